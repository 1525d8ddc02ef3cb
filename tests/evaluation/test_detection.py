import json

import numpy as np
import pytest
import torch

from equiseg.data.targets import cell_class_mask
from equiseg.evaluation.detection import (
    PointsFormatError,
    detect_cells,
    detection_scores,
    match_counts,
    read_points_json,
    write_points_json,
)


def test_hand_worked_matching():
    gt = np.array([[10, 10, 1], [40, 10, 1], [100, 100, 2]])
    pred = np.array([
        [12, 10, 1, 0.9],   # 2 px from GT 0: TP
        [11, 11, 1, 0.8],   # GT 0 taken, GT 1 is 29 px away: FP
        [40, 25, 1, 0.7],   # exactly 15 px from GT 1: TP (inclusive)
        [100, 116, 2, 0.6],  # 16 px from the TC: FP
    ])
    assert match_counts(pred, gt, 1) == (2, 1, 2)
    assert match_counts(pred, gt, 2) == (0, 1, 1)
    scores = detection_scores([pred], [gt])
    assert scores["precision/BC"] == round(2 / 3, 4) and scores["recall/BC"] == 1.0
    assert scores["f1/BC"] == round(2 * (2 / 3) / (2 / 3 + 1), 4)
    assert scores["f1/TC"] == 0.0
    assert scores["mf1"] == pytest.approx((scores["f1/BC"] + 0.0) / 2)


def test_visiting_order_matters_only_in_probability_mode():
    gt = np.array([[10, 10, 1], [30, 10, 1]])
    # pred A (file first, low prob) sits 5 px from GT 0 and 15 from GT 1; pred B (high prob) 1 px from GT 0 only
    pred = np.array([[15, 10, 1, 0.1], [10, 11, 1, 0.9]])
    # file order: A takes GT 0, B finds nothing left within 15 px (GT 1 is 20 px away) -> 1 TP
    assert match_counts(pred, gt, 1, order="official") == (1, 1, 2)
    # by probability: B takes GT 0, then A takes GT 1 at 15 px -> 2 TP
    assert match_counts(pred, gt, 1, order="probability") == (2, 0, 2)


def test_images_with_no_cells_of_a_class():
    gts = [np.zeros((0, 3)), np.array([[5, 5, 2]])]
    preds = [np.array([[50, 50, 1, 0.5]]), np.zeros((0, 4))]
    scores = detection_scores(preds, gts)
    assert (scores["tp/BC"], scores["fp/BC"], scores["gt/BC"]) == (0, 1, 0)
    assert (scores["tp/TC"], scores["fp/TC"], scores["gt/TC"]) == (0, 0, 1)
    assert scores["f1/BC"] == 0.0 and scores["mf1"] == 0.0


def test_counts_sum_over_images():
    gt = [np.array([[10, 10, 2]]), np.array([[20, 20, 2]])]
    pred = [np.array([[10, 12, 2, 0.9]]), np.zeros((0, 4))]
    scores = detection_scores(pred, gt)
    assert scores["precision/TC"] == 1.0 and scores["recall/TC"] == 0.5
    assert scores["f1/TC"] == round(2 * 0.5 / 1.5, 4)


def test_detect_cells_finds_each_disk_with_its_class():
    cells = np.array([[30, 30, 1], [100, 40, 2], [60, 110, 2]])
    mask = torch.from_numpy(cell_class_mask(cells, (140, 140), radius=12)).long()
    probs = torch.nn.functional.one_hot(mask, 3).permute(2, 0, 1).float() * 0.9 + 0.1 / 3
    found = detect_cells(probs, sigma=3.0, min_distance=8)
    assert len(found) == 3
    for x, y, cls in cells:
        d = np.hypot(found[:, 0] - x, found[:, 1] - y)
        k = d.argmin()
        assert d[k] <= 2 and found[k, 2] == cls and 0 <= found[k, 3] <= 1


