"""Whole models: exact equivariance per family, gradients, folding, sizes, width matching."""

import pytest
import torch

from equiseg import build_model
from equiseg.evaluation.equivariance import equivariance_errors, model_equivariance_error
from equiseg.groups import C4, D4
from equiseg.models import (
    BlurPool2d,
    ConvFamily,
    Pooling,
    UNet,
    count_macs,
    count_parameters,
    match_width,
    optimize_for_inference,
    parameter_count,
)
from equiseg.nn import ExpandedConv2d, fold_to_conv2d

TOL = 1e-5
EXACT = [ConvFamily.ISOTROPIC, ConvFamily.P4, ConvFamily.P4M]
STEERABLE = [ConvFamily.C8, ConvFamily.C16, ConvFamily.D8]  # exact for the quarter turns (and flips) they hold
SMALL_WIDTH = {ConvFamily.PLAIN: 6, ConvFamily.ISOTROPIC: 6, ConvFamily.P4: 2, ConvFamily.P4M: 2,
               ConvFamily.C8: 1, ConvFamily.C16: 1, ConvFamily.D8: 1}


def small(family, depth=4, **kwargs):
    return build_model(family, SMALL_WIDTH[family], depth=depth, **kwargs)


def warm_batch_norm(model, x):
    """Give batch norm non-trivial running statistics, then switch to evaluation mode."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("family", EXACT, ids=lambda f: f.value)
@pytest.mark.parametrize("size", [(256, 256), (128, 192)])
def test_exact_families_are_equivariant_for_their_group(family, size):
    x = torch.randn(1, 3, *size)
    model = warm_batch_norm(small(family), x)
    errors = equivariance_errors(model, x, family.group.elements)
    assert len(errors) == family.group.order
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("family", STEERABLE, ids=lambda f: f.value)
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_steerable_families_are_exact_for_the_grid_part_of_their_group(family, size):
    """c8 and c16: C4 exactly, not the flips; d8: D4 exactly (smaller images than above: 16 channels a field)."""
    x = torch.randn(1, 3, *size)
    model = warm_batch_norm(small(family, depth=3), x)
    errors = equivariance_errors(model, x, D4.elements)
    assert max(errors[str(g)] for g in family.group.elements) <= TOL, errors
    assert family.field_group.order == family.channels_per_unit == {"c8": 8, "c16": 16, "d8": 16}[family.value]
    if family.group is C4:
        assert min(errors[str(g)] for g in D4.elements[4:]) > 1e-3, errors


def test_blur_pool_by_hand():
    """Output pixel (i, j) is the [1, 3, 3, 1]/8 (x) [1, 3, 3, 1]/8 average of input rows 2i-1..2i+2 and
    columns 2j-1..2j+2, zeros outside.
    """
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 64.0  # row 1 lies in the windows of output rows 0 (weight 3) and 1 (weight 1)
    torch.testing.assert_close(BlurPool2d()(x)[0, 0], torch.tensor([[9.0, 3.0], [3.0, 1.0]]))
    x = torch.randn(2, 5, 6, 10)
    assert BlurPool2d()(x).shape == (2, 5, 3, 5)
    torch.testing.assert_close(BlurPool2d()(torch.ones(1, 1, 8, 8))[0, 0, 1:3, 1:3], torch.ones(2, 2))  # a low-pass


@pytest.mark.parametrize("family", [ConvFamily.ISOTROPIC, ConvFamily.P4M, ConvFamily.C8], ids=lambda f: f.value)
def test_blur_pooling_keeps_each_family_exact_for_its_group(family):
    x = torch.randn(1, 3, 48, 80)
    model = warm_batch_norm(small(family, depth=3, pool="blur"), x)
    assert model.pool is Pooling.BLUR and isinstance(model.down, BlurPool2d)
    errors = equivariance_errors(model, x, family.group.elements)
    assert max(errors.values()) <= TOL, errors
    plain = warm_batch_norm(small(family, depth=3), x)
    plain.load_state_dict(model.state_dict())  # the same weights: pooling holds no parameters
    assert not torch.allclose(plain(x), model(x))  # and the two really pool differently
    with torch.no_grad():  # deployment keeps it: the fold, and the optimized copy
        torch.testing.assert_close(optimize_for_inference(model)(x), model(x), rtol=1e-4, atol=1e-5)


def test_plain_family_measurably_fails():
    x = torch.randn(1, 3, 64, 64)
    model = warm_batch_norm(small(ConvFamily.PLAIN), x)
    assert model_equivariance_error(model, x, D4) > 1e-2
    assert model_equivariance_error(model, x, C4) > 1e-2


def test_p4_is_exact_for_rotations_only():
    x = torch.randn(1, 3, 64, 64)
    model = warm_batch_norm(small(ConvFamily.P4), x)
    errors = equivariance_errors(model, x, D4.elements)
    assert max(errors[str(g)] for g in C4.elements) <= TOL
    assert min(errors[str(g)] for g in D4.elements[4:]) > 1e-3


@pytest.mark.parametrize("family", list(ConvFamily), ids=lambda f: f.value)
def test_forward_backward_reaches_every_parameter(family):
    model = small(family, depth=3).train()
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3, 32, 32)
    logits.logsumexp(dim=1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", EXACT + STEERABLE, ids=lambda f: f.value)
def test_folded_model_matches(family):
    x = torch.randn(1, 3, 64, 64)
    model = warm_batch_norm(small(family), x)
    folded = fold_to_conv2d(model)
    assert not any(isinstance(m, ExpandedConv2d) for m in folded.modules())
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert float((got - expected).abs().max() / expected.abs().max()) <= TOL


def test_odd_sizes_are_padded_and_cropped_back():
    model = warm_batch_norm(small(ConvFamily.ISOTROPIC), torch.randn(1, 3, 32, 32))
    for size in [(100, 100), (37, 50)]:
        assert model(torch.randn(1, 3, *size)).shape == (1, 3, *size)
    # 120 -> 128: 4 px on each side, so exactness survives the padding
    assert model_equivariance_error(model, torch.randn(1, 3, 120, 120), D4) <= TOL


def test_odd_sizes_can_be_refused_with_a_clear_message():
    model = UNet(ConvFamily.PLAIN, 4, depth=4, pad_input=False)
    with pytest.raises(ValueError, match=r"100x100 px.*multiples of 16.*112x112"):
        model(torch.randn(1, 3, 100, 100))


def test_family_from_string_is_exact_not_by_prefix():
    assert build_model("p4m", 2).family is ConvFamily.P4M
    with pytest.raises(ValueError):
        build_model("p4mx", 2)


def test_seed_pair_has_matched_parameter_counts():
    plain, iso = parameter_count("plain", 64), parameter_count("isotropic", 110)
    assert abs(iso - plain) / plain <= 0.03
    assert match_width("isotropic", plain) in (110, 111)


@pytest.mark.parametrize("family", list(ConvFamily), ids=lambda f: f.value)
def test_match_width_is_the_closest(family):
    target = parameter_count("plain", 32, depth=3)
    w = match_width(family, target, depth=3)
    best = abs(parameter_count(family, w, depth=3) - target)
    for other in (w - 1, w + 1):
        if other >= 1:
            assert best <= abs(parameter_count(family, other, depth=3) - target)


def test_parameter_count_on_meta_equals_a_real_model():
    model = small(ConvFamily.P4M, depth=2)
    assert count_parameters(model) == parameter_count("p4m", SMALL_WIDTH[ConvFamily.P4M], depth=2)


def test_macs_by_hand_for_a_depth_zero_net():
    # depth 0: one 3x3 conv 3 -> 4 and a 1x1 head 4 -> 3, at 8x8
    model = build_model("plain", 4, depth=0)
    assert count_macs(model, 8, 8) == 64 * (4 * 3 * 9 + 3 * 4)
    # a p4 lifting conv expands to 4 fields x 4 rotations = 16 channels; pooled before the head
    model = build_model("p4", 4, depth=0)
    assert count_macs(model, 8, 8) == 64 * (16 * 3 * 9 + 3 * 4)
