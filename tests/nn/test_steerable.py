"""Steerable convolutions over C8, C16 and D8: the groups, the basis, exact quarter turns, 45° behaviour."""

import math

import numpy as np
import pytest
import torch

from equiseg.evaluation.equivariance import arbitrary_angle_error, band_limited_noise, equivariance_errors
from equiseg.groups import C4, C8, C16, D4, D8, GroupElement, PlaneGroup, fold_group, unfold_group
from equiseg.nn import GroupPool, LiftingConv2d, SteerableGroupConv2d, SteerableLiftingConv2d, pool_over_group
from equiseg.nn.steerable import harmonic_basis

TOL = 1e-5
GROUPS = [C8, C16, D8]
SIZES = [(16, 16), (12, 20)]


def exact_elements(group):
    """The elements of D4 that ``group`` holds: those the pixel grid carries exactly."""
    return D4.elements if group.flips else C4.elements


def regular_out(group):
    return lambda g, y: fold_group(group.act_on_regular(g, unfold_group(y, group)))


@pytest.mark.parametrize("group", GROUPS, ids=str)
def test_plane_groups_are_groups_whose_quarter_turns_match_d4(group):
    table = group.cayley
    order = group.order
    assert table.shape == (order, order)
    for row in table:  # a Latin square: every product once per row and column
        assert sorted(row.tolist()) == list(range(order))
    assert sorted(table[:, 0].tolist()) == list(range(order)) and table[0].tolist() == list(range(order))
    mats = group.matrices
    a, b, c = 1, order // 2 + 1, order - 1  # associativity on a few triples
    assert table[table[a, b], c] == table[a, table[b, c]]
    assert np.allclose(mats[table[a, b]], mats[a] @ mats[b])
    # rotations by 2 pi / n counter-clockwise on screen: (1, 0) (to the right) moves up and right at 45° for C8
    step = 2 * math.pi / group.n
    assert np.allclose(mats[1] @ [1.0, 0.0], [math.cos(step), -math.sin(step)])
    # D4's elements sit where the quarter turns and flips are, with the same action on images
    image = torch.arange(12.0).reshape(3, 4)
    for g in exact_elements(group):
        m = mats[group.index(g)]
        assert np.array_equal(m, np.round(m))  # exact integers: grid points go to grid points
        ys, xs = np.mgrid[0:3, 0:4]
        centre = np.array([1.5, 1.0])
        moved = (m @ (np.stack([xs.ravel(), ys.ravel()]).T - centre).T).T  # centred coordinates
        turned = D4.act_on_image(g, image)
        th, tw = turned.shape
        rows = np.rint(moved[:, 1] + (th - 1) / 2).astype(int)
        cols = np.rint(moved[:, 0] + (tw - 1) / 2).astype(int)
        assert torch.equal(turned[rows, cols], image.flatten()), g
    with pytest.raises(ValueError):
        C8.index(GroupElement(1, True))
    with pytest.raises(ValueError):
        PlaneGroup("C6", 6, False).index(GroupElement(1))


