"""Stage 2 of the two-stage cell model: a U-Net over a conv family on a window centred on one cell,
returning the cell's nucleus mask in the window (equivariant) and its class (invariant).

The paper (Liem, 2025) planned this step: propose each cell, then segment it in a small region
around it, where its rotational symmetry can be used in full, because a turn of the cell about its
centre is then a turn of the whole input. That holds on the pixel grid only when the window's
centre is a pixel (a turn of the image about that pixel moves the window onto itself), so windows
have an odd side ``S``, and each level down must keep that centre: `CentredDown` samples the
pixels 0, 2, ..., S - 1 (``S`` odd gives (S + 1) / 2 samples, again symmetric about the centre),
and `CentredUp` goes back with linear interpolation that puts sample i at 2i. Sides with
``(S - 1) % 2**depth == 0`` stay odd down to the last level, so the net is exact for the family's
group at every level (`window_side` gives the nearest such side).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from equiseg.models.unet import ConvFamily, unet_features, unet_levels


def window_side(side_um: float, mpp: float, depth: int) -> int:
    """The odd window side in px nearest ``side_um`` µm at ``mpp`` µm per px that a `CellWindowNet`
    of ``depth`` takes exactly: ``S = 2**depth * j + 1``, j >= 1.
    """
    if side_um <= 0 or mpp <= 0:
        raise ValueError(f"need a positive window side and resolution, got {side_um} µm at {mpp} µm/px")
    step = 2**depth
    return step * max(1, round((side_um / mpp - 1) / step)) + 1


class CentredDown(nn.Module):
    """2x downsampling about the centre pixel: each channel convolved with the binomial
    [1, 2, 1] (x) [1, 2, 1] / 16 at stride 2, zero padding 1, so output pixel i is centred on input
    pixel 2i. For an odd side 2m + 1 the output has m + 1 pixels and input pixel m (the centre) is
    output pixel m / 2 when m is even; the kernel has the square's symmetries, so the layer commutes
    with every quarter turn and flip about the centre when the side is odd.

    Shapes: (B, C, S, S) -> (B, C, (S + 1) // 2, (S + 1) // 2).
    """

    kernel: torch.Tensor  # a buffer (set in __init__), declared for the type checker

    def __init__(self) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (taps[:, None] * taps[None, :] / 16).view(1, 1, 3, 3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        return F.conv2d(x, self.kernel.to(x.dtype).expand(channels, 1, 3, 3), stride=2, padding=1, groups=channels)


def centred_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Back up a level: linear interpolation with the corners aligned, so input pixel i lands on output
    pixel 2i when ``size`` is 2 (n - 1) + 1 (`CentredDown`'s inverse on the grid), and the odd
    pixels are the mean of their two neighbours (weights exactly 1/2, so a turned input gives the
    turned output to the last bit).
    """
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _centred_up_to(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    return centred_up(x, (skip.shape[-2], skip.shape[-1]))


class CellWindowNet(nn.Module):
    """A U-Net on windows of odd side centred on a cell: its nucleus mask and its class.

    The layers are `equiseg.models.unet.UNet`'s (one conv block of the family per level, the same
    widths), with `CentredDown` and `centred_up` in place of pooling and upsampling so that the
    window's centre stays a pixel at every level. Group families pool over the group (max) at the
    end, as the U-Net does, giving scalar features ``f`` (B, width, S, S). Then:

    - mask logits: a 1x1 conv of ``f`` (B, 1, S, S): the nucleus of the centred cell;
    - class logits (B, num_classes): the features averaged over the window weighted by the mask's
      probability (the cell's own pixels count most, so a neighbour of the other class does not
      blend in), then a linear layer.

    Guarantee, in evaluation mode, for the family's group G, sides with ``(S - 1) % 2**depth == 0``
    and T_g a turn or flip of the window about its centre pixel:

        mask(T_g x) = T_g mask(x),    class(T_g x) = class(x),

    exactly up to float rounding. Other sides are refused.

    Args:
        family: the conv family.
        width: units at level 0 (fields of |G| channels for the group families).
        depth: levels down.
        in_channels: image channels (3, or 5 with tissue context).
        num_classes: cell classes (2: BC, TC; no background: the window holds a cell).
    """

    def __init__(self, family: ConvFamily, width: int, depth: int = 3, in_channels: int = 3,
                 num_classes: int = 2) -> None:
        super().__init__()
        if width < 1 or depth < 0:
            raise ValueError(f"need width >= 1 and depth >= 0, got width={width}, depth={depth}")
        self.family, self.width, self.depth = family, width, depth
        self.down = CentredDown()
        self.encoder, self.decoder = unet_levels(family, width, depth, in_channels)
        self.mask_head = nn.Conv2d(width, 1, 1)
        self.class_head = nn.Linear(width, num_classes)

    def check_side(self, side: int) -> None:
        """Refuse a window side this net is not exact on (one line, with the nearest good sides)."""
        step = 2**self.depth
        if side % 2 == 0 or (side - 1) % step:
            low = step * max(1, (side - 1) // step) + 1
            raise ValueError(f"window of {side} px: a CellWindowNet of depth {self.depth} takes odd sides S with "
                             f"(S - 1) a multiple of {step} (for example {low} or {low + step})")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The scalar features (B, width, S, S) at full size, after pooling over the group."""
        self.check_side(x.shape[-1])
        if x.shape[-2] != x.shape[-1]:
            raise ValueError(f"windows are square, got {x.shape[-2]}x{x.shape[-1]}")
        return unet_features(x, self.family, self.encoder, self.decoder, self.down, _centred_up_to)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        mask = self.mask_head(features)
        weight = torch.sigmoid(mask)
        pooled = (features * weight).sum((-2, -1)) / weight.sum((-2, -1)).clamp_min(1e-6)
        return mask, self.class_head(pooled)

    def extra_repr(self) -> str:
        return f"family={self.family.value}, width={self.width}, depth={self.depth}"


def window_classes(model: nn.Module) -> int:
    """The classes a `CellWindowNet` (or its copy optimized for inference) tells apart: its class head's outputs."""
    head = model.class_head
    return head.out_features if isinstance(head, nn.Linear) else 2
