"""``equiseg tune-detect``: choose a run's detection settings on its validation split.

The model runs once over the validation images, and every combination of a small grid of
detection settings (`GRID`) is scored by the OCELOT rules, without retraining. For each
(peaks, sigma, min_distance) an image's candidates are found once, as its map comes, with no
threshold but the grid's lowest; each threshold then keeps the candidates above it before the
greedy suppression, which is what detection with that threshold does (the threshold only
filters candidates). So the grid costs a few detections per image, not one per setting, and
what is kept is each image's candidates, not its probability map.

The best setting by validation mF1 (ties: the first in grid order) is written into the run
(``detect.yaml``, read by `equiseg.runs.load_model`, so evaluate, predict, challenge and
the study use it), with every setting's scores in ``detect-tuning.csv``.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml

from equiseg.config import PEAK_RULES, DetectConfig
from equiseg.data.ocelot import OcelotFolder, Split
from equiseg.datasets import data_root
from equiseg.detection import detection_scores, peak_candidates, suppress_peaks
from equiseg.evaluation.evaluate import evaluate_model
from equiseg.files import owned_outputs, written_whole
from equiseg.runs import Run, is_package, load_model
from equiseg.runtime import Runtime

GRID = {
    "peaks": PEAK_RULES,
    "sigma": (0.0, 1.0, 2.0, 4.0, 8.0),
    "min_distance": (6, 10, 15),
    "threshold": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
}


def score_settings(maps: list[torch.Tensor], truths: list[np.ndarray],
                   grid: dict[str, tuple] = GRID) -> list[dict]:
    """Every setting of ``grid`` scored on probability maps (C, H, W) with their true cells:
    rows of the settings and ``mf1``, ``f1/BC``, ``f1/TC``, ``precision``, ``recall`` (all
    classes together), in grid order.
    """
    return score_candidates([image_candidates(probs, grid) for probs in maps], truths, grid)


def _detectors(grid: dict[str, tuple]) -> list[tuple[str, float, int]]:
    """The (peaks, sigma, min_distance) of ``grid``, in grid order."""
    return list(itertools.product(grid["peaks"], grid["sigma"], grid["min_distance"]))


def image_candidates(probs: torch.Tensor, grid: dict[str, tuple] = GRID) -> list[np.ndarray]:
    """One image's cell candidates for each (peaks, sigma, min_distance) of ``grid`` (grid
    order): every peak above the grid's lowest threshold, unsuppressed. What scoring the grid
    needs of the image, a small fraction of its probability map (which need not be kept).
    """
    _, h, w = probs.shape
    floor = min(grid["threshold"])
    found = []
    for peaks, sigma, min_distance in _detectors(grid):
        c = peak_candidates(probs, (0, 0), (h, w), (0, h, 0, w), sigma, min_distance, -np.inf, peaks == "per-class")
        found.append(c[c[:, 2] > floor])  # no threshold of the grid keeps the others
    return found


def score_candidates(found: list[list[np.ndarray]], truths: list[np.ndarray],
                     grid: dict[str, tuple] = GRID) -> list[dict]:
    """`score_settings` from each image's `image_candidates`."""
    rows = []
    for k, (peaks, sigma, min_distance) in enumerate(_detectors(grid)):
        for threshold in grid["threshold"]:
            points = [suppress_peaks(image[k][image[k][:, 2] > threshold], min_distance) for image in found]
            scores = detection_scores(points, truths)
            tp = sum(scores[f"tp/{name}"] for name in ("BC", "TC"))
            fp = sum(scores[f"fp/{name}"] for name in ("BC", "TC"))
            gt = sum(scores[f"gt/{name}"] for name in ("BC", "TC"))
            rows.append({"peaks": peaks, "sigma": sigma, "min_distance": min_distance, "threshold": threshold,
                         "mf1": scores["mf1"], "f1/BC": scores["f1/BC"], "f1/TC": scores["f1/TC"],
                         "precision": tp / max(tp + fp, 1), "recall": tp / max(gt, 1)})
    return rows


TUNING_FILE, DETECT_FILE = Run.tuning_file.name, Run.detect_file.name  # what it writes, in the run or --out


