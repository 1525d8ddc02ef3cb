"""The plain U-Net baseline's augmentation: D4, free rotation, elastic warp, noise, colour and stain jitter.

An equivariant model is already invariant to the symmetries of the grid, so it trains with
`AugmentConfig.non_symmetry`; the plain baseline trains with `AugmentConfig.heavy`,
which adds what the equivariant models get for free: flips, quarter turns and free rotations.

Everything runs on batched torch tensors on any device: an image (B, 3, H, W) float in [0, 1]
and any number of integer label masks (B, H, W), long or uint8. Each sample of the batch draws its own parameters;
the image and all masks of one sample move by the same geometric transform.

Order of the steps (each skipped, and drawing nothing, when its probability or strength is 0):

1. ``dihedral``: an exact element of D4 (``torch.flip`` / ``torch.rot90``, see
   `equiseg.groups`). Square inputs draw from all 8 elements; non-square inputs only from
   the 4 that keep the shape (identity, 180 degrees, left-right and top-bottom mirror).
2. ``rotation`` and 3. ``elastic``: composed into one sampling grid per sample, so the image is
   interpolated once (bilinear, reflection outside) and masks once (nearest).
4. ``stain``: H&E(-DAB) jitter in colour-deconvolution space (Ruifrok & Johnston 2001).
5. ``brightness_contrast``, then 6. ``noise``; the image is clamped to [0, 1] at the end.

Conventions
-----------
Pixel coordinates are (x, y) = (column, row). A positive angle turns the image
counter-clockwise as shown (row 0 at the top), the way ``torch.rot90(x, 1, dims=(-2, -1))``
turns, about the image centre ((W - 1) / 2, (H - 1) / 2).

Guarantee on masks: for every mask ``m`` the output's values lie in ``set(m) | {IGNORE_INDEX}``
(255, from `equiseg.data.targets`). ``IGNORE_INDEX`` marks the pixels whose source lies
outside the input (corners of a rotation, borders of an elastic warp), and one already in a
mask stays one, since nearest sampling only copies values.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from equiseg.data.targets import IGNORE_INDEX
from equiseg.groups import D4, GroupElement

RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
"""Rows: the optical-density vectors (R, G, B) of haematoxylin, eosin and DAB (Ruifrok & Johnston 2001)."""

HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED.double()).float()
"""The colour-deconvolution matrix: ``od @ HED_FROM_RGB`` gives the H, E, D concentrations."""

COLOUR_CHANNELS = 3
"""Channels 0-2 of an image are RGB; any after them are extra maps the colour steps skip."""

_MIN_INTENSITY = 1e-6
# Optical density in the units of skimage's rgb2hed, -ln(I) / -ln(1e-6), so 1 is the darkest
# pixel represented: the units in which HED-jitter strengths are usually quoted.
_OD_UNIT = -math.log(_MIN_INTENSITY)


# --- configuration ---------------------------------------------------------------------------


class _Transform(Protocol):
    """What the checks below read of a transform's config: a dataclass with a probability ``p``."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def p(self) -> float: ...


def _check_numbers(group: _Transform) -> None:
    """Every field of a transform's config is a finite number >= 0 and ``p`` a probability.

    Raises TypeError for a value that is not a number, ValueError for one out of range.
    """
    for f in fields(group):
        value = getattr(group, f.name)
        where = f"{type(group).__name__}.{f.name}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where} must be finite, got {value}")
        if value < 0:
            raise ValueError(f"{where} must be >= 0, got {value}")
    if group.p > 1:
        raise ValueError(f"{type(group).__name__}.p is a probability and must be in [0, 1], got {group.p}")


def _strength(at_most: float | None = None, why: str = "") -> Any:
    """A field that sets how strongly a transform acts: 0 (the default) leaves it off, and
    ``at_most`` (with the reason ``why``) bounds it.
    """
    return field(default=0.0, metadata={"strength": True, "at_most": at_most, "why": why})


