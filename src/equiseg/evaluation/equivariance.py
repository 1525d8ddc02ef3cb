"""Measured equivariance: how far f(T x) is from T f(x)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from equiseg.groups import D4, Group, GroupElement


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the worst pixel's error as a fraction of the largest value."""
    scale = b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)
    return float((a - b).abs().max() / scale)


def equivariance_errors(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    elements: Iterable[GroupElement] = D4.elements,
    act_out: Callable[[GroupElement, torch.Tensor], torch.Tensor] = Group.act_on_image,
    act_in: Callable[[GroupElement, torch.Tensor], torch.Tensor] = Group.act_on_image,
) -> dict[str, float]:
    """``{str(g): relative_error(f(T_g x), T'_g f(x))}`` for each element g.

    ``act_in`` and ``act_out`` say how g acts on the input and the output: as on an image (the
    default, for images and logit maps) or as on regular features. A model should be in
    evaluation mode.
    """
    with torch.no_grad():
        reference = f(x)
        return {str(g): relative_error(f(act_in(g, x)), act_out(g, reference)) for g in elements}


def model_equivariance_error(model: nn.Module, x: torch.Tensor, group: Group = D4) -> float:
    """The worst relative error over the elements of ``group``, with ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return max(equivariance_errors(model, x, group.elements).values())
    finally:
        model.train(was_training)