@pytest.mark.parametrize("group", GROUPS, ids=str)
@pytest.mark.parametrize("kernel_size, functions", [(3, 6), (5, 15)])
def test_the_basis_is_unit_norm_smooth_and_moves_by_exact_permutations_for_quarter_turns(group, kernel_size,
                                                                                        functions):
    basis = harmonic_basis(group, kernel_size)
    assert basis.shape == (group.order, functions, kernel_size, kernel_size)
    assert torch.allclose(basis[0].flatten(1).norm(dim=1), torch.ones(functions))
    for g in exact_elements(group):  # a grid-exact move permutes the taps, bit for bit
        assert torch.equal(basis[group.index(g)], D4.act_on_image(g, basis[0])), g
    # a move by 45° (22.5° for C16) is the continuous function moved: same norm to sampling, not a permutation
    moved = basis[1]
    assert not torch.allclose(moved, basis[0])
    assert torch.allclose(moved.flatten(1).norm(dim=1), torch.ones(functions), atol=0.35)
    # harmonics of frequency >= 1 (those that change under some move) vanish at the centre, one per ring does not
    varies = (basis - basis[:1]).flatten(2).abs().amax(dim=(0, 2)) > 1e-6
    assert int((~varies).sum()) == kernel_size // 2 + 1
    assert torch.all(basis[:, varies, kernel_size // 2, kernel_size // 2] == 0)


def test_the_basis_is_linearly_independent_and_band_limited():
    basis = harmonic_basis(C16, 5)[0].flatten(1).double()
    assert torch.linalg.matrix_rank(basis) == basis.shape[0]
    # frequency 2 at most on ring 1 and 4 on ring 2, so C16 has no more functions than C8 here
    assert basis.shape[0] == harmonic_basis(C8, 5).shape[1] == 15


@pytest.mark.parametrize("group", GROUPS, ids=str)
@pytest.mark.parametrize("size", SIZES)
def test_steerable_lifting_is_exact_for_its_quarter_turns(group, size):
    layer = SteerableLiftingConv2d(3, 2, group).eval()
    errors = equivariance_errors(layer, torch.randn(2, 3, *size), exact_elements(group), regular_out(group))
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("group", GROUPS, ids=str)
@pytest.mark.parametrize("size", SIZES)
def test_steerable_group_conv_is_exact_for_its_quarter_turns(group, size):
    layer = SteerableGroupConv2d(2, 3, group).eval()
    act = regular_out(group)
    x = torch.randn(2, 2 * group.order, *size)
    errors = equivariance_errors(layer, x, exact_elements(group), act_out=act, act_in=act)
    assert max(errors.values()) <= TOL, errors


def test_c8_is_not_exact_for_flips_and_d8_is():
    x = torch.randn(1, 3, 16, 16)
    for group, exact in ((C8, False), (D8, True)):
        torch.manual_seed(0)
        layer = SteerableLiftingConv2d(3, 2, group).eval()
        errors = equivariance_errors(lambda y, layer=layer, group=group: pool_over_group(layer(y), group), x,
                                     D4.elements[4:])
        assert (max(errors.values()) <= TOL) == exact, (group, errors)


@pytest.mark.parametrize("group", [C8, D8], ids=str)
def test_the_eighth_turn_moves_the_bank_like_the_regular_representation(group):
    """The filter for element g·h is the filter for h moved by g (here g = 45°): the bank of the lifting layer at
    index cayley[1, h] equals the continuous filter of index h turned by 45°, sampled -- checked against the basis
    turned twice (two eighth turns = a quarter turn, exact on the grid).
    """
    layer = SteerableLiftingConv2d(1, 1, group, bias=False)
    bank = layer.expand()[0][:, 0]  # (|G|, k, k)
    two = group.cayley[1, 1]
    assert torch.allclose(bank[two], torch.rot90(bank[0], 1), atol=1e-6)
    assert torch.allclose(bank[group.cayley[two, 1]], torch.rot90(bank[1], 1), atol=1e-6)


@pytest.mark.parametrize("group", GROUPS, ids=str)
def test_group_conv_free_values_and_gradients(group):
    layer = SteerableGroupConv2d(3, 4, group)
    assert layer.weight.numel() == 3 * 4 * group.order * 6  # |G| steerable 3x3 filters (6 functions) per pair
    assert layer.expand()[0].shape == (4 * group.order, 3 * group.order, 3, 3)
    layer(torch.randn(1, 3 * group.order, 8, 8)).square().mean().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_steerable_filters_are_closer_to_45_degree_equivariance_than_p4_filters():
    """One lifting layer and a pool over the group, no downsampling: the 45° error (resampling floor excluded)
    is several times smaller with C8 filters than with p4's, whose copies turn only by quarter turns.
    """
    probe = band_limited_noise(48, seed=1)
    errors = {}
    for name, make, group in (("p4", lambda: LiftingConv2d(3, 4, C4), C4),
                              ("c8", lambda: SteerableLiftingConv2d(3, 4, C8), C8)):
        runs = []
        for seed in range(3):
            torch.manual_seed(seed)
            layer = make().eval()
            runs.append(arbitrary_angle_error(lambda y, layer=layer, group=group: pool_over_group(
                layer(y), group, GroupPool.MAX), probe, 45.0))
        errors[name] = float(np.mean(runs))
    floor = arbitrary_angle_error(None, probe, 45.0)
    assert errors["c8"] < errors["p4"] / 2, errors
    assert errors["c8"] > floor, (errors, floor)
