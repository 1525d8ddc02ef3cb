"""Measured equivariance: how far f(T x) is from T f(x)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from equiseg.data.augment import sampling_grid
from equiseg.groups import D4, Group, GroupElement
from equiseg.runtime import exact_float32


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


class GroupTTA(nn.Module):
    """Average a model's probabilities over a group: f_tta(x) = mean_g T_g^-1 softmax(f(T_g x)).

    For any model f, f_tta(T_u x) = T_u f_tta(x) for u in the group, exactly up to float
    rounding (the average runs over the same set of transformed inputs, reordered), at |G|
    times the inference cost. Returns log-probabilities, so ``softmax`` of the output gives the
    averaged probabilities and it can stand wherever logits are expected.
    """

    def __init__(self, model: nn.Module, group: Group = D4) -> None:
        super().__init__()
        self.model, self.group = model, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for g in self.group.elements:
            probs = self.model(Group.act_on_image(g, x)).softmax(dim=1)
            back = Group.act_on_image(Group.inverse(g), probs)
            total = back if total is None else total + back
        return (total / self.group.order).clamp_min(1e-12).log()


def rotation_error(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, degrees: float) -> float:
    """Relative error of f(R x) against R f(x) for a rotation by ``degrees`` about the centre.

    Both sides are resampled (bilinear), so even an exactly rotation-invariant function shows
    interpolation error; only the disk inscribed in the image, 2 px in from its edge, is
    compared (it stays inside under any rotation).
    """
    import torch.nn.functional as F


    height, width = x.shape[-2:]
    grid, _ = sampling_grid(torch.tensor([float(degrees)]), None, height, width)
    grid = grid.to(x.device).expand(x.shape[0], -1, -1, -1)

    def turn(t: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(t, grid.to(t.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)

    with torch.no_grad():
        lhs, rhs = f(turn(x)), turn(f(x))
    yy, xx = torch.meshgrid(torch.arange(height, device=x.device), torch.arange(width, device=x.device),
                            indexing="ij")
    radius = min(height, width) / 2 - 2
    disk = ((xx - (width - 1) / 2) ** 2 + (yy - (height - 1) / 2) ** 2) <= radius**2
    return relative_error(lhs[..., disk], rhs[..., disk])


def certificate(model: nn.Module, images: list[torch.Tensor], group: Group = D4,
                angles: tuple[float, ...] = (45.0,)) -> dict[str, float]:
    """Measured equivariance of a model's probabilities on real inputs, in eval mode.

    ``{"group": max over images and g of relative_error(f(T_g x), T_g f(x)), "rot45": ...}``:
    the first is ~1e-6 for a model exact for ``group``; the angle entries measure how far the
    model is from equivariance under rotations it is not built for (interpolation included).
    Runs on the model's device, always in float32 with TF32 off (:func:`equiseg.runtime.exact_float32`),
    whatever precision the rest of an evaluation uses.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def probs(t: torch.Tensor) -> torch.Tensor:
        return model(t.to(device, torch.float32)).softmax(dim=1).cpu()

    try:
        with exact_float32():
            return _certificate(probs, images, group, angles)
    finally:
        model.train(was_training)


def _certificate(probs: Callable[[torch.Tensor], torch.Tensor], images: list[torch.Tensor], group: Group,
                 angles: tuple[float, ...]) -> dict[str, float]:
    batched = [x[None] if x.ndim == 3 else x for x in images]
    result = {"group": max(max(equivariance_errors(probs, x, group.elements).values()) for x in batched)}
    for angle in angles:
        result[f"rot{angle:g}"] = max(rotation_error(probs, x, angle) for x in batched)
    return result
