"""Score a trained model on a split: loss, Dice, IoU and the OCELOT detection score."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from equiseg.config import Config
from equiseg.data.context import ContextFn, run_context
from equiseg.data.datamodule import model_input, sample_target
from equiseg.data.ocelot import OcelotFolder
from equiseg.data.targets import IGNORE_INDEX
from equiseg.evaluation.detection import detection_scores, write_points_json
from equiseg.evaluation.inference import predict_probabilities
from equiseg.evaluation.metrics import confusion_matrix, segmentation_scores
from equiseg.training.losses import DiceCELoss


@dataclass
class Evaluation:
    """Scores of one split, and what each image gave (for pictures and the prediction file)."""

    scores: dict[str, float]
    ids: list[str]
    points: list[np.ndarray]            # per image (N, 4): x, y, class, probability
    per_image: list[dict[str, float]]   # per image: loss, dice/mean


def evaluate_model(model: nn.Module, config: Config, root: Path | str, split: str = "test",
                   tile: int | None = 1024, on_image: Callable[[int, int], None] | None = None,
                   keep: Callable[[int, str, torch.Tensor], None] | None = None,
                   transform: Callable | None = None, context: ContextFn | None = None) -> Evaluation:
    """Evaluate ``model`` (eval mode) on ``split`` of the dataset at ``root``.

    Loss: Dice + cross-entropy as in training, averaged over images. Dice and IoU: from the
    confusion matrix summed over the split. Detection (cell task): cells read off each
    probability map with ``config.detect`` and scored by the OCELOT rules (15 px). ``keep(i,
    id, probs)`` receives each probability map (C, H, W), for pictures. ``transform`` (see
    :mod:`equiseg.evaluation.robustness`) turns each image with its labels first; only its
    valid region is scored. ``context`` gives a context model its tissue channels (default:
    :func:`equiseg.data.context.run_context` of the config for evaluation, i.e. the tissue
    model's probabilities where the config names one); it is ignored for models without context.
    """
    task = config.task.value
    folder = OcelotFolder(root, split)
    names = config.task.class_names
    loss_fn = DiceCELoss(config.train.dice_weight, config.train.ce_weight)
    cm = torch.zeros(len(names), len(names), dtype=torch.long)
    points, gts, per_image = [], [], []
    if config.data.context == "none":
        context = None
    elif context is None:
        context = run_context(config.data, evaluation=True)
    model.eval()
    for i in range(len(folder)):
        sample = folder[i]
        image, target = sample_target(sample, task, config.data.radius)
        image = model_input(image, None if context is None else context(sample))
        target = torch.from_numpy(target.astype(np.int64))
        cells, valid = sample.cells, None
        if transform is not None:
            image, target, cells, valid = transform(image, target, cells)
            target = torch.where(valid, target, torch.full_like(target, IGNORE_INDEX))
        probs = predict_probabilities(model, image, tile=tile)
        logits = probs.clamp_min(1e-12).log()  # softmax is shift-invariant: log p are valid logits
        loss = float(loss_fn(logits[None], target[None]))
        image_cm = confusion_matrix(probs.argmax(0), target, len(names))
        cm += image_cm
        per_image.append({"loss": loss, "dice/mean": segmentation_scores(image_cm, names)["dice/mean"]})
        if task == "cells":
            found = config.detect.cells(probs)
            if valid is not None and len(found):
                found = found[valid[found[:, 1].astype(int), found[:, 0].astype(int)].numpy()]
            points.append(found)
            gts.append(cells)
        if keep is not None:
            keep(i, folder.ids[i], probs)
        if on_image is not None:
            on_image(i + 1, len(folder))
    scores = {"loss": float(np.mean([p["loss"] for p in per_image])), **segmentation_scores(cm, names)}
    if task == "cells":
        scores |= detection_scores(points, gts)
    return Evaluation(scores, list(folder.ids), points, per_image)


def write_evaluation(evaluation: Evaluation, out_dir: Path | str, split: str) -> dict[str, Path]:
    """``scores-<split>.json`` and, for cells, ``cell_classification.json`` (official format)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"scores": out_dir / f"scores-{split}.json"}
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in evaluation.scores.items()}
    paths["scores"].write_text(json.dumps({"split": split, "ids": evaluation.ids, "scores": clean,
                                           "per_image": evaluation.per_image}, indent=1) + "\n")
    if evaluation.points:
        paths["points"] = write_points_json(out_dir / "cell_classification.json", evaluation.points)
    return paths


SCORE_ROWS = [("loss", "Dice-CE loss"), ("dice/mean", "Dice (mean)"), ("dice/BC", "Dice BC"), ("dice/TC", "Dice TC"),
              ("dice/background", "Dice background"), ("dice/cancer", "Dice cancer"), ("miou", "mIoU"),
              ("precision/BC", "precision BC"), ("recall/BC", "recall BC"), ("f1/BC", "F1 BC"),
              ("precision/TC", "precision TC"), ("recall/TC", "recall TC"), ("f1/TC", "F1 TC"), ("mf1", "mF1")]
