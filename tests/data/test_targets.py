import math

import numpy as np
import pytest
import torch

from equiseg.data.targets import IGNORE_INDEX, cell_class_mask, tissue_class_mask, tissue_crop


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
