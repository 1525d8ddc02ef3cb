import itertools

import pytest
import torch

from equiseg.groups import C4, D4, GroupElement, fold_group, unfold_group

GROUPS = [C4, D4]


def test_orders_and_identity_first():
    assert (C4.order, D4.order) == (4, 8)
    assert len(set(D4.elements)) == 8
    assert C4.elements == D4.elements[:4]
    assert D4.elements[0] == GroupElement(0, False)


@pytest.mark.parametrize("group", GROUPS, ids=str)
def test_image_action_is_a_homomorphism(group):
    x = torch.randn(2, 5, 7)  # non-square, so a wrong composition shows in the shape too
    for a, b in itertools.product(group.elements, repeat=2):
        lhs = group.act_on_image(a, group.act_on_image(b, x))
        assert torch.equal(lhs, group.act_on_image(group.compose(a, b), x)), (a, b)


@pytest.mark.parametrize("group", GROUPS, ids=str)
def test_inverse_and_closure(group):
    identity = group.elements[0]
    for g in group.elements:
        assert group.compose(g, group.inverse(g)) == identity
        assert group.compose(group.inverse(g), g) == identity
    table = group.cayley
    for row in table:  # a Latin square: every product lands in the group exactly once per row
        assert sorted(row.tolist()) == list(range(group.order))


@pytest.mark.parametrize("group", GROUPS, ids=str)
def test_regular_action_is_a_homomorphism(group):
    f = torch.randn(3, group.order, 4, 6)
    for a, b in itertools.product(group.elements, repeat=2):
        lhs = group.act_on_regular(a, group.act_on_regular(b, f))
        assert torch.equal(lhs, group.act_on_regular(group.compose(a, b), f)), (a, b)


def test_rotation_direction_is_counter_clockwise():
    x = torch.tensor([[1, 2], [3, 4]])
    # top-right goes to top-left under a quarter turn counter-clockwise
    assert D4.act_on_image(GroupElement(1), x).tolist() == [[2, 4], [1, 3]]
    assert D4.act_on_image(GroupElement(0, True), x).tolist() == [[2, 1], [4, 3]]


def test_reflection_is_an_involution_and_flips_rotation():
    r, m = GroupElement(1), GroupElement(0, True)
    assert D4.compose(m, m) == GroupElement(0)
    assert D4.compose(m, D4.compose(r, m)) == GroupElement(3)


def test_c4_refuses_reflections():
    with pytest.raises(ValueError, match="not an element of C4"):
        C4.index(GroupElement(1, True))


def test_fold_round_trip_and_bad_channel_count():
    x = torch.randn(2, 3, 8, 5, 5)
    assert torch.equal(unfold_group(fold_group(x), D4), x)
    assert fold_group(x)[0, 8 + 2].equal(x[0, 1, 2])  # channel-major: field 1, element 2
    with pytest.raises(ValueError, match="do not fold"):
        unfold_group(torch.randn(1, 10, 4, 4), D4)
