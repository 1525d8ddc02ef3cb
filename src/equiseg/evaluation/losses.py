"""Dice + cross-entropy, on hard class targets (the loss of the paper, Liem 2025) or on the soft targets of
centre maps, with an ignore value excluded from both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from equiseg.data.targets import IGNORE_INDEX, CellTarget, TargetKind


class DiceCELoss(nn.Module):
    """``dice_weight * (1 - mean_c Dice_c) + ce_weight * CE``.

    Dice_c = (2 sum p_c y_c + eps) / (sum p_c + sum y_c + eps) over all kept pixels of the
    batch, with p the softmax probabilities and y the one-hot target; CE is the mean
    cross-entropy over kept pixels. Pixels whose target is ``ignore_index`` count in neither
    term. ``eps`` (1e-5) makes a class absent from both prediction and target score Dice 1.

    With a centre ``target`` (`CellTarget`) the code map is read as
    soft class probabilities y (a Gaussian per cell): the same Dice with y in place of the
    one-hot, and the cross-entropy -sum_c y_c log p_c. Disk targets take the hard path above.

    Shapes: logits (B, C, H, W), target (B, H, W) long codes -> scalar.
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, ignore_index: int = IGNORE_INDEX,
                 eps: float = 1e-5, target: CellTarget | None = None) -> None:
        super().__init__()
        if dice_weight < 0 or ce_weight < 0 or dice_weight + ce_weight == 0:
            raise ValueError("loss weights must be >= 0 and not both 0")
        self.dice_weight, self.ce_weight, self.ignore_index, self.eps = dice_weight, ce_weight, ignore_index, eps
        self.target = target if target is not None and target.kind is TargetKind.CENTRES else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.components(logits, target)["loss"]

    def components(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss", "dice_loss", "ce"}`` for logging."""
        num_classes = logits.shape[1]
        keep = target != self.ignore_index  # (B, H, W)
        logits = logits.float()
        if self.target is not None:
            onehot = self.target.soft(target, num_classes).to(logits.device)  # soft, 0 where ignored
            ce_map = -(onehot * logits.log_softmax(dim=1)).sum(1)
        else:
            safe = torch.where(keep, target, 0).long()
            onehot = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).to(logits.dtype) * keep[:, None]
            ce_map = F.cross_entropy(logits, safe, reduction="none")
        ce = ce_map[keep].mean() if keep.any() else logits.sum() * 0.0
        probs = logits.softmax(dim=1) * keep[:, None]
        dims = (0, 2, 3)
        dice = (2 * (probs * onehot).sum(dims) + self.eps) / (probs.sum(dims) + onehot.sum(dims) + self.eps)
        dice_loss = 1 - dice.mean()
        return {"loss": self.dice_weight * dice_loss + self.ce_weight * ce, "dice_loss": dice_loss, "ce": ce}
