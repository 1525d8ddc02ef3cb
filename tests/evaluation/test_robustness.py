"""Robustness transforms, the equivariance certificate and test-time augmentation."""

import numpy as np
import pytest
import torch

from equiseg import build_model
from equiseg.data.targets import IGNORE_INDEX, cell_class_mask
from equiseg.evaluation.equivariance import GroupTTA, certificate, equivariance_errors
from equiseg.evaluation.evaluate import evaluate_model
from equiseg.evaluation.robustness import Transform, rotate_points, standard_transforms, transform_points_d4
from equiseg.groups import C4, D4, GroupElement


@pytest.mark.parametrize("g", D4.elements, ids=str)
def test_points_follow_their_disks_under_every_d4_element(g):
    cells = np.array([[3, 10, 1], [20, 5, 2], [0, 0, 1]])
    mask = torch.from_numpy(cell_class_mask(cells, (24, 32), radius=1.5))
    moved = transform_points_d4(cells, g, 24, 32)
    turned = D4.act_on_image(g, mask).numpy()
    assert np.array_equal(turned, cell_class_mask(moved, turned.shape, radius=1.5))


def test_rotating_points_by_90_agrees_with_d4():
    cells = np.array([[3, 10, 1], [20, 5, 2]])
    assert np.array_equal(rotate_points(cells, 90.0, 32, 32), transform_points_d4(cells, GroupElement(1), 32, 32))


def test_any_angle_masks_the_corners_and_keeps_the_centre():
    image, target = torch.rand(3, 64, 64), torch.ones(64, 64, dtype=torch.long)
    cells = np.array([[32, 32, 2], [1, 1, 1]])
    _, turned, points, valid = Transform("rot45", degrees=45.0)(image, target, cells)
    assert not valid[0, 0] and not valid[-1, -1] and valid[32, 32]
    assert (turned[~valid] == IGNORE_INDEX).all() and (turned[valid] == 1).all()
    assert 0.12 < (~valid).float().mean() < 0.22  # the four corners of a square turned by 45 degrees
    assert len(points) == 1 and points[0, 2] == 2  # the corner cell left the valid region; the central one stays
    assert np.abs(points[0, :2] - 31.5).max() <= 1


def test_an_exact_model_scores_the_same_on_every_d4_element(tmp_path):
    from tests_support import tiny_dataset_with_cells

    root = tiny_dataset_with_cells(tmp_path)
    from equiseg.config import Config

    config = Config.from_dict({"model": {"family": "p4m", "width": 2, "depth": 2},
                               "detect": {"sigma": 2.0, "min_distance": 4}})
    torch.manual_seed(0)
    model = build_model("p4m", 2, depth=2).eval()
    scores = [evaluate_model(model, config, root, "test", tile=None, transform=t).scores
              for t in standard_transforms(())]
    for other in scores[1:]:
        for key in ("loss", "dice/mean", "miou", "mf1", "tp/BC", "tp/TC", "fp/BC", "fp/TC"):
            assert other[key] == pytest.approx(scores[0][key], rel=1e-4, abs=1e-6), key


def test_certificate_passes_exact_models_and_fails_plain():
    images = [torch.rand(3, 32, 32)]
    torch.manual_seed(0)
    exact = certificate(build_model("isotropic", 4, depth=2), images)
    plain = certificate(build_model("plain", 4, depth=2), images)
    assert exact["group"] < 1e-5 and plain["group"] > 1e-3
    assert set(exact) == {"group", "rot45", "arb45", "floor45"} and exact["rot45"] > 0
    # the round trip on the smoothed image: the model far above the resampling floor, which is small
    assert exact["arb45"] > 10 * exact["floor45"] and 0 < exact["floor45"] < 1e-3
    assert certificate(build_model("p4", 2, depth=2), images, group=C4)["group"] < 1e-5


def test_tta_makes_a_plain_model_exactly_d4_equivariant():
    torch.manual_seed(0)
    plain = build_model("plain", 4, depth=2).eval()
    x = torch.rand(1, 3, 32, 32)
    assert max(equivariance_errors(plain, x).values()) > 1e-2
    tta = GroupTTA(plain, D4)
    errors = equivariance_errors(lambda t: tta(t).softmax(1), x)
    assert max(errors.values()) < 1e-5
    probs = tta(x).softmax(1)
    assert torch.allclose(probs.sum(1), torch.ones(1, 32, 32), atol=1e-5)
