"""Probability maps from a trained model, whole or in overlapping tiles with bounded memory."""

from __future__ import annotations

import torch
from torch import nn


def _starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


@torch.no_grad()
def predict_probabilities(model: nn.Module, image: torch.Tensor, tile: int | None = 1024,
                          overlap: int = 128) -> torch.Tensor:
    """Softmax probabilities (classes, H, W) for one input (C, H, W): RGB in [0, 1], then any context.

    Images no larger than ``tile`` on both sides go through whole. Larger ones are cut into
    ``tile`` x ``tile`` windows overlapping by ``overlap`` px; each window's probabilities are
    weighted by a ramp that falls towards its edges (where a U-Net sees less context) and the
    weighted sum is normalised. Memory is bounded by one window's activations plus the
    (C, H, W) output. ``model`` should be in eval mode.
    """
    device = next(model.parameters()).device
    _, height, width = image.shape
    if tile is None or (height <= tile and width <= tile):
        return model(image[None].to(device)).softmax(1)[0].cpu()
    if overlap >= tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    step = tile - overlap
    ramp = torch.minimum(torch.arange(tile) + 1, torch.arange(tile).flip(0) + 1).float().clamp(max=overlap + 1)
    weight = (ramp[:, None] * ramp[None, :]) / (overlap + 1) ** 2  # (tile, tile), 1 inside, falls to the edges
    out = total = None
    for top in _starts(height, tile, step):
        for left in _starts(width, tile, step):
            window = image[:, top:top + tile, left:left + tile]
            h, w = window.shape[-2:]
            probs = model(window[None].to(device)).softmax(1)[0].cpu()
            if out is None:
                out = torch.zeros(probs.shape[0], height, width)
                total = torch.zeros(height, width)
            out[:, top:top + h, left:left + w] += probs * weight[:h, :w]
            total[top:top + h, left:left + w] += weight[:h, :w]
    return out / total
