"""Numbers come from files: every result table of the documentation is rendered from a JSON file.

A page marks a table it shows from a result file::

    <!-- results: layers-2026-12-06.json layers -->
    | layer | train s | ... |
    <!-- end results -->

``FILE`` is relative to the page; ``VIEW`` is one of the file's ``tables`` (written by a
benchmark through ``benchmarks/_record.py``: columns with their formats, rows of raw values),
``environment`` (the machine, date, versions, commit and command the file records) or
``command`` (the command line alone, as a code block). The text
between the markers is what :func:`render` makes of the file.

- As an MkDocs hook (``on_page_markdown``), every block is rendered again from its file when the
  site is built, so the site shows the files' numbers whatever the page holds.
- As a script, ``python docs/hooks/results.py --write`` refreshes the blocks of the committed
  pages, and ``--check`` lists every block that disagrees with its file (exit status 1);
  ``tests/test_result_pages.py`` runs the check.

Each study's hand-written reading (``docs/study-*/README.md``) is checked too, by
:func:`reading_problems`: every number in it must be one of that study's numbers (in its
``results.json`` or its generated ``summary.md``), to the rounding it is written with. The site
build warns (and fails with ``--strict``) on a number that is not. The check is as sharp as the
rounding: a study holds so many numbers that most two-decimal values are among them, so it
catches a wrong 0.153 or 1.4e-6 or 56, rarely a wrong 0.15; a reading's claims about which
number belongs to what (a variant, a seed) are not checked, only that the number exists.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
CONFIGS = DOCS.parent / "src" / "equiseg" / "configs"  # the study configs: study-cpu.yaml, ...
BLOCK = re.compile(r"(<!-- results: (?P<file>\S+) (?P<view>\S+) -->\n)(?P<body>.*?)(<!-- end results -->)", re.DOTALL)

log = logging.getLogger("mkdocs.hooks.results")


class ResultsError(ValueError):
    """A block names a file or view that is not there."""


# --- rendering ----------------------------------------------------------------------------------


def render(data: dict, view: str) -> str:
    """The Markdown of ``view`` of a result file's ``data`` (a table, ``environment`` or ``command``)."""
    if view == "environment":
        return environment_line(data["environment"])
    if view == "command":
        return f"```bash\n{data['environment']['command']}\n```"
    if view not in data.get("tables", {}):
        raise ResultsError(f"no view {view!r} (tables: {', '.join(data.get('tables', {}))}; or environment)")
    columns, rows = data["tables"][view]["columns"], data["tables"][view]["rows"]
    lines = ["| " + " | ".join(c["label"] for c in columns) + " |", "|" + "|".join(
        " ---: " if c["format"] else " --- " for c in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c["key"]), c["format"]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def environment_line(env: dict) -> str:
    """Where, when and how a result file was measured, as one paragraph."""
    machine = env["machine"]
    where = f"{machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads)"
    if machine.get("load_average"):
        where += f", load average {machine['load_average'][0]:g} as it ended"
    if machine.get("gpu"):
        where = f"{machine['gpu']}; host {where}"
    commit = env["commit"] or "an unknown commit"
    changed = " with uncommitted changes in src/" if env.get("src_changed") else ""
    return (f"Measured {env['date'][:10]} on {where}; Python {env['python']}, torch {env['torch']}, "
            f"equiseg {env['equiseg']} at {commit}{changed}.")


def render_blocks(markdown: str, folder: Path) -> str:
    """``markdown`` with every result block rendered from its file (relative to ``folder``)."""

    def one(match: re.Match) -> str:
        path = folder / match["file"]
        if not path.is_file():
            raise ResultsError(f"{path}: no such result file")
        body = render(json.loads(path.read_text()), match["view"])
        return f"{match[1]}{body}\n{match[5]}"

    return BLOCK.sub(one, markdown)


def pages(root: Path = DOCS) -> list[Path]:
    """The Markdown pages under ``root`` that hold a result block."""
    return sorted(p for p in root.rglob("*.md") if BLOCK.search(p.read_text()))


def block_problems(page: Path) -> list[str]:
    """Each block of ``page`` whose text is not its file's rendering: where, and the first line that differs."""
    text = page.read_text()
    problems = []
    for match in BLOCK.finditer(text):
        try:
            want = render_blocks(match[0], page.parent)
        except (ResultsError, KeyError, json.JSONDecodeError) as error:
            problems.append(f"{page}: {match['file']} {match['view']}: {error}")
            continue
        if want != match[0]:
            have_lines, want_lines = match[0].splitlines(), want.splitlines()
            line = next((k for k, (a, b) in enumerate(zip(have_lines, want_lines)) if a != b),
                        min(len(have_lines), len(want_lines)))
            where = text[:match.start()].count("\n") + 1 + line
            shown = want_lines[line] if line < len(want_lines) else "(nothing)"
            problems.append(f"{page}:{where}: {match['file']} {match['view']} renders as {shown!r}")
    return problems


# --- the number check of the study readings -----------------------------------------------------

NUMBER = re.compile(r"(?<![\w.^/])([+\-−]?)(\d+(?:,\d{3})*(?:\.\d+)?)(?:e([+-]?\d+))?(?![\w.]*\d)"
                    r"(\s?%|\sthousand)?")
IGNORED = [
    re.compile(r"`[^`]*`"),                           # commands, options, code
    re.compile(r"\d{4}-\d{2}-\d{2}"),                 # dates
    re.compile(r"\b\d{1,2}:\d{2}(?:-\d{1,2}:\d{2})?"),  # times of day
    re.compile(r"\b[0-9a-f]{7,40}\b"),                # commit hashes
    re.compile(r"\b[A-Za-z]+\d\w*"),                  # names with digits: p4m, c8, D4, float32, F1
    re.compile(r"\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?\s?°"),  # angles: they name transforms (settings), not results
    re.compile(r"\]\([^)]*\)"),                       # link targets
    re.compile(r"\([A-Z][a-z]+(?: et al\.)?, \d{4}\)"),  # citations: (Liem, 2025)
]
COUNTING = 10
"""Integers below this are counting words (2 of 9, seed 3, 4x): not checked."""


def numbers_in(text: str) -> list[tuple[str, float, float, int]]:
    """Every number written in ``text`` (outside code, dates, names, angles): (as written,
    |value|, the half-unit of its last written digit, i.e. the rounding it is written to, and
    where it starts in ``text``).
    """
    for pattern in IGNORED:
        text = pattern.sub(lambda m: " " * len(m[0]), text)
    found = []
    for match in NUMBER.finditer(text):
        digits, exponent, unit = match[2].replace(",", ""), match[3], (match[4] or "").strip()
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        value, half = float(digits), 0.5 * 10.0 ** -decimals
        if not unit and re.match(r"-\d+(?:\.\d+)?\sthousand", text[match.end():]):
            unit = "thousand"  # the first of a range: 61-68 thousand
        scale = 10.0 ** int(exponent) if exponent else 0.01 if unit == "%" else 1000 if unit == "thousand" else 1
        found.append((match[0].strip(), value * scale, half * scale, match.start()))
    return found


HEADLINE = ("mf1", "dice/mean", "miou", "loss", "f1/BC", "f1/TC")
"""The scores of a run a reading may quote besides the report's: the ones the report tabulates."""


def _headline(scores: dict | None) -> list[float]:
    return [scores[k] for k in HEADLINE if scores and scores.get(k) is not None]


def _robustness(transforms: list | dict) -> list[float]:
    """A run's mF1 spread over all its transforms and over the D4 ones, and its worst mF1, as the
    report's robustness table takes them (results of before format 3 keep transforms by name).
    """
    if isinstance(transforms, dict):
        transforms = [{"d4": not name.removeprefix("flip.").removeprefix("rot").isdigit()
                       or int(name.removeprefix("flip.").removeprefix("rot")) % 90 == 0, "scores": scores}
                      for name, scores in transforms.items()]
    every = [t["scores"]["mf1"] for t in transforms if t["scores"].get("mf1") is not None]
    d4 = [t["scores"]["mf1"] for t in transforms if t["d4"] and t["scores"].get("mf1") is not None]
    return [max(every) - min(every), max(d4) - min(d4), min(every)] if every and d4 else []


def study_numbers(folder: Path) -> list[float]:
    """The numbers a study's reading may quote: every number of its summary.md and, from its
    results.json, each run's headline scores (:data:`HEADLINE`; with the oracle context and with
    TTA too), certificate, mF1 spreads under the test transforms and worst mF1, TTA time, rate, parameters, training images and epochs (counted from 1,
    as the report does), the learning-rate search's losses, the tissue model's scores, and the
    numbers of runs, variants, seeds and images. Not the per-image rows, nor each transform's
    scores: with them nearly every two-digit number would be somebody's.
    """
    data = json.loads((folder / "results.json").read_text())
    values = [v for _, v, _, _ in numbers_in((folder / "summary.md").read_text())]
    runs = data["results"]
    for r in runs:
        values += _headline(r["scores"]) + _headline(r.get("oracle")) + _headline((r.get("tta") or {}).get("scores"))
        values += [v for v in r["certificate"]["test"].values() if v is not None]
        values += [v for v in (r["certificate"].get("real") or {}).values() if v is not None]
        values += [r["parameters"], r["width"], r.get("lr", 0), r.get("train_count", 0), r.get("epochs_trained", 0),
                   r.get("best_epoch", -1) + 1, (r.get("tta") or {}).get("seconds", 0)]
        values += _robustness(r["robustness"])
    for t in data.get("lr_trials", []):
        values += [t["lr"], t["val_loss"], t["best_epoch"] + 1]
    if data.get("tissue"):
        values += _headline(data["tissue"]["scores"]) + [data["tissue"]["parameters"], data["tissue"]["width"]]
    values += [len(runs), len({r["variant"] for r in runs}), len({r["seed"] for r in runs}),
               data.get("train_images", 0), data.get("test_images", 0)]
    return sorted({abs(float(v)) for v in values if v is not None and math.isfinite(v)})


def reading(page: Path) -> tuple[str, str]:
    """(the setting: the text before the reading's heading, the reading: from its heading on)."""
    text = page.read_text()
    heading = re.search(r"^## Reading.*$", text, re.MULTILINE)
    if heading is None:
        raise ResultsError(f"{page}: no '## Reading' heading")
    return text[:heading.start()], text[heading.start():]


def reading_problems(folder: Path, exempt: dict[str, str] | None = None) -> list[str]:
    """The numbers of ``folder/README.md``'s reading that are not the study's (see
    :func:`study_numbers`; a reading that names another study folder may quote its numbers too),
    to the rounding they are written with. Integers may also be the setting's (the counts of
    images, seeds and epochs the text before the reading, or the study's config, gives); integers below :data:`COUNTING` are counting words;
    ``exempt`` maps a number, as written, to where it comes from instead.
    """
    setting, text = reading(folder / "README.md")
    others = [f for f in study_folders(folder.parent) if f != folder and re.search(rf"\b{f.name}\b(?!-)", text)]
    known = study_numbers(folder) + [v for f in others for v in study_numbers(f)]
    config = CONFIGS / f"{folder.name}.yaml"
    described = setting + (re.sub(r"#.*", "", config.read_text()) if config.is_file() else "")
    counts = {v for written, v, _, _ in numbers_in(described) if "." not in written}
    problems = []
    for written, value, half, at in numbers_in(text):
        integer = value == int(value) and not re.search(r"[.e]", written)
        if written in (exempt or {}) or (integer and (value < COUNTING or value in counts)):
            continue
        if not any(abs(v - value) <= half * (1 + 1e-9) for v in known):
            line = setting.count("\n") + text[:at].count("\n") + 1
            problems.append(f"{folder.name}/README.md:{line}: {written!r} is not among the study's numbers")
    return problems


def page_reading_problems(page: Path) -> list[str]:
    """The numbers of a benchmark page's reading (from its '## Reading' heading on) that its rendered
    result blocks and text above the reading do not hold, to the rounding they are written with
    (integers below :data:`COUNTING` are counting words). A page without a reading has none.
    """
    if not re.search(r"^## Reading", page.read_text(), re.MULTILINE):
        return []
    setting, text = reading(page)
    known = [v for _, v, _, _ in numbers_in(setting)]
    problems = []
    for written, value, half, at in numbers_in(text):
        if value == int(value) and value < COUNTING and not re.search(r"[.e]", written):
            continue
        if not any(abs(v - value) <= half * (1 + 1e-9) for v in known):
            line = setting.count("\n") + text[:at].count("\n") + 1
            problems.append(f"{page.name}:{line}: {written!r} is not among the page's result numbers")
    return problems


STEPS = "training steps: epochs x batches of 4 (12 x 6 at 24 images, 48 x 2 at 6), from the config"
PAPER = "the setting of the paper (Liem, 2025), not this study's"
READING_EXEMPT: dict[str, dict[str, str]] = {
    "study-context": {"72": STEPS, "96": STEPS},
    "study-small": {"72": STEPS, "96": STEPS, "110": PAPER, "64": PAPER, "1024": PAPER},
    "study-steerable": {"20": "the widths of c16 and d8 at paper size (benchmarks/inference.py)",
                        "28": "the width of c8 at paper size (benchmarks/inference.py)"},
    "study-cpu-rotated": {"58": "the 60 runs less the 2 named that ran to their epoch budget"},
}
"""Per study folder, numbers of its reading that come from elsewhere, each with where from."""


def study_folders(root: Path = DOCS) -> list[Path]:
    """The study report folders: those with a results.json and a README.md."""
    return sorted(p.parent for p in root.glob("*/results.json") if (p.parent / "README.md").is_file())


# --- MkDocs hook and script ---------------------------------------------------------------------


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    """Render every result block from its file; warn on a study reading's unknown numbers."""
    source = Path(page.file.abs_src_path)
    if source.name == "README.md" and (source.parent / "results.json").is_file():
        for problem in reading_problems(source.parent, READING_EXEMPT.get(source.parent.name)):
            log.warning(problem)
    rendered = render_blocks(markdown, source.parent)
    if source.parent.name == "benchmarks":
        for problem in page_reading_problems(source):
            log.warning(problem)
    return rendered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--write", action="store_true", help="render every block of the pages from its file")
    what.add_argument("--check", action="store_true", help="list blocks and readings that disagree with their files")
    parser.add_argument("pages", nargs="*", type=Path, help="pages to handle (default: every page under docs/)")
    args = parser.parse_args()
    targets = args.pages or pages()
    if args.write:
        for page in targets:
            text = page.read_text()
            new = render_blocks(text, page.parent)
            if new != text:
                page.write_text(new)
                print(f"rewrote {page}")
        return 0
    problems = [p for page in targets for p in block_problems(page)]
    problems += [p for folder in study_folders() for p in reading_problems(folder, READING_EXEMPT.get(folder.name))]
    problems += [p for page in targets for p in page_reading_problems(page)]
    print("\n".join(problems) or "every result block and reading agrees with its files")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
