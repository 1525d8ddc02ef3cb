"""Segmentation scores from a confusion matrix: Dice and IoU per class.

Scores are accumulated over a whole split (sum the confusion matrices of its images), as
MONAI's and torchmetrics' "global" reductions do. A class that appears neither in the
prediction nor in the target has no defined score: it is NaN and left out of the means.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix

from equiseg.data.targets import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(C, C) int64 counts, rows = target class, columns = predicted class; ``ignore_index`` skipped.

    ``pred`` and ``target`` are class-index tensors of the same shape. Counted by torchmetrics
    (``multiclass_confusion_matrix``); training keeps the
    same counts in a `MulticlassConfusionMatrix`, which
    the library sums across DDP processes.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    kept = target[target != ignore_index]
    if kept.numel() and (kept.max() >= num_classes or kept.min() < 0):  # torchmetrics would fail obscurely
        raise ValueError(f"target classes outside 0..{num_classes - 1} (other than {ignore_index})")
    return multiclass_confusion_matrix(pred.long(), target.long(), num_classes, ignore_index=ignore_index,
                                       validate_args=True).long().cpu()


def dice_per_class(cm: torch.Tensor | np.ndarray) -> np.ndarray:
    """2 TP / (2 TP + FP + FN) per class; NaN where the class is in neither prediction nor target."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    denominator = cm.sum(0) + cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def iou_per_class(cm: torch.Tensor | np.ndarray) -> np.ndarray:
    """TP / (TP + FP + FN) per class; NaN where the class is in neither prediction nor target."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def segmentation_scores(cm: torch.Tensor | np.ndarray, class_names: list[str]) -> dict[str, float]:
    """``dice/<name>``, ``iou/<name>`` per class, ``dice/mean`` and ``miou`` (NaN-aware means)."""
    dice, iou = dice_per_class(cm), iou_per_class(cm)
    scores = {f"dice/{name}": float(d) for name, d in zip(class_names, dice)}
    scores |= {f"iou/{name}": float(i) for name, i in zip(class_names, iou)}
    scores["dice/mean"] = float(np.nanmean(dice)) if not np.isnan(dice).all() else float("nan")
    scores["miou"] = float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")
    return scores
