"""Tissue context for the cell model (the seed's second stage, after SoftCTM).

A tissue model segments the tissue patch; its class probabilities over the cell patch's block
are resampled onto the cell patch's grid and concatenated with the cell image as extra input
channels of the cell model.
"""

from __future__ import annotations

import torch
from torch import nn

from equiseg.data.targets import tissue_crop
from equiseg.groups import GroupElement


class TissueContextNet(nn.Module):
    """cell logits = cell_model(cat(cell image, crop(softmax(tissue_model(tissue image)), block))).

    Guarantee: if both models are exact for a group G (their families' groups contain G) and
    each block's corners are whole tissue pixels, then transforming the pair together,

        f(T_g cell, T_g tissue, g . block) = T_g f(cell, tissue, block)   for g in G,

    where ``g . block`` is :func:`transform_block` (the crop's sample points map onto the
    transformed block's sample points, and bilinear interpolation commutes with grid turns).

    Shapes: cell (B, 3, H, W), tissue (B, 3, Ht, Wt), blocks (B, 4) rows (x0, y0, x1, y1) in
    tissue pixels -> (B, num_classes, H, W). The cell model takes 3 + tissue classes channels.
    """

    def __init__(self, tissue_model: nn.Module, cell_model: nn.Module) -> None:
        super().__init__()
        self.tissue_model, self.cell_model = tissue_model, cell_model

    def context(self, tissue: torch.Tensor, blocks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Tissue class probabilities on the cell patch's grid: (B, tissue classes, H, W)."""
        return tissue_crop(self.tissue_model(tissue).softmax(dim=1), blocks, size, mode="bilinear")

    def forward(self, cell: torch.Tensor, tissue: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        return self.cell_model(torch.cat([cell, self.context(tissue, blocks, cell.shape[-2:])], dim=1))


def transform_block(block: tuple[float, float, float, float], g: GroupElement, tissue_height: int,
                    tissue_width: int) -> tuple[float, float, float, float]:
    """Where a block (x0, y0, x1, y1) of the tissue patch lies after ``Group.act_on_image(g, tissue)``.

    Continuous coordinates, pixel i covering [i, i + 1). A flip maps x -> W - x; a quarter turn
    (``torch.rot90`` k=1, counter-clockwise as shown) maps (x, y) -> (y, W - x) and swaps the sides.
    """
    x0, y0, x1, y1 = block
    h, w = tissue_height, tissue_width
    if g.flip:
        x0, x1 = w - x1, w - x0
    for _ in range(g.rotation % 4):
        x0, y0, x1, y1 = y0, w - x1, y1, w - x0
        h, w = w, h
    return x0, y0, x1, y1
