"""Rotation robustness: the test images and their labels turned by D4 elements or any angle.

A transform maps (image, target, cells) to the transformed triple and a ``valid`` mask of the
pixels whose content came from inside the original image. Elements of D4 are exact
permutations (everything is valid). A rotation by another angle resamples the image
(bilinear) and the target (nearest) about the centre; the corners it brings in from outside
are marked invalid, and scores count only the valid region (the target there is set to the
ignore value, and cells outside it are dropped from both the prediction and the truth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from equiseg.data.augment import sampling_grid, warp
from equiseg.data.targets import IGNORE_INDEX
from equiseg.groups import D4, Group, GroupElement


@dataclass(frozen=True)
class Transform:
    """A D4 element (``element``) or a rotation by ``degrees`` counter-clockwise as shown."""

    name: str
    element: GroupElement | None = None
    degrees: float = 0.0

    def __call__(self, image: torch.Tensor, target: torch.Tensor, cells: np.ndarray
                 ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor]:
        """(C, H, W) image (with any context channels), (H, W) target, (N, 3) cells -> the same transformed, and (H, W) bool valid."""
        height, width = target.shape
        if self.element is not None:
            g = self.element
            return (Group.act_on_image(g, image), Group.act_on_image(g, target),
                    transform_points_d4(cells, g, height, width),
                    torch.ones(Group.act_on_image(g, target).shape, dtype=torch.bool))
        grid, inside = sampling_grid(torch.tensor([float(self.degrees)]), None, height, width)
        turned, masks = warp(image[None], {"target": target[None]}, grid, inside)
        valid = inside[0]
        points = rotate_points(cells, self.degrees, height, width)
        if len(points):
            x, y = points[:, 0], points[:, 1]
            keep = (x >= 0) & (x < width) & (y >= 0) & (y < height)
            points = points[keep]
            points = points[valid[points[:, 1], points[:, 0]].numpy()]
        return turned[0], masks["target"][0], points, valid


def transform_points_d4(cells: np.ndarray, g: GroupElement, height: int, width: int) -> np.ndarray:
    """Where points (x, y, ...) go under ``Group.act_on_image(g, .)`` on an H x W image (exact)."""
    out = np.array(cells, dtype=np.int64, copy=True).reshape(-1, np.asarray(cells).shape[-1] if len(cells) else 3)
    h, w = height, width
    if g.flip:
        out[:, 0] = w - 1 - out[:, 0]
    for _ in range(g.rotation % 4):
        # one quarter turn (torch.rot90 k=1): (x, y) -> (y, W - 1 - x) and the sides swap
        x, y = out[:, 0].copy(), out[:, 1].copy()
        out[:, 0], out[:, 1] = y, w - 1 - x
        h, w = w, h
    return out


def rotate_points(cells: np.ndarray, degrees: float, height: int, width: int) -> np.ndarray:
    """Points turned by ``degrees`` about the image centre, as the image content turns; rounded."""
    cells = np.asarray(cells, dtype=np.float64).reshape(-1, np.asarray(cells).shape[-1] if len(cells) else 3)
    theta = math.radians(degrees)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    u, v = cells[:, 0] - cx, cells[:, 1] - cy
    out = cells.copy()
    out[:, 0] = np.cos(theta) * u + np.sin(theta) * v + cx
    out[:, 1] = -np.sin(theta) * u + np.cos(theta) * v + cy
    return np.rint(out).astype(np.int64)


def standard_transforms(angles: tuple[float, ...] = (15.0, 30.0, 45.0)) -> list[Transform]:
    """Every element of D4, then rotations by ``angles``."""
    return [Transform(str(g), element=g) for g in D4.elements] + [Transform(f"rot{a:g}", degrees=a) for a in angles]


def mask_invalid(target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The target with ``IGNORE_INDEX`` outside the valid region."""
    return torch.where(valid, target, torch.full_like(target, IGNORE_INDEX))
