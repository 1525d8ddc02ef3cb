"""The study report: one HTML file with its pictures embedded, and a Markdown summary.

The report is a function of a `StudyResult` alone: it loads no
model and runs no inference (the case figure's pictures were kept by the study). Each table and
figure has its own builder (``results_table``, ``efficiency_figure``, ...); `build_report`
puts them into sections, and two small renderers write the same sections as Markdown and HTML.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from equiseg.data.context import ContextKind
from equiseg.evaluation.bootstrap import Interval, counts_array, score_intervals
from equiseg.evaluation.comparisons import Difference, calibrated_difference, half_width, holm, holm_verdict, plan
from equiseg.evaluation.data_record import DataSource
from equiseg.models import ConvFamily
from equiseg.report.plots import cases_figure, loss_curves_figure, machine_line, markdown_table
from equiseg.report.results import RunResult, StudyResult, TissueResult

METRICS = [("loss", "loss"), ("dice/mean", "Dice"), ("miou", "mIoU"), ("mf1", "mF1")]

CERTIFICATE_NOTE = ("Max over seeds of max|f(Tx) - T f(x)| / max|f(x)| on the probabilities. The round-trip columns: "
                    "||R_-45 f(R_45 x) - f(x)|| / ||f(x)|| on the smoothed test images (quintic-spline rotations, "
                    "central disk), and the same for the identity network, below which no model can be told apart.")

CONTEXT_HEADER = ["variant", "trained with", "compared with", "train fraction", "mF1 without", "mF1 with",
                  "Δ mF1 (paired)", "F1 TC without", "F1 TC with", "Dice without", "Dice with", "mF1 with oracle mask"]


@dataclass(frozen=True)
class Table:
    """A table of formatted cells."""

    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Figure:
    """A PNG figure, written to ``file`` beside the Markdown and embedded in the HTML."""

    file: str
    alt: str
    png: bytes


@dataclass(frozen=True)
class Section:
    """One heading of the report: its paragraphs, then its table, then its figures."""

    title: str
    paragraphs: tuple[str, ...] = ()
    table: Table | None = None
    figures: tuple[Figure, ...] = ()


@dataclass(frozen=True)
class Report:
    title: str
    intro: str
    sections: tuple[Section, ...]


@dataclass(frozen=True)
class ContextComparison:
    """A context variant at one fraction against its sibling without context (same family and
    augmentation; None when the study has none): their runs, and the per-seed change of mF1.
    """

    variant: str
    context: ContextKind
    sibling: str | None
    fraction: float
    with_context: list[RunResult]
    without: list[RunResult]
    paired: list[float]


def write_report(result: StudyResult, out: Path) -> Path:
    """Write ``out/report.html``, ``out/summary.md`` and the figures beside it; returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(result)
    for section in report.sections:
        for figure in section.figures:
            (out / figure.file).write_bytes(figure.png)
    (out / "summary.md").write_text(render_markdown(report))
    (out / "report.html").write_text(render_html(report))
    return out / "report.html"


def build_report(result: StudyResult) -> Report:
    """The report's sections, built from the results."""
    comparisons = context_comparisons(result)
    paired = baseline_comparisons(result)
    full = result.full
    sections = [Section("Reading", tuple(reading(result, comparisons) + paired_reading(result, paired)))]
    if paired:
        sections.append(Section(f"Against {result.baseline}: paired differences with 95 % intervals",
                                (PAIRED_NOTE.format(draws=result.bootstrap, seeds=len(result.seeds),
                                                    images=result.test_images, comparisons=len(paired)),),
                                paired_table(result, paired), (paired_figure(result, paired),)))
    sections.append(Section("Test scores (mean ± std over seeds)", table=results_table(result),
                            figures=(efficiency_figure(result),)))
    if any("pq/mean" in r.scores for r in result.results):
        sections.append(Section("Cells as instances (mean ± std over seeds)", (INSTANCES_NOTE,),
                                instances_table(result)))
    if any(r.best_epoch >= 0 for r in result.results):
        sections.append(Section("Convergence", (CONVERGENCE_NOTE,), convergence_table(result)))
    if result.lr_trials:
        sections.append(Section("Learning rate of each variant (chosen on the validation split)", (LR_NOTE,),
                                lr_table(result)))
    if all(r.robustness for r in result.results):
        sections.append(Section(f"Rotation robustness (training fraction {full:g})", table=robustness_table(result),
                                figures=(robustness_figure(result),)))
    sections.append(Section("Equivariance certificate (max over seeds; relative error of probabilities)",
                            (CERTIFICATE_NOTE,), certificate_table(result)))
    if any(r.tta is not None for r in result.results):
        sections.append(Section("Test-time augmentation", table=tta_table(result)))
    if comparisons:
        sections.append(Section("Tissue context", (context_intro(result.tissue),), context_table(comparisons),
                                (context_figure(comparisons, result.fractions),)))
    cases = cases_picture(result)
    sections.append(Section("Training curves and cases",
                            figures=(loss_curves(result), *(() if cases is None else (cases,)))))
    return Report(f"Study report: {result.study}", intro(result), tuple(sections))


