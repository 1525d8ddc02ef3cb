"""Build U-Nets by family and width, and match widths to a parameter budget."""

from __future__ import annotations

import copy

import torch
from torch import nn

from equiseg.models.optimize import optimize_for_inference
from equiseg.models.unet import ConvFamily, Pooling, UNet
from equiseg.nn import ExpandedConv2d

PAPER_WIDTHS = {ConvFamily.PLAIN: 64, ConvFamily.ISOTROPIC: 110}
"""The pair of the paper (Liem, 2025): a plain U-Net of width 64 against an isotropic one of width 110."""


def build_model(family: ConvFamily | str, width: int, depth: int = 4, in_channels: int = 3,
                num_classes: int = 3, pool: Pooling | str = Pooling.MAX, nucleus: bool = False) -> UNet:
    """A U-Net of the given conv family (``"plain"``, ``"isotropic"``, ``"p4"``, ``"p4m"``, ``"c8"``,
    ``"c16"`` or ``"d8"``), going down by ``pool`` (``"max"`` or ``"blur"``).

    Args:
        family: the conv family (`ConvFamily` or its value).
        width: units at level 0: channels for plain and isotropic, fields of |G| channels for the
            group families (doubled at each level down).
        depth: number of 2x2 poolings.
        in_channels: image channels (3 for RGB; 5 with tissue context).
        num_classes: logit channels (3 for cells: background, BC, TC; 2 for tissue).
        pool: how the U-Net goes down a level (`Pooling` or its value).
        nucleus: a nucleus logit after the class logits (``data.nuclei``; see `UNet`).

    Examples:
        >>> model = build_model("isotropic", width=110)
    """
    return UNet(ConvFamily(family), width, depth=depth, in_channels=in_channels, num_classes=num_classes,
                pool=Pooling(pool), nucleus=nucleus)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable values (free parameters, not the expanded filter banks)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_count(family: ConvFamily | str, width: int, depth: int = 4, in_channels: int = 3,
                    num_classes: int = 3) -> int:
    """Parameters of ``build_model(...)``, counted on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return count_parameters(build_model(family, width, depth, in_channels, num_classes))


def match_width(family: ConvFamily | str, reference: nn.Module | int, depth: int = 4, in_channels: int = 3,
                num_classes: int = 3, max_width: int = 4096) -> int:
    """The width of ``family`` whose parameter count is closest to ``reference``'s.

    Args:
        family: the family to size.
        reference: a model, or a parameter count.
        depth: number of 2x2 poolings of the models compared.
        in_channels: image channels of the models compared.
        num_classes: logit channels of the models compared.
        max_width: the largest width considered.
    """
    target = reference if isinstance(reference, int) else count_parameters(reference)
    low, high = 1, max_width
    while low < high:  # smallest width with at least ``target`` parameters (the count grows with width)
        mid = (low + high) // 2
        if parameter_count(family, mid, depth, in_channels, num_classes) < target:
            low = mid + 1
        else:
            high = mid
    candidates = [w for w in (low - 1, low) if w >= 1]
    return min(candidates, key=lambda w: abs(parameter_count(family, w, depth, in_channels, num_classes) - target))


def count_macs(model: nn.Module, height: int = 1024, width: int = 1024) -> int:
    """Multiply-adds of one forward pass on a (1, C, height, width) input, convolutions only.

    Equivariant convs count as the plain conv they expand to. Runs on a meta-device copy of
    the model, so no arithmetic is done and any size is free to count.
    """
    probe = copy.deepcopy(model).to("meta")
    total = 0

    def hook(module: nn.Conv2d | ExpandedConv2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size
        taps = kernel * kernel if isinstance(kernel, int) else kernel[0] * kernel[1]
        total += output.numel() * inputs[0].shape[1] * taps

    convs = (nn.Conv2d, ExpandedConv2d)
    handles = [m.register_forward_hook(hook) for m in probe.modules() if isinstance(m, convs)]
    with torch.no_grad():
        probe.eval()(torch.empty(1, in_channels(probe), height, width, device="meta"))
    for handle in handles:
        handle.remove()
    return total


def receptive_reach(model: nn.Module, depth: int) -> int:
    """How far, in px each way, an output pixel of ``model`` (a U-Net of ``depth`` poolings) sees: an
    impulse through a copy with every conv weight positive, at each of the 2**depth offsets to the
    pooling grid, the farthest output it reaches. 61 px for the presets' depth-4 U-Nets.
    """
    probe = optimize_for_inference(model, channels_last=False, fuse_up=False)
    with torch.no_grad():
        for layer in probe.modules():
            if isinstance(layer, nn.Conv2d):
                layer.weight.fill_(1.0 / layer.weight[0].numel())
                if layer.bias is not None:
                    layer.bias.zero_()
        multiple, side = 2**depth, 64
        while True:
            reach, centre = 0, side // 2
            for offset in range(multiple):
                x = torch.zeros(1, in_channels(probe), side, side)
                x[0, :, centre + offset, centre + offset] = 1
                rows = torch.nonzero(probe(x)[0].sum(0).sum(1) > 0)
                reach = max(reach, centre + offset - int(rows.min()), int(rows.max()) - centre - offset)
            if reach < centre - multiple:  # the impulse's reach stayed inside the probe
                return reach
            side *= 2


def in_channels(model: nn.Module) -> int:
    """The channels the first conv of ``model`` takes."""
    return next(m for m in model.modules() if isinstance(m, (nn.Conv2d, ExpandedConv2d))).in_channels
