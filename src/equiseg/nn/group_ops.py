"""Operations on regular group features: pooling over the group and group batch norm."""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn

from equiseg.groups import Group, PlaneGroup, unfold_group


class GroupPool(enum.Enum):
    """How `pool_over_group` reduces the group axis."""

    MAX = "max"
    MEAN = "mean"


def pool_over_group(x: torch.Tensor, group: Group | PlaneGroup, mode: GroupPool = GroupPool.MAX) -> torch.Tensor:
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
      (`FieldBatchNorm`). On a GPU the four passes are PyTorch's own batch-norm kernels
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
        if not batch_stats:
            return F.batch_norm(x, *self.channel_buffers(), False, 0.0, norm.eps)
        update = self.training and norm.track_running_stats
        momentum = 0.0
        if update:
            tracked = norm.num_batches_tracked
            assert tracked is not None  # a buffer whenever track_running_stats
            tracked.add_(1)
            momentum = norm.momentum if norm.momentum is not None else 1.0 / float(tracked)
        return FieldBatchNorm.apply(x, norm.weight, norm.bias, norm.running_mean if update else None,
                                    norm.running_var if update else None, momentum, order, norm.eps)

    def channel_buffers(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                                       torch.Tensor | None]:
        """Running mean and variance, weight and bias repeated per channel (weight/bias None without
        affine): the per-channel ``BatchNorm2d`` this layer is in evaluation.

        Kept while evaluating without gradients and rebuilt when one of them changes (as
        ``ExpandedConv2d`` keeps its bank): one batch-norm kernel a forward, nothing more.
        """
        norm, order = self.norm, self.group.order
        tensors = (norm.running_mean, norm.running_var, norm.weight, norm.bias)
        grad = torch.is_grad_enabled()
        key = None if grad else tuple(None if t is None else (t._version, t.data_ptr()) for t in tensors)
        cache = self.__dict__.get("_channel_cache")
        if cache is not None and cache[0] == key and key is not None:
            return cache[1]
        mean, var, weight, bias = (None if t is None else t.repeat_interleave(order) for t in tensors)
        repeated = (mean, var, weight, bias)
        self.__dict__["_channel_cache"] = None if grad else (key, repeated)
        return repeated

    def extra_repr(self) -> str:
        return f"group={self.group}"


class FieldBatchNorm(torch.autograd.Function):
    """Training-mode batch norm over fields of ``order`` consecutive channels, from per-channel passes.

    ``apply(x, weight, bias, running_mean, running_var, momentum, order, eps) -> y``: ``weight``,
    ``bias`` (or None) and the running statistics (None: not updated) per field, as in
    ``BatchNorm2d``; the running variance is updated with the unbiased variance. A field's mean
    is the mean of its channels' means, its (biased) variance the mean of their variances plus
    the variance of their means (equal counts). Backward: with n values per field and S1, S2 the
    sums of dy and of dy (x - mean) over the field,

        dx = w / sigma * (dy - S1 / n - (x - mean) / sigma**2 * S2 / n),
        dweight = S2 / sigma,  dbias = S1.

    Two backends compute the four passes (moments, normalise, gradient sums, input gradient):
    `_CudaKernels`, PyTorch's own batch-norm kernels, about seven kernels each way, few
    enough that a small batch is not held up by launches (eager CUDA); and `_Formulas`,
    the same formulas in tensor operations (every other device, and any code ``torch.compile``
    traces: the kernels have no fake implementation to trace through, and the compiler fuses
    the formulas itself).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, order, eps):
        backend = _CudaKernels if x.is_cuda and not torch.compiler.is_compiling() else _Formulas
        mean, invstd = backend.moments(x, order, running_mean, running_var, momentum, eps)
        mean_r, invstd_r, weight_r, bias_r = _per_channel(order, mean, invstd, weight, bias)
        y = backend.normalise(x, weight_r, bias_r, mean_r, invstd_r, eps)
        ctx.save_for_backward(x, weight_r, mean_r, invstd_r)
        ctx.order, ctx.backend = order, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight_r, mean_r, invstd_r = ctx.saved_tensors
        order, backend = ctx.order, ctx.backend
        count = x.numel() // x.shape[1] * order  # values per field
        dy = dy.contiguous(memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                           else torch.contiguous_format)
        sum_dy_c, sum_dy_xmu_c = backend.gradient_sums(dy, x, mean_r, invstd_r, weight_r)
        s1, s2 = sum_dy_c.view(-1, order).sum(dim=1), sum_dy_xmu_c.view(-1, order).sum(dim=1)
        dweight = s2 * invstd_r[::order] if ctx.needs_input_grad[1] else None
        dbias = s1 if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dx = backend.input_gradient(dy, x, mean_r, invstd_r, weight_r, *_per_channel(order, s1, s2), count)
        return dx, dweight, dbias, None, None, None, None, None


def _per_channel(order: int, *per_field: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each (C,) tensor repeated to (C * order,), field-major (None stays None), each in its own
    dtype: one stack and one repeat for them all, not a repeat each (fewer operations to issue).
    """
    present = [t for t in per_field if t is not None]
    # one dtype that holds each exactly (float64 holds every float type's values)
    dtype = present[0].dtype if all(t.dtype == present[0].dtype for t in present) else torch.float64
    rows = iter(torch.stack([t.to(dtype) for t in present]).repeat_interleave(order, dim=1).unbind())
    return tuple(None if t is None else next(rows).to(t.dtype) for t in per_field)