# --- text ---------------------------------------------------------------------------------------


def intro(result: StudyResult) -> str:
    """What was run, on what, where, and how long this invocation took."""
    n_runs = len(result.results)
    return (f"{result.study}: {len(result.variants)} variants x {len(result.fractions)} training fractions x "
            f"{len(result.seeds)} seeds, {result.train_images} training and {result.test_images} test images; data: "
            f"{result.data.describe()}. {time.strftime('%Y-%m-%d %H:%M')}, {machine_line()}, "
            f"{result.minutes:.1f} min for this invocation of the study"
            + (f" ({result.reused} of {n_runs} runs were not trained in their turn but reused: finished by an "
               "earlier invocation, whose training is not in that time, or by this one's learning-rate search)."
               if result.reused else ", training and evaluation of every run."))


def reading(result: StudyResult, comparisons: list[ContextComparison]) -> list[str]:
    """Statements read off the numbers: who leads at each fraction, and whether it is separable."""
    synthetic = "synthetic " if result.data.is_synthetic else ""
    lines = [(f"Each number is a mean over {len(result.seeds)} seeds on {result.test_images} {synthetic}test images; "
              "with so few seeds and images, a difference smaller than about two standard deviations is not "
              "evidence of a difference.")]
    lines += [_leaders(result, f) for f in result.fractions]
    if all(r.robustness for r in result.results):
        # a run that found no cell scores 0 at every angle: flat, but not robust; it is left out
        runs = {v: [r for r in result.runs(v, result.full) if not _found_nothing(r)] for v in result.variants}
        spreads = {v: float(np.mean([_range(_mf1s(r.robustness)) for r in rs])) for v, rs in runs.items() if rs}
        angles = [t.degrees for t in result.results[0].robustness if not t.d4]
        which = "D4" + (" and " + ", ".join(f"{a:g}°" for a in angles) if angles else "")
        if spreads:
            steady, shaky = min(spreads, key=spreads.__getitem__), max(spreads, key=spreads.__getitem__)
            lines.append(f"Under rotation of the test images ({which}) the mF1 of {steady} varies least "
                         f"(mean range {spreads[steady]:.3f}) and that of {shaky} most ({spreads[shaky]:.3f}).")
        failed = [f"{r.variant} seed {r.seed}" for r in result.results
                  if r.fraction == result.full and _found_nothing(r)]
        if failed:
            lines.append(f"Runs that found no cell at all (mF1 0; they did not learn the task) are left out of that "
                         f"comparison: {', '.join(failed)}.")
    lines.append(data_sentence(result))
    verdicts = [_context_verdict(c) for c in comparisons if c.paired]
    if verdicts:
        lines.append(" ".join(verdicts))
    return lines


def data_sentence(result: StudyResult) -> str:
    """What the data says about how far the numbers reach: synthetic only when it was."""
    match result.data.source:
        case DataSource.SYNTHETIC:
            return ("These are synthetic images from one generator: they say how the families compare on a task "
                    "whose classes are decided by appearance and context, not how they rank on real OCELOT slides.")
        case DataSource.FOLDER:
            return (f"The images are those of {result.data.describe()}: the numbers describe its "
                    f"{result.test_images} test images, and reach as far as those images stand for others.")
    return ("Which data these runs used was not recorded (their results.json was written before equiseg recorded "
            "it): see the study's own notes for it.")


def _leaders(result: StudyResult, fraction: float) -> str:
    """Who has the highest and lowest mean mF1 at ``fraction``, and whether the lead exceeds the spread."""
    stats = {v: _stats([r.scores.get("mf1") for r in result.runs(v, fraction)]) for v in result.variants}
    ranked = sorted(result.variants, key=lambda v: -stats[v][0])
    best, mb, sb = ranked[0], *stats[ranked[0]]
    text = (f"At training fraction {fraction:g} ({result.train_count(fraction)} images) the highest mean "
            f"mF1 is {best} ({mb:.3f} ± {sb:.3f})")
    if len(ranked) > 1:
        second, (ms, ss) = ranked[1], stats[ranked[1]]
        separable = (mb - ms) > 2 * max(sb, ss, 1e-9)
        text += (f", ahead of {second} ({ms:.3f} ± {ss:.3f})"
                 + ("." if separable else ", a gap within the seed-to-seed spread."))
    worst, (mw, sw) = ranked[-1], stats[ranked[-1]]
    return text + f" Lowest: {worst} ({mw:.3f} ± {sw:.3f})."


