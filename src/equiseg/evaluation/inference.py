"""Probability maps from a trained model, whole or in overlapping tiles, batched on any device."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from equiseg.runtime import Runtime

WindowReader = Callable[[int, int, int, int], torch.Tensor]  # (top, left, height, width) -> (C, h, w) float


def _starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """The windows (top, left, h, w) that cover an H x W image, row by row.

    Windows are ``tile`` x ``tile`` (or the image's side where it is smaller) and overlap their
    neighbours by at least ``overlap`` px; the last window of a row or column ends at the edge,
    so all windows of one image have the same shape.
    """
    if overlap >= tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    step = tile - overlap
    h, w = min(tile, height), min(tile, width)
    return [(top, left, h, w) for top in _starts(height, tile, step) for left in _starts(width, tile, step)]


def tile_weight(tile: int, overlap: int) -> torch.Tensor:
    """(tile, tile) blending weight: 1 inside, a linear ramp over the ``overlap`` px at each edge
    (where a U-Net sees less context); a window's share of the blend in overlaps."""
    ramp = torch.minimum(torch.arange(tile) + 1, torch.arange(tile).flip(0) + 1).float().clamp(max=overlap + 1)
    return (ramp[:, None] * ramp[None, :]) / (overlap + 1) ** 2


@torch.no_grad()
def window_probabilities(model: nn.Module, read: WindowReader, windows: list[tuple[int, int, int, int]],
                         runtime: Runtime) -> Iterator[tuple[tuple[int, int, int, int], torch.Tensor]]:
    """Each window with its softmax probabilities (classes, h, w), float32 on the CPU.

    Windows go through ``model`` (already on ``runtime.device``, eval mode) ``runtime.batch`` at
    a time, under ``runtime.autocast()``; only one batch of windows is held at once.
    """
    for k in range(0, len(windows), runtime.batch):
        chunk = windows[k:k + runtime.batch]
        x = torch.stack([read(*w) for w in chunk]).to(runtime.device, torch.float32, non_blocking=True)
        with runtime.autocast():
            probs = model(x).float().softmax(1)
        probs = probs.cpu()
        yield from zip(chunk, probs)


def model_runtime(model: nn.Module) -> Runtime:
    """Batch 1, float32, on the device of ``model``'s parameters."""
    return Runtime(next(model.parameters()).device)


def predict_probabilities(model: nn.Module, image: torch.Tensor, tile: int | None = 1024,
                          overlap: int = 128, runtime: Runtime | None = None) -> torch.Tensor:
    """Softmax probabilities (classes, H, W), float32 on the CPU, for one input (C, H, W): RGB in
    [0, 1], then any context.

    Images no larger than ``tile`` on both sides go through whole. Larger ones are cut into
    ``tile`` x ``tile`` windows overlapping by ``overlap`` px (:func:`tile_grid`); each window's
    probabilities are weighted by :func:`tile_weight` and the weighted sum is normalised.
    ``runtime`` (default: the model's device, batch 1, float32) says where and how many windows
    go through at once. Memory: one batch of windows' activations plus the (C, H, W) input and
    output; :mod:`equiseg.evaluation.predict` streams larger images through disk instead.
    ``model`` should be in eval mode.
    """
    runtime = runtime or model_runtime(model)
    _, height, width = image.shape
    if tile is None or (height <= tile and width <= tile):
        (_, probs), = window_probabilities(model, lambda *_: image, [(0, 0, height, width)], runtime)
        return probs
    weight = tile_weight(tile, overlap)
    out = total = None
    windows = tile_grid(height, width, tile, overlap)
    read = lambda top, left, h, w: image[:, top:top + h, left:left + w]
    for (top, left, h, w), probs in window_probabilities(model, read, windows, runtime):
        if out is None:
            out = torch.zeros(probs.shape[0], height, width)
            total = torch.zeros(height, width)
        out[:, top:top + h, left:left + w] += probs * weight[:h, :w]
        total[top:top + h, left:left + w] += weight[:h, :w]
    return out / total


def stream_probabilities(model: nn.Module, read: WindowReader, height: int, width: int, tile: int | None = 1024,
                         overlap: int = 128, runtime: Runtime | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """The probabilities of an H x W image, finished rows at a time, top to bottom.

    Yields ``(top, rows)``: rows (classes, n, W), float32 on the CPU, are rows top .. top + n - 1
    of what :func:`predict_probabilities` returns for the image that ``read`` gives, bit for bit
    (the same windows, weights, order of sums and normalisation). The rows above a row of
    windows are handed out as soon as no later window reaches them, so only a float32
    accumulator of one row of windows (classes x min(tile, H) x W, and its weight) and one
    batch of windows are held, whatever H.

    Args:
        model: in eval mode, on ``runtime.device``.
        read: (top, left, h, w) -> (C, h, w) float input of that window, read when needed.
        height, width: the image's size, px.
        tile, overlap: as in :func:`predict_probabilities`.
        runtime: default: the model's device, batch 1, float32.
    """
    runtime = runtime or model_runtime(model)
    if tile is None or (height <= tile and width <= tile):
        (_, probs), = window_probabilities(model, read, [(0, 0, height, width)], runtime)
        yield 0, probs
        return
    weight = tile_weight(tile, overlap)
    windows = tile_grid(height, width, tile, overlap)
    band = windows[0][2]  # the height of every window
    out = total = None  # rows top .. top + band - 1
    top = 0
    for (row, left, h, w), probs in window_probabilities(model, read, windows, runtime):
        if out is None:
            out = torch.zeros(probs.shape[0], band, width)
            total = torch.zeros(band, width)
        if row != top:  # a new row of windows: the rows above it are finished
            done = row - top
            yield top, out[:, :done] / total[:done]
            # move the rows still open to the top, in place (the clone: source and target may overlap)
            out[:, :band - done] = out[:, done:].clone()
            out[:, band - done:] = 0
            total[:band - done] = total[done:].clone()
            total[band - done:] = 0
            top = row
        out[:, :h, left:left + w] += probs * weight[:h, :w]
        total[:h, left:left + w] += weight[:h, :w]
    yield top, out / total
