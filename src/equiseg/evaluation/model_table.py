"""The table behind ``equiseg models``: each family at the paper's widths (Liem, 2025) and at matched widths."""

from __future__ import annotations

import numpy as np
import torch

from equiseg.evaluation.equivariance import arbitrary_angle_error, band_limited_noise, equivariance_errors, smoothed
from equiseg.groups import D4
from equiseg.models.build import PAPER_WIDTHS, build_model, count_macs, count_parameters, match_width, parameter_count
from equiseg.models.unet import ConvFamily, Pooling

ANGLE = 45.0  # the arbitrary-angle measure's rotation
HALF_ANGLE = 22.5  # and the one C16 holds that C8 does not
ANGLE_PROBE = 128  # px of its band-limited probe (the central disk compared is a quarter of it across)


def tissue_probe(image: np.ndarray, side: int = ANGLE_PROBE, sigma: float = 1.5) -> torch.Tensor:
    """The central ``side`` px of a real H&E image (H, W, 3) uint8, smoothed by a Gaussian of
    ``sigma`` px so that rotating it resamples little: (1, 3, side, side) in [0, 1].
    """
    height, width = image.shape[:2]
    if min(height, width) < side:
        raise ValueError(f"the tissue image is {width}x{height} px; the probe needs {side} px a side")
    top, left = (height - side) // 2, (width - side) // 2
    crop = torch.from_numpy(image[top:top + side, left:left + side].astype(np.float32) / 255).permute(2, 0, 1)
    return smoothed(crop[None], sigma)


def model_table(depth: int = 4, size: int = 1024, probe_size: int = 32, seed: int = 0,
                angle_probe: int = ANGLE_PROBE, tissue: np.ndarray | None = None,
                reference_width: int = PAPER_WIDTHS[ConvFamily.PLAIN], pool: str = "max") -> list[dict]:
    """One dict per (family, width): parameters, MACs at size x size, exact group, measured errors.

    "matched" widths are those whose parameter count is closest to plain width ``reference_width``
    (default 64, the paper's) at this depth.
    ``error_45``: `arbitrary_angle_error` of the
    logits at 45° on band-limited noise of ``angle_probe`` px; ``floor_45`` (the same for every
    row): the identity network's, the resampling floor; ``error_22.5`` and ``floor_22.5`` the same
    at 22.5° (an element of C16, not of C8). With ``tissue`` (a real H&E image),
    ``error_45_tissue`` and ``floor_45_tissue`` measure the same on its smoothed centre
    (`tissue_probe`). ``pool``: every U-Net's downsampling (``max`` or ``blur``).
    Raises ValueError for another ``pool``.
    """
    try:
        pooling = Pooling(pool)
    except ValueError:
        raise ValueError(f"--pool must be one of {', '.join(p.value for p in Pooling)}, got {pool!r}") from None
    reference = parameter_count(ConvFamily.PLAIN, reference_width, depth)
    plan = [(ConvFamily.PLAIN, PAPER_WIDTHS[ConvFamily.PLAIN], "paper"),
            (ConvFamily.ISOTROPIC, PAPER_WIDTHS[ConvFamily.ISOTROPIC], "paper")]
    plan += [(family, match_width(family, reference, depth), "matched") for family in ConvFamily
             if family is not ConvFamily.PLAIN]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, probe_size, probe_size, generator=generator)
    smooth = band_limited_noise(angle_probe, seed=seed)
    floor = arbitrary_angle_error(None, smooth, ANGLE)
    half_floor = arbitrary_angle_error(None, smooth, HALF_ANGLE)
    real = tissue_probe(tissue, angle_probe) if tissue is not None else None
    real_floor = arbitrary_angle_error(None, real, ANGLE) if real is not None else None
    rows = []
    for family, width, sized_as in plan:
        torch.manual_seed(seed)
        model = build_model(family, width, depth, pool=pooling).eval()
        group = family.group
        errors = equivariance_errors(model, x, D4.elements)
        rows.append({
            "family": family.value,
            "width": width,
            "sized_as": sized_as,
            "parameters": count_parameters(model),
            "macs": count_macs(model, size, size),
            "exact_group": None if group is None else group.name,
            "error_own_group": None if group is None else max(errors[str(g)] for g in group.elements),
            "error_d4": max(errors.values()),
            "error_45": arbitrary_angle_error(model, smooth, ANGLE),
            "floor_45": floor,
            "error_22.5": arbitrary_angle_error(model, smooth, HALF_ANGLE),
            "floor_22.5": half_floor,
            **({} if real is None else {"error_45_tissue": arbitrary_angle_error(model, real, ANGLE),
                                        "floor_45_tissue": real_floor}),
        })
    return rows
