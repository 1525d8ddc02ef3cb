"""The study report: one HTML file with its pictures embedded, and a Markdown summary."""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from equiseg.data.datamodule import model_input
from equiseg.data.ocelot import OcelotFolder
from equiseg.evaluation.detection import find_cells
from equiseg.evaluation.inference import predict_probabilities
from equiseg.evaluation.tissue_context import run_context
from equiseg.report.plots import best_and_worst, machine_line, plot_cases, plot_loss_curves
from equiseg.runs import load_model
from equiseg.runtime import Runtime

METRICS = [("loss", "loss"), ("dice/mean", "Dice"), ("miou", "mIoU"), ("mf1", "mF1")]


def _stats(values: list[float]) -> tuple[float, float]:
    arr = np.array([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], float)
    if not len(arr):
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _pm(values: list[float], signed: bool = False) -> str:
    mean, std = _stats(values)
    return "-" if math.isnan(mean) else f"{mean:+.3f} ± {std:.3f}" if signed else f"{mean:.3f} ± {std:.3f}"


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_report(study, results: list[dict], root: Path, out: Path, minutes: float, tissue: dict | None = None,
                 reused: int = 0, context_for: Callable | None = None, runtime: Runtime | None = None) -> Path:
    """Write ``out/report.html`` and ``out/summary.md``; returns the HTML path.

    ``minutes``: the time of this invocation, of which ``reused`` runs were finished before it.
    ``context_for(config)``: the evaluation context of a run (the study's, shared between runs);
    by default each context run's own tissue model is loaded again for the case figure.
    ``runtime``: where the case figure's models run (default: the CPU).

    ``tissue``: the tissue model's summary (``equiseg.study.evaluate_tissue``) when variants use context.
    """
    out.mkdir(parents=True, exist_ok=True)
    variants = list(dict.fromkeys(r["variant"] for r in results))
    fractions = sorted({r["fraction"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    by = defaultdict(list)
    for r in results:
        by[r["variant"], r["fraction"]].append(r)
    full = max(fractions)
    n_train = _count(root, "train")
    n_test = _count(root, "test")

    # 1. the main table
    header = ["variant", "augment", "params", "train fraction"] + [label for _, label in METRICS]
    rows = []
    for v in variants:
        for f in fractions:
            runs = by[v, f]
            rows.append([v, runs[0]["augment"], f"{runs[0]['parameters']:,}", f"{f:g} ({round(f * n_train)} images)"]
                        + [_pm([r["scores"].get(key) for r in runs]) for key, _ in METRICS])

    # 2. data efficiency
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, v in enumerate(variants):
        for ax, key in zip(axes, ("mf1", "dice/mean")):
            stats = [_stats([r["scores"].get(key) for r in by[v, f]]) for f in fractions]
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
    fig.suptitle(f"Data efficiency (mean ± std over {len(seeds)} seeds)")
    fig.tight_layout()
    efficiency_png = _figure_png(fig)

    # 3. robustness (at the full fraction): score against rotation angle, and the spread
    quarter_turns = [("rot90", 90.0), ("rot180", 180.0), ("rot270", 270.0)]
    rotations = [("rot0", 0.0), *((f"rot{a:g}", a) for a in study.angles), *quarter_turns]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    spread_rows = []
    for k, v in enumerate(variants):
        runs = by[v, full]
        for ax, key in zip(axes, ("mf1", "dice/mean")):
            means = [_stats([r["robustness"][name].get(key) for r in runs])[0] for name, _ in rotations]
            ax.plot([a for _, a in rotations], means, marker="o", color=f"C{k}", label=v)
        d4 = [n for n in runs[0]["robustness"] if not n.startswith("rot") or n in ("rot0", "rot90", "rot180", "rot270")]
        spread_d4 = [_range([r["robustness"][n].get("mf1") for n in d4]) for r in runs]
        spread_all = [_range([s.get("mf1") for s in r["robustness"].values()]) for r in runs]
        worst = [min(s.get("mf1") for s in r["robustness"].values()) for r in runs]
        spread_rows.append([v, _pm(spread_d4), _pm(spread_all), _pm(worst)])
    for ax, label in zip(axes, ("OCELOT mF1", "Dice")):
        ax.set_xlabel("rotation of the test images (degrees, counter-clockwise)")
        ax.set_ylabel(label)
        ax.set_xticks([a for _, a in rotations])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Rotation robustness (training fraction {full:g}, mean over {len(seeds)} seeds)")
    fig.tight_layout()
    robustness_png = _figure_png(fig)

    # 4. certificate
    cert_rows = []
    for v in variants:
        runs = by[v, full]
        group = runs[0]["certificate"]["group"]
        real = [r["certificate"].get("real", {}) for r in runs]
        cert_rows.append([v, group if runs[0]["family"] != "plain" else "- (D4 measured)",
                          _max([r["certificate"]["test"]["group"] for r in runs]),
                          _max([x.get("group") for x in real]),
                          _max([r["certificate"]["test"].get("rot45") for r in runs]),
                          _max([x.get("rot45") for x in real])])

    # 5. TTA
    tta_rows = []
    for v in variants:
        runs = by[v, full]
        base_seconds = _stats([r["seconds"] for r in runs])[0]
        tta_rows.append([v, _pm([r["scores"].get("mf1") for r in runs]), _pm([r["scores"]["dice/mean"] for r in runs]),
                         f"{base_seconds:.2f} s", "" if "tta" not in runs[0] else _pm([r["tta"]["scores"].get("mf1")
                                                                                         for r in runs]),
                         "" if "tta" not in runs[0] else _pm([r["tta"]["scores"]["dice/mean"] for r in runs]),
                         "" if "tta" not in runs[0] else f"{_stats([r['tta']['seconds'] for r in runs])[0]:.2f} s"])

    # 6. pictures: loss curves and cases (full fraction, first seed)
    curves_path = plot_loss_curves({v: Path(by[v, full][0]["run_dir"]) for v in variants}, out / "loss_curves.png")
    cases_path = _cases(by, variants, full, root, out / "cases.png", context_for, runtime)

    # 7. tissue context: each context variant against its family's variant without context
    context_rows, context_lines, context_pairs = _context_comparison(variants, fractions, by)
    context_png = _context_figure(context_pairs, fractions) if context_pairs else None

    reading = _reading(variants, fractions, by, full, len(seeds), n_train, n_test)
    if context_lines:
        reading += "\n\n" + " ".join(context_lines)
    machine = machine_line()
    stamp = time.strftime("%Y-%m-%d %H:%M")
    tables = {
        "results": (header, rows),
        "robustness": (["variant", "mF1 spread over D4", "mF1 spread over all 11 transforms", "worst mF1"],
                       spread_rows),
        "certificate": (["variant", "exact for", "test images, group", "real image, group", "test images, 45°",
                         "real image, 45°"], cert_rows),
        "tta": (["variant", "mF1", "Dice", "test-set time", "mF1 with D4 TTA", "Dice with D4 TTA", "time with TTA"],
                tta_rows),
    }
    context_intro = ""
    if context_rows:
        tables["context"] = (CONTEXT_HEADER, context_rows)
        context_intro = _context_intro(tissue)
    intro = (f"{study.name}: {len(variants)} variants x {len(fractions)} training fractions x {len(seeds)} seeds, "
             f"{n_train} training and {n_test} test images of the synthetic world. {stamp}, {machine}, "
             f"{minutes:.1f} min for this invocation of the study"
             + (f" ({reused} of {len(results)} runs were finished earlier and reused; their training is not in "
                f"that time)." if reused else ", training and evaluation of every run."))
    md = [f"# Study report: {study.name}", "", intro, "", "## Reading", "", reading, "",
          "## Test scores (mean ± std over seeds)", "", _md(*tables["results"]), "",
          "![data efficiency](data_efficiency.png)", "",
          "## Rotation robustness (training fraction 1)", "", _md(*tables["robustness"]), "",
          "![robustness](robustness.png)", "",
          "## Equivariance certificate (max over seeds; relative error of probabilities)", "",
          _md(*tables["certificate"]), "", "## Test-time augmentation", "", _md(*tables["tta"]), "",
          *(["## Tissue context", "", context_intro, "", _md(*tables["context"]), "", "![context](context.png)", ""]
            if context_rows else []),
          "## Training curves and cases", "", "![loss curves](loss_curves.png)", "", "![cases](cases.png)", ""]
    (out / "data_efficiency.png").write_bytes(efficiency_png)
    (out / "robustness.png").write_bytes(robustness_png)
    if context_png is not None:
        (out / "context.png").write_bytes(context_png)
    (out / "summary.md").write_text("\n".join(md))
    images = {"efficiency": efficiency_png, "robustness": robustness_png, "curves": curves_path.read_bytes(),
              "cases": cases_path.read_bytes(), **({"context": context_png} if context_png is not None else {})}
    page = _html(study.name, intro, reading, tables, images, context_intro)
    (out / "report.html").write_text(page)
    return out / "report.html"


CONTEXT_HEADER = ["variant", "trained with", "compared with", "train fraction", "mF1 without", "mF1 with",
                  "Δ mF1 (paired)", "F1 TC without", "F1 TC with", "Dice without", "Dice with", "mF1 with oracle mask"]


def _context_intro(tissue: dict | None) -> str:
    text = ("Each variant with tissue context against the variant of the same family and augmentation without it. "
            "'with' is scored with the tissue model's predicted probabilities as context (what a submitted model "
            "has); 'oracle mask' feeds the ground-truth tissue mask instead. Δ is the mean ± std over seeds of the "
            "per-seed difference (same seed, same training crops).")
    if tissue:
        scores = tissue["scores"]
        text += (f" The tissue model ({tissue['family']}, width {tissue['width']}, {tissue['parameters']:,} "
                 f"parameters, shared by all context variants) scores Dice {scores['dice/mean']:.3f} and mIoU "
                 f"{scores['miou']:.3f} on the test tissue patches.")
    return text


def _context_comparison(variants, fractions, by) -> tuple[list[list[str]], list[str], dict]:
    """Table rows, reading sentences and the per-seed changes ({(variant, fraction): [...]}) comparing
    each context variant with its no-context sibling."""
    rows, lines, pairs = [], [], {}
    first = {v: by[v, fractions[0]][0] for v in variants}
    for v in variants:
        if first[v].get("context", "none") == "none":
            continue
        sibling = next((w for w in variants if first[w].get("context", "none") == "none"
                        and first[w]["family"] == first[v]["family"] and first[w]["augment"] == first[v]["augment"]),
                       None)
        for f in fractions:
            runs = by[v, f]
            base = {r["seed"]: r for r in by[sibling, f]} if sibling else {}
            paired = [r["scores"].get("mf1") - base[r["seed"]]["scores"].get("mf1") for r in runs if r["seed"] in base]
            rows.append([v, first[v]["context"], sibling or "-", f"{f:g}",
                         _pm([r["scores"].get("mf1") for r in base.values()]) if base else "-",
                         _pm([r["scores"].get("mf1") for r in runs]),
                         _pm(paired, signed=True) if paired else "-",
                         _pm([r["scores"].get("f1/TC") for r in base.values()]) if base else "-",
                         _pm([r["scores"].get("f1/TC") for r in runs]),
                         _pm([r["scores"]["dice/mean"] for r in base.values()]) if base else "-",
                         _pm([r["scores"]["dice/mean"] for r in runs]),
                         _pm([r.get("oracle", {}).get("mf1") for r in runs])])
            if paired:
                pairs[v, f] = paired
                mean, std = _stats(paired)
                verdict = ("helped" if mean > 2 * std else "hurt" if mean < -2 * std
                           else "made no difference beyond the seed-to-seed spread")
                lines.append(f"Tissue context {verdict} at fraction {f:g} for {v} against {sibling}: mF1 "
                             f"{mean:+.3f} ± {std:.3f} (paired by seed).")
    return rows, lines, pairs


def _context_figure(pairs: dict, fractions: list[float]) -> bytes:
    """Per context variant and fraction: the mean change of mF1 from context (bar) and each seed's (dots)."""
    variants = list(dict.fromkeys(v for v, _ in pairs))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(variants), 3.6))
    step = 0.8 / len(fractions)
    for k, f in enumerate(fractions):
        xs = [i - 0.4 + step * (k + 0.5) for i in range(len(variants))]
        values = [pairs.get((v, f), []) for v in variants]
        ax.bar(xs, [np.mean(d) if d else 0 for d in values], width=step * 0.9, color=f"C{k}", alpha=0.6,
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
    return _figure_png(fig)


def _range(values):
    values = [v for v in values if v is not None]
    return max(values) - min(values) if values else float("nan")


def _max(values):
    values = [v for v in values if v is not None]
    return f"{max(values):.1e}" if values else "-"


def _count(root: Path, split: str) -> int:

    return len(OcelotFolder(root, split))


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _cases(by, variants, fraction, root: Path, path: Path, context_for: Callable | None = None,
           runtime: Runtime | None = None) -> Path:

    test = OcelotFolder(root, "test")
    cases = []
    for v in variants:
        run = by[v, fraction][0]
        model, config = load_model(run["run_dir"], runtime.device if runtime else "cpu")
        context = context_for(config) if context_for is not None else run_context(config.data, evaluation=True)
        for kind, i in best_and_worst(run["per_image"], [len(test[i].cells) > 0 for i in range(len(test))]):
            sample, dice = test[i], run["per_image"][i]["dice/mean"]
            image = model_input(sample.cell_image, context and context(sample))
            probs = predict_probabilities(model, image, tile=None, runtime=runtime)
            points = find_cells(probs, config.detect)
            cases.append({"title": f"{v}: {kind} ({test.ids[i]}, Dice {dice:.2f})", "image": sample.cell_image,
                          "probs": probs.numpy(), "points": points, "gt": sample.cells})
    return plot_cases(cases, path)


def _reading(variants, fractions, by, full, n_seeds, n_train, n_test) -> str:
    """Statements read off the numbers: who leads at each fraction, and whether it is separable."""
    caution = (f"Each number is a mean over {n_seeds} seeds on {n_test} synthetic test images; with so few seeds and "
               "images, a difference smaller than about two standard deviations is not evidence of a difference.")
    lines = [caution]
    for f in fractions:
        ranked = sorted(variants, key=lambda v: -_stats([r["scores"].get("mf1") for r in by[v, f]])[0])
        best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
        mb, sb = _stats([r["scores"].get("mf1") for r in by[best, f]])
        text = f"At training fraction {f:g} ({round(f * n_train)} images) the highest mean mF1 is {best} ({mb:.3f} ± {sb:.3f})"
        if second:
            ms, ss = _stats([r["scores"].get("mf1") for r in by[second, f]])
            separable = (mb - ms) > 2 * max(sb, ss, 1e-9)
            text += (f", ahead of {second} ({ms:.3f} ± {ss:.3f})" +
                     ("." if separable else ", a gap within the seed-to-seed spread."))
        worst = ranked[-1]
        mw, sw = _stats([r["scores"].get("mf1") for r in by[worst, f]])
        text += f" Lowest: {worst} ({mw:.3f} ± {sw:.3f})."
        lines.append(text)
    spreads = {v: np.mean([_range([s.get("mf1") for s in r["robustness"].values()]) for r in by[v, full]])
               for v in variants}
    steady = min(spreads, key=spreads.get)
    shaky = max(spreads, key=spreads.get)
    lines.append(f"Under rotation of the test images (D4 and 15°, 30°, 45°) the mF1 of {steady} varies least "
                 f"(mean range {spreads[steady]:.3f}) and that of {shaky} most ({spreads[shaky]:.3f}).")
    lines.append("These are synthetic images from one generator: they say how the families compare on a task "
                 "whose classes are decided by appearance and context, not how they rank on real OCELOT slides.")
    return "\n\n".join(lines)


def _html(name: str, intro: str, reading: str, tables: dict, images: dict, context_intro: str = "") -> str:
    def table(header, rows):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def img(key, alt):
        data = base64.b64encode(images[key]).decode()
        return f'<img alt="{alt}" src="data:image/png;base64,{data}">'

    paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in reading.split("\n\n"))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 8px}"
             "th{background:#f3f3f3}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title>"
            f"<style>{style}</style></head><body><h1>Study report: {html.escape(name)}</h1>"
            f"<p>{html.escape(intro)}</p><h2>Reading</h2>{paragraphs}"
            f"<h2>Test scores (mean ± std over seeds)</h2>{table(*tables['results'])}{img('efficiency', 'data efficiency')}"
            f"<h2>Rotation robustness</h2>{table(*tables['robustness'])}{img('robustness', 'robustness')}"
            f"<h2>Equivariance certificate</h2><p>Max over seeds of max|f(Tx) - T f(x)| / max|f(x)| on the "
            f"probabilities.</p>{table(*tables['certificate'])}"
            f"<h2>Test-time augmentation</h2>{table(*tables['tta'])}"
            + (f"<h2>Tissue context</h2><p>{html.escape(context_intro)}</p>{table(*tables['context'])}"
               f"{img('context', 'tissue context')}" if "context" in tables else "") +
            f"<h2>Training curves</h2>{img('curves', 'loss curves')}<h2>Cases</h2>{img('cases', 'cases')}"
            "</body></html>\n")
