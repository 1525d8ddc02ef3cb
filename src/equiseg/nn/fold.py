"""Fold a trained equivariant network into plain ``nn.Conv2d`` layers."""

from __future__ import annotations

import copy

from torch import nn

from equiseg.nn.bank import ExpandedConv2d


def fold_to_conv2d(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``ExpandedConv2d`` (each equivariant conv) replaced by its ``to_conv2d()``.

    The copy computes the same function (up to float rounding) with no expansion at run time,
    for export or for runtimes that know only standard layers. ``model`` is left unchanged.
    """
    folded = copy.deepcopy(model)
    for name, module in list(folded.named_modules()):
        if isinstance(module, ExpandedConv2d):
            parent_name, _, child = name.rpartition(".")
            parent = folded.get_submodule(parent_name) if parent_name else folded
            if parent is module:
                return module.to_conv2d()
            setattr(parent, child, module.to_conv2d().train(module.training))
    return folded
