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

    Two computations of the same numbers (they agree to float rounding): ``BatchNorm2d`` over
    the view (B, C, |G|*H, W), and, for training on a GPU when a field holds at least
    ``CHANNEL_STATS_MIN_VALUES`` values (B*|G|*H*W), per-channel statistics combined over each
    field's |G| channels. CUDA's batch-norm kernels give each channel few blocks, so a few
    fields of millions of values leave most of the GPU idle; below about 2**20 values a field
    the fused kernel was the faster one. On an H100 a p4m U-Net training step (width 8, batch
    16x256x256) took 44 ms this way against 76 ms with the fused kernel only
    (``python benchmarks/unet_step.py --batch 16`` with and without ``--fused-norm``).

    Shapes: (B, C*|G|, H, W) -> same.
    """

    CHANNEL_STATS_MIN_VALUES = 2**20

    def __init__(self, num_fields: int, group: Group, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.group = group
        self.norm = nn.BatchNorm2d(num_fields, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.training and x.is_cuda and x.numel() // self.norm.num_features >= self.CHANNEL_STATS_MIN_VALUES:
            return self.from_channel_stats(x)
        # (B, C*|G|, H, W) -> (B, C, |G|*H, W): the group axis joins the plane for the statistics
        y = self.norm(x.reshape(b, -1, self.group.order * h, w))
        return y.reshape(b, -1, h, w)

    def from_channel_stats(self, x: torch.Tensor) -> torch.Tensor:
        """Training-mode batch norm from per-channel statistics (many parallel reductions).

        A field's mean is the mean of its channels' means; its (biased) variance is the mean
        of their variances plus the variance of their means. Running statistics are updated
        as ``BatchNorm2d`` updates them (unbiased variance, ``momentum``, or a cumulative
        average when momentum is None).
        """
        norm, order = self.norm, self.group.order
        b, _, h, w = x.shape
        var_c, mean_c = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        mean_c, var_c = mean_c.view(-1, order), var_c.view(-1, order)
        mean = mean_c.mean(dim=1)
        var = (var_c + (mean_c - mean[:, None]).square()).mean(dim=1)
        if norm.track_running_stats:
            with torch.no_grad():
                norm.num_batches_tracked += 1
                momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
                n = b * order * h * w
                norm.running_mean.lerp_(mean.detach(), momentum)
                norm.running_var.lerp_(var.detach() * (n / max(n - 1, 1)), momentum)
        scale = torch.rsqrt(var + norm.eps)
        if norm.affine:
            scale = scale * norm.weight
        shift = -mean * scale + (norm.bias if norm.affine else 0)
        scale, shift = scale.repeat_interleave(order), shift.repeat_interleave(order)
        return torch.addcmul(shift[None, :, None, None], x, scale[None, :, None, None])

    def extra_repr(self) -> str:
        return f"group={self.group}"
