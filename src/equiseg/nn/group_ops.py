"""Operations on regular group features: pooling over the group and group batch norm."""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn

from equiseg.groups import Group, PlaneGroup, unfold_group


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
    # max with indices, not amax: the same values, and a backward that scatters into the arg-max
    # instead of comparing every value with the maximum and dividing by the ties (fewer passes)
    return fields.max(dim=2).values if mode is GroupPool.MAX else fields.mean(dim=2)


class GroupBatchNorm2d(nn.Module):
    """Batch norm for regular features: one mean, variance, scale and shift per field.

    Statistics are taken over batch, group axis and plane together, so the |G| channels of
    a field are normalised alike and the layer commutes with every T_u, u in G (in training
    and in evaluation). A per-channel ``BatchNorm2d`` over the folded channels would not.

    The definition is ``BatchNorm2d`` over the view (B, C, |G|*H, W). It is computed
    otherwise, to the same numbers up to float rounding (tested against the definition):

    * training: per-channel moments (one pass, as many parallel reductions as channels)
      merged over each field's |G| channels, then one elementwise pass; the backward is
      likewise one per-channel reduction, a merge, and one elementwise pass
      (:class:`FieldBatchNorm`). On a GPU the four passes are PyTorch's own batch-norm kernels
      (those ``SyncBatchNorm`` runs, with the |G| channels of a field in the place of the
      replicas). ``BatchNorm2d`` on the view would give each field's millions of values to
      few thread blocks, which left an H100 mostly idle (a p4m U-Net training step, width 8,
      batch 16x256x256: 76 ms against plain's 37 ms).
    * evaluation: the running statistics repeated per channel, so it is a per-channel
      ``F.batch_norm`` (one elementwise pass on every device).

    ``TRAINING_PATH = "view"`` trains through the definition instead (for comparison).

    Shapes: (B, C*|G|, H, W) -> same.
    """

    TRAINING_PATH = "fields"

    def __init__(self, num_fields: int, group: Group | PlaneGroup, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.group = group
        self.norm = nn.BatchNorm2d(num_fields, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, order = self.norm, self.group.order
        batch_stats = self.training or not norm.track_running_stats
        if batch_stats and self.TRAINING_PATH == "view":
            b, _, h, w = x.shape  # (B, C*|G|, H, W) -> (B, C, |G|*H, W): the group axis joins the plane
            return self.norm(x.reshape(b, -1, order * h, w)).reshape(b, -1, h, w)
        weight = None if norm.weight is None else norm.weight.repeat_interleave(order)
        bias = None if norm.bias is None else norm.bias.repeat_interleave(order)
        if not batch_stats:
            return F.batch_norm(x, norm.running_mean.repeat_interleave(order), norm.running_var.repeat_interleave(order),
                                weight, bias, False, 0.0, norm.eps)
        y, mean, var = FieldBatchNorm.apply(x, weight, bias, order, norm.eps)
        if self.training and norm.track_running_stats:
            self._update_running_stats(mean, var, x.numel() // norm.num_features)
        return y

    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """As ``BatchNorm2d`` updates them: unbiased variance; ``momentum``, or a cumulative average when it is None."""
        norm = self.norm
        with torch.no_grad():
            norm.num_batches_tracked += 1
            momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
            norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), momentum)
            norm.running_var.lerp_((var * (count / max(count - 1, 1))).to(norm.running_var.dtype), momentum)

    def extra_repr(self) -> str:
        return f"group={self.group}"


class FieldBatchNorm(torch.autograd.Function):
    """Training-mode batch norm over fields of ``order`` consecutive channels, from per-channel passes.

    ``apply(x, weight, bias, order, eps) -> (y, mean, var)``: ``weight`` and ``bias`` per
    channel (one value repeated over each field's channels; or None), ``mean`` and biased
    ``var`` per field (not differentiable). A field's mean is the mean of its channels' means;
    its variance the mean of their variances plus the variance of their means (equal counts).
    Backward: with n values per field, per-channel sums of dy and of dy (x - mean) added up per
    field give S1 and S2, and

        dx = w / sigma * (dy - S1 / n - (x - mean) / sigma**2 * S2 / n),
        dweight = S2 / sigma,  dbias = S1   (per field, summed over its channels).

    On CUDA the passes are PyTorch's batch-norm kernels (``batch_norm_stats``,
    ``batch_norm_elemt``, ``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``);
    elsewhere the same formulas in tensor operations.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, order, eps):
        channels = x.shape[1]
        if x.is_cuda:
            mean_c, invstd_c = torch.batch_norm_stats(x, eps)
            var_c = invstd_c.reciprocal().square() - eps
        else:
            var_c, mean_c = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
        mean_c, var_c = mean_c.view(-1, order), var_c.view(-1, order)
        mean = mean_c.mean(dim=1)
        var = (var_c + (mean_c - mean[:, None]).square()).mean(dim=1)
        invstd = torch.rsqrt(var + eps)
        mean_r, invstd_r = mean.repeat_interleave(order), invstd.repeat_interleave(order)
        if x.is_cuda:
            y = torch.batch_norm_elemt(x, weight, bias, mean_r, invstd_r, eps)
        else:
            scale = invstd_r if weight is None else invstd_r * weight
            shift = -mean_r * scale + (0 if bias is None else bias)
            y = torch.addcmul(shift.view(1, channels, 1, 1).to(x.dtype), x, scale.view(1, channels, 1, 1).to(x.dtype))
        ctx.save_for_backward(x, weight, mean_r, invstd_r)
        ctx.order = order
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _mean, _var):
        x, weight, mean_r, invstd_r = ctx.saved_tensors
        order, channels = ctx.order, x.shape[1]
        count = x.numel() // channels * order  # values per field
        dy = dy.contiguous()
        if x.is_cuda:
            sum_dy_c, sum_dy_xmu_c, _, _ = torch.batch_norm_backward_reduce(dy, x, mean_r, invstd_r, weight,
                                                                            True, False, False)
        else:
            sum_dy_c = dy.sum(dim=(0, 2, 3), dtype=torch.float32)
            sum_dy_xmu_c = (dy * x).sum(dim=(0, 2, 3), dtype=torch.float32) - mean_r * sum_dy_c
        s1, s2 = sum_dy_c.view(-1, order).sum(dim=1), sum_dy_xmu_c.view(-1, order).sum(dim=1)
        # per channel; repeat_interleave's backward adds them up per field
        dweight = sum_dy_xmu_c * invstd_r if ctx.needs_input_grad[1] else None
        dbias = sum_dy_c if ctx.needs_input_grad[2] else None
        s1_r, s2_r = s1.repeat_interleave(order), s2.repeat_interleave(order)
        dx = None
        if ctx.needs_input_grad[0]:
            if x.is_cuda:
                dx = torch.batch_norm_backward_elemt(dy, x, mean_r, invstd_r, weight, s1_r, s2_r,
                                                     torch.full((1,), count, dtype=torch.int32, device=x.device))
            else:
                a = invstd_r if weight is None else invstd_r * weight
                k = a * invstd_r.square() * s2_r / count
                c = (k * mean_r - a * s1_r / count).view(1, channels, 1, 1)
                dx = torch.addcmul(torch.addcmul(c, x, -k.view(1, channels, 1, 1)), dy, a.view(1, channels, 1, 1))
                dx = dx.to(x.dtype)
        return dx, dweight, dbias, None, None
