"""The two-stage cell model on one image: stage 1 proposes cells (a ``cells`` U-Net and its detection
settings), stage 2 (a ``nuclei`` `CellWindowNet`) gives each proposal its nucleus and its class in a
window centred on it, and the nuclei are pasted into one instance label image.

Pasting: a pixel belongs to the proposal whose window gives it the highest nucleus probability, if
that is at least ``threshold``; equal probabilities go to the higher proposal score, then the higher
class, and only then to the earlier proposal (a rule that does not depend on coordinates, so the
labels turn with the image, exact ties aside). Then every proposal owns its centre pixel and each
instance keeps the 4-connected piece that holds it (`settle_instances`), so points and outlines agree. Each
instance has the one class stage 2 gave it: a class never changes inside an outline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from equiseg.config import Config
from equiseg.detection import find_cells
from equiseg.detection.instances import NUCLEUS_THRESHOLD, settle_instances
from equiseg.inference.tiling import inference_model, predict_probabilities
from equiseg.models.unet import reflect_pad
from equiseg.models.window import window_classes
from equiseg.runtime import Runtime


@dataclass(frozen=True, eq=False)
class CellInstances:
    """The cells of one image as instances.

    Attributes:
        labels: (H, W) int32, 0 background, k the cell of row k - 1 of ``cells``.
        cells: (N, 4) float64 rows (x, y, class, probability): the proposal's pixel, stage 2's class
            (1 BC, 2 TC) and its probability.
        proposal_scores: (N,) stage 1's score of each proposal.
    """

    labels: np.ndarray
    cells: np.ndarray
    proposal_scores: np.ndarray


WindowSource = Callable[[int, int], torch.Tensor]
"""The model input's window centred on pixel (x, y): (C, S, S) float (RGB in [0, 1], then any context)."""


