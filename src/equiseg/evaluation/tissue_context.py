"""Tissue context from a tissue model: the second stage of the paper (Liem, 2025), after SoftCTM, in one place.

A tissue model segments the whole tissue patch; its class probabilities over the cell patch's
block (located from the pair's metadata) are resampled onto the cell patch's grid and given to
the cell model as extra input channels after the colours. Training (``data.context=model``),
evaluation, the challenge interface and prediction all get their context here
(`run_context`, `context_fn`, `model_context`); `TissueContextNet` is
the same chain as one module, for stating and testing its exactness. What a context is
(`ContextKind`) and the ground-truth context live in
`equiseg.data.context`, below the config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from equiseg.config import DataConfig
from equiseg.data.context import ContextFn, ContextKind, cell_block_tensor, truth_context
from equiseg.data.ocelot import PairMeta, Sample, image_to_tensor
from equiseg.data.targets import Task, tissue_crop
from equiseg.groups import GroupElement
from equiseg.inference.tiling import predict_probabilities
from equiseg.runs import load_model
from equiseg.runtime import resolve_device


class TissueContextNet(nn.Module):
    """cell logits = cell_model(cat(cell image, crop(softmax(tissue_model(tissue image)), block))).

    Guarantee: if both models are exact for a group G (their families' groups contain G) and
    each block's corners are whole tissue pixels, then transforming the pair together,

        f(T_g cell, T_g tissue, g . block) = T_g f(cell, tissue, block)   for g in G,

    where ``g . block`` is `transform_block` (the crop's sample points map onto the
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
        height, width = cell.shape[-2:]
        return self.cell_model(torch.cat([cell, self.context(tissue, blocks, (height, width))], dim=1))


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


@torch.no_grad()
def tissue_probabilities(tissue_model: nn.Module, tissue_image: torch.Tensor) -> torch.Tensor:
    """The tissue model's softmax on a whole tissue patch (3, Ht, Wt): (2, Ht, Wt), on the CPU."""
    return predict_probabilities(tissue_model, tissue_image, tile=1024).float()


def model_context(tissue_model: nn.Module, tissue_image: torch.Tensor, meta: PairMeta,
                  cell_shape: tuple[int, int]) -> torch.Tensor:
    """A tissue model's class probabilities over the cell patch: (2, H, W) float32.

    ``tissue_image``: (3, Ht, Wt) in [0, 1]. The whole tissue patch goes through the model (its
    context reaches beyond the cell block), then the block is cut out bilinearly.
    """
    probs = tissue_probabilities(tissue_model, tissue_image)
    block = cell_block_tensor(meta, cell_shape, (tissue_image.shape[-2], tissue_image.shape[-1]))
    return tissue_crop(probs[None], block, cell_shape, mode="bilinear")[0]


def load_tissue_model(path: Path | str, device: str | torch.device = "cpu") -> nn.Module:
    """A trained tissue model (eval mode, on ``device``) from a run folder or checkpoint; refuses a cell model."""
    model, config = load_model(path, device)
    if config.task is not Task.TISSUE:
        raise ValueError(f"{path}: a {config.task.value} model, not a tissue model")
    return model


def context_fn(kind: ContextKind, tissue_model: Path | str | nn.Module | None = None,
               device: str | torch.device | None = None) -> ContextFn | None:
    """The context of ``kind`` (``NONE`` gives None) as a function of a sample.

    ``MODEL`` needs ``tissue_model`` (a module, run folder or checkpoint; a loaded one runs on
    ``device``, by default this process's GPU when there is one, see
    `equiseg.runtime.resolve_device`). The result is always on the CPU.
    """
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
