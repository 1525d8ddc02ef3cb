"""Group convolutions for p4 = Z2 x| C4 and p4m = Z2 x| D4 (Cohen & Welling, 2016).

Group features travel through the network folded, ``(B, C*|G|, H, W)``, channel-major: the
fold of ``(B, C, |G|, H, W)`` by `equiseg.groups.fold_group`. In that layout both layers
below are an ordinary ``F.conv2d`` with an expanded filter bank, so they cost what a plain
conv with the same channel counts costs and fold into an ``nn.Conv2d``.
"""

from __future__ import annotations

import torch

from equiseg.groups import Group
from equiseg.nn.bank import Bank, ExpandedConv2d


def bank_index(group: Group, kernel_size: int, regular_input: bool) -> torch.Tensor:
    """Where each tap of the transformed filters comes from: (|G|, n) long, n = (|G| *) k*k.

    Row g lists, for the flattened filter ``T_g psi``, the flat position in ``psi`` that each
    of its entries copies: the group action applied to an ``arange``. One gather with it builds
    the whole bank, instead of |G| separate rotations and a stack (a few small kernels fewer on
    a GPU, where the filters are rebuilt at every training step).
    """
    shape = (group.order, kernel_size, kernel_size) if regular_input else (kernel_size, kernel_size)
    positions = torch.arange(torch.Size(shape).numel(), device="cpu").reshape(shape)
    act = group.act_on_regular if regular_input else group.act_on_image
    return torch.stack([act(g, positions).flatten() for g in group.elements])


def layout_index(index: torch.Tensor, in_channels: int, per_channel: int) -> torch.Tensor:
    """One flat index that builds the whole bank in its final layout with a single gather.

    ``index`` (|G|, n) says where each of the n taps of ``T_g psi`` comes from among one input
    channel's ``per_channel`` free values. The result, (|G| * in_channels * n,) in int32, lists
    for row g, input channel c, tap j the position ``c * per_channel + index[g, j]`` in a filter's
    free values flattened over (C_in, per_channel), so that

        weight.view(C_out, -1).index_select(1, result).view(C_out * |G|, C_in(*|G|), k, k)

    is the bank with the output's group axis already inside each field: no transpose, no copy
    after the gather (one pass over the bank instead of two, and one fewer kernel each way).
    """
    offsets = torch.arange(in_channels, device="cpu")[None, :, None] * per_channel
    return (offsets + index[:, None, :]).flatten().to(torch.int32)


class LiftingConv2d(ExpandedConv2d):
    """Z2 -> G: correlate an image with every transformed copy T_g psi of each filter.

        out[c, g](p) = sum_q x(q) . psi_c(g^-1 (q - p))

    Guarantee, for every u in G (stride 1, zero padding k // 2, any H, W):

        out(T_u x) = T_u out(x),   (T_u f)[g](p) = f[u^-1 g](u^-1 p)

    i.e. the plane turns and the group axis is permuted as in the regular representation.

    Args:
        in_channels: scalar input channels C_in.
        out_channels: output fields C_out; the output has C_out * |G| channels.
        group: ``C4`` (p4) or ``D4`` (p4m).
        kernel_size: odd k; k*k free values per field pair.
        bias: one learned bias per output field, shared over the group axis.

    Shapes: (B, C_in, H, W) -> (B, C_out*|G|, H, W), folded from (B, C_out, |G|, H, W).
    """

    bank_index: torch.Tensor  # a buffer (set in __init__), declared for the type checker

    def __init__(self, in_channels: int, out_channels: int, group: Group, kernel_size: int = 3,
                 bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, (out_channels, in_channels, kernel_size, kernel_size),
                         fan_in=in_channels * kernel_size**2, bias=bias)
        self.group = group
        index = bank_index(group, kernel_size, regular_input=False)
        self.register_buffer("bank_index", layout_index(index, in_channels, kernel_size**2), persistent=False)

    def expand(self) -> Bank:
        """The plain conv weight (C_out*|G|, C_in, k, k) and bias (C_out*|G|,) this layer applies."""
        k = self.kernel_size
        # (C_out, C_in*k*k) -> (C_out, |G|, C_in, k*k): T_g psi for every g, already field-major
        bank = self.weight.reshape(self.out_channels, -1).index_select(1, self.bank_index)
        bank = bank.view(-1, self.in_channels, k, k)  # -> (C_out*|G|, C_in, k, k)
        bias = None if self.bias is None else self.bias.repeat_interleave(self.group.order)
        return bank, bias


class GroupConv2d(ExpandedConv2d):
    """G -> G: correlate regular features with the transformed copies of each filter.

        out[c, g](p) = sum_{d, h, q} f[d, h](q) . psi_{c, d}(g^-1 h, g^-1 (q - p))

    The filter for output element g is ``T_g psi``, the regular action on the filter's own
    group axis and plane, so the bank holds |G| * k*k free values per field pair. Guarantee,
    for every u in G (stride 1, zero padding k // 2, any H, W):

        out(T_u f) = T_u out(f),   (T_u f)[g](p) = f[u^-1 g](u^-1 p).

    Args:
        in_channels: input fields C_in (C_in * |G| channels).
        out_channels: output fields C_out (C_out * |G| channels).
        group: ``C4`` (p4) or ``D4`` (p4m).
        kernel_size: odd k.
        bias: one learned bias per output field, shared over the group axis.

    Shapes: (B, C_in*|G|, H, W) -> (B, C_out*|G|, H, W), both folded from (B, C, |G|, H, W).
    """

    bank_index: torch.Tensor  # a buffer (set in __init__), declared for the type checker

    def __init__(self, in_channels: int, out_channels: int, group: Group, kernel_size: int = 3,
                 bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size,
                         (out_channels, in_channels, group.order, kernel_size, kernel_size),
                         fan_in=in_channels * group.order * kernel_size**2, bias=bias)
        self.group = group
        index = bank_index(group, kernel_size, regular_input=True)
        self.register_buffer("bank_index", layout_index(index, in_channels, group.order * kernel_size**2),
                             persistent=False)

    def expand(self) -> Bank:
        """The plain conv weight (C_out*|G|, C_in*|G|, k, k) and bias (C_out*|G|,) this layer applies."""
        k, order = self.kernel_size, self.group.order
        # (C_out, C_in*|G|in*k*k) -> (C_out, |G|out, C_in, |G|in*k*k) -> (C_out*|G|, C_in*|G|, k, k),
        # channel-major on both sides
        bank = self.weight.reshape(self.out_channels, -1).index_select(1, self.bank_index)
        bank = bank.view(-1, self.in_channels * order, k, k)
        bias = None if self.bias is None else self.bias.repeat_interleave(self.group.order)
        return bank, bias