def _context_verdict(c: ContextComparison) -> str:
    mean, std = _stats(c.paired)
    verdict = ("helped" if mean > 2 * std else "hurt" if mean < -2 * std
               else "made no difference beyond the seed-to-seed spread")
    return (f"Tissue context {verdict} at fraction {c.fraction:g} for {c.variant} against {c.sibling}: mF1 "
            f"{mean:+.3f} ± {std:.3f} (paired by seed).")


def context_intro(tissue: TissueResult | None) -> str:
    """How the tissue-context table compares, and the tissue model's own scores."""
    text = ("Each variant with tissue context against the variant of the same family and augmentation without it. "
            "'with' is scored with the tissue model's predicted probabilities as context (what a submitted model "
            "has); 'oracle mask' feeds the ground-truth tissue mask instead. Δ is the mean ± std over seeds of the "
            "per-seed difference (same seed, same training crops).")
    if tissue:
        text += (f" The tissue model ({tissue.family.value}, width {tissue.width}, {tissue.parameters:,} "
                 f"parameters, shared by all context variants) scores Dice {tissue.scores['dice/mean']:.3f} and mIoU "
                 f"{tissue.scores['miou']:.3f} on the test tissue patches.")
    return text


# --- tables -------------------------------------------------------------------------------------


def results_table(result: StudyResult) -> Table:
    """Test scores of every variant at every fraction, mean ± std over seeds."""
    rows = []
    for v in result.variants:
        for f in result.fractions:
            runs = result.runs(v, f)
            rows.append([v, runs[0].augment, f"{runs[0].parameters:,}",
                         f"{f:g} ({result.train_count(f)} images)"]
                        + [_pm([r.scores.get(key) for r in runs]) for key, _ in METRICS])
    return Table(["variant", "augment", "params", "train fraction"] + [label for _, label in METRICS], rows)


INSTANCES_NOTE = ("Variants that give each cell as a nucleus instance, on the test split's instance labels: a "
                  "one-stage variant (nuclei: a U-Net with a nucleus output, instances grown from its cells) and a "
                  "two-stage variant (stage2: its U-Net proposes the cells, a stage-2 network segments and "
                  "classifies each in its window). mF1 here is of the instances' centroids; PQ mean is CoNIC's "
                  "mPQ+ (counts summed over the split), PQ all matches nuclei whatever their class; blended is the "
                  "share of a one-stage variant's instances whose pixels mix BC and TC in its class map (a two-stage "
                  "variant has one class per instance by construction). A two-stage variant's parameters count "
                  "both stages; its Dice, mIoU, robustness and certificate elsewhere in the report are its "
                  "stage 1's, its mF1 everywhere its instances' centroids'.")


def instances_table(result: StudyResult) -> Table:
    """The instance scores of the variants that have them, at every training set."""
    rows = []
    for v in result.variants:
        for f in result.fractions:
            runs = [r for r in result.runs(v, f) if "pq/mean" in r.scores]
            if not runs:
                continue
            kind = "one-stage" if "instances/mf1" in runs[0].scores else "two-stage"
            centroids = [r.scores.get("instances/mf1", r.scores.get("mf1")) for r in runs]
            rows.append([v, kind, f"{runs[0].parameters:,}", str(result.train_count(f)), _pm(centroids)]
                        + [_mean_pm(runs, key) for key in ("pq/mean", "pq/all", "aji", "blended")])
    return Table(["variant", "model", "params", "training images", "mF1 (centroids)", "PQ mean", "PQ all", "AJI",
                  "blended"], rows)


def robustness_table(result: StudyResult) -> Table:
    """How much mF1 moves under the D4 elements and under all transforms (full fraction)."""
    rows = []
    for v in result.variants:
        runs = result.runs(v, result.full)
        rows.append([v, _pm([_range(_mf1s(t for t in r.robustness if t.d4)) for r in runs]),
                     _pm([_range(_mf1s(r.robustness)) for r in runs]),
                     _pm([min(_mf1s(r.robustness), default=math.nan) for r in runs])])
    n = len(result.results[0].robustness)
    return Table(["variant", "mF1 spread over D4", f"mF1 spread over all {n} transforms", "worst mF1"], rows)


def certificate_table(result: StudyResult) -> Table:
    """Measured equivariance errors, max over seeds (full fraction)."""
    rows = []
    for v in result.variants:
        runs = result.runs(v, result.full)
        tests = [r.certificate.test for r in runs]
        reals = [r.certificate.real or {} for r in runs]
        exact = "- (D4 measured)" if runs[0].family is ConvFamily.PLAIN else runs[0].certificate.group
        rows.append([v, exact, _max([t.get("group") for t in tests]), _max([x.get("group") for x in reals]),
                     _max([t.get("rot45") for t in tests]), _max([x.get("rot45") for x in reals]),
                     _max([t.get("arb45") for t in tests]), _max([t.get("floor45") for t in tests])])
    return Table(["variant", "exact for", "test images, group", "real image, group", "test images, 45°",
                  "real image, 45°", "45° round trip (L2)", "its resampling floor"], rows)


