"""IsotropicConv2d: a convolution whose kernel depends only on the distance to its centre."""

from __future__ import annotations

import torch

from equiseg.nn.bank import Bank, ExpandedConv2d, gather


def radius_index(kernel_size: int) -> torch.Tensor:
    """(k, k) long tensor: for each tap, the rank of its squared radius among the distinct ones.

    A 3x3 grid has squared radii {0, 1, 2} (centre, edge, corner); 5x5 has {0, 1, 2, 4, 5, 8}.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    c = kernel_size // 2
    offsets = torch.arange(kernel_size, device="cpu") - c
    r2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    return torch.unique(r2, return_inverse=True)[1]


class IsotropicConv2d(ExpandedConv2d):
    """Scalar-to-scalar convolution with an isotropic kernel K(x) = f(|x|).

    One free value per input/output channel pair and per distinct radius on the odd k x k
    grid (3 for 3x3: centre, edge, corner; 6 for 5x5). Every element g of D4 maps the grid to
    itself and keeps radii, so T_g K = K and

        conv(T_g x) = T_g conv(x)   for all g in D4,

    exactly, on inputs of any size (stride 1, zero padding k // 2 on every side).

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: odd k.
        bias: add a learned per-channel bias (invariant, so equivariance is kept).

    Shapes: (B, C_in, H, W) -> (B, C_out, H, W).
    """

    radius_index: torch.Tensor  # a buffer (set in __init__), declared for the type checker

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        index = radius_index(kernel_size)  # (k, k); computed first, the number of radii sizes the weight
        num_radii = int(index.max()) + 1
        super().__init__(in_channels, out_channels, kernel_size, (out_channels, in_channels, num_radii),
                         fan_in=in_channels * kernel_size**2, bias=bias)
        self.register_buffer("radius_index", index, persistent=False)

    def expand(self) -> Bank:
        """The plain conv weight (C_out, C_in, k, k) and bias (C_out,) this layer applies."""
        return gather(self.weight, self.radius_index), self.bias

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"radii={self.weight.shape[-1]}, bias={self.bias is not None}")
