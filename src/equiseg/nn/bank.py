"""The expanded filter bank shared by every equivariant conv: build, cache, fold.

An equivariant conv stores a few free values and expands them into an ordinary conv weight
(rotated, reflected or radially tied copies). The expansion is cheap next to the convolution
but not free, so it is rebuilt on every forward while training (once per step) and reused in
evaluation until a parameter changes. The bank is a plain ``nn.Conv2d`` weight, so a trained
layer folds into an ``nn.Conv2d`` that computes the same function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Bank = tuple[torch.Tensor, torch.Tensor | None]


def filter_bank(module: nn.Module, build: Callable[[], Bank]) -> Bank:
    """The (weight, bias) bank of ``module``, cached while it evaluates without gradients.

    The cache is keyed on the version counters and storage of the module's parameters, so an
    optimiser step, ``load_state_dict`` or a move to another device invalidates it.
    """
    state = module.__dict__  # plain dict access: this runs on every forward, keep it cheap
    if module.training or torch.is_grad_enabled():
        if state.get("_bank_cache") is not None:
            state["_bank_cache"] = None
        return build()
    # a new storage (device or dtype move, load) changes data_ptr; an in-place update bumps _version
    key = tuple((p._version, p.data_ptr()) for p in module._parameters.values() if p is not None)
    cache = state.get("_bank_cache")
    if cache is None or cache[0] != key:
        cache = (key, build())
        state["_bank_cache"] = cache
    return cache[1]


def gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[..., index]`` (an index of any shape into the last axis), via ``index_select``.

    The same numbers as advanced indexing; its backward is one ``index_add_`` instead of an
    accumulating ``index_put_`` (which sorts its indices on a GPU), a few kernels fewer at every
    training step.
    """
    return values.index_select(-1, index.flatten()).view(*values.shape[:-1], *index.shape)


def bank_to_conv2d(weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> nn.Conv2d:
    """An ``nn.Conv2d`` (zero padding, stride 1) holding a copy of an expanded bank."""
    out_channels, in_channels, kh, kw = weight.shape
    conv = nn.Conv2d(in_channels, out_channels, (kh, kw), padding=padding, bias=bias is not None,
                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv
