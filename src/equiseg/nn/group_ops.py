"""Operations on regular group features: pooling over the group and group batch norm."""

from __future__ import annotations

import enum

import torch
from torch import nn

from equiseg.groups import Group, unfold_group


class GroupPool(enum.Enum):
    """How :func:`pool_over_group` reduces the group axis."""

    MAX = "max"
    MEAN = "mean"


def pool_over_group(x: torch.Tensor, group: Group, mode: GroupPool = GroupPool.MAX) -> torch.Tensor:
    """G -> Z2: reduce the group axis, giving scalar fields that transform like images.

    Any permutation-invariant reduction turns the regular action into a plain one:

        pool(T_u f) = T_u pool(f)   for all u in G.

    Shapes: (B, C*|G|, H, W) -> (B, C, H, W).
    """
    fields = unfold_group(x, group)  # (B, C*|G|, H, W) -> (B, C, |G|, H, W)
    return fields.amax(dim=2) if mode is GroupPool.MAX else fields.mean(dim=2)


class GroupBatchNorm2d(nn.Module):
    """Batch norm for regular features: one mean, variance, scale and shift per field.

    Statistics are taken over batch, group axis and plane together, so the |G| channels of
    a field are normalised alike and the layer commutes with every T_u, u in G (in training
    and in evaluation). A per-channel ``BatchNorm2d`` over the folded channels would not.

    Shapes: (B, C*|G|, H, W) -> same.
    """

    def __init__(self, num_fields: int, group: Group, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.group = group
        self.norm = nn.BatchNorm2d(num_fields, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # (B, C*|G|, H, W) -> (B, C, |G|*H, W): the group axis joins the plane for the statistics
        y = self.norm(x.reshape(b, -1, self.group.order * h, w))
        return y.reshape(b, -1, h, w)

    def extra_repr(self) -> str:
        return f"group={self.group}"
