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


def test_centre_targets_at_their_peaks_score_as_the_hard_loss_of_their_classes():
    """Codes at distance 0 only are one-hot soft targets: the soft path equals the hard loss."""
    from equiseg.data.targets import CellTarget, TargetKind

    target = CellTarget(TargetKind.CENTRES, sigma=2.0)
    classes = torch.randint(0, 3, (2, 6, 7))
    codes = torch.where(classes == 0, 0, 1 + (classes - 1) * target.reach)
    codes[0, 0] = 255
    logits = torch.randn(2, 3, 6, 7)
    soft = DiceCELoss(target=target).components(logits, codes)
    hard = DiceCELoss().components(logits, torch.where(codes == 255, 255, classes))
    for key in ("loss", "ce", "dice_loss"):
        assert soft[key].item() == pytest.approx(hard[key].item(), rel=1e-6), key


def test_centre_loss_is_the_soft_cross_entropy_and_prefers_the_gaussian():
    """CE = -sum_c y_c log p_c with y the Gaussian soft target, by hand on two pixels; the soft
    target itself as the prediction scores lower than a confident hard prediction.
    """
    from equiseg.data.targets import CellTarget, TargetKind

    target = CellTarget(TargetKind.CENTRES, sigma=1.0)
    codes = torch.tensor([[[0, 2]]])  # background; BC at distance 1 (g = exp(-1/2))
    logits = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])[None, :, None, :]  # (1, 3, 1, 2)
    g = math.exp(-0.5)
    p1 = torch.tensor([0.0, 1.0, 0.0]).softmax(0)
    ce_pixel2 = -((1 - g) * math.log(p1[0]) + g * math.log(p1[1]))
    expected = (math.log(3) + ce_pixel2) / 2
    loss = DiceCELoss(dice_weight=0.0, target=target)
    assert loss(logits, codes).item() == pytest.approx(expected, rel=1e-6)
    soft = target.soft(codes, 3).clamp_min(1e-9).log()
    hard = F.one_hot(torch.tensor([[[0, 1]]]), 3).permute(0, 3, 1, 2).float() * 20
    assert loss(soft, codes) < loss(hard, codes)
