"""Training targets: cell points -> class disks or centre maps; tissue masks -> class indices; tissue crops.

Class indices: cells 0 background, 1 BC, 2 TC; tissue 0 background, 1 cancer area;
``IGNORE_INDEX`` (255) marks pixels that no loss or metric counts.

A target is stored as one (H, W) uint8 *code map*, so that crops and augmentation move it as
they move any label mask (nearest sampling copies codes, never mixes them), and a
`CellTarget` reads it back as hard classes (for Dice, IoU and the confusion matrix) or
as soft class probabilities (for the loss):

* ``disks`` (the paper's, Liem 2025): codes are classes; a disk of ``radius`` px around each cell.
* ``centres``: a Gaussian of ``sigma`` px on each cell centre, as soft targets: a pixel at
  distance d (rounded to whole px) from its nearest centre, of class k, has probability
  g = exp(-d² / 2 sigma²) of k and 1 - g of background, out to d = 3 sigma. Neighbouring cells
  keep separate peaks however crowded they are, where touching disks merge into one plateau.
  Code: 0 background, else 1 + (k - 1) * reach + d with reach = ceil(3 sigma) + 1. The hard
  class is k where g >= 1/2.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from equiseg.data.ocelot import TISSUE_BACKGROUND, TISSUE_CANCER, TISSUE_UNKNOWN

IGNORE_INDEX = 255
DEFAULT_RADIUS = 30


class Task(enum.Enum):
    """What a model segments: cell classes (0 background, 1 BC, 2 TC), tissue (0 background, 1 cancer),
    or, as stage 2 of the two-stage cell model, the nucleus and class of each proposed cell in a
    window centred on it (``nuclei``: `equiseg.models.window.CellWindowNet`; it trains on instance labels).
    """

    CELLS = "cells"
    TISSUE = "tissue"
    NUCLEI = "nuclei"

    @property
    def class_names(self) -> list[str]:
        return ["background", "cancer"] if self is Task.TISSUE else ["background", "BC", "TC"]


class TargetKind(enum.Enum):
    """How cell points become a training target (see the module docstring)."""

    DISKS = "disks"
    CENTRES = "centres"


DEFAULT_SIGMA = 5.0


@dataclass(frozen=True)
class CellTarget:
    """One target design: encodes cell points as a code map and reads code maps back.

    ``radius`` (px) is the disks' radius; ``sigma`` (px) the centre Gaussians' width. Tissue
    targets and disks are their own codes (`classes` is the identity).
    """

    kind: TargetKind = TargetKind.DISKS
    radius: float = DEFAULT_RADIUS
    sigma: float = DEFAULT_SIGMA

    def __post_init__(self) -> None:
        if self.kind is TargetKind.CENTRES and not 0 < self.sigma <= 40:
            raise ValueError(f"data.sigma must be in (0, 40] px (codes must fit a byte), got {self.sigma}")

    @property
    def reach(self) -> int:
        """Distances 0 .. reach - 1 px from a centre are coded (centres only)."""
        return math.ceil(3 * self.sigma) + 1

    def encode(self, cells: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(H, W) uint8 codes of the cells (N, 3) rows (x, y, class) on an image of ``shape``."""
        if self.kind is TargetKind.DISKS:
            return cell_class_mask(cells, shape, self.radius)
        labels, distance = _nearest_centres(cells, shape, self.reach - 1)
        codes = np.zeros(shape, np.uint8)
        near = labels > 0
        codes[near] = 1 + (labels[near].astype(np.int64) - 1) * self.reach + np.rint(np.sqrt(distance[near])).astype(
            np.int64)
        return codes

    def _decode(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class, g) of a centre code map: class 0 where background or ignored."""
        codes = codes.long()
        near = (codes > 0) & (codes != IGNORE_INDEX)
        k = torch.where(near, (codes - 1) // self.reach + 1, 0)
        d = torch.where(near, (codes - 1) % self.reach, 0).float()
        g = torch.where(near, torch.exp(-(d * d) / (2 * self.sigma**2)), 0.0)
        return k, g

    def classes(self, codes: torch.Tensor) -> torch.Tensor:
        """Hard class indices (long, same shape), ``IGNORE_INDEX`` kept."""
        if self.kind is TargetKind.DISKS:
            return codes.long()
        k, g = self._decode(codes)
        hard = torch.where(g >= 0.5, k, 0)
        return torch.where(codes.long() == IGNORE_INDEX, IGNORE_INDEX, hard)

    def soft(self, codes: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Class probabilities (B, C, H, W) float32 of codes (B, H, W); ignored pixels all 0."""
        keep = codes.long() != IGNORE_INDEX
        if self.kind is TargetKind.DISKS:
            onehot = F.one_hot(torch.where(keep, codes.long(), 0), num_classes).permute(0, 3, 1, 2).float()
            return onehot * keep[:, None]
        k, g = self._decode(codes)
        soft = F.one_hot(k, num_classes).permute(0, 3, 1, 2).float() * g[:, None]
        soft[:, 0] = 1 - g
        return soft * keep[:, None]


PAPER_TARGET = CellTarget()  # the paper's disks of radius 30 px


def _nearest_centres(cells: np.ndarray, shape: tuple[int, int], reach: float) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel, the class (0: none) and squared distance of its nearest cell within
    ``reach`` px. Exact ties between cells of different classes go to the higher class, a rule
    that does not depend on coordinates, so the result turns with the image (and does not
    depend on the order of the points).
    """
    height, width = shape
    labels = np.zeros(shape, np.uint8)
    best = np.full(shape, np.inf)
    r = int(np.floor(reach))
    for x, y, cls in np.asarray(cells, dtype=np.int64).reshape(-1, 3).tolist():
        y0, y1, x0, x1 = max(y - r, 0), min(y + r + 1, height), max(x - r, 0), min(x + r + 1, width)
        if y0 >= y1 or x0 >= x1:
            continue
        rows, cols = np.ogrid[y0:y1, x0:x1]
        d2 = (rows - y) ** 2 + (cols - x) ** 2
        here, label = best[y0:y1, x0:x1], labels[y0:y1, x0:x1]
        win = (d2 <= reach * reach) & ((d2 < here) | ((d2 == here) & (cls > label)))
        here[win] = d2[win]
        label[win] = cls
    return labels, best


def cell_class_mask(cells: np.ndarray, shape: tuple[int, int], radius: float = DEFAULT_RADIUS) -> np.ndarray:
    """Paint a disk of ``radius`` px around each cell point with its class.

    A pixel (row i, column j) belongs to the disk of point (x, y) when
    (j - x)^2 + (i - y)^2 <= radius^2. Where disks overlap, the nearest centre wins; exact
    ties between centres of different classes go to the higher class (a rule that does not
    depend on coordinates, so the mask of turned points is the turned mask), and the result
    does not depend on the order of the points.

    Args:
        cells: (N, 3) rows (x, y, class), x = column, y = row, class 1 (BC) or 2 (TC).
        shape: (H, W) of the cell image.
        radius: disk radius in px (the paper's default is 30).

    Returns:
        (H, W) uint8 with 0 background, 1 BC, 2 TC.
    """
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    return _nearest_centres(cells, shape, radius)[0]


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
