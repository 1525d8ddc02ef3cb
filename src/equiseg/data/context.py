"""Tissue context for the cell task: two extra input channels per cell patch.

A cell model with context reads ``cat(cell image, context)``: (3 + 2, H, W), where the context
is the cell patch's block of a tissue map (located from the pair's metadata, see
`equiseg.data.ocelot.PairMeta.cell_block`) resampled onto the cell patch's grid. Its two
channels are the tissue classes (background, cancer area). The map is either

- ``truth``: the one-hot ground-truth tissue mask (nearest resampling; unknown pixels (255)
  and samples outside the tissue patch are all-zero), or
- ``model``: a trained tissue model's softmax probabilities (bilinear resampling; outside the
  tissue patch all-zero).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import numpy as np
import torch

from equiseg.data.ocelot import PairMeta, Sample
from equiseg.data.targets import IGNORE_INDEX, tissue_class_mask, tissue_crop


class ContextKind(enum.Enum):
    """Where a cell model's tissue context comes from (``data.context``): none, the ground-truth
    tissue mask, or a tissue model's probabilities.
    """

    NONE = "none"
    TRUTH = "truth"
    MODEL = "model"


CONTEXT_CHANNELS = 2
"""Tissue classes: 0 background, 1 cancer area."""

ContextFn = Callable[[Sample], torch.Tensor]
"""Sample -> (CONTEXT_CHANNELS, H, W) float32 context on the cell patch's grid."""


def cell_block_tensor(meta: PairMeta, cell_shape: tuple[int, int], tissue_shape: tuple[int, int]) -> torch.Tensor:
    """The cell patch's block in the tissue patch as a (1, 4) tensor (x0, y0, x1, y1)."""
    return torch.tensor([meta.cell_block(cell_shape, tissue_shape)], dtype=torch.float64)


def truth_context(sample: Sample) -> torch.Tensor:
    """The one-hot ground-truth tissue classes over the cell patch: (2, H, W) float32 of 0s and 1s.

    Unknown tissue (255) and samples outside the tissue patch have both channels 0.
    """
    if sample.tissue_mask is None:
        raise ValueError(f"{sample.meta.sample_id}: no tissue mask, so no ground-truth context")
    classes = torch.from_numpy(tissue_class_mask(sample.tissue_mask).astype(np.float32))[None, None]
    cell_shape = sample.cell_image.shape[:2]
    block = cell_block_tensor(sample.meta, cell_shape, sample.tissue_mask.shape)
    labels = tissue_crop(classes, block, cell_shape, mode="nearest", fill=IGNORE_INDEX)[0, 0]
    return torch.stack([labels == k for k in range(CONTEXT_CHANNELS)]).float()


def cached(fn: ContextFn) -> ContextFn:
    """``fn`` computed once per sample (keyed by slide, subset and sample id) and kept (8 bytes a pixel).

    For evaluating one split many times (robustness transforms, several models with the same
    tissue model): the tissue model then runs once per image.
    """
    store: dict[tuple[str, str, str], torch.Tensor] = {}

    def lookup(sample: Sample) -> torch.Tensor:
        key = (sample.meta.slide_name, sample.meta.subset, sample.meta.sample_id)
        if key not in store:
            store[key] = fn(sample)
        return store[key]

    return lookup