def _check_transform(group: _Transform) -> None:
    """A transform's config: numbers as `_check_numbers` wants them, strengths within their bounds."""
    _check_numbers(group)
    for f in fields(group):
        bound, value = f.metadata.get("at_most"), getattr(group, f.name)
        if bound is not None and value > bound:
            raise ValueError(f"{type(group).__name__}.{f.name} must be <= {bound} ({f.metadata['why']}), got {value}")


def _enabled(group: _Transform) -> bool:
    """Whether a transform runs: ``p`` > 0 and, if it has strengths, one of them > 0."""
    strengths = [getattr(group, f.name) for f in fields(group) if f.metadata.get("strength")]
    return group.p > 0 and (not strengths or any(value > 0 for value in strengths))


@dataclass(frozen=True)
class Dihedral:
    """Flips and quarter turns: with probability ``p`` a uniform element of D4, else the identity."""

    p: float = 0.0
    __post_init__ = _check_transform
    enabled = property(_enabled)


@dataclass(frozen=True)
class Rotation:
    """With probability ``p``, a rotation by an angle uniform in [-max_degrees, max_degrees] (degrees)."""

    p: float = 0.0
    max_degrees: float = _strength(180.0, "180 already covers every angle")
    __post_init__ = _check_transform
    enabled = property(_enabled)


@dataclass(frozen=True)
class Elastic:
    """With probability ``p``, a smooth random displacement field.

    White Gaussian noise smoothed by a Gaussian of std ``sigma`` px (the smoothness) and scaled
    so that each axis of the displacement has RMS ``alpha`` px (the magnitude), whatever
    ``sigma`` (see `elastic_displacement`). The classic recipe of Simard et al. (2003),
    uniform noise times alpha_S, corresponds to ``alpha ~= alpha_S / (2 * sqrt(3 * pi) * sigma)``:
    alpha_S = 40 at sigma = 10 is about 0.65 px here. The warp starts to fold over itself (a
    locally mirrored image) near ``alpha / sigma = 0.25``: measured on 8 fields of 512 x 512,
    alpha = 2 px at sigma = 10 px never folds, alpha = 3 folds 4 pixels in 10^5.
    """

    p: float = 0.0
    alpha: float = _strength()
    sigma: float = 10.0  # the smoothness, not a strength
    enabled = property(_enabled)

    def __post_init__(self) -> None:
        _check_transform(self)
        if self.sigma == 0:
            raise ValueError("Elastic.sigma must be > 0 (px), got 0")


@dataclass(frozen=True)
class Noise:
    """With probability ``p``, add Gaussian noise of std ``std`` (intensity units, image in [0, 1])."""

    p: float = 0.0
    std: float = _strength()
    __post_init__ = _check_transform
    enabled = property(_enabled)


@dataclass(frozen=True)
class BrightnessContrast:
    """With probability ``p``, ``x -> (x - mean) * c + mean + b``.

    ``b`` uniform in [-brightness, brightness] (intensity units), ``c`` uniform in
    [1 - contrast, 1 + contrast]; ``mean`` is the sample's mean over channels and pixels.
    """

    p: float = 0.0
    brightness: float = _strength()
    contrast: float = _strength(1.0, "a negative contrast factor would invert the image")
    __post_init__ = _check_transform
    enabled = property(_enabled)


@dataclass(frozen=True)
class StainJitter:
    """With probability ``p``, jitter each stain concentration: ``s -> a * s + b`` for s in (H, E, D).

    ``a`` uniform in [1 - sigma, 1 + sigma], ``b`` uniform in [-bias, bias], drawn per sample and
    stain; concentrations in the units of skimage's ``rgb2hed`` (see `rgb_to_hed`).
    """

    p: float = 0.0
    sigma: float = _strength(1.0, "a negative stain scale is not a stain")
    bias: float = _strength()
    __post_init__ = _check_transform
    enabled = property(_enabled)


