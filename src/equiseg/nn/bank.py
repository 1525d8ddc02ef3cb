"""The expanded convolution every equivariant conv is: free values -> a plain conv weight.

An equivariant conv stores a few free values and expands them into an ordinary conv weight
(rotated, reflected or radially tied copies). The expansion is cheap next to the convolution
but not free, so it is rebuilt on every forward while training (once per step) and reused in
evaluation until a parameter changes. The bank is a plain ``nn.Conv2d`` weight, so a trained
layer folds into an ``nn.Conv2d`` that computes the same function.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

Bank = tuple[torch.Tensor, torch.Tensor | None]


def gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[..., index]`` (an index of any shape into the last axis), via ``index_select``.

    The same numbers as advanced indexing; its backward is one ``index_add_`` instead of an
    accumulating ``index_put_`` (which sorts its indices on a GPU), a few kernels fewer at every
    training step.
    """
    return values.index_select(-1, index.flatten()).view(*values.shape[:-1], *index.shape)


class ExpandedConv2d(nn.Module, metaclass=abc.ABCMeta):
    """A stride-1 convolution whose weight is expanded from free values: forward, cache and fold.

    With (W, b) = ``expand()``, W of shape (C_out', C_in', k, k):

        forward(x) = F.conv2d(x, W, b, padding=k // 2) = to_conv2d()(x),

    so the equivariance a subclass proves for W holds for the layer and for its fold. While
    training (or whenever gradients are on) W is rebuilt on every forward, once per step; in
    evaluation without gradients it is cached and rebuilt only when a parameter changes
    (optimiser step, ``load_state_dict``, device or dtype move), so a forward is one ``F.conv2d``.
    Subclasses give the free values' shape and write ``expand``; the weight, bias (one value
    per output field, zero at start) and He initialisation live here.

    Two levels of ours (nn.Module -> ExpandedConv2d -> layer), as issue #11 asks, against DESIGN's one.

    Args:
        in_channels: input channels or fields C_in, as the subclass counts them.
        out_channels: output channels or fields C_out; the bias has C_out values.
        kernel_size: odd k.
        weight_shape: shape of the free values ``weight``.
        fan_in: inputs to each output of the expanded conv, C_in' * k * k (He init scale).
        bias: add a learned bias, shape (C_out,).

    Shapes: (B, C_in', H, W) -> (B, C_out', H, W), the channel counts of the expanded weight.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, weight_shape: tuple[int, ...],
                 fan_in: int, bias: bool) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.fan_in = fan_in
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # He-style scale for the taps the expanded kernel really has, not the fewer free values.
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / self.fan_in))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @abc.abstractmethod
    def expand(self) -> Bank:
        """The plain conv weight (C_out', C_in', k, k) and bias (C_out',) or None this layer applies."""

    def filter_bank(self) -> Bank:
        """``expand()``, cached while the layer evaluates without gradients.

        The cache is keyed on the version counters and storage of the parameters, so an
        optimiser step, ``load_state_dict`` or a move to another device invalidates it.
        """
        state = vars(self)  # the instance dict, read directly: this runs on every forward, keep it cheap
        if self.training or torch.is_grad_enabled():
            if state.get("_bank_cache") is not None:
                state["_bank_cache"] = None
            return self.expand()
        # a new storage (device or dtype move, load) changes data_ptr; an in-place update bumps _version
        key = tuple((p._version, p.data_ptr()) for p in self._parameters.values() if p is not None)
        cache = state.get("_bank_cache")
        if cache is None or cache[0] != key:
            cache = (key, self.expand())
            state["_bank_cache"] = cache
        return cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.filter_bank()
        return F.conv2d(x, weight, bias, padding=self.kernel_size // 2)

    def extra_repr(self) -> str:
        group = getattr(self, "group", None)  # the group layers' point group
        return (f"{self.in_channels}, {self.out_channels}, " + ("" if group is None else f"group={group}, ")
                + f"kernel_size={self.kernel_size}")

    def to_conv2d(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` (zero padding, stride 1) computing the same function; a copy, not shared by later training."""
        with torch.no_grad():
            weight, bias = self.expand()
            out_channels, in_channels, kh, kw = weight.shape
            conv = nn.Conv2d(in_channels, out_channels, (kh, kw), padding=self.kernel_size // 2,
                             bias=bias is not None, device=weight.device, dtype=weight.dtype)
            conv.weight.copy_(weight)
            if bias is not None:
                assert conv.bias is not None  # made with bias=True just above
                conv.bias.copy_(bias)
        return conv