def tta_table(result: StudyResult) -> Table:
    """Scores and test-set time without and (plain models) with D4 test-time augmentation."""
    rows = []
    for v in result.variants:
        runs = result.runs(v, result.full)
        row = [v, _pm([r.scores.get("mf1") for r in runs]), _pm([r.scores.get("dice/mean") for r in runs]),
               f"{_stats([r.seconds for r in runs])[0]:.2f} s"]
        if runs[0].tta is None:
            row += ["", "", ""]
        else:
            ttas = [r.tta for r in runs if r.tta is not None]
            row += [_pm([t.scores.get("mf1") for t in ttas]), _pm([t.scores.get("dice/mean") for t in ttas]),
                    f"{_stats([t.seconds for t in ttas])[0]:.2f} s"]
        rows.append(row)
    return Table(["variant", "mF1", "Dice", "test-set time", "mF1 with D4 TTA", "Dice with D4 TTA", "time with TTA"],
                 rows)


def context_comparisons(result: StudyResult) -> list[ContextComparison]:
    """Each context variant at each fraction against its sibling without context."""
    first = {v: result.runs(v, result.fractions[0])[0] for v in result.variants}
    out = []
    for v in result.variants:
        if first[v].context is ContextKind.NONE:
            continue
        sibling = next((w for w in result.variants if first[w].context is ContextKind.NONE
                        and first[w].family is first[v].family and first[w].augment == first[v].augment), None)
        for f in result.fractions:
            runs = result.runs(v, f)
            base = {r.seed: r for r in result.runs(sibling, f)} if sibling else {}
            paired = [r.scores["mf1"] - base[r.seed].scores["mf1"] for r in runs if r.seed in base]
            out.append(ContextComparison(v, first[v].context, sibling, f, runs, list(base.values()), paired))
    return out


def context_table(comparisons: list[ContextComparison]) -> Table:
    """Scores with and without tissue context, the paired change, and the oracle's mF1."""
    rows = []
    for c in comparisons:
        rows.append([c.variant, c.context.value, c.sibling or "-", f"{c.fraction:g}", _mean_pm(c.without, "mf1"),
                     _mean_pm(c.with_context, "mf1"), _pm(c.paired, signed=True) if c.paired else "-",
                     _mean_pm(c.without, "f1/TC"), _mean_pm(c.with_context, "f1/TC"),
                     _mean_pm(c.without, "dice/mean"), _mean_pm(c.with_context, "dice/mean"),
                     _pm([r.oracle.get("mf1") if r.oracle else None for r in c.with_context])])
    return Table(CONTEXT_HEADER, rows)


# --- figures ------------------------------------------------------------------------------------


def efficiency_figure(result: StudyResult) -> Figure:
    """mF1 and Dice against the training fraction (log scale), mean ± std over seeds."""
    fractions = result.fractions
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, v in enumerate(result.variants):
        for ax, key in zip(axes, ("mf1", "dice/mean")):
            stats = [_stats([r.scores.get(key) for r in result.runs(v, f)]) for f in fractions]
            ax.errorbar(fractions, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
                        color=f"C{k}", label=v)
    for ax, label in zip(axes, ("OCELOT mF1", "Dice (mean over classes)")):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.set_xlabel("fraction of the training split")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Data efficiency (mean ± std over {len(result.seeds)} seeds)")
    fig.tight_layout()
    return Figure("data_efficiency.png", "data efficiency", _png(fig))


def robustness_figure(result: StudyResult) -> Figure:
    """mF1 and Dice against the rotation of the test images (no flips), full fraction, mean over seeds; and,
    where the certificates hold it, the arbitrary-angle equivariance error of the probabilities against the
    angle, with the resampling floor (the identity network's error on the same smoothed test images).
    """
    turns = sorted((t for t in result.results[0].robustness if not t.flip), key=lambda t: t.degrees)
    full = [r for v in result.variants for r in result.runs(v, result.full)]
    angles = sorted({t.degrees for t in turns if not t.d4 and all(f"arb{t.degrees:g}" in r.certificate.test
                                                                   for r in full)})
    if any(not t.d4 for t in turns):  # a curve over free angles: up to the first quarter turn (the rest is D4's)
        turns = [t for t in turns if t.degrees <= 90]
    fig, axes = plt.subplots(1, 3 if angles else 2, figsize=(15 if angles else 10, 4))
    for k, v in enumerate(result.variants):
        runs = [{t.name: t.scores for t in r.robustness} for r in result.runs(v, result.full)]
        for ax, key in zip(axes, ("mf1", "dice/mean")):
            means = [_stats([scores[t.name].get(key) for scores in runs])[0] for t in turns]
            ax.plot([t.degrees for t in turns], means, marker="o", color=f"C{k}", label=v)
        if angles:
            tests = [r.certificate.test for r in result.runs(v, result.full)]
            axes[2].plot(angles, [_stats([t[f"arb{a:g}"] for t in tests])[0] for a in angles], marker="o",
                         color=f"C{k}", label=v)
    for ax, label in zip(axes, ("OCELOT mF1", "Dice")):
        ax.set_xlabel("rotation of the test images (degrees, counter-clockwise)")
        ax.set_ylabel(label)
        ax.set_xticks([t.degrees for t in turns], [f"{t.degrees:g}" for t in turns])
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3)
    if angles:
        floor = [_stats([r.certificate.test[f"floor{a:g}"] for r in full])[0] for a in angles]
        axes[2].plot(angles, floor, linestyle="--", color="black", label="resampling floor (identity)")
        axes[2].set_yscale("log")
        axes[2].set_xlabel("rotation (degrees)")
        axes[2].set_ylabel("relative L2 error of the probabilities")
        axes[2].set_title("R_-θ f(R_θ x) against f(x), smoothed test images", fontsize=9)
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Rotation robustness (training fraction {result.full:g}, mean over {len(result.seeds)} seeds)")
    fig.tight_layout()
    return Figure("robustness.png", "robustness", _png(fig))


def context_figure(comparisons: list[ContextComparison], fractions: list[float]) -> Figure:
    """Per context variant and fraction: the mean change of mF1 from context (bar) and each seed's (dots)."""
    pairs = {(c.variant, c.fraction): c.paired for c in comparisons if c.paired}
    variants = list(dict.fromkeys(c.variant for c in comparisons))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(variants), 3.6))
    step = 0.8 / len(fractions)
    for k, f in enumerate(fractions):
        xs = [i - 0.4 + step * (k + 0.5) for i in range(len(variants))]
        values = [pairs.get((v, f), []) for v in variants]
        ax.bar(xs, [float(np.mean(d)) if d else 0.0 for d in values], width=step * 0.9, color=f"C{k}", alpha=0.6,
               label=f"fraction {f:g}")
        for x, d in zip(xs, values):
            ax.plot([x] * len(d), d, "k.", markersize=5)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(variants)), variants)
    ax.set_ylabel("mF1 with context - without")
    ax.set_title("Tissue context: change of mF1, paired by seed (dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return Figure("context.png", "context", _png(fig))


def loss_curves(result: StudyResult) -> Figure:
    """Training and validation loss of each variant's first run at the full fraction."""
    runs = {v: Path(result.runs(v, result.full)[0].run_dir) for v in result.variants}
    return Figure("loss_curves.png", "loss curves", _png(loss_curves_figure(runs), dpi=120))


def cases_picture(result: StudyResult) -> Figure | None:
    """The best and worst test image of each variant's first run at the full fraction, as the study kept
    them; None when no run kept any.
    """
    cases = [{"title": f"{v}: {case.kind} ({case.image_id}, Dice {case.dice:.2f})", "image": picture.image,
              "probs": picture.probs, "points": picture.points, "gt": picture.gt}
             for v in result.variants for case, picture in result.runs(v, result.full)[0].case_pictures()]
    return Figure("cases.png", "cases", _png(cases_figure(cases), dpi=100)) if cases else None


# --- renderers ----------------------------------------------------------------------------------


def render_markdown(report: Report) -> str:
    """The report as Markdown, its figures referenced by file name."""
    lines = [f"# {report.title}", "", report.intro, ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        if section.table is not None:
            lines += [markdown_table(section.table.header, section.table.rows), ""]
        for figure in section.figures:
            lines += [f"![{figure.alt}]({figure.file})", ""]
    return "\n".join(lines)


HTML_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
              "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 8px}"
              "th{background:#f3f3f3}img{max-width:100%}")


def render_html(report: Report) -> str:
    """The report as one HTML page, its figures embedded."""
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>"
              f"<style>{HTML_STYLE}</style></head><body><h1>{html.escape(report.title)}</h1>"),
             f"<p>{html.escape(report.intro)}</p>"]
    for section in report.sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
        if section.table is not None:
            parts.append(_html_table(section.table))
        parts += [f'<img alt="{html.escape(f.alt)}" src="data:image/png;base64,{base64.b64encode(f.png).decode()}">'
                  for f in section.figures]
    return "".join(parts) + "</body></html>\n"


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --- paired comparisons with a baseline ---------------------------------------------------------

PAIRED_NOTE = ("Each variant against the baseline trained with the same seeds on the same training images and "
               "tested on the same images. The scores' intervals: 95 % percentile intervals of a bootstrap that "
               "resamples seeds and test images together ({draws} draws over {seeds} seeds and {images} test images; "
               "equiseg.evaluation.bootstrap). The difference's interval is calibrated for few seeds: the variance of "
               "a bootstrap over the seeds and of one over the test images, each times n / (n - 1), with a t "
               "quantile of Welch-Satterthwaite degrees of freedom (equiseg.evaluation.comparisons; it covered a "
               "known difference about 95 % of the time at 3 to 5 seeds in a simulation, where the percentile "
               "interval covered 75-82 %). Beside it, the seed-level paired t-interval (each seed's difference on "
               "the whole test set: the test images held fixed). p: the two-sided p-value of no difference; "
               "Holm: adjusted by Holm's step-down over the study's {comparisons} mF1 comparisons. A verdict only "
               "where the Holm-adjusted p is below 0.05; 'resolves' is half the calibrated interval's width.")