class AugmentPreset(enum.Enum):
    """The named augmentations (``data.augment: heavy``): none, the baseline's heavy pipeline,
    and the heavy pipeline without the symmetries an equivariant model already has.
    """

    NONE = "none"
    HEAVY = "heavy"
    NON_SYMMETRY = "non_symmetry"


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run, how often and how strongly; all off by default.

    One field per transform, each with a probability ``p`` and its strengths; a probability or
    strength of 0 turns the transform off. Presets: `none`, `heavy`,
    `non_symmetry`. Read from and written to YAML through `from_dict` /
    `to_dict` (nested dicts of floats, keyed by the field names below).
    """

    dihedral: Dihedral = Dihedral()
    rotation: Rotation = Rotation()
    elastic: Elastic = Elastic()
    stain: StainJitter = StainJitter()
    brightness_contrast: BrightnessContrast = BrightnessContrast()
    noise: Noise = Noise()

    def __post_init__(self) -> None:
        for f in fields(self):
            expected = type(f.default)
            if not isinstance(getattr(self, f.name), expected):
                raise TypeError(f"AugmentConfig.{f.name} must be a {expected.__name__}, "
                                f"got {getattr(self, f.name)!r}")

    @classmethod
    def none(cls) -> AugmentConfig:
        """The identity: every transform off."""
        return cls()

    @classmethod
    def heavy(cls) -> AugmentConfig:
        """The plain baseline's augmentation: every transform on, symmetries included."""
        return cls(
            dihedral=Dihedral(p=1.0),
            rotation=Rotation(p=1.0, max_degrees=180.0),
            elastic=Elastic(p=0.5, alpha=2.0, sigma=10.0),
            stain=StainJitter(p=1.0, sigma=0.05, bias=0.02),
            brightness_contrast=BrightnessContrast(p=1.0, brightness=0.1, contrast=0.2),
            noise=Noise(p=0.5, std=0.03),
        )

    @classmethod
    def non_symmetry(cls) -> AugmentConfig:
        """`heavy` without flips and rotations: what an equivariant model is not invariant to."""
        return replace(cls.heavy(), dihedral=Dihedral(), rotation=Rotation())

    @classmethod
    def preset(cls, name: AugmentPreset | str) -> AugmentConfig:
        """The preset called ``name`` (an `AugmentPreset` or its value)."""
        try:
            preset = AugmentPreset(name)
        except ValueError:
            raise ValueError(f"unknown augmentation preset {name!r}; choose from "
                             f"{[p.value for p in AugmentPreset]}") from None
        match preset:
            case AugmentPreset.NONE:
                return cls.none()
            case AugmentPreset.HEAVY:
                return cls.heavy()
            case AugmentPreset.NON_SYMMETRY:
                return cls.non_symmetry()

    @property
    def preset_name(self) -> str:
        """The name of the preset this config equals, or ``"custom"``."""
        return next((p.value for p in AugmentPreset if self == AugmentConfig.preset(p)), "custom")

    @classmethod
    def from_dict(cls, d: Mapping[str, Mapping[str, float]]) -> AugmentConfig:
        """The config from nested dicts as `to_dict` writes them; missing transforms are off."""
        # each field's default is a transform's config (`Dihedral()`, `Rotation()`, ...)
        groups = {f.name: cast("type[_Transform]", type(f.default)) for f in fields(cls)}
        unknown = set(d) - set(groups)
        if unknown:
            raise ValueError(f"unknown augmentation(s) {sorted(unknown)}; expected some of {list(groups)}")
        kwargs = {}
        for name, values in d.items():
            if not isinstance(values, Mapping):
                raise TypeError(f"augmentation {name!r} must be a mapping of its settings, got {values!r}")
            allowed = [f.name for f in fields(groups[name])]
            unknown = set(values) - set(allowed)
            if unknown:
                raise ValueError(f"unknown setting(s) {sorted(unknown)} for {name!r}; expected some of {allowed}")
            kwargs[name] = groups[name](**values)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, dict[str, float]]:
        """Nested plain dicts, e.g. ``{"rotation": {"p": 1.0, "max_degrees": 180.0}, ...}``."""
        return asdict(self)


