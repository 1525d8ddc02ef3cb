"""optimize_for_inference: the same function (every family, odd sizes), exact equivariance kept, no norms left."""

import pytest
import torch
from tests.models.test_unet import EXACT, STEERABLE, TOL, small, warm_batch_norm
from torch import nn

from equiseg import optimize_for_inference
from equiseg.evaluation.equivariance import equivariance_errors
from equiseg.models import ConvFamily, build_model
from equiseg.nn import ExpandedConv2d, GroupBatchNorm2d


@pytest.mark.parametrize("family", list(ConvFamily), ids=lambda f: f.value)
@pytest.mark.parametrize("size", [(64, 64), (45, 71)])  # 45 x 71: padded to multiples of 16 and cropped back
def test_the_optimized_model_computes_the_same_function(family, size):
    x = torch.randn(2, 3, *size)
    model = warm_batch_norm(small(family), torch.randn(2, 3, 64, 64))
    optimized = optimize_for_inference(model)
    layers = list(optimized.modules())
    assert not any(isinstance(m, (ExpandedConv2d, nn.BatchNorm2d, GroupBatchNorm2d)) for m in layers)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in layers if isinstance(m, nn.Conv2d))
    assert not any(p.requires_grad for p in optimized.parameters()) and not optimized.training
    with torch.no_grad():
        expected, got = model(x), optimized(x)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max() / expected.abs().max()) <= TOL
    assert any(isinstance(m, (nn.BatchNorm2d, GroupBatchNorm2d)) for m in model.modules())  # the model is untouched


@pytest.mark.parametrize("family", EXACT + STEERABLE, ids=lambda f: f.value)
def test_the_optimized_model_keeps_exact_equivariance(family):
    x = torch.randn(1, 3, 96, 64)
    optimized = optimize_for_inference(warm_batch_norm(small(family), torch.randn(2, 3, 64, 64)))
    errors = equivariance_errors(optimized, x, family.group.elements)
    assert max(errors.values()) <= TOL, errors


def test_a_batch_norm_folds_by_hand():
    """Conv (weight 2, bias 1) then norm (mean 3, var 4 - eps, weight 5, bias 6):
    y = 5 (2x + 1 - 3) / 2 + 6 = 5x + 1, one conv of weight 5 and bias 1.
    """
    conv = nn.Conv2d(1, 1, 1)
    norm = nn.BatchNorm2d(1)
    with torch.no_grad():
        conv.weight.fill_(2.0), conv.bias.fill_(1.0)
        norm.running_mean.fill_(3.0), norm.running_var.fill_(4.0 - norm.eps)
        norm.weight.fill_(5.0), norm.bias.fill_(6.0)
    folded = optimize_for_inference(nn.Sequential(conv, norm, nn.ReLU()).eval(), channels_last=False)
    assert len(folded) == 2 and isinstance(folded[1], nn.ReLU)
    assert folded[0].weight.item() == pytest.approx(5.0) and folded[0].bias.item() == pytest.approx(1.0)


def test_inference_uses_one_optimized_copy_until_the_model_changes():
    from equiseg.inference.tiling import inference_model, predict_probabilities
    from equiseg.runtime import Runtime

    model = warm_batch_norm(small(ConvFamily.P4M, depth=2), torch.randn(2, 3, 32, 32))
    first = inference_model(model)
    assert inference_model(model) is first and first is not model
    image = torch.rand(3, 40, 56)
    optimized = predict_probabilities(model, image, tile=None, runtime=Runtime())
    as_trained = predict_probabilities(model, image, tile=None, runtime=Runtime(optimize=False))
    assert float((optimized - as_trained).abs().max()) <= TOL
    with torch.no_grad():
        next(model.parameters()).mul_(2)  # as an optimiser step would
    assert inference_model(model) is not first


def test_decoder_blocks_fuse_the_upsampling_into_their_conv_and_fall_back_on_other_sizes():
    """NearestUpConcatConv against the block it replaces (nearest x2 upsampling, concatenation, conv, ReLU):
    the same output on a skip twice x's size (the four output phases), and on a skip of any other size
    through the conv as it was; off (fuse_up=False) the decoder keeps its blocks.
    """
    from equiseg.models.optimize import NearestUpConcatConv

    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(12, 4, 3, padding=1), nn.ReLU())
    fused = NearestUpConcatConv(block, 8)
    with torch.no_grad():
        for x, skip in [(torch.randn(2, 8, 5, 7), torch.randn(2, 4, 10, 14)),
                        (torch.randn(1, 8, 5, 7), torch.randn(1, 4, 11, 13))]:
            up = nn.functional.interpolate(x, size=skip.shape[-2:], mode="nearest")
            expected = block(torch.cat([up, skip], 1))
            torch.testing.assert_close(fused(x, skip), expected, rtol=0, atol=1e-5)
    model = warm_batch_norm(small(ConvFamily.P4), torch.randn(2, 3, 32, 32))
    assert all(isinstance(b, NearestUpConcatConv) for b in optimize_for_inference(model).decoder)
    assert not any(isinstance(b, NearestUpConcatConv) for b in optimize_for_inference(model, fuse_up=False).decoder)


def test_the_default_overlap_covers_twice_the_receptive_reach_of_a_depth_4_unet():
    """docs/guide/prediction.md: a depth-4 U-Net (one 3x3 conv a level, 2x2 pooling, nearest upsampling)
    reaches 61 px each way whatever its family and width (models.build.receptive_reach); a depth-3 one
    29 px; predict's default overlap, 128 px, is at least twice 61, so every pixel has a window that saw
    all of its context.
    """
    import inspect

    from equiseg.inference.predict import predict_run
    from equiseg.models.build import receptive_reach

    assert receptive_reach(build_model("plain", 2, depth=4).eval(), 4) == 61
    assert receptive_reach(build_model("p4", 1, depth=4).eval(), 4) == 61
    assert receptive_reach(build_model("plain", 2, depth=3).eval(), 3) == 29
    assert inspect.signature(predict_run).parameters["overlap"].default >= 2 * 61