CONVERGENCE_NOTE = ("Each run trains until its validation loss stops improving (train.early_stopping) or its epoch "
                    "budget ends; the checkpoint scored is the one of its lowest validation loss (with train.select=mf1, "
                    "of its highest validation mF1). A run is counted "
                    "unconverged when its best epoch was its last, however it ended (with train.select=mf1 early "
                    "stopping can end a run whose validation mF1 still rises), or when it ran to its budget with its "
                    "best epoch within the early-stopping patience of its end (it might have improved further).")
LR_NOTE = ("Each variant without a stated rate trained once per rate on the largest training set (first seed); the "
           "rate with the lowest validation loss is used for all its runs. A stated rate is used as it is.")


@dataclass(frozen=True)
class PairedComparison:
    """A variant against the study's baseline at one training set: each one's mF1 and per-class
    F1 with intervals, and their paired difference (variant minus baseline), calibrated for few seeds, with
    its Holm-adjusted p-value over the study's comparisons.
    """

    variant: str
    fraction: float
    images: int
    scores: dict[str, Interval]
    baseline: dict[str, Interval]
    calibrated: dict[str, Difference]
    holm_p: float = 1.0

    @property
    def mf1(self) -> Difference:
        """The calibrated difference of mF1 (variant minus baseline)."""
        return self.calibrated["mf1"]

    @property
    def verdict(self) -> str:
        """"higher", "lower" or "not resolved" after Holm's correction over the study's comparisons."""
        return holm_verdict(self.mf1, self.holm_p)


def _counts(runs: list[RunResult]) -> np.ndarray | None:
    """(seeds, images, classes, 3) counts of ``runs`` in seed order; None if a run lacks them."""
    try:
        return counts_array([list(r.per_image) for r in sorted(runs, key=lambda r: r.seed)])
    except KeyError:
        return None


def baseline_comparisons(result: StudyResult) -> list[PairedComparison]:
    """Every variant against ``result.baseline`` at every training set, over their common seeds."""
    if result.baseline is None or result.baseline not in result.variants:
        return []
    out = []
    for f in result.fractions:
        base_runs = {r.seed: r for r in result.runs(result.baseline, f)}
        for v in result.variants:
            if v == result.baseline:
                continue
            runs = {r.seed: r for r in result.runs(v, f) if r.seed in base_runs}
            a, b = _counts(list(runs.values())), _counts([base_runs[seed] for seed in runs])
            if a is None or b is None or not len(a):
                continue
            out.append(PairedComparison(v, f, result.train_count(f), score_intervals(a, result.bootstrap),
                                        score_intervals(b, result.bootstrap),
                                        calibrated_difference(a, b, result.bootstrap)))
    adjusted = holm([c.mf1.p for c in out])
    return [dataclasses.replace(c, holm_p=p) for c, p in zip(out, adjusted, strict=True)]


