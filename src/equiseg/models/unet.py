"""One U-Net over seven conv families: plain, isotropic, p4, p4m and the steerable c8, c16 and d8."""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from equiseg.groups import C4, C8, C16, D4, D8, Group, PlaneGroup
from equiseg.nn import (
    GroupBatchNorm2d,
    GroupConv2d,
    GroupPool,
    IsotropicConv2d,
    LiftingConv2d,
    SteerableGroupConv2d,
    SteerableLiftingConv2d,
    pool_over_group,
)


class ConvFamily(enum.Enum):
    """The convolution a U-Net is built from, and the symmetry it is exact for.

    ``c8``, ``c16`` and ``d8`` carry regular fields over finer rotation groups (C8, C16, D8) with
    steerable filters (`equiseg.nn.steerable`); on the pixel grid they are exact for the
    quarter turns (c8, c16) and flips (d8) they contain, and close to equivariant for the rest.
    """

    PLAIN = "plain"
    ISOTROPIC = "isotropic"
    P4 = "p4"
    P4M = "p4m"
    C8 = "c8"
    C16 = "c16"
    D8 = "d8"

    @property
    def group(self) -> Group | None:
        """The group G with f(T_g x) = T_g f(x) exactly for g in G; None for plain convs."""
        exact = {ConvFamily.PLAIN: None, ConvFamily.ISOTROPIC: D4, ConvFamily.P4: C4, ConvFamily.P4M: D4,
                 ConvFamily.C8: C4, ConvFamily.C16: C4, ConvFamily.D8: D4}
        return exact[self]

    @property
    def field_group(self) -> Group | PlaneGroup | None:
        """The group over which features are regular fields (their group axis); None for scalar features."""
        fields = {ConvFamily.P4: C4, ConvFamily.P4M: D4, ConvFamily.C8: C8, ConvFamily.C16: C16, ConvFamily.D8: D8}
        return fields.get(self)

    @property
    def channels_per_unit(self) -> int:
        """Conv channels per unit of width: |G| for regular group features, else 1."""
        return 1 if self.field_group is None else self.field_group.order


def conv_block(family: ConvFamily, in_width: int, out_width: int, lifting: bool = False) -> nn.Sequential:
    """Conv 3x3 (no bias: the norm follows) -> batch norm -> ReLU, in the family's feature type.

    Widths count fields for the group families (each |G| channels) and channels otherwise;
    ``lifting`` marks the first block of a group family, whose input is a plain image.
    """
    match family:
        case ConvFamily.PLAIN:
            conv, norm = nn.Conv2d(in_width, out_width, 3, padding=1, bias=False), nn.BatchNorm2d(out_width)
        case ConvFamily.ISOTROPIC:
            conv, norm = IsotropicConv2d(in_width, out_width, 3, bias=False), nn.BatchNorm2d(out_width)
        case ConvFamily.P4 | ConvFamily.P4M:
            group = family.group
            assert group is not None  # C4 or D4
            layer = LiftingConv2d if lifting else GroupConv2d
            conv = layer(in_width, out_width, group, 3, bias=False)
            norm = GroupBatchNorm2d(out_width, group)
        case ConvFamily.C8 | ConvFamily.C16 | ConvFamily.D8:
            plane_group = family.field_group
            assert isinstance(plane_group, PlaneGroup)  # C8, C16 or D8
            layer = SteerableLiftingConv2d if lifting else SteerableGroupConv2d
            conv = layer(in_width, out_width, plane_group, 3, bias=False)
            norm = GroupBatchNorm2d(out_width, plane_group)
    return nn.Sequential(conv, norm, nn.ReLU(inplace=True))


class Pooling(enum.Enum):
    """How a U-Net goes down a level (both halve each side and keep the guarantee below).

    ``max``: 2x2 max pooling. ``blur``: a binomial low-pass, [1, 3, 3, 1] / 8 in each direction,
    taken at stride 2 (``BlurPool2d``), so that less of what the next level cannot represent
    folds back into it (aliasing), which is what a turn by an angle off the grid brings out.
    """

    MAX = "max"
    BLUR = "blur"