def run_windows(model: nn.Module, source: WindowSource, centres: np.ndarray, side: int, batch: int = 64,
                runtime: Runtime | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2 on the windows ``source`` gives for ``centres`` (M, 2) rows (x, y), ``batch`` at a time: (M,
    side, side) float32 nucleus probabilities and (M, K) float32 class probabilities (BC first). The model
    runs optimized for inference (`inference_model`, as tiles do) unless ``runtime.optimize`` is off.
    """
    device = runtime.device if runtime is not None else next(model.parameters()).device
    net = inference_model(model) if runtime is None or runtime.optimize else model
    centres = np.asarray(centres, np.int64).reshape(-1, 2)
    classes_out = window_classes(model)
    masks = np.zeros((len(centres), side, side), np.float32)
    classes = np.zeros((len(centres), classes_out), np.float32)
    with torch.inference_mode():
        for start in range(0, len(centres), batch):
            chunk = centres[start:start + batch]
            windows = torch.stack([source(x, y) for x, y in chunk.tolist()]).to(device)
            with runtime.autocast() if runtime is not None else torch.autocast("cpu", enabled=False):
                mask, logits = net(windows)
            masks[start:start + len(chunk)] = torch.sigmoid(mask[:, 0].float()).cpu().numpy()
            classes[start:start + len(chunk)] = torch.softmax(logits.float(), dim=1).cpu().numpy()
    return masks, classes


def window_predictions(model: nn.Module, image: torch.Tensor, cells: np.ndarray, side: int, batch: int = 64,
                       runtime: Runtime | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2 on every cell of one input: its nucleus probability in its window and its class probabilities
    (`run_windows`).

    Args:
        model: a `CellWindowNet` in eval mode.
        image: (C, H, W) model input (RGB in [0, 1], then any context), mirrored beyond its edges
            as training windows are (`equiseg.data.windows`).
        cells: (N, >= 2) rows starting (x, y), the centre pixels.
        side: the window's odd side, px (the run's ``window.side_px``).
        batch: windows per forward pass.
        runtime: device, precision, and whether the model runs optimized (default: the model's device,
            float32, optimized).
    """
    half = side // 2
    padded = reflect_pad(image, (half, half, half, half))
    centres = np.asarray(cells, np.float64).reshape(-1, np.asarray(cells).shape[-1] if len(cells) else 2)[:, :2]

    def source(x: int, y: int) -> torch.Tensor:
        return padded[:, y:y + side, x:x + side]

    return run_windows(model, source, centres, side, batch, runtime)


def paste_instances(masks: np.ndarray, cells: np.ndarray, shape: tuple[int, int], classes: np.ndarray,
                    scores: np.ndarray, threshold: float = NUCLEUS_THRESHOLD) -> np.ndarray:
    """One instance label image (H, W) int32 from each cell's nucleus probability in its window (see
    the module's docstring for the rule); label k is row k - 1.
    """
    height, width = shape
    side = masks.shape[-1] if len(masks) else 1
    half = side // 2
    labels = np.zeros(shape, np.int32)
    best = np.full(shape, -1.0, np.float32)
    rank = np.full((height, width, 2), -np.inf)  # (score, class) of the pixel's owner
    for k, (x, y) in enumerate(np.asarray(cells)[:, :2].astype(np.int64).tolist()):
        y0, y1, x0, x1 = max(y - half, 0), min(y + half + 1, height), max(x - half, 0), min(x + half + 1, width)
        if y0 >= y1 or x0 >= x1:
            continue
        p = masks[k, y0 - (y - half):y1 - (y - half), x0 - (x - half):x1 - (x - half)]
        here, owner, order = best[y0:y1, x0:x1], labels[y0:y1, x0:x1], rank[y0:y1, x0:x1]
        mine = (float(scores[k]), float(classes[k]))
        higher = (mine[0] > order[..., 0]) | ((mine[0] == order[..., 0]) & (mine[1] > order[..., 1]))
        win = (p >= threshold) & ((p > here) | ((p == here) & higher))
        here[win], owner[win] = p[win], k + 1
        order[win] = mine
    table = np.column_stack([np.asarray(cells, np.float64)[:, :2], classes, scores]).reshape(-1, 4)
    return settle_instances(labels, table)


def two_stage_instances(stage1: nn.Module, stage1_config: Config, stage2: nn.Module, stage2_config: Config,
                        image: torch.Tensor, stage2_image: torch.Tensor | None = None, tile: int | None = 1024,
                        runtime: Runtime | None = None, threshold: float = NUCLEUS_THRESHOLD) -> CellInstances:
    """The two-stage model on one input: stage 1's cells (found with its ``detect`` settings) as proposals,
    stage 2's nucleus and class for each, pasted into instances (`paste_instances`).

    Args:
        stage1: the ``cells`` U-Net (eval mode); stage1_config its config.
        stage2: the ``nuclei`` window net (eval mode); stage2_config its config (``window.side_px`` set).
        image: (C, H, W) stage 1's input.
        stage2_image: stage 2's input where it differs (other context channels); default ``image``.
        tile: stage 1's tile side (None: whole).
        runtime: device, batch and precision.
        threshold: the least nucleus probability of an instance's pixel.
    """
    side = stage2_config.window.side_px
    if side is None:
        raise ValueError("the stage-2 config has no window.side_px (it is set when stage 2 trains)")
    probs = predict_probabilities(stage1, image, tile=tile, runtime=runtime)
    proposals = find_cells(probs[:stage1_config.class_channels], stage1_config.detect)
    masks, class_probs = window_predictions(stage2, image if stage2_image is None else stage2_image, proposals, side,
                                            runtime=runtime)
    classes = class_probs.argmax(1) + 1 if len(class_probs) else np.zeros(0, np.int64)
    probability = class_probs.max(1) if len(class_probs) else np.zeros(0)
    scores = proposals[:, 3] if len(proposals) else np.zeros(0)
    labels = paste_instances(masks, proposals, (image.shape[-2], image.shape[-1]), classes, scores, threshold)
    cells = np.column_stack([proposals[:, :2], classes, probability]) if len(proposals) else np.zeros((0, 4))
    return CellInstances(labels, cells.astype(np.float64), scores.astype(np.float64))


@dataclass(frozen=True, eq=False)
class TileInstances:
    """The instances whose centre lies in one tile's core, whole (`instances_in_tiles`).

    Attributes:
        top, left: where ``labels`` lies in the image, px.
        labels: (h, w) int32: 0, or i + 1 for the cell ``rows[i]``.
        rows: (m,) the cells' rows in the proposals.
        classes: (m,) their classes (1 BC, 2 TC).
        probability: (m,) their class's probability.
    """

    top: int
    left: int
    labels: np.ndarray
    rows: np.ndarray
    classes: np.ndarray
    probability: np.ndarray


WindowFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""Stage 2 on cells given as (M, 2) rows (x, y): (M, S, S) nucleus probabilities and (M, K) class probabilities."""


def instances_in_tiles(proposals: np.ndarray, shape: tuple[int, int], side: int, windows: WindowFn,
                       tile: int = 2048, threshold: float = NUCLEUS_THRESHOLD) -> Iterator[TileInstances]:
    """`paste_instances` over an image of any size, a tile at a time, in bounded memory.

    Each tile's core (``tile`` px square, row-major) reports the cells whose centre lies in it, each
    once and whole: a nucleus lies inside its window (``side // 2`` px around its centre), and every
    window that can touch it belongs to a centre within ``side - 1`` px of the core, so the tile
    pastes those (stage 2 run again for the ones its neighbours also need) on a canvas of the core
    grown by ``side - 1`` px, and its core's instances equal the whole image's pasting exactly.
    Memory: the canvas and its cells' windows, whatever the image's size.
    """
    height, width = shape
    proposals = np.asarray(proposals, np.float64).reshape(-1, 4)
    xs, ys = proposals[:, 0].astype(np.int64), proposals[:, 1].astype(np.int64)
    reach = side - 1
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            near = np.flatnonzero((ys >= top - reach) & (ys < top + tile + reach)
                                  & (xs >= left - reach) & (xs < left + tile + reach))
            core = (ys[near] >= top) & (ys[near] < top + tile) & (xs[near] >= left) & (xs[near] < left + tile)
            if not core.any():
                continue
            y0, x0 = max(0, top - reach), max(0, left - reach)
            y1, x1 = min(height, top + tile + reach), min(width, left + tile + reach)
            masks, class_probs = windows(np.column_stack([xs[near], ys[near]]))
            classes = class_probs.argmax(1) + 1
            local = proposals[near].copy()
            local[:, 0] -= x0
            local[:, 1] -= y0
            labels = paste_instances(masks, local, (y1 - y0, x1 - x0), classes, local[:, 3], threshold)
            keep = np.zeros(len(near) + 1, np.int32)
            keep[1:][core] = np.arange(1, int(core.sum()) + 1)
            yield TileInstances(y0, x0, keep[labels], near[core], classes[core], class_probs[core].max(1))
