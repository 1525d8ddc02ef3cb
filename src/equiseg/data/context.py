"""Tissue context for the cell task: two extra input channels per cell patch.

A cell model with context reads ``cat(cell image, context)``: (3 + 2, H, W), where the context
is the cell patch's block of a tissue map (located from the pair's metadata, see
:meth:`equiseg.data.ocelot.PairMeta.cell_block`) resampled onto the cell patch's grid. Its two
channels are the tissue classes (background, cancer area). The map is either

- ``truth``: the one-hot ground-truth tissue mask (nearest resampling; unknown pixels (255)
  and samples outside the tissue patch are all-zero), or
- ``model``: a trained tissue model's softmax probabilities (bilinear resampling; outside the
  tissue patch all-zero).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from equiseg.data.ocelot import PairMeta, Sample
from equiseg.data.targets import IGNORE_INDEX, Task, tissue_class_mask, tissue_crop
from equiseg.runtime import resolve_device

if TYPE_CHECKING:
    from equiseg.config import DataConfig

class ContextKind(enum.Enum):
    """Where a cell model's tissue context comes from (``data.context``): none, the ground-truth
    tissue mask, or a tissue model's probabilities."""

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


@torch.no_grad()
def tissue_probabilities(tissue_model: nn.Module, tissue_image: torch.Tensor) -> torch.Tensor:
    """The tissue model's softmax on a whole tissue patch (3, Ht, Wt): (2, Ht, Wt), on the CPU."""
    from equiseg.evaluation.inference import predict_probabilities

    return predict_probabilities(tissue_model, tissue_image, tile=1024).float()


def model_context(tissue_model: nn.Module, tissue_image: torch.Tensor, meta: PairMeta,
                  cell_shape: tuple[int, int]) -> torch.Tensor:
    """A tissue model's class probabilities over the cell patch: (2, H, W) float32.

    ``tissue_image``: (3, Ht, Wt) in [0, 1]. The whole tissue patch goes through the model (its
    context reaches beyond the cell block), then the block is cut out bilinearly.
    """
    probs = tissue_probabilities(tissue_model, tissue_image)
    block = cell_block_tensor(meta, cell_shape, tuple(tissue_image.shape[-2:]))
    return tissue_crop(probs[None], block, cell_shape, mode="bilinear")[0]


def load_tissue_model(path: Path | str, device: str | torch.device = "cpu") -> nn.Module:
    """A trained tissue model (eval mode, on ``device``) from a run folder or checkpoint; refuses a cell model."""
    from equiseg.runs import load_model

    model, config = load_model(path, device)
    if config.task is not Task.TISSUE:
        raise ValueError(f"{path}: a {config.task.value} model, not a tissue model")
    return model


def context_fn(kind: ContextKind, tissue_model: Path | str | nn.Module | None = None,
               device: str | torch.device | None = None) -> ContextFn | None:
    """The context of ``kind`` (``NONE`` gives None) as a function of a sample.

    ``MODEL`` needs ``tissue_model`` (a module, run folder or checkpoint; a loaded one runs on
    ``device``, by default this process's GPU when there is one, see
    :func:`equiseg.runtime.resolve_device`). The result is always on the CPU.
    """
    from equiseg.data.datamodule import image_to_tensor

    match ContextKind(kind):
        case ContextKind.NONE:
            return None
        case ContextKind.TRUTH:
            return truth_context
    if tissue_model is None:
        raise ValueError("context 'model' needs a tissue model (data.tissue_model=RUN_DIR or CKPT)")
    if isinstance(tissue_model, nn.Module):
        model = tissue_model
    else:  # on this process's GPU when there is one: the tissue patches are 1024 px
        model = load_tissue_model(tissue_model, resolve_device(device))
    model.eval()

    def from_model(sample: Sample) -> torch.Tensor:
        return model_context(model, image_to_tensor(sample.tissue_image), sample.meta, sample.cell_image.shape[:2])

    return from_model


def run_context(data: DataConfig, evaluation: bool = False, tissue_model: Path | str | nn.Module | None = None,
                device: str | torch.device | None = None) -> ContextFn | None:
    """The context a run's config asks for (``data.context``, ``data.tissue_model``).

    Training uses ``data.context`` as written. Evaluation (``evaluation=True``) of a model with
    context uses the tissue model whenever there is one, since test images come without
    tissue labels in practice; ``truth`` without a tissue model gives the oracle context.
    ``tissue_model`` replaces ``data.tissue_model``; ``device`` is where a loaded one runs.
    """
    tissue_model = tissue_model if tissue_model is not None else data.tissue_model
    kind = data.context
    if evaluation and kind is not ContextKind.NONE and tissue_model is not None:
        kind = ContextKind.MODEL
    return context_fn(kind, tissue_model if kind is ContextKind.MODEL else None, device)


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