class BlurPool2d(nn.Module):
    """Anti-aliased 2x downsampling: each channel convolved with the 4x4 binomial
    [1, 3, 3, 1] (x) [1, 3, 3, 1] / 64 at stride 2, zero padding 1.

    Output pixel (i, j) is centred on the 2x2 cell {2i, 2i+1} x {2j, 2j+1} of the input, as
    2x2 max pooling is, and the kernel has the square's symmetries, so for an input whose sides
    are even the layer commutes with every quarter turn and flip of the plane (each cell lands
    on a cell), channel by channel, hence with any regular group features too. A low-pass before
    subsampling, after Zhang, "Making Convolutional Networks Shift-Invariant Again" (ICML 2019),
    here without the max: measured (``equiseg models --pool``) it is the version that kept the
    U-Nets closest to equivariant at 45°.

    Shapes: (B, C, H, W) -> (B, C, H // 2, W // 2), H and W even.
    """

    kernel: torch.Tensor  # a buffer (set in __init__), declared for the type checker

    def __init__(self) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("kernel", (taps[:, None] * taps[None, :] / 64).view(1, 1, 4, 4), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        kernel = self.kernel.to(x.dtype).expand(channels, 1, 4, 4)
        return F.conv2d(x, kernel, stride=2, padding=1, groups=channels)



def probabilities(logits: torch.Tensor, class_channels: int | None = None, dim: int = 1) -> torch.Tensor:
    """A U-Net's probabilities from its logits: softmax over the first ``class_channels`` channels
    along ``dim`` (the classes), sigmoid of each channel after them (a nucleus logit).

    ``class_channels`` None, or as many as there are channels: softmax over all of them, bit for bit
    what ``logits.softmax(dim)`` gives. A cell U-Net with a nucleus output (``data.nuclei``) has
    logits (B, 4, H, W) with ``class_channels`` 3: its probabilities are p(background), p(BC), p(TC)
    (summing to 1) and p(nucleus) in [0, 1].
    """
    channels = logits.shape[dim]
    if class_channels is None or class_channels >= channels:
        return logits.softmax(dim)
    classes, extra = logits.split([class_channels, channels - class_channels], dim)
    return torch.cat([classes.softmax(dim), extra.sigmoid()], dim)


def model_class_channels(model: nn.Module) -> int | None:
    """The class channels of ``model``'s output (`UNet.class_channels`, kept by `optimize_for_inference`,
    ``torch.compile`` and wrappers that state it), or None for a module that does not state them: its
    output is all classes.
    """
    return getattr(model, "class_channels", None)


def _up(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 upsampling (the skip's size, for 2x2 pooling)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def unet_levels(family: ConvFamily, width: int, depth: int, in_channels: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The encoder blocks (level 0 lifting the image, then ``width * 2**level`` units a level) and the decoder
    blocks (each level's skip concatenated to the level below it) of a U-Net of ``family``.
    """
    widths = [width * 2**level for level in range(depth + 1)]
    encoder = nn.ModuleList(
        [conv_block(family, in_channels, widths[0], lifting=True)]
        + [conv_block(family, widths[level - 1], widths[level]) for level in range(1, depth + 1)]
    )
    decoder = nn.ModuleList(
        [conv_block(family, widths[level + 1] + widths[level], widths[level]) for level in range(depth)]
    )
    return encoder, decoder


def unet_features(x: torch.Tensor, family: ConvFamily, encoder: nn.ModuleList, decoder: nn.ModuleList,
                  down: Callable[[torch.Tensor], torch.Tensor],
                  up: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The U-Net's level-0 features: the encoder (level 0 at full size, each further level after ``down``),
    the decoder (from just above the bottleneck back to level 0, ``up(x, skip)`` then the skip
    concatenated), pooled over the group (max) for the group families, so scalar fields either way.
    """
    skips = []
    for level, block in enumerate(encoder):
        x = block(x if level == 0 else down(x))
        skips.append(x)
    x = skips.pop()
    for level in reversed(range(len(decoder))):
        skip, block = skips[level], decoder[level]
        # a block that takes (x, skip) itself does the upsampling and the concatenation in its first conv
        # (equiseg.models.optimize.NearestUpConcatConv, for nearest x2 upsampling only)
        x = block(x, skip) if getattr(block, "takes_skip", False) else block(torch.cat([up(x, skip), skip], dim=1))
    group = family.field_group
    if group is not None:  # regular features (|G| > 1 channels a field)
        x = pool_over_group(x, group, GroupPool.MAX)  # (B, C*|G|, H, W) -> (B, C, H, W)
    return x


def reflect_pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """``x`` (..., H, W) padded by ``pad`` = (left, right, top, bottom) px of its own mirror image.

    Padded row ``-k`` is row ``k`` of the image and row ``H - 1 + k`` is row ``H - 1 - k`` (the
    edge row is not repeated: ``F.pad``'s ``"reflect"``), likewise the columns. A pad not smaller
    than its side goes on mirroring: the rows repeat with period 2 (H - 1), a triangle wave, and a
    side of one pixel repeats that pixel. The row taken at offset i depends only on (H, top,
    bottom) and turns with the image: with r(i) that row, r(H - 1 - i) = H - 1 - r(i), so with
    top = bottom padding commutes with flipping the rows, and the same rule for the columns
    makes it commute with the transpose when H = W and the four pads are equal: with all of D4.
    """
    left, right, top, bottom = pad
    height, width = x.shape[-2:]
    if max(top, bottom) < height and max(left, right) < width:
        return F.pad(x, pad, mode="reflect")
    rows = _mirrored(height, top, bottom, x.device)
    columns = _mirrored(width, left, right, x.device)
    return x.index_select(-2, rows).index_select(-1, columns)


def _mirrored(length: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """The index into 0 .. length - 1 of each position -before .. length - 1 + after, mirrored
    at both ends again and again (`reflect_pad`).
    """
    position = torch.arange(-before, length + after, device=device)
    if length == 1:
        return torch.zeros_like(position)
    period = 2 * (length - 1)
    position = position.remainder(period)
    return torch.where(position < length, position, period - position)


class UNet(nn.Module):
    """A U-Net with one conv (+ norm + ReLU) per level, parameterised by its conv family.

    Encoder level l (l = 0..depth) has ``width * 2**l`` units, the last being the bottleneck;
    2x2 max pooling (or, with ``pool=Pooling.BLUR``, a binomial low-pass at stride 2: ``BlurPool2d``)
    goes down, nearest-neighbour x2 upsampling goes up (no transposed convs),
    and each decoder level concatenates the skip of its encoder level. Group families pool
    over the group (max) before a 1x1 head, so every family returns plain logits.

    Guarantee, in evaluation mode (batch norm on running statistics), for the family's group G
    (isotropic: D4, p4: C4, p4m: D4; plain: none):

        f(T_g x) = T_g f(x)   for all g in G,

    exactly up to float rounding when H and W are multiples of 2**depth (pooling then tiles
    every level evenly). Other sizes are padded to the next multiple with the image's mirror image
    (`reflect_pad`; it looks like the tissue around it, where zeros, black, read as nuclei along
    the border), split evenly between the two sides, and the logits cropped back.
    Reflection about the edges commutes with flipping an axis when both of its sides get the same
    pad, and rows and columns are padded by one rule, so this stays exact when the total padding
    of each side pair is even, and is only approximately equivariant when it is odd (one extra
    row or column lands on one side). With ``pad_input=False`` such sizes are refused instead.

    Args:
        family: the conv family.
        width: units at level 0 (channels for plain/isotropic, fields of |G| channels for the group families).
        depth: number of 2x2 poolings.
        in_channels: image channels.
        num_classes: class logit channels (default 3: background, BC, TC).
        pad_input: pad sizes that are not multiples of 2**depth rather than refuse them.
        pool: how to go down a level (`Pooling`).
        nucleus: one more logit channel after the classes, a nucleus logit (its sigmoid is p(nucleus):
            `probabilities`); the head is a 1x1 conv either way, so it is as equivariant as the classes.

    Attributes:
        class_channels: the class logit channels (``num_classes``); the output's channels after them
            (``out_channels - class_channels``: 1 with ``nucleus``) are sigmoid logits.
        out_channels: all logit channels.

    Shapes: (B, in_channels, H, W) -> (B, num_classes + nucleus, H, W).
    """

    def __init__(self, family: ConvFamily, width: int, depth: int = 4, in_channels: int = 3, num_classes: int = 3,
                 pad_input: bool = True, pool: Pooling = Pooling.MAX, nucleus: bool = False) -> None:
        super().__init__()
        if width < 1 or depth < 0:
            raise ValueError(f"need width >= 1 and depth >= 0, got width={width}, depth={depth}")
        self.family, self.width, self.depth, self.pad_input, self.pool = family, width, depth, pad_input, Pooling(pool)
        self.class_channels, self.out_channels = num_classes, num_classes + int(nucleus)
        self.down = BlurPool2d() if self.pool is Pooling.BLUR else nn.MaxPool2d(2)
        self.encoder, self.decoder = unet_levels(family, width, depth, in_channels)
        self.head = nn.Conv2d(width, self.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x, (top, left) = self._pad(x)
        logits = self.unpadded(x)
        return logits[..., top:top + height, left:left + width]

    def unpadded(self, x: torch.Tensor) -> torch.Tensor:
        """The network itself, for H and W multiples of 2**depth (no padding, no crop): what an
        exported file holds.
        """
        return self.head(unet_features(x, self.family, self.encoder, self.decoder, self.down, _up))

    def probabilities(self, logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """`probabilities` of this U-Net's ``logits`` (softmax over its classes, sigmoid of a nucleus channel)."""
        return probabilities(logits, self.class_channels, dim)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        multiple = 2**self.depth
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % multiple, (-width) % multiple
        if not (pad_h or pad_w):
            return x, (0, 0)
        if not self.pad_input:
            raise ValueError(
                f"input of {height}x{width} px: this U-Net of depth {self.depth} needs sides that are multiples of "
                f"{multiple} (for example {height + pad_h}x{width + pad_w}); crop or pad the image, "
                "or build it with pad_input=True"
            )
        top, left = pad_h // 2, pad_w // 2
        return reflect_pad(x, (left, pad_w - left, top, pad_h - top)), (top, left)

    def extra_repr(self) -> str:
        return (f"family={self.family.value}, width={self.width}, depth={self.depth}"
                + ("" if self.pool is Pooling.MAX else f", pool={self.pool.value}")
                + (", nucleus=True" if self.out_channels > self.class_channels else ""))
