import math

import numpy as np
import pytest
import torch

from equiseg.evaluation.metrics import confusion_matrix, dice_per_class, iou_per_class, segmentation_scores


def test_hand_computed_masks():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = confusion_matrix(pred, target, 3)
    # rows target, columns prediction; the 255 pixel is skipped
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    dice = dice_per_class(cm)
    assert dice == pytest.approx([4 / 6, 4 / 5, 2 / 3])
    assert iou_per_class(cm) == pytest.approx([2 / 4, 2 / 3, 1 / 2])


def test_absent_class_is_nan_and_left_out_of_the_mean():
    target = torch.tensor([0, 0, 1])
    pred = torch.tensor([0, 0, 1])
    scores = segmentation_scores(confusion_matrix(pred, target, 3), ["background", "BC", "TC"])
    assert math.isnan(scores["dice/TC"]) and math.isnan(scores["iou/TC"])
    assert scores["dice/mean"] == 1.0 and scores["miou"] == 1.0


def test_class_predicted_but_absent_scores_zero():
    scores = segmentation_scores(confusion_matrix(torch.tensor([2, 0]), torch.tensor([0, 0]), 3), ["b", "x", "y"])
    assert scores["dice/y"] == 0.0 and scores["iou/y"] == 0.0


def test_shape_and_range_errors():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2), torch.zeros(3), 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.zeros(2), torch.tensor([0, 5]), 2)


def test_matrices_add_up_over_images():
    rng = np.random.default_rng(0)
    a, b = (torch.from_numpy(rng.integers(0, 3, (2, 6, 6))) for _ in range(2))
    whole = confusion_matrix(a, b, 3)
    assert torch.equal(whole, confusion_matrix(a[0], b[0], 3) + confusion_matrix(a[1], b[1], 3))
