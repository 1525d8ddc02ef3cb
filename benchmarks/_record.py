"""The result file every benchmark writes: what it measured, where, when, with what, and how it was called.

A benchmark adds the ``--json`` option (:func:`add_json_option`), measures, and hands its
numbers to :func:`write_result` as tables of raw values with their columns
(:func:`table`); the file is ``docs/benchmarks/NAME-YYYY-MM-DD.json`` by default, so a
re-measurement is a new file beside the old one. The documentation pages render their
tables from these files (``docs/hooks/results.py``): a page names the file it shows.

The record (:func:`environment`): the machine (CPU model, cores this process may use, torch
threads, the load average as the measurement ended, GPU name when one is used), the date (UTC), the Python, torch and equiseg versions,
the git commit and whether ``src/`` differed from it, and the exact command line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "benchmarks"


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """``--json PATH``: where the result file goes (default ``docs/benchmarks/NAME-DATE.json``)."""
    parser.add_argument("--json", type=Path, default=None,
                        help="write the results here (default: docs/benchmarks/NAME-YYYY-MM-DD.json)")


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it ("AMD EPYC"), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def environment(device: str = "cpu") -> dict:
    """Where and how a benchmark ran (see the module docstring); ``device``: the torch device it
    timed ("cuda..." adds the GPU's name).
    """
    import torch

    from equiseg import __version__

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    machine = {"cpu": cpu_model(), "cores": cores, "torch_threads": torch.get_num_threads(),
               "architecture": platform.machine()}
    if hasattr(os, "getloadavg"):  # other work on the machine while it measured (1, 5 and 15 minutes)
        machine["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if device.startswith("cuda") and torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
    changed = _git("status", "--porcelain", "--", "src")
    return {"machine": machine,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "python": platform.python_version(), "torch": torch.__version__, "equiseg": __version__,
            "commit": _git("rev-parse", "--short", "HEAD"), "src_changed": bool(changed),
            "command": shlex.join(["python", _relative(sys.argv[0]), *sys.argv[1:]])}


def _relative(script: str) -> str:
    path = Path(script).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else script


def column(key: str, label: str, fmt: str = "") -> dict:
    """One column of a result table: the rows' ``key``, its heading, and its format
    (``format(value, fmt)``: ".4f", ".2e", ".0%"; empty: the value as it is).
    """
    return {"key": key, "label": label, "format": fmt}


def table(columns: list[dict], rows: list[dict]) -> dict:
    """A result table: its columns (:func:`column`) and rows of raw values keyed by column key;
    a missing or null value shows as blank.
    """
    return {"columns": columns, "rows": rows}


def write_result(name: str, what: str, settings: dict, tables: dict[str, dict], out: Path | None = None,
                 device: str = "cpu") -> Path:
    """Write the result file of benchmark ``name`` (``what``: one line saying what it measures)
    with its ``settings`` (the parsed options), its ``tables`` (view name -> :func:`table`) and
    the :func:`environment`; returns its path.
    """
    record = environment(device)
    path = out or RESULTS / f"{name}-{record['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items() if k != "json"}
    data = {"benchmark": name, "what": what, "environment": record, "settings": settings, "tables": tables}
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    print(f"wrote {_relative(str(path))}")
    return path


def cell(value: object, fmt: str) -> str:
    """One formatted value of a result table: blank for a missing one."""
    return "" if value is None else format(value, fmt)


def print_table(result: dict) -> None:
    """A result table (:func:`table`) on the terminal, aligned, formatted as the pages show it."""
    labels = [c["label"] for c in result["columns"]]
    rows = [[cell(row.get(c["key"]), c["format"]) for c in result["columns"]] for row in result["rows"]]
    widths = [max(len(x) for x in column) for column in zip(labels, *rows)]
    for line in (labels, *rows):
        print("  ".join(x.rjust(w) if k else x.ljust(w) for k, (x, w) in enumerate(zip(line, widths))))