# --- the deterministic pieces ----------------------------------------------------------------


def rgb_to_hed(image: torch.Tensor) -> torch.Tensor:
    """Colour deconvolution: RGB in [0, 1], (B, 3, H, W) -> H, E, D concentrations, (B, 3, H, W).

    Optical density ``od = ln(I) / ln(1e-6)`` per channel (intensities clamped to >= 1e-6, so
    1 is the darkest pixel represented; the units of skimage's ``rgb2hed``), then
    ``od = hed @ RGB_FROM_HED`` solved for ``hed`` at every pixel. Concentrations are not
    clamped, so `hed_to_rgb` inverts this exactly for intensities in [1e-6, 1].
    """
    od = -torch.log(image.clamp(min=_MIN_INTENSITY)) / _OD_UNIT
    return torch.einsum("bchw,cs->bshw", od, HED_FROM_RGB.to(image))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """The inverse of `rgb_to_hed`: concentrations (B, 3, H, W) -> RGB (B, 3, H, W) clamped to [0, 1]."""
    od = torch.einsum("bshw,sc->bchw", hed, RGB_FROM_HED.to(hed))
    return torch.exp(-od * _OD_UNIT).clamp(0.0, 1.0)


def jitter_stains(image: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) -> RGB with stain concentrations ``s -> scale * s + shift``.

    ``scale`` and ``shift`` are (B, 3), one value per sample and stain (H, E, D). With
    ``scale = 1`` and ``shift = 0`` this is the round trip through `rgb_to_hed`.
    """
    hed = rgb_to_hed(image)
    return hed_to_rgb(hed * scale[:, :, None, None] + shift[:, :, None, None])


def elastic_lattice(height: int, width: int, sigma: float) -> tuple[int, int]:
    """The (h, w) noise lattice that `Augment` smooths into an H x W elastic field.

    Its spacing is about sigma / 4 px: fine enough that bilinear interpolation keeps the field's
    RMS within about 2 % (measured), and at sigma = 10 a quarter of the points and half the
    kernel of one value per pixel; smoothing is the elastic warp's main cost (1024 x 1024 on
    2 CPU cores: 175 ms per pixel, 17 ms on this lattice).
    """
    step = max(1, int(sigma / 4))
    return math.ceil((height - 1) / step) + 1, math.ceil((width - 1) / step) + 1


def elastic_displacement(noise: torch.Tensor, alpha: float, sigma: float, size: tuple[int, int]) -> torch.Tensor:
    """Smooth white noise into a displacement field (N, 2, H, W) px of RMS ``alpha`` px per axis.

    Args:
        noise: (N, 2, h, w) standard normal, on a lattice of h x w points spanning the image
            corner to corner (spacing (H - 1) / (h - 1) px down, (W - 1) / (w - 1) px across);
            h, w = H, W for one value per pixel.
        alpha: RMS displacement per axis, px.
        sigma: std of the smoothing Gaussian, px (kornia's kernel, reflecting borders,
            truncated at 3 sigma or at the lattice side).
        size: (H, W).

    The smoothed lattice is divided by the kernel's noise gain, so the field's RMS does not
    depend on ``sigma``, and interpolated bilinearly to (H, W).
    """
    # imported here: kornia takes about half a second to import, which predict and slide never need
    from kornia.filters import filter2d_separable, get_gaussian_kernel1d

    height, width = size
    h, w = noise.shape[-2:]
    kernels = []
    for points, side in ((w, width), (h, height)):  # kornia wants kernel_x, then kernel_y
        lattice_sigma = sigma * (points - 1) / max(side - 1, 1)  # sigma in lattice steps
        radius = max(1, min(math.ceil(3 * lattice_sigma), points - 1))
        kernel = get_gaussian_kernel1d(2 * radius + 1, lattice_sigma, device=noise.device, dtype=noise.dtype)
        kernels.append(kernel.reshape(1, -1))  # (1, K): kornia's batch of one kernel
    # White noise through a separable filter kx ky has RMS sqrt(sum(kx^2) * sum(ky^2)).
    gain = (kernels[0].square().sum() * kernels[1].square().sum()).sqrt()
    field = filter2d_separable(noise, *kernels, border_type="reflect") * (alpha / gain)
    if (h, w) == (height, width):
        return field
    return F.interpolate(field, size=(height, width), mode="bilinear", align_corners=True)


def sampling_grid(angles: torch.Tensor, displacement: torch.Tensor | None, height: int, width: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each output pixel reads the input: rotation about the centre, then a displacement.

    Output pixel p = (x, y) reads the input at ``q = R(-angle) (p - c) + c + d(p)``, with
    ``c = ((W - 1) / 2, (H - 1) / 2)``, so the content turns counter-clockwise as shown by
    ``angle``, and ``d`` is ``displacement`` (N, 2, H, W) in px, channel 0 along x.

    Args:
        angles: (N,) degrees.
        displacement: (N, 2, H, W) px, or None for none.
        height: H.
        width: W.

    Returns:
        ``grid`` (N, H, W, 2) for ``grid_sample(..., align_corners=True)`` and ``inside``
        (N, H, W) bool: whether the nearest input pixel of q exists.
    """
    if height < 2 or width < 2:
        raise ValueError(f"warping needs at least 2 x 2 pixels, got {height} x {width}")
    dtype = displacement.dtype if displacement is not None else torch.float32
    theta = torch.deg2rad(angles.to(dtype))[:, None, None]  # (N, 1, 1)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    u = torch.arange(width, device=angles.device, dtype=dtype)[None, None, :] - cx  # (1, 1, W)
    v = torch.arange(height, device=angles.device, dtype=dtype)[None, :, None] - cy  # (1, H, 1)
    qx = torch.cos(theta) * u - torch.sin(theta) * v + cx  # (N, H, W)
    qy = torch.sin(theta) * u + torch.cos(theta) * v + cy
    if displacement is not None:
        qx, qy = qx + displacement[:, 0], qy + displacement[:, 1]
    # Strict bounds: a point on a half-pixel edge counts as outside, so masks never take a
    # value that grid_sample's own rounding might read from beyond the border.
    inside = (qx > -0.5) & (qx < width - 0.5) & (qy > -0.5) & (qy < height - 0.5)
    grid = torch.stack((2 * qx / (width - 1) - 1, 2 * qy / (height - 1) - 1), dim=-1)  # (N, H, W, 2)
    return grid, inside


