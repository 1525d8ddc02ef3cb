"""Steerable group convolutions over C_N and D_N: filters from a band-limited circular-harmonic basis.

A 3x3 filter cannot be turned by 45 degrees by moving its pixels. A filter written as a sum of
smooth functions of the plane can: each basis function is sampled at the turned (or mirrored)
grid points ``g^-1 p``, so the filter for every element g of C8, C16 or D8 is the same
continuous filter moved by g, sampled on the grid (Weiler, Hamprecht & Storath, "Learning
Steerable Filters for Rotation Equivariant CNNs", CVPR 2018; Weiler & Cesa, "General E(2)-
Equivariant Steerable CNNs", NeurIPS 2019).

The basis (`harmonic_basis`) is a product of a Gaussian ring and a circular harmonic,

    psi_{j,k}(r, phi) = exp(-(r - j)^2 / (2 sigma^2)) * (cos k phi | sin k phi),

on rings j = 0, 1, ..., (kernel_size - 1) / 2, with frequencies k <= 2 j (at most n / 2 for C_n): a
ring of radius j is sampled by about 2 pi j pixels, so higher frequencies would alias and the
turned copies would differ in more than their turn. Each function has unit norm on the grid.

Guarantees: the quarter turns (and flips for D8) map the pixel grid onto itself, so for them the
sampled filters are exact permutations of pixels and the layers below are exactly equivariant
(up to float rounding), as the other group families are; for the other turns they are
equivariant up to the sampling of the continuous filters (measured by
`equiseg.evaluation.equivariance.arbitrary_angle_error`).

Features are regular fields folded channel-major, ``(B, C*|G|, H, W)``, as in
`equiseg.nn.group_conv`; both layers expand to one ``F.conv2d`` weight.
"""

from __future__ import annotations

import numpy as np
import torch

from equiseg.groups import PlaneGroup
from equiseg.nn.bank import Bank, ExpandedConv2d, gather

SIGMA = 0.6
"""Width (px) of each Gaussian ring of the basis."""


def harmonic_basis(group: PlaneGroup, kernel_size: int = 3, sigma: float = SIGMA) -> torch.Tensor:
    """The basis moved by every element: (|G|, n_basis, k, k) float32, ``out[g, b](p) = psi_b(g^-1 p)``.

    ``p`` is a pixel's offset from the filter's centre, x to the right, y down. Functions with
    ``k >= 1`` are zero at the centre (where the angle is undefined).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    half = kernel_size // 2
    ys, xs = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    points = np.stack([xs.ravel(), ys.ravel()])  # (2, k*k)
    functions = [(ring, k, part) for ring in range(half + 1) for k in range(min(2 * ring, group.n // 2) + 1)
                 for part in (("cos",) if k == 0 else ("cos", "sin"))]
    moved = np.linalg.inv(group.matrices) @ points  # (|G|, 2, k*k): g^-1 p, exact grid points for quarter turns
    radius, angle = np.hypot(moved[:, 0], moved[:, 1]), np.arctan2(moved[:, 1], moved[:, 0])
    basis = []
    for ring, k, part in functions:
        profile = np.exp(-(radius - ring) ** 2 / (2 * sigma**2))
        wave = np.cos(k * angle) if part == "cos" else np.sin(k * angle)
        value = profile * (wave if k == 0 else np.where(radius > 1e-9, wave, 0.0))
        basis.append(value / np.linalg.norm(value[0]))  # unit norm unmoved (grid-exact moves keep it)
    stacked = np.stack(basis, axis=1).reshape(group.order, len(functions), kernel_size, kernel_size)
    return torch.tensor(stacked, dtype=torch.float32, device="cpu")


class SteerableLiftingConv2d(ExpandedConv2d):
    """Z2 -> G for G = C_N or D_N: every input channel correlated with the moved copies of a steerable filter.

        out[c, g](p) = sum_q x(q) . psi_c(g^-1 (q - p)),   psi_c = sum_b w[c, b] basis_b

    Exactly equivariant for the quarter turns (and flips) in G, as `LiftingConv2d`:
    ``out(T_u x) = T_u out(x)`` with ``(T_u f)[g](p) = f[u^-1 g](u^-1 p)``.

    Args:
        in_channels: scalar input channels C_in.
        out_channels: output fields C_out (C_out * |G| channels).
        group: a `PlaneGroup` (C8, C16, D8).
        kernel_size: odd k; the basis has 6 functions at k = 3, 15 at k = 5 (C8).
        bias: one learned bias per output field.

    Shapes: (B, C_in, H, W) -> (B, C_out*|G|, H, W).
    """

    basis: torch.Tensor  # a buffer (set in __init__), declared for the type checker

    def __init__(self, in_channels: int, out_channels: int, group: PlaneGroup, kernel_size: int = 3,
                 bias: bool = True) -> None:
        basis = harmonic_basis(group, kernel_size)
        size = basis.shape[1]
        # unit-norm basis: fan-in over free values gives each expanded filter He's total variance
        super().__init__(in_channels, out_channels, kernel_size, (out_channels, in_channels, size),
                         fan_in=in_channels * size, bias=bias)
        self.group = group
        self.register_buffer("basis", basis, persistent=False)

    def expand(self) -> Bank:
        """The plain conv weight (C_out*|G|, C_in, k, k) and bias (C_out*|G|,) this layer applies."""
        k = self.kernel_size
        bank = torch.einsum("cib,gbxy->cgixy", self.weight, self.basis.to(self.weight.dtype))
        bias = None if self.bias is None else self.bias.repeat_interleave(self.group.order)
        return bank.reshape(-1, self.in_channels, k, k), bias


class SteerableGroupConv2d(ExpandedConv2d):
    """G -> G for G = C_N or D_N: regular fields correlated with the moved copies of steerable filters.

        out[c, g](p) = sum_{d, h, q} f[d, h](q) . psi_{c, d}(g^-1 h, g^-1 (q - p))

    The filter has a group axis of its own (|G| steerable filters per field pair); element g
    permutes that axis as the regular representation does and moves each filter by g.
    Exactly equivariant for the quarter turns (and flips) in G, as `GroupConv2d`.

    Args:
        in_channels: input fields C_in (C_in * |G| channels).
        out_channels: output fields C_out (C_out * |G| channels).
        group: a `PlaneGroup`.
        kernel_size: odd k.
        bias: one learned bias per output field.

    Shapes: (B, C_in*|G|, H, W) -> (B, C_out*|G|, H, W).
    """

    basis: torch.Tensor  # buffers (set in __init__), declared for the type checker
    regular: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, group: PlaneGroup, kernel_size: int = 3,
                 bias: bool = True) -> None:
        basis = harmonic_basis(group, kernel_size)
        size = basis.shape[1]
        super().__init__(in_channels, out_channels, kernel_size, (out_channels, in_channels, group.order, size),
                         fan_in=in_channels * group.order * size, bias=bias)
        self.group = group
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("regular", group.left_regular.clone(), persistent=False)

    def expand(self) -> Bank:
        """The plain conv weight (C_out*|G|, C_in*|G|, k, k) and bias (C_out*|G|,) this layer applies."""
        k, order = self.kernel_size, self.group.order
        # (C_out, C_in, |G|h, B) -> (C_out, C_in, B, |G|g, |G|h): the filter axis seen from each output element
        turned = gather(self.weight.transpose(2, 3), self.regular)
        bank = torch.einsum("cibgh,gbxy->cgihxy", turned, self.basis.to(self.weight.dtype))
        bias = None if self.bias is None else self.bias.repeat_interleave(order)
        return bank.reshape(-1, self.in_channels * order, k, k), bias
