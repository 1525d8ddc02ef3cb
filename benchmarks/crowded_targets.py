"""Target designs on crowded and sparse tissue: does detection survive touching cells?

    python benchmarks/crowded_targets.py [--out DIR] [--worlds crowded sparse] [--targets "disks r30" ...]
                                         [--seeds 0 1 2] [--families isotropic plain] [--epochs N]

For each world (the crowded synthetic world of the ``*-small`` presets, ``crowding: 1``, and the
sparse one of ``*-small-sparse``), each target design and each family (isotropic width 28 without
augmentation, plain width 16 with heavy augmentation: the small presets' pair at matched
parameters), one run of the preset with that target, trained on 2 CPU cores (or reused from
OUT/runs when finished). Targets: the disks of radius 30 px of the paper (Liem, 2025), disks of radius 12 px
(smaller than half the spacing of crowded nuclei), and centres (a Gaussian of sigma 6 px on
each cell). Each run's detection settings are chosen on its validation split
(``equiseg tune-detect``'s grid), then it is scored once on the test split.

Columns: Dice (mean over BC and TC, on the run's own target: disks, or the cores of the
centre Gaussians where g >= 1/2), detection precision and recall (both classes), mF1 (OCELOT
rules), the chosen detection settings, and the mF1 the paper's fixed rule gives the same
probability maps (foreground peaks, sigma 8 px, 15 px apart, threshold 0.5). Writes OUT/table.md, OUT/table.json and
OUT/crowded-overlay.png (the test patch with the most cells: disks r30 against centres,
the first family and seed, ground truth as rings and predictions as dots). With several ``--seeds`` (``train.seed``: weights,
crops, order and augmentation; the data stay the same) a second table gives each design's mean
and range over the seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from equiseg.config import Config
from equiseg.data.ocelot import OcelotFolder
from equiseg.datasets import data_root
from equiseg.evaluation.evaluate import evaluate_model
from equiseg.evaluation.tune_detect import tune_detection
from equiseg.pictures import prediction_overlay
from equiseg.presets import preset_path
from equiseg.report.plots import machine_line, markdown_table
from equiseg.runs import load_model
from equiseg.training.fit import train_or_reuse

TARGETS = {  # name -> overrides
    "disks r30": ["data.target=disks", "data.radius=30"],
    "disks r12": ["data.target=disks", "data.radius=12"],
    "centres s6": ["data.target=centres", "data.sigma=6"],
}
WORLDS = {"crowded": "small", "sparse": "small-sparse"}


def one_run(args: argparse.Namespace, world: str, target: str, seed: int, family: str) -> tuple[dict, dict]:
    """Train (or reuse), tune detection on val, score on test: the table row, and the most
    crowded test image's index, probabilities and points for the overlay.
    """
    config = Config.from_yaml(preset_path(f"{family}-{WORLDS[world]}"), overrides=[
        *TARGETS[target], "train.loggers=[csv]", f"train.seed={seed}",
        *([f"train.epochs={args.epochs}"] if args.epochs else [])])
    suffix = f"-seed{seed}" if seed else ""
    run_dir = args.out / "runs" / f"{world}-{target.replace(' ', '')}-{family}{suffix}"
    t0 = time.time()
    reused = train_or_reuse(config, run_dir, progress=False)
    tune_detection(run_dir, "val")
    model, tuned = load_model(run_dir)
    root = data_root(config)
    test = OcelotFolder(root, "test", labels=False)
    crowded = max(range(len(test)), key=lambda i: len(test.cells(i)))
    first = {"index": crowded}
    result = evaluate_model(model, tuned, root, "test",
                            keep=lambda i, sid, p: first.update(probs=p.numpy()) if i == crowded else None)
    s = result.scores
    tp, fp, gt = (s[f"{k}/BC"] + s[f"{k}/TC"] for k in ("tp", "fp", "gt"))
    paper_rule = Config.from_dict({**tuned.to_dict(), "detect": {}})  # foreground peaks, sigma 8, 15 px, 0.5
    d = tuned.detect
    row = {"world": world, "target": target, "seed": seed, "family": family,
           "dice": (s["dice/BC"] + s["dice/TC"]) / 2, "precision": tp / max(tp + fp, 1), "recall": tp / max(gt, 1),
           "mf1": s["mf1"], "f1/BC": s["f1/BC"], "f1/TC": s["f1/TC"], "cells": gt,
           "detect": f"{d.peaks} s{d.sigma:g} d{d.min_distance} t{d.threshold:g}",
           "mf1_paper_rule": evaluate_model(model, paper_rule, root, "test").scores["mf1"],
           "minutes": (time.time() - t0) / 60, "reused": reused}
    first.update(points=result.points[crowded], root=root)
    return row, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("crowded-targets"))
    parser.add_argument("--epochs", type=int, default=None, help="override the presets' 30 epochs")
    parser.add_argument("--families", nargs="+", default=["isotropic", "plain"])
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    started = time.time()
    rows, overlays = [], {}
    for world, target, seed, family in itertools.product(args.worlds, args.targets, args.seeds, args.families):
        row, first = one_run(args, world, target, seed, family)
        rows.append(row)
        print(f"{world} / {target} / seed {seed} / {family}: Dice {row['dice']:.3f} P {row['precision']:.3f} "
              f"R {row['recall']:.3f} mF1 {row['mf1']:.3f} (the paper's rule {row['mf1_paper_rule']:.3f}; "
              f"{row['minutes']:.1f} min)", flush=True)
        if world == "crowded" and family == args.families[0] and seed == args.seeds[0]:
            sample = OcelotFolder(first["root"], "test")[first["index"]]
            overlays[target] = prediction_overlay(sample.cell_image, first["probs"], first["points"], sample.cells)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps(rows, indent=2, default=str))
    header = ["world", "target", "seed", "family", "Dice", "precision", "recall", "mF1", "F1 BC", "F1 TC",
              "test cells", "detection (tuned on val)", "mF1, the paper's rule"]
    table = markdown_table(header, [[r["world"], r["target"], str(r["seed"]), r["family"], f"{r['dice']:.3f}",
                                     f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['mf1']:.3f}",
                                     f"{r['f1/BC']:.3f}", f"{r['f1/TC']:.3f}", str(r["cells"]), r["detect"],
                                     f"{r['mf1_paper_rule']:.3f}"] for r in rows])
    if len(args.seeds) > 1:
        summary = []
        for world, target, family in itertools.product(args.worlds, args.targets, args.families):
            group = [r for r in rows if (r["world"], r["target"], r["family"]) == (world, target, family)]
            for key in ("mf1", "dice", "mf1_paper_rule"):
                values = [r[key] for r in group]
                summary.append([world, target, family, key, f"{np.mean(values):.3f}",
                                f"{min(values):.3f}-{max(values):.3f}"])
        table += "\n\nOver seeds " + ", ".join(map(str, args.seeds)) + ":\n\n" + markdown_table(
            ["world", "target", "family", "score", "mean", "range"], summary)
    minutes = (time.time() - started) / 60
    command = shlex.join(["python", "benchmarks/crowded_targets.py", *sys.argv[1:]])
    text = f"{table}\n\n{len(rows)} runs, {minutes:.0f} min on {machine_line()}; `{command}`\n"
    (args.out / "table.md").write_text(text)
    print(text)
    if {"disks r30", "centres s6"} <= set(overlays):
        from PIL import Image

        gap = np.full((overlays["disks r30"].shape[0], 16, 3), 255, np.uint8)
        Image.fromarray(np.concatenate([overlays["disks r30"], gap, overlays["centres s6"]], axis=1)).save(
            args.out / "crowded-overlay.png")


if __name__ == "__main__":
    main()
