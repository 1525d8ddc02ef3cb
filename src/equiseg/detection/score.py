"""Cells as points: read them off probability maps, score them by the OCELOT rules, and
read and write the official ``cell_classification.json`` format.

The OCELOT 2023 score (mF1), as the official scorer computes it today (lunit-io/ocelot23algo,
``evaluation/eval.py`` at commit fb1f722, 2023-07-28, "fixing confidence computation", read on
2026-11-27): for each class (1 = BC, 2 = TC) separately, the predictions of an image are
visited in descending probability (``np.argsort(-confidence)`` over the class's rows as float32,
numpy's default sort) and each takes the nearest ground-truth point of the same class within
15 px (Euclidean on float32 coordinates, inclusive) that no earlier prediction took (a true
positive); a prediction with none left is a false positive. TP, FP and the number of
ground-truth points are summed over all images; precision = TP / (TP + FP + 1e-7), recall =
TP / (GT + 1e-7), F1 = 2 P R / (P + R + 1e-7), each rounded to 4 decimals; mF1 is the mean of
the rounded F1(BC) and F1(TC).

Ties in probability are visited in the order numpy's default (unstable) argsort gives them, as
in the official scorer; this module makes the same call, so it agrees with the scorer run by
the same numpy on the same machine.

Before that fix the scorer sorted by the column holding the class index, the same for every
prediction of a class, so predictions were in effect visited in file order.
``MatchOrder.PRE_JULY_2023`` reproduces that older figure for comparison with results computed
by it; ``MatchOrder.OFFICIAL`` (the default everywhere) is today's rule.
"""

from __future__ import annotations

import enum

import numpy as np

from equiseg.data.ocelot import CELL_CLASSES

DISTANCE_CUTOFF = 15.0


class MatchOrder(enum.Enum):
    """The order in which a class's predictions take ground-truth points (see the module docstring)."""

    OFFICIAL = "official"            # descending probability: the scorer since 2023-07-28
    PRE_JULY_2023 = "pre-july-2023"  # by the class column, i.e. file order: the scorer before that fix


def match_counts(pred: np.ndarray, gt: np.ndarray, cls: int, cutoff: float = DISTANCE_CUTOFF,
                 order: MatchOrder = MatchOrder.OFFICIAL) -> tuple[int, int, int]:
    """(TP, FP, number of GT) of one image and class, by the OCELOT greedy matching.

    Args:
        pred: (N, 4) rows (x, y, class, probability), in file order.
        gt: (M, >=3) rows (x, y, class, ...).
        cls: 1 or 2.
        cutoff: the largest matching distance, px (inclusive).
        order: `MatchOrder`; the official scorer's current rule by default.
    """
    # float32 rows, as the official scorer holds them: probabilities that differ only beyond
    # float32 precision tie there, and ties are broken by the same argsort
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt, dtype=np.float64)
    gt = gt.reshape(-1, gt.shape[-1] if gt.size else 3)
    p = pred[pred[:, 2] == cls].astype(np.float32)
    g = gt[gt[:, 2] == cls, :2].astype(np.float32)
    if not len(p):
        return 0, 0, len(g)
    match MatchOrder(order):
        case MatchOrder.OFFICIAL:
            visit = np.argsort(-p[:, 3])
        case MatchOrder.PRE_JULY_2023:
            visit = np.argsort(-p[:, 2])
    distance = np.linalg.norm(p[:, None, :2] - g[None, :, :], axis=2)
    free = distance <= cutoff
    tp = 0
    for i in visit:
        candidates = np.flatnonzero(free[i])
        if candidates.size:
            j = candidates[np.argmin(distance[i, candidates])]  # first of equal distances, as min() does
            free[:, j] = False
            tp += 1
    return tp, len(p) - tp, len(g)


def detection_scores(preds: list[np.ndarray], gts: list[np.ndarray], cutoff: float = DISTANCE_CUTOFF,
                     order: MatchOrder = MatchOrder.OFFICIAL) -> dict[str, float]:
    """OCELOT scores over a list of images.

    Keys: ``precision/BC``, ``recall/BC``, ``f1/BC`` (rounded to 4 decimals, as the official
    scorer reports them), ``tp/BC``, ``fp/BC``, ``gt/BC``, the same for TC, and ``mf1``, the
    official figure: the mean of the two rounded F1. The same before rounding are kept as
    ``unrounded/precision/BC`` ... ``unrounded/mf1``.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predicted images but {len(gts)} ground-truth images")
    scores: dict[str, float] = {}
    unrounded: dict[str, float] = {}
    for cls, name in CELL_CLASSES.items():
        tp = fp = n_gt = 0
        for pred, gt in zip(preds, gts):
            a, b, c = match_counts(pred, gt, cls, cutoff, order)
            tp, fp, n_gt = tp + a, fp + b, n_gt + c
        precision = tp / (tp + fp + 1e-7)
        recall = tp / (n_gt + 1e-7)
        f1 = 2 * precision * recall / (precision + recall + 1e-7)
        for key, value in (("precision", precision), ("recall", recall), ("f1", f1)):
            scores[f"{key}/{name}"] = round(value, 4)
            unrounded[f"unrounded/{key}/{name}"] = value
        scores |= {f"tp/{name}": tp, f"fp/{name}": fp, f"gt/{name}": n_gt}
    scores["mf1"] = (scores["f1/BC"] + scores["f1/TC"]) / 2
    unrounded["unrounded/mf1"] = (unrounded["unrounded/f1/BC"] + unrounded["unrounded/f1/TC"]) / 2
    return scores | unrounded
