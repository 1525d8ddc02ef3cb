import math

import numpy as np
import pytest
import torch

from equiseg.data.targets import IGNORE_INDEX, CellTarget, TargetKind, cell_class_mask, tissue_class_mask, tissue_crop
from equiseg.evaluation.robustness import transform_points_d4
from equiseg.groups import D4


def test_isolated_disk_has_the_area_of_its_radius():
    mask = cell_class_mask(np.array([[100, 100, 2]]), (200, 200), radius=30)
    assert set(np.unique(mask)) == {0, 2}
    assert abs((mask == 2).sum() - math.pi * 30**2) / (math.pi * 30**2) < 0.02


def test_small_disk_by_hand():
    mask = cell_class_mask(np.array([[2, 2, 1]]), (5, 5), radius=1)
    expected = np.zeros((5, 5), np.uint8)
    expected[2, 1:4] = 1
    expected[1:4, 2] = 1
    assert np.array_equal(mask, expected)


def test_point_is_x_column_y_row():
    mask = cell_class_mask(np.array([[7, 2, 1]]), (10, 10), radius=0.5)
    assert mask[2, 7] == 1 and mask.sum() == 1


def test_overlap_goes_to_the_nearest_centre_whatever_the_order():
    cells = np.array([[10, 10, 1], [16, 10, 2], [13, 14, 1], [13, 14, 2]])
    first = cell_class_mask(cells, (30, 30), radius=6)
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2]):
        assert np.array_equal(cell_class_mask(cells[perm], (30, 30), radius=6), first)
    assert first[10, 11] == 1 and first[10, 15] == 2  # nearer to (10, 10) and to (16, 10)


def test_disks_are_clipped_at_the_border():
    mask = cell_class_mask(np.array([[0, 0, 2]]), (40, 40), radius=30)
    area = (mask == 2).sum()
    assert abs(area - math.pi * 900 / 4) / (math.pi * 900 / 4) < 0.05


def test_no_cells_is_all_background():
    assert not cell_class_mask(np.zeros((0, 3), np.int64), (8, 8)).any()


def test_tissue_classes_keep_the_ignore_value():
    mask = np.array([[1, 2], [255, 1]], np.uint8)
    assert tissue_class_mask(mask).tolist() == [[0, 1], [IGNORE_INDEX, 0]]
    with pytest.raises(ValueError, match=r"\[3\]"):
        tissue_class_mask(np.array([[3]], np.uint8))


def test_tissue_crop_repeats_each_block_pixel_four_times():
    tissue = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16)
    crop = tissue_crop(tissue, torch.tensor([[4.0, 8.0, 8.0, 12.0]]), (16, 16), mode="nearest")
    expected = tissue[..., 8:12, 4:8].repeat_interleave(4, -2).repeat_interleave(4, -1)
    assert torch.equal(crop, expected)


def test_tissue_crop_bilinear_of_a_linear_ramp_is_exact():
    ramp = torch.arange(32, dtype=torch.float32).expand(1, 1, 32, 32)  # value = x - 0.5 at continuous x
    crop = tissue_crop(ramp, torch.tensor([[8.0, 8.0, 16.0, 16.0]]), (8, 8))
    expected = 8 + (torch.arange(8) + 0.5) - 0.5
    assert torch.allclose(crop[0, 0, 3], expected)


def test_tissue_crop_fills_outside():
    tissue = torch.ones(1, 1, 8, 8)
    crop = tissue_crop(tissue, torch.tensor([[-8.0, 0.0, 8.0, 8.0]]), (8, 8), mode="nearest", fill=IGNORE_INDEX)
    assert (crop[..., :4] == IGNORE_INDEX).all() and (crop[..., 4:] == 1).all()


# --- target designs: disks and centres ----------------------------------------------------------------------------


def _turned(array, g):
    return D4.act_on_image(g, torch.as_tensor(array)[None]).numpy()[0]


