"""Measured equivariance: how far f(T x) is from T f(x)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from equiseg.data.augment import sampling_grid
from equiseg.groups import D4, Group, GroupElement
from equiseg.models.unet import model_class_channels, probabilities
from equiseg.runtime import exact_float32


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| / max |b|: the worst pixel's error as a fraction of the largest value."""
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
    """Average a model's probabilities over a group: f_tta(x) = mean_g T_g^-1 p(f(T_g x)), with p
    `equiseg.models.unet.probabilities` (softmax over the classes, sigmoid of a nucleus channel).

    For any model f, f_tta(T_u x) = T_u f_tta(x) for u in the group, exactly up to float
    rounding (the average runs over the same set of transformed inputs, reordered), at |G|
    times the inference cost. Returns logits of the averaged probabilities (log-probabilities of
    the classes, the logit log q - log(1 - q) of an averaged nucleus probability q), so
    `probabilities` of the output (``softmax`` for a model without a nucleus channel) gives the
    averaged probabilities and it can stand wherever logits are expected. ``class_channels`` is the
    model's (`model_class_channels`).
    """

    def __init__(self, model: nn.Module, group: Group = D4) -> None:
        super().__init__()
        self.model, self.group = model, group
        self.class_channels = model_class_channels(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for g in self.group.elements:
            probs = probabilities(self.model(Group.act_on_image(g, x)), self.class_channels)
            back = Group.act_on_image(Group.inverse(g), probs)
            total = back if total is None else total + back
        assert total is not None  # a group has at least the identity
        mean = total / self.group.order
        classes = self.class_channels
        if classes is None or classes >= mean.shape[1]:
            return mean.clamp_min(1e-12).log()
        return torch.cat([mean[:, :classes].clamp_min(1e-12).log(), torch.logit(mean[:, classes:], eps=1e-6)], dim=1)


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


SPLINE_ORDER = 5  # the interpolator of the arbitrary-angle measure: quintic B-splines (scipy.ndimage)


def rotate_image(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """(..., H, W) turned by ``degrees`` counter-clockwise as shown, about the image centre, with
    quintic spline interpolation (``scipy.ndimage.rotate``, order 5, zeros outside); float64 on
    the CPU inside, ``x``'s dtype out.
    """
    array = x.detach().cpu().double().numpy()
    # ndimage.rotate turns the (row, column) plane; rows grow downwards, so a positive angle turns
    # the picture counter-clockwise as shown, as torch.rot90(k=1) does
    turned = ndimage.rotate(array, degrees, axes=(-1, -2), reshape=False, order=SPLINE_ORDER, mode="constant",
                            prefilter=True)
    return torch.from_numpy(turned).to(x.dtype)


def band_limited_noise(size: int, channels: int = 3, sigma: float = 3.0, seed: int = 0) -> torch.Tensor:
    """(1, channels, size, size) Gaussian noise smoothed by a Gaussian of ``sigma`` px and
    scaled to [0, 1]: an input whose rotation interpolators reproduce well (few frequencies near
    the grid's limit).
    """
    rng = torch.Generator().manual_seed(seed)
    noise = torch.randn(channels, size, size, generator=rng, dtype=torch.float64).numpy()
    smooth = ndimage.gaussian_filter(noise, (0, sigma, sigma), mode="wrap")
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return torch.from_numpy(smooth).float()[None]


def arbitrary_angle_error(f: Callable[[torch.Tensor], torch.Tensor] | None, x: torch.Tensor, degrees: float,
                          disk: float = 0.25) -> float:
    """How far f is from commuting with a rotation by ``degrees``, separated from resampling.

    e = ||R_-θ f(R_θ x) - f(x)|| / ||f(x) - mean f(x)|| (L2 over the channels and the central disk
    of radius ``disk`` x side, each channel's mean over the disk taken out of both sides), with R_θ
    the quintic-spline rotation `rotate_image`; NaN for a map without any pattern there. The round trip
    puts both sides on x's own grid; ``f=None`` measures the identity network, R_-θ R_θ x
    against x: the resampling floor, below which no network's error can be told apart. The disk
    keeps the comparison away from the corners that a rotation fills with zeros (and from
    what a network sees of them), so ``x`` should be a few times the model's reach across.
    ``x``: (1, C, H, W), band-limited (`band_limited_noise`, or smoothed tissue).
    """
    f = f or (lambda t: t)
    with torch.no_grad():
        reference = f(x)
        back = rotate_image(f(rotate_image(x, degrees)), -degrees)
    height, width = x.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    inside = ((xx - (width - 1) / 2) ** 2 + (yy - (height - 1) / 2) ** 2) <= (disk * min(height, width)) ** 2
    a, b = back[..., inside].double(), reference[..., inside].double()
    # each channel's mean over the disk removed from both: a constant offset (a logit bias, the
    # mean of a probability) would hide how the pattern turns; a map without pattern has no error
    a, b = a - b.mean(dim=-1, keepdim=True), b - b.mean(dim=-1, keepdim=True)
    scale = b.norm()
    return float((a - b).norm() / scale) if scale > 1e-9 * max(1.0, float(reference.abs().max())) else math.nan


def smoothed(x: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """``x`` (..., H, W) blurred in the plane by a Gaussian of ``sigma`` px (reflecting edges), float32: a
    band-limited probe made from a real image, so that rotating it resamples little.
    """
    array = x.detach().cpu().double().numpy()
    blurred = ndimage.gaussian_filter(array, [0] * (array.ndim - 2) + [sigma, sigma], mode="reflect")
    return torch.from_numpy(blurred).float()


def certificate(model: nn.Module, images: list[torch.Tensor], group: Group = D4,
                angles: tuple[float, ...] = (45.0,)) -> dict[str, float]:
    """Measured equivariance of a model's probabilities on real inputs, in eval mode.

    ``{"group": max over images and g of relative_error(f(T_g x), T_g f(x)), "rot45": ...,
    "arb45": ..., "floor45": ...}``: the first is ~1e-6 for a model exact for ``group``; ``rot{a}``
    measure how far the model is from equivariance under rotations it is not built for (bilinear
    interpolation of both sides included, max over images); ``arb{a}`` is
    `arbitrary_angle_error` on the images smoothed by `smoothed` (mean over images), and
    ``floor{a}`` the same for the identity network: the resampling floor below which no model's
    ``arb{a}`` can be told apart. Runs on the model's device, always in float32 with TF32 off
    (`equiseg.runtime.exact_float32`), whatever precision the rest of an evaluation uses.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    classes = model_class_channels(model)

    def probs(t: torch.Tensor) -> torch.Tensor:
        return probabilities(model(t.to(device, torch.float32)), classes).cpu()

    try:
        with exact_float32():
            return _certificate(probs, images, group, angles)
    finally:
        model.train(was_training)


def _mean_of_finite(values: list[float]) -> float:
    """The mean of the values that are not NaN; NaN, without numpy's warning, when none is (a featureless
    image has no error at an arbitrary angle to measure).
    """
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _certificate(probs: Callable[[torch.Tensor], torch.Tensor], images: list[torch.Tensor], group: Group,
                 angles: tuple[float, ...]) -> dict[str, float]:
    batched = [x[None] if x.ndim == 3 else x for x in images]
    result = {"group": max(max(equivariance_errors(probs, x, group.elements).values()) for x in batched)}
    probes = [smoothed(x) for x in batched]
    for angle in angles:
        result[f"rot{angle:g}"] = max(rotation_error(probs, x, angle) for x in batched)
        result[f"arb{angle:g}"] = _mean_of_finite([arbitrary_angle_error(probs, x, angle) for x in probes])
        result[f"floor{angle:g}"] = float(np.mean([arbitrary_angle_error(None, x, angle) for x in probes]))
    return result