def test_detect_cells_on_background_finds_nothing():
    probs = torch.zeros(3, 32, 32)
    probs[0] = 1
    assert detect_cells(probs).shape == (0, 4)


def test_points_json_round_trip_and_official_format(tmp_path):
    images = [np.array([[1.4, 2.6, 1, 0.75], [1023.2, 0, 2, 1.0]]), np.zeros((0, 4)), np.array([[5, 6, 2, 0.5]])]
    path = write_points_json(tmp_path / "pred.json", images)
    data = json.loads(path.read_text())
    assert data["type"] == "Multiple points" and data["version"] == {"major": 1, "minor": 0}
    assert data["points"][0] == {"name": "image_0", "point": [1, 3, 1], "probability": 0.75}
    back = read_points_json(path, num_images=3)
    assert [len(b) for b in back] == [2, 0, 1]
    assert back[2].tolist() == [[5, 6, 2, 0.5]]
    gt = write_points_json(tmp_path / "gt.json", [i[:, :3] for i in images], ground_truth=True)
    assert json.loads(gt.read_text())["num_images"] == 3 and len(read_points_json(gt)) == 3


@pytest.mark.parametrize("bad, message", [
    ({"name": "img_0", "point": [1, 2, 1], "probability": 0.5}, "image_<index>"),
    ({"name": "image_0", "point": [1.0, 2, 1], "probability": 0.5}, "ints"),
    ({"name": "image_0", "point": [1, 2000, 1], "probability": 0.5}, "0..1023"),
    ({"name": "image_0", "point": [1, 2, 3], "probability": 0.5}, "class"),
    ({"name": "image_0", "point": [1, 2, 1], "probability": 1}, "float"),
    ({"name": "image_0", "point": [1, 2, 1]}, "keys"),
])
def test_points_json_rejects_what_the_official_checker_rejects(tmp_path, bad, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"type": "Multiple points", "points": [bad]}))
    with pytest.raises(PointsFormatError, match=message):
        read_points_json(path)


def brute_force_detect(probs, min_distance, threshold):
    """detect_cells without smoothing, written the slow obvious way (all pairs, no k-d tree)."""
    from scipy.ndimage import maximum_filter

    p = probs.numpy().astype(np.float32)
    foreground = (1 - p[0]).astype(np.float32)
    window = 2 * min_distance + 1
    local_max = maximum_filter(foreground, size=window, mode="constant", cval=-np.inf)
    ys, xs = np.nonzero((foreground == local_max) & (foreground > threshold))  # row-major, as torch.nonzero
    order = sorted(range(len(xs)), key=lambda i: -foreground[ys[i], xs[i]])  # stable: ties keep row-major order
    kept = []
    for i in order:
        if all((xs[i] - xs[j]) ** 2 + (ys[i] - ys[j]) ** 2 >= min_distance ** 2 for j in kept):
            kept.append(i)
    rows = []
    for i in kept:
        cls = int(np.argmax(p[1:, ys[i], xs[i]]))
        rows.append([xs[i], ys[i], cls + 1, p[1 + cls, ys[i], xs[i]]])
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


@pytest.mark.parametrize("kind", ["noise", "plateaus"])
def test_detect_cells_suppression_equals_the_brute_force_greedy(kind):
    torch.manual_seed(0)
    if kind == "noise":  # many small peaks of distinct heights
        logits = torch.randn(3, 96, 96) * 3
    else:  # flat saturated regions: every plateau pixel is a candidate of equal height
        logits = torch.zeros(3, 96, 96)
        logits[0, :, :] = 5.0
        logits[2, 10:60, 20:80] = 20.0
        logits[1, 70:90, 5:40] = 20.0
    probs = logits.softmax(0)
    found = detect_cells(probs, sigma=0, min_distance=6, threshold=0.5)
    expected = brute_force_detect(probs, 6, 0.5)
    assert len(found) > 5
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-6)