class _CudaKernels:
    """`FieldBatchNorm`'s passes as PyTorch's CUDA batch-norm kernels (those ``SyncBatchNorm`` runs)."""

    @staticmethod
    def moments(x, order, running_mean, running_var, momentum, eps):
        """Per-field mean and 1/sigma; the running statistics updated in the same kernel."""
        mean_c, invstd_c = torch.batch_norm_stats(x, eps)
        # the |G| channels of a field in the place of SyncBatchNorm's replicas: (|G|, C) views,
        # which the kernel reads through their strides; counts in the type it dispatches on
        # (the running statistics', else the input's; PyTorch's Normalization.cu, 2.11-2.13)
        counts = torch.full((order,), x.numel() // x.shape[1], device=x.device,
                            dtype=x.dtype if running_mean is None else running_mean.dtype)
        return torch.batch_norm_gather_stats_with_counts(x, mean_c.view(-1, order).t(), invstd_c.view(-1, order).t(),
                                                         running_mean, running_var, momentum, eps, counts)

    @staticmethod
    def normalise(x, weight_r, bias_r, mean_r, invstd_r, eps):
        return torch.batch_norm_elemt(x, weight_r, bias_r, mean_r, invstd_r, eps)

    @staticmethod
    def gradient_sums(dy, x, mean_r, invstd_r, weight_r):
        """Per channel: the sum of dy and of dy (x - mean)."""
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(dy, x, mean_r, invstd_r, weight_r,
                                                                    True, False, False)
        return sum_dy, sum_dy_xmu

    @staticmethod
    def input_gradient(dy, x, mean_r, invstd_r, weight_r, s1_r, s2_r, count):
        return torch.batch_norm_backward_elemt(dy, x, mean_r, invstd_r, weight_r, s1_r, s2_r,
                                               torch.full((1,), count, dtype=torch.int32, device=x.device))


def _accumulator(x: torch.Tensor) -> torch.dtype:
    """The dtype a batch norm's sums over ``x`` are taken in: float32, or float64 for float64 input."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Formulas:
    """`FieldBatchNorm`'s passes as tensor operations (statistics in float32, or float64 for
    float64 input).
    """

    @staticmethod
    def moments(x, order, running_mean, running_var, momentum, eps):
        var_c, mean_c = torch.var_mean(x.to(_accumulator(x)), dim=(0, 2, 3), unbiased=False)
        mean_c, var_c = mean_c.view(-1, order), var_c.view(-1, order)
        mean = mean_c.mean(dim=1)
        var = (var_c + (mean_c - mean[:, None]).square()).mean(dim=1)
        if running_mean is not None:
            n = x.numel() // x.shape[1] * order
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (n / max(n - 1, 1))).to(running_var.dtype), momentum)
        return mean, torch.rsqrt(var + eps)

    @staticmethod
    def normalise(x, weight_r, bias_r, mean_r, invstd_r, eps):
        shape = (1, x.shape[1], 1, 1)
        scale = invstd_r if weight_r is None else invstd_r * weight_r
        shift = -mean_r * scale + (0 if bias_r is None else bias_r)
        return torch.addcmul(shift.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))

    @staticmethod
    def gradient_sums(dy, x, mean_r, invstd_r, weight_r):
        sum_dy = dy.sum(dim=(0, 2, 3), dtype=_accumulator(x))
        return sum_dy, (dy * x).sum(dim=(0, 2, 3), dtype=_accumulator(x)) - mean_r * sum_dy

    @staticmethod
    def input_gradient(dy, x, mean_r, invstd_r, weight_r, s1_r, s2_r, count):
        shape = (1, x.shape[1], 1, 1)
        a = invstd_r if weight_r is None else invstd_r * weight_r
        k = a * invstd_r.square() * s2_r / count
        c = (k * mean_r - a * s1_r / count).view(shape)
        return torch.addcmul(torch.addcmul(c, x, -k.view(shape)), dy, a.view(shape)).to(x.dtype)
