import math

import pytest
import torch
import torch.nn.functional as F

from equiseg.evaluation.losses import DiceCELoss


def test_hand_computed_two_pixels():
    # two pixels, two classes; logits give p = (0.5, 0.5) at both; targets 0 and 1
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    parts = DiceCELoss(eps=0.0).components(logits, target)
    assert parts["ce"].item() == pytest.approx(math.log(2))
    # Dice_c = 2 * 0.5 / (1.0 + 1) = 0.5 for both classes
    assert parts["dice_loss"].item() == pytest.approx(0.5)
    assert parts["loss"].item() == pytest.approx(0.5 + math.log(2))


def test_ignored_pixels_count_in_neither_term():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    ignored = target.clone()
    ignored[:, :2] = 255
    loss = DiceCELoss()
    # changing logits where the target is ignored changes nothing
    other = logits.clone()
    other[:, :, :2] = torch.randn(2, 3, 2, 4) * 10
    assert loss(logits, ignored).item() == pytest.approx(loss(other, ignored).item())
    # and the value equals the loss of the kept half alone
    assert loss(logits, ignored).item() == pytest.approx(loss(logits[:, :, 2:], target[:, 2:]).item(), rel=1e-6)


def test_cross_entropy_term_matches_torch():
    logits = torch.randn(2, 3, 5, 5)
    target = torch.randint(0, 3, (2, 5, 5))
    parts = DiceCELoss().components(logits, target)
    assert parts["ce"].item() == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)


def test_perfect_prediction_has_near_zero_loss():
    target = torch.randint(0, 3, (1, 8, 8))
    logits = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert DiceCELoss()(logits, target).item() < 1e-4


def test_weights_and_all_ignored():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), 255)
    value = DiceCELoss(dice_weight=0.0, ce_weight=1.0)(logits, target)
    assert value.item() == 0.0
    value.backward()
    with pytest.raises(ValueError):
        DiceCELoss(dice_weight=0.0, ce_weight=0.0)
