"""Target designs on crowded and sparse tissue: does detection survive touching cells?

    python benchmarks/crowded_targets.py [--out DIR] [--epochs N] [--families isotropic plain]

For each world (the crowded synthetic world of the ``*-small`` presets, ``crowding: 1``, and the
sparse one of ``*-small-sparse``), each target design and each family (isotropic width 28 without
augmentation, plain width 16 with heavy augmentation: the small presets' pair at matched
parameters), one run of the preset with that target, trained on 2 CPU cores (or reused from
OUT/runs when finished). Targets: the seed's disks of radius 30 px, disks of radius 12 px
(smaller than half the spacing of crowded nuclei), and centres (a Gaussian of sigma 6 px on
each cell). Each run's detection settings are chosen on its validation split
(``equiseg tune-detect``'s grid), then it is scored once on the test split.

Columns: Dice (mean over BC and TC, on the run's own target: disks, or the cores of the
centre Gaussians where g >= 1/2), detection precision and recall (both classes), mF1 (OCELOT
rules), the chosen detection settings. Writes OUT/table.md, OUT/table.json and
OUT/crowded-overlay.png (a crowded test patch: disks r30 against centres, isotropic, ground
truth as rings and predictions as dots).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from equiseg.config import Config
from equiseg.data.ocelot import OcelotFolder
from equiseg.evaluation.evaluate import evaluate_model
from equiseg.evaluation.tune_detect import tune_detection
from equiseg.presets import preset_path
from equiseg.report.pictures import prediction_overlay
from equiseg.report.plots import machine_line, markdown_table
from equiseg.runs import load_model
from equiseg.training.fit import data_root, train_or_reuse

TARGETS = {  # name -> overrides
    "disks r30": ["data.target=disks", "data.radius=30"],
    "disks r12": ["data.target=disks", "data.radius=12"],
    "centres s6": ["data.target=centres", "data.sigma=6"],
}
WORLDS = {"crowded": "small", "sparse": "small-sparse"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("crowded-targets"))
    parser.add_argument("--epochs", type=int, default=None, help="override the presets' 30 epochs")
    parser.add_argument("--families", nargs="+", default=["isotropic", "plain"])
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS))
    args = parser.parse_args()
    started = time.time()
    rows, overlays = [], {}
    for world in args.worlds:
        for target, overrides in TARGETS.items():
            for family in args.families:
                label = f"{world} / {target} / {family}"
                config = Config.from_yaml(preset_path(f"{family}-{WORLDS[world]}"), overrides=[
                    *overrides, "train.loggers=[csv]", *([f"train.epochs={args.epochs}"] if args.epochs else [])])
                run_dir = args.out / "runs" / f"{world}-{target.replace(' ', '')}-{family}"
                t0 = time.time()
                reused = train_or_reuse(config, run_dir, progress=False)
                tune_detection(run_dir, "val")
                model, tuned = load_model(run_dir)
                root = data_root(config)
                keep = {}
                result = evaluate_model(model, tuned, root, "test", keep=lambda i, sid, p, keep=keep: keep.update(
                    {i: p.numpy()}) if i == 0 else None)
                s = result.scores
                tp = s["tp/BC"] + s["tp/TC"]
                fp = s["fp/BC"] + s["fp/TC"]
                gt = s["gt/BC"] + s["gt/TC"]
                d = tuned.detect
                rows.append({"world": world, "target": target, "family": family,
                             "dice": (s["dice/BC"] + s["dice/TC"]) / 2, "precision": tp / max(tp + fp, 1),
                             "recall": tp / max(gt, 1), "mf1": s["mf1"], "f1/BC": s["f1/BC"], "f1/TC": s["f1/TC"],
                             "cells": gt, "detect": f"{d.peaks} s{d.sigma:g} d{d.min_distance} t{d.threshold:g}",
                             "minutes": (time.time() - t0) / 60, "reused": reused})
                print(f"{label}: Dice {rows[-1]['dice']:.3f} P {rows[-1]['precision']:.3f} "
                      f"R {rows[-1]['recall']:.3f} mF1 {s['mf1']:.3f} ({rows[-1]['minutes']:.1f} min)", flush=True)
                if world == "crowded" and family == args.families[0]:
                    test = OcelotFolder(root, "test")
                    sample = test[0]
                    overlays[target] = prediction_overlay(sample.cell_image, keep[0], result.points[0], sample.cells)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps(rows, indent=2))
    header = ["world", "target", "family", "Dice", "precision", "recall", "mF1", "F1 BC", "F1 TC", "test cells",
              "detection (tuned on val)"]
    table = markdown_table(header, [[r["world"], r["target"], r["family"], f"{r['dice']:.3f}", f"{r['precision']:.3f}",
                                     f"{r['recall']:.3f}", f"{r['mf1']:.3f}", f"{r['f1/BC']:.3f}",
                                     f"{r['f1/TC']:.3f}", str(r["cells"]), r["detect"]] for r in rows])
    minutes = (time.time() - started) / 60
    text = (f"{table}\n\n{len(rows)} runs, {minutes:.0f} min on {machine_line()}; "
            f"`python benchmarks/crowded_targets.py --out {args.out}`\n")
    (args.out / "table.md").write_text(text)
    print(text)
    if {"disks r30", "centres s6"} <= set(overlays):
        from PIL import Image

        pair = np.concatenate([overlays["disks r30"], np.full((overlays["disks r30"].shape[0], 16, 3), 255, np.uint8),
                               overlays["centres s6"]], axis=1)
        Image.fromarray(pair).save(args.out / "crowded-overlay.png")


if __name__ == "__main__":
    main()
