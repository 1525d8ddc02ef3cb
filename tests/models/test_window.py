"""Stage 2 of the two-stage cell model: the window net is exact about the window's centre for its family's
group (mask equivariant, class invariant), refuses sides it is not exact on, and trains end to end.
"""

import pytest
import torch

from equiseg.groups import C4, D4
from equiseg.models import ConvFamily
from equiseg.models.window import CellWindowNet, CentredDown, centred_up, window_side

WIDTH = {ConvFamily.PLAIN: 4, ConvFamily.ISOTROPIC: 4, ConvFamily.P4: 2, ConvFamily.P4M: 2,
         ConvFamily.C8: 1, ConvFamily.C16: 1, ConvFamily.D8: 1}
TOL = 1e-5


def act(g, x):
    """T_g on the last two axes: a quarter turn about the centre, after a flip when g has one."""
    return D4.act_on_image(g, x)


def warm(model, x):
    model.train()
    with torch.no_grad():
        model(x * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("family", [f for f in ConvFamily if f is not ConvFamily.PLAIN], ids=lambda f: f.value)
@pytest.mark.parametrize(("depth", "side"), [(2, 17), (3, 33)])
def test_window_net_is_exact_about_the_centre_for_its_group(family, depth, side):
    x = torch.rand(2, 5, side, side)
    net = warm(CellWindowNet(family, WIDTH[family], depth=depth, in_channels=5), x)
    with torch.no_grad():
        mask, classes = net(x)
        assert mask.shape == (2, 1, side, side) and classes.shape == (2, 2)
        for g in family.group.elements:
            turned_mask, turned_classes = net(act(g, x))
            # float rounding only: relative to the outputs' size (sums taken in another order)
            assert (turned_mask - act(g, mask)).abs().max() <= TOL * mask.abs().max().clamp_min(1), g
            assert (turned_classes - classes).abs().max() <= TOL * classes.abs().max().clamp_min(1), g


def test_plain_window_net_is_not_equivariant_so_the_test_can_fail():
    x = torch.rand(1, 3, 17, 17)
    net = warm(CellWindowNet(ConvFamily.PLAIN, 4, depth=2), x)
    with torch.no_grad():
        mask = net(x)[0]
        turned = net(act(C4.elements[1], x))[0]
    assert (turned - act(C4.elements[1], mask)).abs().max() > 1e-3


def test_centred_down_and_up_keep_the_centre_pixel():
    x = torch.zeros(1, 1, 9, 9)
    x[..., 4, 4] = 16.0
    down = CentredDown()(x)
    assert down.shape[-1] == 5 and down[0, 0, 2, 2] == 4.0  # the centre tap of [1, 2, 1]^2 / 16
    assert torch.equal(down, down.flip(-1)) and torch.equal(down, down.transpose(-1, -2))
    up = centred_up(down, (9, 9))
    assert up[0, 0, 4, 4] == 4.0 and torch.equal(up, up.flip(-2))


@pytest.mark.parametrize("side", [16, 31, 35])
def test_sides_the_net_is_not_exact_on_are_refused_in_one_line(side):
    net = CellWindowNet(ConvFamily.P4, 1, depth=3)
    with pytest.raises(ValueError, match=r"odd sides S with \(S - 1\) a multiple of 8") as error:
        net(torch.rand(1, 3, side, side))
    assert "\n" not in str(error.value)


def test_window_side_is_the_nearest_exact_side():
    assert window_side(24.0, 0.2, depth=3) == 121  # 120 px: (121 - 1) / 8 = 15
    assert window_side(24.0, 0.25, depth=3) == 97  # 96 px
    assert window_side(1.0, 0.2, depth=4) == 17  # never below 2**depth + 1
    with pytest.raises(ValueError):
        window_side(0.0, 0.2, depth=3)


def test_every_parameter_gets_a_gradient():
    net = CellWindowNet(ConvFamily.P4M, 1, depth=2)
    mask, classes = net(torch.rand(2, 3, 17, 17))
    (mask.mean() + classes.mean()).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
