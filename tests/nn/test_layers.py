"""Exact equivariance of every layer, for every group and element, plus hand-checked cases."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from equiseg.evaluation.equivariance import equivariance_errors
from equiseg.groups import C4, C8, D4, D8, fold_group, unfold_group
from equiseg.nn import (
    ExpandedConv2d,
    GroupBatchNorm2d,
    GroupConv2d,
    GroupPool,
    IsotropicConv2d,
    LiftingConv2d,
    SteerableGroupConv2d,
    SteerableLiftingConv2d,
    fold_to_conv2d,
    pool_over_group,
)
from equiseg.nn.isotropic import radius_index

TOL = 1e-5
GROUPS = [C4, D4]
SIZES = [(16, 16), (12, 20)]


def regular_out(group):
    """How g acts on folded regular features: unfold, act, fold."""
    return lambda g, y: fold_group(group.act_on_regular(g, unfold_group(y, group)))


def assert_equivariant(errors):
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("kernel_size, radii", [(1, 1), (3, 3), (5, 6), (7, 10)])
def test_isotropic_free_values_per_radius(kernel_size, radii):
    layer = IsotropicConv2d(2, 4, kernel_size)
    assert layer.weight.shape == (4, 2, radii)
    assert int(radius_index(kernel_size).max()) + 1 == radii


def test_isotropic_3x3_kernel_is_centre_edge_corner():
    layer = IsotropicConv2d(1, 1, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[[5.0, 2.0, 1.0]]]))  # centre, edge, corner
    impulse = torch.zeros(1, 1, 5, 5)
    impulse[0, 0, 2, 2] = 1.0
    # correlating an impulse with K gives K flipped; K is symmetric, so K itself
    expected = torch.tensor([[1.0, 2.0, 1.0], [2.0, 5.0, 2.0], [1.0, 2.0, 1.0]])
    assert torch.equal(layer(impulse)[0, 0, 1:4, 1:4], expected)


@pytest.mark.parametrize("size", SIZES)
def test_isotropic_is_d4_equivariant(size):
    layer = IsotropicConv2d(3, 5, 5).eval()
    assert_equivariant(equivariance_errors(layer, torch.randn(2, 3, *size), D4.elements))


@pytest.mark.parametrize("group", GROUPS, ids=str)
@pytest.mark.parametrize("size", SIZES)
def test_lifting_conv_is_equivariant(group, size):
    layer = LiftingConv2d(3, 4, group).eval()
    assert_equivariant(equivariance_errors(layer, torch.randn(2, 3, *size), group.elements, regular_out(group)))


@pytest.mark.parametrize("group", GROUPS, ids=str)
@pytest.mark.parametrize("size", SIZES)
def test_group_conv_is_equivariant(group, size):
    layer = GroupConv2d(3, 4, group).eval()
    x = torch.randn(2, 3 * group.order, *size)
    act = regular_out(group)
    assert_equivariant(equivariance_errors(layer, x, group.elements, act_out=act, act_in=act))


@pytest.mark.parametrize("group", GROUPS, ids=str)
def test_group_conv_free_values(group):
    layer = GroupConv2d(3, 4, group, bias=False)
    assert layer.weight.numel() == 3 * 4 * group.order * 9  # |G| * k^2 per field pair
    assert layer.expand()[0].shape == (4 * group.order, 3 * group.order, 3, 3)


def test_lifting_bank_holds_rotated_copies():
    layer = LiftingConv2d(1, 1, C4, bias=False)
    bank = layer.expand()[0]
    for r in range(4):
        assert torch.equal(bank[r, 0], torch.rot90(layer.weight[0, 0], r))


@pytest.mark.parametrize("group", GROUPS, ids=str)
def test_banks_place_every_transformed_filter_by_field_and_element(group):
    """With several channels: bank row (c_out, g) and input block c_in hold T_g of filter (c_out, c_in),
    T_g the group's action on the plane (lifting) or its regular action on the filter's group axis and
    plane (group conv): the layout the single gather builds.
    """
    lifting, conv = LiftingConv2d(3, 2, group, bias=False), GroupConv2d(3, 2, group, bias=False)
    lifted, bank = lifting.expand()[0], conv.expand()[0]
    order = group.order
    for c_out in range(2):
        for c_in in range(3):
            for k, g in enumerate(group.elements):
                assert torch.equal(lifted[c_out * order + k, c_in], group.act_on_image(g, lifting.weight[c_out, c_in]))
                expected = group.act_on_regular(g, conv.weight[c_out, c_in])  # (|G|, k, k)
                assert torch.equal(bank[c_out * order + k, c_in * order:(c_in + 1) * order], expected)


@pytest.mark.parametrize("group", GROUPS, ids=str)
@pytest.mark.parametrize("mode", list(GroupPool))
def test_pool_over_group_is_invariant_on_the_group_axis(group, mode):
    x = torch.randn(2, 3 * group.order, 8, 10)
    def pool(y):
        return pool_over_group(y, group, mode)
    assert_equivariant(equivariance_errors(pool, x, group.elements, act_in=regular_out(group)))


@pytest.mark.parametrize("group", GROUPS, ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_group_batch_norm_is_equivariant_and_shares_statistics(group, training):
    norm = GroupBatchNorm2d(3, group)
    with torch.no_grad():
        norm.norm.weight.uniform_(0.5, 2.0)
        norm.norm.bias.uniform_(-1.0, 1.0)
        norm.norm.running_mean.uniform_(-1.0, 1.0)
    x = torch.randn(4, 3 * group.order, 6, 6) * 3 + 1
    norm.train(training)
    # in training the batch statistics are used, and must not depend on the order of the group axis
    act = regular_out(group)
    assert_equivariant(equivariance_errors(norm, x, group.elements, act_out=act, act_in=act))
    if training:
        with torch.no_grad():
            fields = unfold_group(norm(x), group)  # (B, C, |G|, H, W): each field normalised as one
        assert torch.allclose(fields.mean(dim=(0, 2, 3, 4)), norm.norm.bias, atol=1e-5)


@pytest.mark.parametrize("group", GROUPS, ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_group_batch_norm_computes_its_definition(group, momentum, affine, monkeypatch):
    """The per-channel passes (training) and the repeated running statistics (evaluation) give
    what BatchNorm2d over the (B, C, |G|*H, W) view gives: outputs, input and parameter
    gradients, running statistics over several steps.
    """
    view, fields = (GroupBatchNorm2d(3, group, momentum=momentum) for _ in range(2))
    for norm in (view, fields):
        norm.norm.affine = affine
        if not affine:
            norm.norm.weight = norm.norm.bias = None
    if affine:
        with torch.no_grad():
            view.norm.weight.uniform_(0.5, 2.0)
            view.norm.bias.uniform_(-1.0, 1.0)
    fields.load_state_dict(view.state_dict())

    def run(norm, path, x, grad):
        monkeypatch.setattr(GroupBatchNorm2d, "TRAINING_PATH", path)
        x = x.clone().requires_grad_()
        out = norm(x)
        out.backward(grad)
        return out, x.grad

    for step in range(3):  # running statistics over several steps
        x = torch.randn(4, 3 * group.order, 6, 5) * 3 + step
        grad = torch.randn_like(x)
        (out, dx), (out2, dx2) = run(view.train(), "view", x, grad), run(fields.train(), "fields", x, grad)
        torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dx2, dx, atol=1e-5, rtol=1e-5)
        if affine:
            torch.testing.assert_close(fields.norm.weight.grad, view.norm.weight.grad, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(fields.norm.bias.grad, view.norm.bias.grad, atol=1e-4, rtol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fields.norm, name), getattr(view.norm, name), atol=1e-6, rtol=1e-6)
    assert view.norm.num_batches_tracked == 3
    x = torch.randn(2, 3 * group.order, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(fields.eval()(x), view.eval().norm(x.reshape(2, 3, -1, 5)).reshape(x.shape),
                                   atol=1e-6, rtol=1e-6)
    # and it commutes with the group like the definition
    act = regular_out(group)
    assert_equivariant(equivariance_errors(fields.train(), torch.randn(2, 3 * group.order, 6, 6),
                                           group.elements, act_out=act, act_in=act))


def test_group_batch_norm_keeps_its_channel_buffers_only_while_they_hold():
    """Evaluation repeats the running statistics per channel once, and again after any of them changes."""
    norm = GroupBatchNorm2d(2, D4).eval()
    x = torch.randn(1, 2 * D4.order, 4, 4)
    def reference():
        return norm.norm(x.reshape(1, 2, -1, 4)).reshape(x.shape)  # the definition, on the view
    with torch.no_grad():
        first = norm(x)
        torch.testing.assert_close(first, reference())
        norm.norm.running_mean.add_(1.0)  # in place: the cache must notice
        torch.testing.assert_close(norm(x), reference())
        assert not torch.allclose(norm(x), first)
        norm.load_state_dict({**norm.state_dict(), "norm.weight": torch.full((2,), 3.0)})
        torch.testing.assert_close(norm(x), reference())
    out = norm(x.requires_grad_())  # with gradients nothing is cached, and the weight gets its gradient
    out.sum().backward()
    assert norm.norm.weight.grad is not None and norm.__dict__["_channel_cache"] is None


# every ExpandedConv2d subclass, with the channels its input has
EXPANDED = {
    "isotropic": (lambda: IsotropicConv2d(3, 4), 3),
    "isotropic-5x5": (lambda: IsotropicConv2d(2, 3, 5), 2),
    "lifting-p4": (lambda: LiftingConv2d(3, 2, C4), 3),
    "lifting-p4m": (lambda: LiftingConv2d(3, 2, D4), 3),
    "group-p4": (lambda: GroupConv2d(2, 3, C4), 2 * 4),
    "group-p4m": (lambda: GroupConv2d(2, 3, D4, bias=False), 2 * 8),
    "lifting-c8": (lambda: SteerableLiftingConv2d(3, 2, C8), 3),
    "group-d8": (lambda: SteerableGroupConv2d(2, 3, D8, bias=False), 2 * 16),
}


def test_every_expanded_conv_is_covered():
    assert {type(make()) for make, _ in EXPANDED.values()} == set(ExpandedConv2d.__subclasses__())
    with pytest.raises(TypeError, match="abstract"):
        ExpandedConv2d(1, 1, 3, (1, 1, 3, 3), fan_in=9, bias=False)


@pytest.mark.parametrize("case", EXPANDED.values(), ids=EXPANDED.keys())
def test_forward_is_the_expanded_conv_and_its_fold(case):
    make, in_channels = case
    layer = make()
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_()  # a zero bias would hide a missing one
    x = torch.randn(2, in_channels, 9, 7)
    weight, bias = layer.expand()
    expected = F.conv2d(x, weight, bias, padding=layer.kernel_size // 2)
    assert torch.equal(layer.train()(x), expected)
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), expected.detach())
        assert torch.allclose(layer.to_conv2d()(x), expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(fold_to_conv2d(layer)(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", EXPANDED.values(), ids=EXPANDED.keys())
def test_an_optimiser_step_rebuilds_the_bank(case):
    make, in_channels = case
    layer = make()
    x = torch.randn(1, in_channels, 6, 6)
    optimiser = torch.optim.SGD(layer.parameters(), lr=0.5)
    with torch.no_grad():
        stale = layer.eval()(x)  # fills the evaluation cache
    for _ in range(2):
        layer.train()(x).square().mean().backward()
        optimiser.step()
        optimiser.zero_grad()
        fresh = layer.to_conv2d()
        assert torch.equal(layer(x), fresh(x))  # training: built from the stepped values
        with torch.no_grad():
            assert torch.equal(layer.eval()(x), fresh(x))  # evaluation: the cache was rebuilt
    assert not torch.allclose(stale, fresh(x))


def test_a_cached_evaluation_forward_is_one_convolution():
    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    for make, in_channels in EXPANDED.values():
        layer, x = make().eval(), torch.randn(1, in_channels, 5, 5)
        with torch.no_grad():
            layer(x)  # builds the bank
            with Ops() as seen:
                layer(x)
        assert seen.ops == [torch.ops.aten.convolution.default], (type(layer).__name__, seen.ops)


def test_bank_is_cached_in_eval_and_rebuilt_after_a_change():
    layer = GroupConv2d(2, 2, D4).eval()
    x = torch.randn(1, 16, 6, 6)
    with torch.no_grad():
        first = layer(x)
        cached = layer._bank_cache[1][0]
        layer(x)
        assert layer._bank_cache[1][0] is cached  # reused, not rebuilt
        layer.weight.add_(1.0)  # an in-place update, as an optimiser makes
        second = layer(x)
    assert layer._bank_cache[1][0] is not cached
    assert not torch.allclose(first, second)
    expected = F.conv2d(x, layer.expand()[0].detach(), layer.expand()[1].detach(), padding=1)
    assert torch.allclose(second, expected, atol=1e-6)


def test_training_rebuilds_the_bank_and_gradients_reach_the_free_values():
    layer = LiftingConv2d(2, 3, D4).train()
    layer(torch.randn(1, 2, 5, 5)).square().sum().backward()
    assert layer.__dict__.get("_bank_cache") is None  # nothing cached while training
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kernel_size", [0, 2, 4])
def test_even_kernels_are_refused(kernel_size):
    for make in (lambda: IsotropicConv2d(1, 1, kernel_size), lambda: LiftingConv2d(1, 1, C4, kernel_size),
                 lambda: GroupConv2d(1, 1, C4, kernel_size)):
        with pytest.raises(ValueError, match="odd"):
            make()


def test_field_values_are_repeated_per_channel_exactly_in_their_own_dtypes():
    """The group batch norm repeats its per-field values with one stack: each keeps its dtype and
    its value (no rounding through another type), and None stays None.
    """
    from equiseg.nn.group_ops import _per_channel

    values = (torch.rand(3), None, torch.rand(3, dtype=torch.float64) / 3, torch.rand(3).half())
    repeated = _per_channel(4, *values)
    assert repeated[1] is None
    for original, out in zip(values, repeated, strict=True):
        if original is not None:
            assert out.dtype == original.dtype and out.is_contiguous()
            assert torch.equal(out, original.repeat_interleave(4))


def test_group_batch_norm_trains_float64_input_in_float64():
    """Statistics and gradient sums follow a float64 input (not float32): the definition to 1e-12."""
    view, fields = GroupBatchNorm2d(2, D4).double(), GroupBatchNorm2d(2, D4).double()
    x = (torch.randn(3, 2 * D4.order, 5, 7, dtype=torch.float64) * 1e3 + 1e4).requires_grad_()
    grad = torch.randn_like(x)
    out = fields(x)
    out.backward(grad)
    dx, x.grad = x.grad, None
    expected = view.norm(x.reshape(3, 2, -1, 7)).reshape(x.shape)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fields.norm.running_var, view.norm.running_var, rtol=1e-12, atol=1e-12)
