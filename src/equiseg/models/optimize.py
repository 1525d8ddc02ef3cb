"""A trained U-Net made ready for deployment: the same function, fewer and plainer layers.

`optimize_for_inference` returns a copy in evaluation mode in which

* every equivariant conv is expanded once into an ``nn.Conv2d`` (`fold_to_conv2d`),
* every batch norm is folded into the conv before it (running statistics: y = s (W x) + t
  becomes (s W) x + t), so a block is one conv with a bias and a ReLU,
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

from equiseg.nn import GroupBatchNorm2d, fold_to_conv2d


def optimize_for_inference(model: nn.Module, channels_last: bool = True, compile: bool = False) -> nn.Module:
    """An inference-only copy of ``model`` computing the same function (see the module docstring).

    ``model`` itself is left unchanged. The copy has no gradients and stays in evaluation mode
    (its batch norms are gone, so training it again would mean something else).

    Args:
        model: a U-Net (any family) or any module of conv -> batch norm -> ReLU blocks.
        channels_last: keep weights and activations channels-last.
        compile: wrap the result in ``torch.compile`` (worth it for long runs on a GPU; the
            first call compiles for a while).
    """
    optimized = fold_to_conv2d(model).eval()
    for module in list(optimized.modules()):
        if isinstance(module, nn.Sequential):
            _fold_norms(module)
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