@pytest.mark.parametrize("target", [CellTarget(TargetKind.DISKS, radius=6), CellTarget(TargetKind.CENTRES, sigma=2.0)])
def test_a_target_of_turned_points_is_the_turned_target_even_at_exact_ties(target):
    """Equidistant centres of different classes (a tie on a whole row and column of pixels)
    and a random crowd: the code map commutes with all eight D4 elements.
    """
    rng = np.random.default_rng(0)
    crowd = np.stack([rng.integers(0, 31, 40), rng.integers(0, 25, 40), rng.integers(1, 3, 40)], 1)
    ties = np.array([[8, 8, 1], [14, 8, 2], [8, 14, 2], [14, 14, 1]])
    for cells, (h, w) in ((ties, (23, 23)), (crowd, (25, 31))):
        codes = target.encode(cells, (h, w))
        for g in D4.elements:
            turned_cells = transform_points_d4(cells, g, h, w)
            hh, ww = (h, w) if g.rotation % 2 == 0 else (w, h)
            np.testing.assert_array_equal(target.encode(turned_cells, (hh, ww)), _turned(codes, g), err_msg=str(g))


def test_overlapping_disks_of_different_classes_tie_to_the_higher_class():
    mask = cell_class_mask(np.array([[4, 5, 2], [10, 5, 1]]), (11, 15), radius=5)
    assert mask[5, 7] == 2 and mask[3, 7] == 2  # equidistant column: TC (2) over BC (1), in any order
    assert np.array_equal(mask, cell_class_mask(np.array([[10, 5, 1], [4, 5, 2]]), (11, 15), radius=5))


def test_centre_codes_by_hand():
    """Sigma 1: reach 4, distances 0..3 coded; two cells of different classes 5 px apart."""
    target = CellTarget(TargetKind.CENTRES, sigma=1.0)
    codes = target.encode(np.array([[2, 2, 1], [7, 2, 2]]), (5, 10))
    assert target.reach == 4
    assert codes[2, 2] == 1 and codes[2, 3] == 2 and codes[2, 4] == 3  # BC at distances 0, 1, 2
    assert codes[2, 7] == 1 + 4 and codes[2, 5] == 1 + 4 + 2  # TC at 0 and 2 (column 5 is 3 from BC)
    assert codes[0, 0] == 1 + round(math.sqrt(8)) and codes[4, 9] == 1 + 4 + round(math.sqrt(8))
    soft = target.soft(torch.as_tensor(codes)[None], 3)[0]
    assert torch.allclose(soft.sum(0), torch.ones(5, 10))
    assert soft[1, 2, 2] == 1 and soft[2, 2, 7] == 1
    assert torch.isclose(soft[1, 2, 3], torch.tensor(math.exp(-0.5)))
    hard = target.classes(torch.as_tensor(codes))
    assert hard[2, 2] == 1 and hard[2, 3] == 1 and hard[2, 4] == 0 and hard[2, 7] == 2  # g >= 1/2 out to 1.18 px
    ignored = torch.as_tensor(codes).clone()
    ignored[0] = IGNORE_INDEX
    assert (target.classes(ignored)[0] == IGNORE_INDEX).all() and (target.soft(ignored[None], 3)[0, :, 0] == 0).all()


def test_touching_cells_keep_separate_peaks_in_the_centre_target_but_merge_in_disks():
    cells = np.array([[20, 20, 2], [44, 20, 2]])  # 24 px apart: radius-30 disks overlap into one region
    disks = CellTarget(TargetKind.DISKS, radius=30).encode(cells, (40, 64))
    assert (disks[20, 20:45] == 2).all()
    soft = CellTarget(TargetKind.CENTRES, sigma=4.0).soft(
        torch.as_tensor(CellTarget(TargetKind.CENTRES, sigma=4.0).encode(cells, (40, 64)))[None], 3)[0, 2, 20]
    assert soft[20] == 1 and soft[44] == 1 and soft[32] < 0.05