def _interval(i: Interval, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{i.estimate:{sign}.3f} [{i.low:{sign}.3f}, {i.high:{sign}.3f}]"


def paired_table(result: StudyResult, paired: list[PairedComparison]) -> Table:
    rows = [[str(c.images), c.variant, _interval(c.scores["mf1"]), _interval(c.baseline["mf1"]),
             _interval(c.mf1.interval, signed=True),
             _interval(c.mf1.seed_interval, signed=True) if c.mf1.seed_interval is not None else "-",
             f"{c.mf1.p:.3f}", f"{c.holm_p:.3f}", c.verdict, f"± {c.mf1.interval.half_width:.3f}",
             _interval(c.calibrated["f1/BC"].interval, signed=True),
             _interval(c.calibrated["f1/TC"].interval, signed=True)] for c in paired]
    return Table(["training images", "variant", "mF1", f"mF1 of {result.baseline}", "Δ mF1 (seeds and images)",
                  "Δ mF1 (seeds, t)", "p", "p (Holm)", "verdict (Holm)", "resolves", "Δ F1 BC", "Δ F1 TC"], rows)


def paired_reading(result: StudyResult, paired: list[PairedComparison], target: float = 0.05) -> list[str]:
    """What the paired comparisons say after Holm's correction (and which verdicts it takes back), whether
    the design resolves ``target`` mF1, and the seeds a design would need to (`study_plan`).
    """
    if not paired:
        return []
    lines = []
    for f in result.fractions:
        here = [c for c in paired if c.fraction == f]
        if not here:
            continue
        resolved = [c for c in here if c.verdict != "not resolved"]
        parts = [f"{c.variant} {c.verdict} by {abs(c.mf1.estimate):.3f} [{c.mf1.interval.low:+.3f}, "
                 f"{c.mf1.interval.high:+.3f}] (Holm p {c.holm_p:.3f})" for c in resolved]
        text = f"With {here[0].images} training images, against {result.baseline}: "
        text += ("; ".join(parts) + "." if parts else "no difference in mF1 is resolved after Holm's correction.")
        taken_back = [c for c in here if c.verdict == "not resolved" and c.mf1.p < 0.05]
        if taken_back:
            text += (" Unadjusted, " + ", ".join(f"{c.variant} (p {c.mf1.p:.3f})" for c in taken_back)
                     + " would read as a difference; Holm's correction over the study's comparisons takes it back.")
        unresolved = [c for c in here if c not in resolved]
        if unresolved:
            text += (f" Not resolved: {', '.join(c.variant for c in unresolved)} (the design resolves about "
                     f"± {np.mean([c.mf1.interval.half_width for c in unresolved]):.3f} here).")
        lines.append(text)
    widths = [c.mf1.interval.half_width for c in paired]
    lines.append(f"The design resolves mF1 differences of {min(widths):.3f} to {max(widths):.3f} (half-widths of the "
                 f"calibrated intervals): " + (f"a difference of {target:g} is resolved everywhere." if max(widths)
                                               <= target else
                                               f"a difference of {target:g} is resolved where the half-width is "
                                               f"below it, which holds for {sum(w <= target for w in widths)} of "
                                               f"{len(paired)} comparisons."))
    return lines + against_plan(result, paired) + study_plan(result, paired, target)


def against_plan(result: StudyResult, paired: list[PairedComparison]) -> list[str]:
    """The half-widths reached beside the one the study was sized for (its config's ``plan``), if it has one."""
    if result.plan is None:
        return []
    planned = result.plan
    expected = half_width(planned.sigma_seed, planned.sigma_image, len(result.seeds), result.test_images)
    widths = [c.mf1.interval.half_width for c in paired]
    source = f" ({planned.source})" if planned.source else ""
    return [f"Against its plan: sized with σ seed {planned.sigma_seed:.3f} and σ image {planned.sigma_image:.3f}"
            f"{source} to resolve {planned.target:g} with {planned.power:.0%} power after Holm, its {len(result.seeds)} "
            f"seeds and {result.test_images} test images were expected to give intervals of ± {expected:.3f}; they "
            f"reached ± {min(widths):.3f} to ± {max(widths):.3f} (median ± {float(np.median(widths)):.3f})."]


def variance_components(paired: list[PairedComparison]) -> tuple[float, float]:
    """(σ seed, σ image) of a study's mF1 differences: the medians over its comparisons (`Difference`)."""
    return (float(np.median([c.mf1.sigma_seed for c in paired])),
            float(np.median([c.mf1.sigma_image for c in paired])))


def plan_rows(result: StudyResult, paired: list[PairedComparison], target: float = 0.05,
              target_power: float = 0.8, comparisons: int | None = None,
              images: tuple[int, ...] = ()) -> list[dict]:
    """For each number of test images (default: the study's, twice and four times it), the seeds that a
    half-width of ``target`` and ``target_power`` to resolve a true difference of ``target`` need after Holm
    over ``comparisons`` (default: the study's), from the study's variance components; None for more
    than 1000.
    """
    sigma_seed, sigma_image = variance_components(paired)
    m = comparisons or len(paired)
    rows = []
    for count in images or (result.test_images, 2 * result.test_images, 4 * result.test_images):
        width = plan(sigma_seed, sigma_image, count, target_half_width=target, comparisons=m)
        powered = plan(sigma_seed, sigma_image, count, difference=target, target_power=target_power, comparisons=m)
        rows.append({"test_images": count, "comparisons": m, "sigma_seed": sigma_seed, "sigma_image": sigma_image,
                     "seeds_for_half_width": width.seeds if width else None,
                     "seeds_for_power": powered.seeds if powered else None, "target": target,
                     "power": target_power})
    return rows


def study_plan(result: StudyResult, paired: list[PairedComparison], target: float = 0.05,
               target_power: float = 0.8) -> list[str]:
    """The seeds this study's variance components (median over its comparisons) would need for ``target``:
    a half-width of it, and a true difference of it resolved with ``target_power`` after Holm (Bonferroni,
    its strictest step, over the study's comparisons), at its own number of test images and at four times it.
    """
    rows = plan_rows(result, paired, target, target_power, images=(result.test_images, 4 * result.test_images))
    parts = [f"with {r['test_images']} test images, {r['seeds_for_half_width'] or 'more than 1000'} seeds for a "
             f"half-width of ± {target:g} and {r['seeds_for_power'] or 'more than 1000'} for {target_power:.0%} power "
             f"to resolve a true difference of {target:g}" for r in rows]
    return [f"Plan: the variance components here (median over the comparisons: σ seed {rows[0]['sigma_seed']:.3f}, "
            f"σ image {rows[0]['sigma_image']:.3f} mF1; Var(Δ) = σ seed² / seeds + σ image² / images) and Holm over "
            f"{len(paired)} comparisons need, {'; '.join(parts)} (this study: {len(result.seeds)} seeds, "
            f"{result.test_images} test images)."]


def paired_figure(result: StudyResult, paired: list[PairedComparison]) -> Figure:
    """mF1 of every variant against the number of training images (95 % intervals), and each
    variant's paired difference to the baseline.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    variants = [result.baseline, *dict.fromkeys(c.variant for c in paired)]
    for k, v in enumerate(variants):
        own = [c for c in paired if c.variant == v] if v != result.baseline else []
        if v == result.baseline:
            points = {c.images: c.baseline["mf1"] for c in paired}
        else:
            points = {c.images: c.scores["mf1"] for c in own}
        xs = sorted(points)
        axes[0].plot(xs, [points[x].estimate for x in xs], marker="o", color=f"C{k}", label=v)
        axes[0].fill_between(xs, [points[x].low for x in xs], [points[x].high for x in xs], color=f"C{k}", alpha=0.15)
        if own:
            diffs = {c.images: c.mf1.interval for c in own}
            xs = sorted(diffs)
            axes[1].errorbar(xs, [diffs[x].estimate for x in xs],
                             yerr=[[diffs[x].estimate - diffs[x].low for x in xs],
                                   [diffs[x].high - diffs[x].estimate for x in xs]],
                             marker="o", capsize=3, color=f"C{k}", label=v)
    axes[1].axhline(0, color="black", lw=0.8)
    for ax, label in zip(axes, ("OCELOT mF1 (mean over seeds)", f"Δ mF1 against {result.baseline} (paired)")):
        ax.set_xscale("log", base=2)
        ticks = sorted({c.images for c in paired})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("training images")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Data scarcity: 95 % bootstrap intervals over {len(result.seeds)} seeds and "
                 f"{result.test_images} test images")
    fig.tight_layout()
    return Figure("scarcity.png", "mF1 against training images, with intervals", _png(fig))


def convergence_table(result: StudyResult) -> Table:
    rows = []
    for v in result.variants:
        for f in result.fractions:
            runs = result.runs(v, f)
            rows.append([v, str(result.train_count(f)), f"{runs[0].lr:g}",
                         ", ".join(str(r.best_epoch + 1) for r in runs),
                         ", ".join(str(r.epochs_trained) for r in runs),
                         f"{sum(not r.converged for r in runs)} of {len(runs)}"])
    return Table(["variant", "training images", "lr", "best epoch (per seed)", "epochs trained",
                  "unconverged"], rows)


def lr_table(result: StudyResult) -> Table:
    rows = [[t.variant, f"{t.lr:g}", f"{t.val_loss:.4f}", str(t.best_epoch + 1), "chosen" if t.chosen else ""]
            for t in result.lr_trials]
    searched = {t.variant for t in result.lr_trials}
    stated = {r.variant: r.lr for r in result.results if r.variant not in searched}
    rows += [[variant, f"{lr:g}", "", "", "stated (not searched)"] for variant, lr in stated.items()]
    return Table(["variant", "lr", "lowest validation loss", "at epoch", ""], rows)


# --- numbers ------------------------------------------------------------------------------------


def _finite(values) -> list[float]:
    """The values that are numbers: a score that could not be computed is None or NaN."""
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def _stats(values) -> tuple[float, float]:
    """Mean and sample std (0 for one value; NaN for none) of the finite values."""
    arr = np.array(_finite(values), float)
    if not len(arr):
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _pm(values, signed: bool = False) -> str:
    mean, std = _stats(values)
    return "-" if math.isnan(mean) else f"{mean:+.3f} ± {std:.3f}" if signed else f"{mean:.3f} ± {std:.3f}"


def _mean_pm(runs: list[RunResult], key: str) -> str:
    """Score ``key`` over ``runs`` as mean ± std; '-' without runs."""
    return _pm([r.scores.get(key) for r in runs]) if runs else "-"


def _found_nothing(run: RunResult) -> bool:
    """The run's test mF1 is exactly 0: it detected no cell, or none right."""
    mf1 = run.scores.get("mf1")
    return mf1 is not None and not math.isnan(mf1) and mf1 == 0


def _mf1s(transforms) -> list[float]:
    return _finite(t.scores.get("mf1") for t in transforms)


def _range(values) -> float:
    values = _finite(values)
    return max(values) - min(values) if values else math.nan


def _max(values) -> str:
    values = _finite(values)
    return f"{max(values):.1e}" if values else "-"


def _png(fig: matplotlib.figure.Figure, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()
