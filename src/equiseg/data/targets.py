"""Training targets: cell points -> class disks; tissue masks -> class indices; tissue crops.

Class indices: cells 0 background, 1 BC, 2 TC; tissue 0 background, 1 cancer area;
``IGNORE_INDEX`` (255) marks pixels that no loss or metric counts.
"""

from __future__ import annotations

import enum

import numpy as np
import torch
import torch.nn.functional as F

from equiseg.data.ocelot import TISSUE_BACKGROUND, TISSUE_CANCER, TISSUE_UNKNOWN

IGNORE_INDEX = 255
DEFAULT_RADIUS = 30


class Task(enum.Enum):
    """What a model segments: cell classes (0 background, 1 BC, 2 TC) or tissue (0 background, 1 cancer)."""

    CELLS = "cells"
    TISSUE = "tissue"

    @property
    def class_names(self) -> list[str]:
        return ["background", "BC", "TC"] if self is Task.CELLS else ["background", "cancer"]


def cell_class_mask(cells: np.ndarray, shape: tuple[int, int], radius: float = DEFAULT_RADIUS) -> np.ndarray:
    """Paint a disk of ``radius`` px around each cell point with its class.

    A pixel (row i, column j) belongs to the disk of point (x, y) when
    (j - x)^2 + (i - y)^2 <= radius^2. Where disks overlap, the nearest centre wins; exact
    ties go to the smallest (x, y, class), so the result does not depend on the order of the
    points.

    Args:
        cells: (N, 3) rows (x, y, class), x = column, y = row, class 1 (BC) or 2 (TC).
        shape: (H, W) of the cell image.
        radius: disk radius in px (the seed's default is 30).

    Returns:
        (H, W) uint8 with 0 background, 1 BC, 2 TC.
    """
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    height, width = shape
    labels = np.zeros(shape, np.uint8)
    best = np.full(shape, np.inf)
    r = int(np.floor(radius))
    for x, y, cls in sorted(map(tuple, np.asarray(cells, dtype=np.int64).reshape(-1, 3).tolist())):
        y0, y1, x0, x1 = max(y - r, 0), min(y + r + 1, height), max(x - r, 0), min(x + r + 1, width)
        if y0 >= y1 or x0 >= x1:
            continue
        rows, cols = np.ogrid[y0:y1, x0:x1]
        d2 = (rows - y) ** 2 + (cols - x) ** 2
        win = (d2 <= radius * radius) & (d2 < best[y0:y1, x0:x1])  # strict: an exact tie keeps the earlier point
        best[y0:y1, x0:x1][win] = d2[win]
        labels[y0:y1, x0:x1][win] = cls
    return labels


def tissue_class_mask(mask: np.ndarray) -> np.ndarray:
    """OCELOT tissue values (1 background, 2 cancer area, 255 unknown) -> classes 0, 1, IGNORE_INDEX."""
    out = np.full(mask.shape, IGNORE_INDEX, np.uint8)
    out[mask == TISSUE_BACKGROUND] = 0
    out[mask == TISSUE_CANCER] = 1
    unexpected = ~np.isin(mask, (TISSUE_BACKGROUND, TISSUE_CANCER, TISSUE_UNKNOWN))
    if unexpected.any():
        raise ValueError(f"tissue mask values {np.unique(mask[unexpected]).tolist()} outside {{1, 2, 255}}")
    return out


def tissue_crop(tissue: torch.Tensor, blocks: torch.Tensor, size: tuple[int, int], mode: str = "bilinear",
                fill: float = 0.0) -> torch.Tensor:
    """Resample the cell patch's block of tissue maps to the cell patch's grid.

    Coordinates are continuous with pixel i covering [i, i + 1); cell pixel (i, j) samples the
    tissue map at (x0 + (j + 0.5) * (x1 - x0) / W, y0 + (i + 0.5) * (y1 - y0) / H). With a
    4x ratio and an integer corner, ``mode="nearest"`` repeats each tissue pixel 4x4 times
    exactly. Samples outside the tissue map get ``fill``.

    Args:
        tissue: (B, C, Ht, Wt) float maps (class probabilities, or a mask as float).
        blocks: (B, 4) rows (x0, y0, x1, y1) in tissue pixels, as ``PairMeta.cell_block`` gives.
        size: (H, W) of the cell patch.
        mode: "bilinear" for probabilities, "nearest" for label masks.
        fill: value for samples outside the tissue map (IGNORE_INDEX for masks).

    Returns:
        (B, C, H, W).
    """
    batch, _, tissue_h, tissue_w = tissue.shape
    height, width = size
    blocks = torch.as_tensor(blocks, dtype=torch.float64).reshape(batch, 4)
    j = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    i = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    xs = blocks[:, 0:1] + j[None] * (blocks[:, 2:3] - blocks[:, 0:1])  # (B, W) tissue x
    ys = blocks[:, 1:2] + i[None] * (blocks[:, 3:4] - blocks[:, 1:2])  # (B, H) tissue y
    # grid_sample with align_corners=False: normalised u = 2 x / Wt - 1
    u = (2 * xs / tissue_w - 1)[:, None, :].expand(batch, height, width)
    v = (2 * ys / tissue_h - 1)[:, :, None].expand(batch, height, width)
    grid = torch.stack([u, v], dim=-1).to(tissue.dtype if tissue.is_floating_point() else torch.float32)
    grid = grid.to(tissue.device)
    shifted = tissue.float() - fill  # zero padding outside, then shift back: outside reads ``fill``
    return F.grid_sample(shifted, grid, mode=mode, padding_mode="zeros", align_corners=False) + fill
