"""A trained U-Net made ready for deployment: the same function, fewer and plainer layers.

`optimize_for_inference` returns a copy in evaluation mode in which

* every equivariant conv is expanded once into an ``nn.Conv2d`` (`fold_to_conv2d`),
* every batch norm is folded into the conv before it (running statistics: y = s (W x) + t
  becomes (s W) x + t), so a block is one conv with a bias and a ReLU,
* each decoder block of a U-Net (nearest x2 upsampling, concatenation with the skip, then a 3x3
  conv) becomes `NearestUpConcatConv`: the conv split into its skip half at full size and its
  upsampled half as four 2x2 convs at half size, one per output phase, summed in place, so that the
  upsampled map and the concatenation are never made (they cost a quarter of a small U-Net's time
  on the CPU, and the upsampled half has 4/9 of the multiply-adds: benchmarks/predict_profile.py),
* parameters and activations use the channels-last memory format (the layout oneDNN and cuDNN
  convolve fastest), and
* optionally, ``torch.compile`` fuses what the backend can.

Folding a group batch norm scales all |G| channels of a field alike, so the folded weights keep
the structure that makes the layer equivariant: the optimized model is exactly as equivariant
as the trained one (tested), and equal to it up to float rounding.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from equiseg.models.unet import UNet
from equiseg.nn import GroupBatchNorm2d, fold_to_conv2d


def optimize_for_inference(model: nn.Module, channels_last: bool = True, compile: bool = False,
                           fuse_up: bool = True) -> nn.Module:
    """An inference-only copy of ``model`` computing the same function (see the module docstring).

    ``model`` itself is left unchanged. The copy has no gradients and stays in evaluation mode
    (its batch norms are gone, so training it again would mean something else).

    Args:
        model: a U-Net (any family) or any module of conv -> batch norm -> ReLU blocks.
        channels_last: keep weights and activations channels-last.
        compile: wrap the result in ``torch.compile`` (worth it for long runs on a GPU; the
            first call compiles for a while).
        fuse_up: a U-Net's decoder blocks as `NearestUpConcatConv` (off for a graph exported to
            other runtimes, which then keeps the plain upsample, concatenation and conv).
    """
    optimized = fold_to_conv2d(model).eval()
    for module in list(optimized.modules()):
        if isinstance(module, nn.Sequential):
            _fold_norms(module)
    if fuse_up and isinstance(optimized, UNet):  # nearest x2 upsampling (a CellWindowNet's centred one is not)
        optimized.decoder = nn.ModuleList([_fused_decoder_block(block) for block in optimized.decoder])
    optimized.requires_grad_(False)
    if channels_last:
        # Module.to takes memory_format (as Tensor.to does); torch's overloads leave it out
        optimized = optimized.to(memory_format=torch.channels_last)  # pyright: ignore[reportCallIssue]
        optimized.register_forward_pre_hook(_channels_last_input)
    # a module compiles to a module (OptimizedModule); torch.compile is typed for any callable
    return cast(nn.Module, torch.compile(optimized)) if compile else optimized


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    x, *rest = args
    return (x.contiguous(memory_format=torch.channels_last), *rest) if x.dim() == 4 else args


def _fold_norms(block: nn.Sequential) -> None:
    """Replace each (nn.Conv2d, batch norm) pair of ``block`` by one conv, in place."""
    layers = list(block)
    folded: list[nn.Module] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        following = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, nn.Conv2d) and (affine := _norm_affine(following)) is not None:
            folded.append(_conv_with_affine(layer, *affine))
            i += 2
        else:
            folded.append(layer)
            i += 1
    if len(folded) != len(layers):
        for name in list(block._modules):
            del block._modules[name]
        for k, layer in enumerate(folded):
            block.add_module(str(k), layer)


def _norm_affine(norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per output channel (scale, shift) of a batch norm on running statistics, or None if it is not one."""
    inner = norm.norm if isinstance(norm, GroupBatchNorm2d) else norm
    if not isinstance(inner, nn.BatchNorm2d) or not inner.track_running_stats or inner.running_mean is None:
        return None
    with torch.no_grad():
        # a group norm has one value per field, shared by its |G| consecutive channels: its per-channel form
        mean, var, weight, bias = (norm.channel_buffers() if isinstance(norm, GroupBatchNorm2d) else
                                   (inner.running_mean, inner.running_var, inner.weight, inner.bias))
        assert mean is not None and var is not None  # running statistics, checked above
        scale = torch.rsqrt(var + inner.eps)
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale + (0 if bias is None else bias)
    return scale, shift


