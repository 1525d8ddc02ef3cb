"""Scoring cells as instances on a split: panoptic quality per class and averaged, AJI, and the OCELOT
mF1 of the instances' centroids, from any predictor that gives an image its instance labels and cells.

The two-stage cell model (a ``nuclei`` run and the ``cells`` run that proposes its cells) is one such
predictor (`equiseg.evaluation.evaluate.two_stage_predictor`); `evaluate_instances` scores any of them
against the split's instance labels (``annotations/SPLIT/cell_instances``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from equiseg.data.ocelot import CELL_CLASSES, OcelotFolder, Sample
from equiseg.detection import detection_scores, match_counts
from equiseg.detection.instances import measure_instances
from equiseg.evaluation.data_record import DataRecord
from equiseg.evaluation.instance_metrics import (
    InstanceCounts,
    blended_share,
    instance_counts,
    instance_scores,
    per_image_scores,
)
from equiseg.evaluation.result import ContextSource, Evaluation

Predictor = Callable[[Sample], tuple[np.ndarray, np.ndarray]]
"""An image's instances: ``sample`` -> (labels (H, W) int, cells (N, 4) rows (x, y, class, probability)),
label k the cell of row k - 1."""

CLASS_NAMES = tuple(CELL_CLASSES.values())  # BC, TC


def centroid_points(labels: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """The cells as points at their instances' centroids: (N, 4) rows (x, y, class, probability) with
    (x, y) the pixel holding the centroid; a cell without pixels keeps its own point.
    """
    points = np.asarray(cells, np.float64).reshape(-1, 4).copy()
    if not len(points):
        return points
    measured = measure_instances(labels, len(points), 1.0)
    found = np.isfinite(measured["centroid_x"])
    points[found, 0] = np.floor(measured["centroid_x"][found])
    points[found, 1] = np.floor(measured["centroid_y"][found])
    return points


def image_scores(sample: Sample, labels: np.ndarray, cells: np.ndarray) -> tuple[InstanceCounts, dict[str, float],
                                                                                np.ndarray]:
    """One image against its truth: the instance counts, its row (matches per class for the OCELOT score,
    its own PQ and AJI), and its cells at their centroids.
    """
    truth, points = sample.instances, sample.cells
    if truth is None or points is None:
        raise ValueError(f"sample {sample.meta.sample_id}: no instance labels to score instances against "
                         "(annotations/SPLIT/cell_instances)")
    true_classes = np.concatenate([[0], points[:, 2]]).astype(np.int64)
    pred_classes = np.concatenate([[0], np.asarray(cells, np.float64).reshape(-1, 4)[:, 2]]).astype(np.int64)
    counts = instance_counts(truth, labels, true_classes, pred_classes, num_classes=len(CLASS_NAMES))
    found = centroid_points(labels, cells)
    row = {key: value for key, value in per_image_scores([counts], CLASS_NAMES).items()}
    for cls, name in CELL_CLASSES.items():
        tp, fp, n_gt = match_counts(found, points, cls)
        row |= {f"tp/{name}": tp, f"fp/{name}": fp, f"gt/{name}": n_gt}
    return counts, row, found


class InstanceTally:
    """Instance scores summed over a split's images as they come (`add`), then read (`scores`)."""

    def __init__(self) -> None:
        self.total = InstanceCounts.zeros(len(CLASS_NAMES))
        self.points: list[np.ndarray] = []
        self.truths: list[np.ndarray] = []
        self.instances = self.blended = 0

    def add(self, sample: Sample, labels: np.ndarray, cells: np.ndarray,
            class_map: np.ndarray | None = None) -> dict[str, float]:
        """One image's instances (and, with a per-pixel class map, their blending); returns its row."""
        counts, row, found = image_scores(sample, labels, cells)
        self.total = self.total + counts
        self.points.append(found)
        assert sample.cells is not None  # image_scores refuses a sample without labels
        self.truths.append(sample.cells)
        if class_map is not None and len(found):
            share = blended_share(labels, class_map)
            row["blended"] = share
            self.instances += len(found)
            self.blended += round(share * len(found))
        return row

    def scores(self) -> dict[str, float]:
        """PQ, AJI and the centroids' OCELOT scores (see `evaluate_instances`), and ``blended``: the share
        of all instances whose pixels mix BC and TC (when class maps were given).
        """
        scores = {**instance_scores(self.total, CLASS_NAMES), **detection_scores(self.points, self.truths)}
        if self.instances:
            scores["blended"] = self.blended / self.instances
        return scores


def evaluate_instances(predict: Predictor, root: Path | str, split: str = "test",
                       context: ContextSource = ContextSource.NONE,
                       on_image: Callable[[int, int], None] | None = None) -> Evaluation:
    """Score a predictor of instances on a split with instance labels.

    Scores: ``pq/BC``, ``pq/TC``, ``pq/mean`` (from counts summed over the split: CoNIC's mPQ+), their
    ``sq``/``rq``, ``pq/all`` (nuclei matched whatever their class), ``aji`` and ``aji_plus`` (pooled over
    the split), and the OCELOT scores (``mf1``, per-class precision, recall and F1) of the instances'
    centroids by the official rule. Each image's row holds its own PQ, AJI and matches.
    """
    folder = OcelotFolder(root, split)
    tally = InstanceTally()
    rows, shapes = [], []
    for i in range(len(folder)):
        sample = folder[i]
        rows.append(tally.add(sample, *predict(sample)))
        shapes.append(sample.cell_image.shape[:2])
        if on_image is not None:
            on_image(i + 1, len(folder))
    return Evaluation(tally.scores(), list(folder.ids), tally.points, rows, context, shapes,
                      DataRecord.of_folder(root))