def warp(image: torch.Tensor, masks: Mapping[str, torch.Tensor], grid: torch.Tensor, inside: torch.Tensor
         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Resample an image (N, C, H, W) and masks (N, H, W) on one grid from `sampling_grid`.

    The image: bilinear, reflected at the border. Masks: nearest (values are copied, never
    mixed), and ``IGNORE_INDEX`` wherever ``inside`` is False.
    """
    warped = F.grid_sample(image.float(), grid.float(), mode="bilinear", padding_mode="reflection",
                           align_corners=True).to(image.dtype)
    if not masks:
        return warped, {}
    names = list(masks)
    # float32 holds every integer label below 2**24 exactly; "border" keeps any out-of-range
    # read on a real label before it is overwritten by IGNORE_INDEX.
    stacked = torch.stack([masks[name].float() for name in names], dim=1)  # (N, K, H, W)
    sampled = F.grid_sample(stacked, grid.float(), mode="nearest", padding_mode="border", align_corners=True)
    sampled = torch.where(inside[:, None], sampled, float(IGNORE_INDEX))
    return warped, {name: sampled[:, k].to(masks[name].dtype) for k, name in enumerate(names)}


# --- the random pipeline ---------------------------------------------------------------------


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1), drawn on the generator's device (torch requires it) and moved to ``device``."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """N(0, 1), drawn like `_uniform`."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source).to(device)


def _symmetric(shape: tuple[int, ...], bound: float, generator: torch.Generator | None,
               device: torch.device) -> torch.Tensor:
    """Uniform in [-bound, bound)."""
    return (2 * _uniform(shape, generator, device) - 1) * bound


class Augment(nn.Module):
    """Random augmentation of a batch of images and their label masks, configured by `AugmentConfig`.

    Per sample, in this order (see the config classes for the exact distributions):

    - ``dihedral``: an exact flip / quarter turn, one of the 8 elements of D4 on square inputs,
      one of the 4 shape-keeping ones (identity, 180 degrees, two mirrors) on non-square inputs.
    - ``rotation`` by an angle in degrees, counter-clockwise as shown, about the image centre,
      and an ``elastic`` displacement (RMS ``alpha`` px, smoothness ``sigma`` px), composed into one
      sampling grid: the image is interpolated bilinearly and reflected at the border, masks are
      sampled nearest and set to ``IGNORE_INDEX`` where the source lies outside the input.
    - ``stain``: H, E, D concentrations (Ruifrok & Johnston deconvolution) scaled and shifted.
    - ``brightness_contrast``: shift and contrast stretch about the sample mean.
    - ``noise``: additive Gaussian noise; then the image is clamped to [0, 1].

    Guarantees: the same geometric transform moves the image and every mask of a sample; mask
    values after ⊆ mask values before ∪ {IGNORE_INDEX}; a transform that is off (probability or
    strength 0) leaves its input untouched, so `AugmentConfig.none` is the exact identity.
    The output is a function of the inputs and the state of ``generator``: the same seed gives
    the same batch. Random numbers are drawn on the generator's device; a generator on the
    image's device avoids copying the elastic noise between devices.

    Shapes: image (B, C, H, W) float with C >= 3, masks {name: (B, H, W)} integer; the outputs
    have the same shapes, dtypes and keys. The first three channels are the colours; channels
    after them (tissue context maps) move with the image in the geometric steps, interpolated
    the same way, and are left alone by the colour steps (stain, brightness and contrast,
    noise, clamping).
    """

    def __init__(self, config: AugmentConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, image: torch.Tensor, masks: Mapping[str, torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        masks = dict(masks) if masks is not None else {}
        _check_inputs(image, masks)
        cfg = self.config
        if cfg.dihedral.enabled:
            image, masks = self._dihedral(image, masks, generator)
        if cfg.rotation.enabled or cfg.elastic.enabled:
            image, masks = self._warp(image, masks, generator)
        # extra channels (tissue context) moved with the geometry; the colour steps leave them alone
        colour, extra = image[:, :COLOUR_CHANNELS], image[:, COLOUR_CHANNELS:]
        photometric = False
        if cfg.stain.enabled:
            colour, photometric = self._stain(colour, generator), True
        if cfg.brightness_contrast.enabled:
            colour, photometric = self._brightness_contrast(colour, generator), True
        if cfg.noise.enabled:
            colour, photometric = self._noise(colour, generator), True
        if photometric:
            colour = colour.clamp(0.0, 1.0)
            # without extra channels, keep the image's own tensor (and memory format: a copy through
            # torch.cat would change which conv algorithm runs next, and the float rounding with it)
            image = torch.cat([colour, extra], dim=1) if extra.shape[1] else colour
        return image, masks

    def _dihedral(self, image: torch.Tensor, masks: dict[str, torch.Tensor], generator: torch.Generator | None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch, _, height, width = image.shape
        # A quarter turn swaps H and W, which a batch of non-square images cannot hold.
        elements = D4.elements if height == width else tuple(g for g in D4.elements if g.rotation % 2 == 0)
        applied = _uniform((batch,), generator, image.device) < self.config.dihedral.p
        index = (_uniform((batch,), generator, image.device) * len(elements)).long().clamp(max=len(elements) - 1)
        chosen = [elements[i] if a else elements[0] for i, a in zip(index.tolist(), applied.tolist())]
        if all(g == elements[0] for g in chosen):
            return image, masks
        return _per_sample(image, chosen), {name: _per_sample(m, chosen) for name, m in masks.items()}

    def _warp(self, image: torch.Tensor, masks: dict[str, torch.Tensor], generator: torch.Generator | None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rotation, elastic = self.config.rotation, self.config.elastic
        batch, _, height, width = image.shape
        device = image.device
        angles = torch.zeros(batch, device=device)
        if rotation.enabled:
            rotated = _uniform((batch,), generator, device) < rotation.p
            angles = torch.where(rotated, _symmetric((batch,), rotation.max_degrees, generator, device), angles)
        deformed = torch.zeros(batch, dtype=torch.bool, device=device)
        if elastic.enabled:
            deformed = _uniform((batch,), generator, device) < elastic.p
        # Only the samples that move are resampled, so the others stay bit-exact.
        moving = torch.nonzero((angles != 0) | deformed).flatten()
        if moving.numel() == 0:
            return image, masks
        displacement = None
        if elastic.enabled:
            deformed_moving = torch.nonzero(deformed[moving]).flatten()  # positions within `moving`
            displacement = torch.zeros(len(moving), 2, height, width, device=device)
            if deformed_moving.numel():
                lattice = elastic_lattice(height, width, elastic.sigma)
                noise = _normal((deformed_moving.numel(), 2, *lattice), generator, device)
                field = elastic_displacement(noise, elastic.alpha, elastic.sigma, (height, width))
                displacement = displacement.index_copy(0, deformed_moving, field)
        grid, inside = sampling_grid(angles[moving], displacement, height, width)
        warped, warped_masks = warp(image[moving], {name: m[moving] for name, m in masks.items()}, grid, inside)
        image = image.index_copy(0, moving, warped)
        masks = {name: m.index_copy(0, moving, warped_masks[name]) for name, m in masks.items()}
        return image, masks

    def _stain(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        stain = self.config.stain
        batch, device = image.shape[0], image.device
        applied = _uniform((batch,), generator, device) < stain.p
        scale = 1 + _symmetric((batch, 3), stain.sigma, generator, device)
        shift = _symmetric((batch, 3), stain.bias, generator, device)
        return torch.where(applied[:, None, None, None], jitter_stains(image, scale, shift), image)

    def _brightness_contrast(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        jitter = self.config.brightness_contrast
        batch, device = image.shape[0], image.device
        applied = _uniform((batch,), generator, device) < jitter.p
        shift = _symmetric((batch,), jitter.brightness, generator, device)[:, None, None, None]
        factor = 1 + _symmetric((batch,), jitter.contrast, generator, device)[:, None, None, None]
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        return torch.where(applied[:, None, None, None], (image - mean) * factor + mean + shift, image)

    def _noise(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        noise = self.config.noise
        applied = _uniform((image.shape[0],), generator, image.device) < noise.p
        sample = _normal(tuple(image.shape), generator, image.device)
        return image + sample * (noise.std * applied[:, None, None, None])

    def extra_repr(self) -> str:
        return repr(self.config)


def _per_sample(x: torch.Tensor, elements: list[GroupElement]) -> torch.Tensor:
    """Apply ``elements[i]`` to sample ``x[i]``; x is (B, ..., H, W) and every element keeps H, W."""
    return torch.stack([D4.act_on_image(g, sample) for g, sample in zip(elements, x)])


def _check_inputs(image: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> None:
    if image.dim() != 4 or not image.is_floating_point():
        raise ValueError(f"expected a float image (B, C, H, W), got {image.dtype} of shape {tuple(image.shape)}")
    batch, _, height, width = image.shape
    for name, m in masks.items():
        if m.shape != (batch, height, width) or m.is_floating_point():
            raise ValueError(f"mask {name!r} must be an integer tensor of shape {(batch, height, width)} "
                             f"to match the image, got {m.dtype} of shape {tuple(m.shape)}")