def tune_detection(run: Path | str, split: str = "val", runtime: Runtime | None = None,
                   on_image: Callable[[int, int], None] | None = None,
                   grid: dict[str, tuple] = GRID, data: Path | str | None = None,
                   out: Path | str | None = None) -> tuple[DetectConfig, list[dict]]:
    """Choose the detection settings of the run at ``run`` on ``split`` of its dataset and write
    them into the run (``detect.yaml``, ``detect-tuning.csv``), or into ``out``; returns them and all rows.

    The test split is refused: settings chosen on the images a score is reported on would
    report a tuned-on-test score.

    Args:
        run: a run folder (detection settings belong to a run), or a package (`equiseg.runs.is_package`:
            then ``out`` is needed, as equiseg never writes into a package).
        split: the split to tune on, ``val`` (or ``train``); never ``test``.
        runtime: where and how the model runs (device, batch, precision, optimized); None: the
            CPU with the defaults (``Runtime.of("cpu")``).
        on_image: called with (images done, images in all) after each image (progress).
        grid: each setting's candidate values (``peaks``, ``sigma``, ``min_distance``, ``threshold``);
            every combination is scored.
        data: the dataset to tune on (an OCELOT-layout folder); None: the one the run trained on (a
            package's: its config's).
        out: the folder for the two files (made if missing, equiseg's own files there replaced, others
            kept); None: the run folder.

    Raises:
        ValueError: ``split`` is the test split, the run is not a cell model, it has no recorded
            dataset and none is given, or a package without ``out``.
    """
    if split == Split.TEST.value:
        raise ValueError("tuning detection on the test split would report tuned-on-test scores; tune on val "
                         "(or train)")
    package = is_package(run)
    if package and out is None:
        raise ValueError(f"{run} is a package (equiseg package), which equiseg never writes into: give --out")
    folder = Run.of(run)
    model, config = load_model(run if package else folder.best, runtime.device if runtime is not None else "cpu")
    if config.task.value != "cells":
        raise ValueError(f"{folder.path}: a {config.task.value} model has no cells to detect"
                         + (" (the cells of a two-stage model come from its stage-1 cells run: tune that)"
                            if config.task.value == "nuclei" else ""))
    root = Path(data) if data is not None else data_root(config) if package else folder.data_root()
    if root is None:
        raise ValueError(f"{folder.path}: no data.txt naming the dataset it trained on: give --data")
    found: list[list[np.ndarray]] = []  # each image's candidates, not its map (1024² x 3 float32 = 12 MB)
    evaluate_model(model, config, root, split, on_image=on_image, runtime=runtime,
                   keep=lambda i, sample_id, probs: found.append(image_candidates(
                       probs[:config.class_channels].cpu(), grid)))  # the classes: not a p(nucleus) after them
    labelled = OcelotFolder(root, split, labels=False)
    truths = [labelled.cells(i) for i in range(len(labelled))]
    rows = score_candidates(found, truths, grid)
    best = max(rows, key=lambda row: row["mf1"])  # max keeps the first of equals: grid order
    chosen = DetectConfig(sigma=float(best["sigma"]), min_distance=int(best["min_distance"]),
                          threshold=float(best["threshold"]), peaks=str(best["peaks"]))
    _write_tuning(rows, best, chosen, split, folder.path if out is None else Path(out), owned=out is not None)
    return chosen, rows


def _write_tuning(rows: list[dict], best: dict, chosen: DetectConfig, split: str, folder: Path, owned: bool) -> None:
    """``detect-tuning.csv`` and ``detect.yaml`` into ``folder``: a run folder, or with ``owned`` an output folder
    of equiseg's (`owned_outputs`: made if missing, equiseg's own files replaced, others kept).
    """
    with owned_outputs(folder, True) if owned else contextlib.nullcontext(folder) as target:
        tuning, detect = target / TUNING_FILE, target / DETECT_FILE
        with written_whole(tuning) as partial, partial.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with written_whole(detect) as partial:
            partial.write_text(f"# chosen by equiseg tune-detect on the {split} split: mF1 {best['mf1']:.4f} "
                               f"({len(rows)} settings tried, see {TUNING_FILE})\n"
                               + yaml.safe_dump(asdict(chosen), sort_keys=False))