def _conv_with_affine(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Conv2d:
    """``conv`` followed by y -> scale * y + shift per output channel, as one conv."""
    # torch types Conv2d's attributes tuple[int, ...] and its arguments int | tuple[int, int]: the same values
    fused = nn.Conv2d(conv.in_channels, conv.out_channels,
                      conv.kernel_size, conv.stride, conv.padding,  # pyright: ignore[reportArgumentType]
                      conv.dilation,  # pyright: ignore[reportArgumentType]
                      conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
        assert fused.bias is not None  # made with bias=True
        fused.bias.copy_(bias * scale + shift)
    return fused


_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


def _collapse(kernel: torch.Tensor, phase: int, dim: int) -> torch.Tensor:
    """The 3 taps of ``kernel`` along ``dim`` as the 2 rows (columns) of x that output phase ``phase`` of
    "nearest x2 up, then a 3x3 conv" reads: phase 0 (even rows) reads x's row i - 1 with tap 0 and row i
    with taps 1 + 2; phase 1 reads row i with taps 0 + 1 and row i + 1 with tap 2.
    """
    t0, t1, t2 = (kernel.select(dim, k) for k in range(3))
    return torch.stack([t0, t1 + t2] if phase == 0 else [t0 + t1, t2], dim)


class NearestUpConcatConv(nn.Module):
    """``rest(conv(cat([nearest_x2(x), skip])))`` of a U-Net decoder block, computed without the
    upsampled map or the concatenation: ``conv`` (3x3, padding 1) is split into its skip half, run on the
    skip as it is, and its upsampled half, which on a nearest x2 upsampling is, for each output phase
    (even or odd row, even or odd column), a 2x2 conv of x itself (the kernel's rows and columns summed
    in pairs): one conv of x with the four phases' kernels, padded by 1, each phase added in place at
    its rows and columns. The same function up to float rounding (tested); a skip that is not twice
    x's size (no such input reaches a U-Net's decoder) falls back to the conv as it was.
    """

    takes_skip = True

    def __init__(self, block: nn.Sequential, up_channels: int) -> None:
        super().__init__()
        conv = block[0]
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        self.conv, self.rest = conv, nn.Sequential(*list(block)[1:])
        weight, out, skip_channels = conv.weight.detach(), conv.out_channels, conv.in_channels - up_channels
        self.skip = nn.Conv2d(skip_channels, out, 3, padding=1, bias=conv.bias is not None,
                              device=weight.device, dtype=weight.dtype)
        self.up = nn.Conv2d(up_channels, 4 * out, 2, padding=1, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.skip.weight.copy_(weight[:, up_channels:])
            if conv.bias is not None and self.skip.bias is not None:
                self.skip.bias.copy_(conv.bias)
            up = weight[:, :up_channels]
            self.up.weight.copy_(torch.cat([_collapse(_collapse(up, a, 2), b, 3) for a, b in _PHASES]))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if skip.shape[-2:] != (2 * h, 2 * w):
            up = nn.functional.interpolate(x, size=skip.shape[-2:], mode="nearest")
            return self.rest(self.conv(torch.cat([up, skip], dim=1)))
        y = self.skip(skip)
        phases = self.up(x)  # (B, 4 out, h + 1, w + 1): phase k's out channels, its rows from a, columns from b
        out = y.shape[1]
        for k, (a, b) in enumerate(_PHASES):
            y[:, :, a::2, b::2] += phases[:, k * out:(k + 1) * out, a:a + h, b:b + w]
        return self.rest(y)


def _fused_decoder_block(block: nn.Module) -> nn.Module:
    """A U-Net decoder block (a Sequential starting with a 3x3 conv of the upsampled map and the skip, the
    upsampled map's channels first; the skip has as many channels as the block puts out) as
    `NearestUpConcatConv`; any other block as it is.
    """
    conv = block[0] if isinstance(block, nn.Sequential) and len(block) else None
    if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3) or conv.padding != (1, 1) \
            or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 \
            or conv.padding_mode != "zeros" or conv.in_channels <= conv.out_channels:
        return block
    assert isinstance(block, nn.Sequential)
    return NearestUpConcatConv(block, conv.in_channels - conv.out_channels)
