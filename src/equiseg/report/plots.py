"""Plots for run reports: loss curves and good/bad cases beside the ground truth."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from equiseg.pictures import draw_points, prediction_overlay, probability_picture
from equiseg.runs import Run


def read_epoch_metrics(run_dir: Path | str) -> dict[str, dict[int, float]]:
    """Epoch-level metrics of a run from its metrics.csv: name -> {epoch: value}."""
    out: dict[str, dict[int, float]] = {}
    path = Run(Path(run_dir)).metrics
    if not path.is_file():
        return out
    for row in csv.DictReader(path.open()):
        epoch = int(float(row["epoch"])) if row.get("epoch") else None
        if epoch is None:
            continue
        for key, value in row.items():
            if key in ("epoch", "step") or key.endswith("_step") or value in ("", None):
                continue
            out.setdefault(key.removesuffix("_epoch"), {})[epoch] = float(value)
    return out


def plot_loss_curves(runs: dict[str, Path], path: Path | str) -> Path:
    """Training and validation loss per epoch, one colour per run (solid: train, dashed: val), saved at ``path``."""
    fig = loss_curves_figure(runs)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def loss_curves_figure(runs: dict[str, Path]) -> Figure:
    """The figure of `plot_loss_curves`, not yet saved (the caller closes it)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, (label, run_dir) in enumerate(runs.items()):
        metrics = read_epoch_metrics(run_dir)
        colour = f"C{k}"
        for key, style, what in (("train/loss", "-", "train"), ("val/loss", "--", "val")):
            series = metrics.get(key, {})
            if series:
                epochs = sorted(series)
                ax.plot([e + 1 for e in epochs], [series[e] for e in epochs], style, color=colour,
                        label=f"{label} ({what})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("Dice + cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_cases(cases: list[dict], path: Path | str) -> Path:
    """One row per case: image with ground truth, prediction overlay, probability map; saved at ``path``.

    Each case is a dict with ``title``, ``image`` (H, W, 3) uint8, ``probs`` (C, H, W),
    ``points`` (N, 4) and ``gt`` (M, 3).
    """
    fig = cases_figure(cases)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def cases_figure(cases: list[dict]) -> Figure:
    """The figure of `plot_cases`, not yet saved (the caller closes it)."""
    rows = len(cases)
    fig, axes = plt.subplots(rows, 3, figsize=(10.5, 3.6 * rows), squeeze=False)
    for row, case in zip(axes, cases):
        size = max(4, case["image"].shape[0] // 150)
        panels = [
            (draw_points(case["image"], case["gt"], radius=size + 4, filled=False), "ground truth (rings)"),
            (prediction_overlay(case["image"], case["probs"], case["points"]), "prediction (tint, dots)"),
            (probability_picture(case["probs"]), "p(BC) green, p(TC) red"),
        ]
        for ax, (picture, label) in zip(row, panels):
            ax.imshow(picture)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
        row[0].text(-0.04, 0.5, case["title"], transform=row[0].transAxes, rotation=90, va="center", ha="right",
                    fontsize=9)
    fig.tight_layout()
    return fig


def fmt(value: float | None, digits: int = 3) -> str:
    """A score for a table: fixed digits, '-' for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def best_and_worst(per_image: list[dict], has_cells: list[bool]) -> list[tuple[str, int]]:
    """("best", i) and ("worst", i) by per-image Dice, among images with cells (an empty image
    is trivially "best"); all images when none has cells.
    """
    dice = [p["dice/mean"] if cells else np.nan for p, cells in zip(per_image, has_cells)]
    if np.isnan(dice).all():
        dice = [p["dice/mean"] for p in per_image]
    if np.isnan(dice).all():
        return []
    return [("best", int(np.nanargmax(dice))), ("worst", int(np.nanargmin(dice)))]


def machine_line() -> str:
    """"x86_64, 2 cores, torch 2.13.0+cpu": where a report was made."""
    import os
    import platform

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return f"{platform.machine()}, {cores} cores, torch {torch.__version__}"
