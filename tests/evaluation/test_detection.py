import json

import numpy as np
import pytest
import torch

from equiseg.data.targets import cell_class_mask
from equiseg.detection import (
    MatchOrder,
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


def test_the_two_visiting_orders_on_a_hand_counted_case():
    gt = np.array([[10, 10, 1], [30, 10, 1]])
    # pred A (file first, low prob) sits 5 px from GT 0 and 15 from GT 1; pred B (high prob) 1 px from GT 0 only
    pred = np.array([[15, 10, 1, 0.1], [10, 11, 1, 0.9]])
    # today's official rule, by probability: B takes GT 0, then A takes GT 1 at 15 px -> 2 TP
    assert match_counts(pred, gt, 1) == (2, 0, 2)
    # the scorer before 2023-07-28, file order: A takes GT 0, B finds nothing left (GT 1 is 20 px away)
    assert match_counts(pred, gt, 1, order=MatchOrder.PRE_JULY_2023) == (1, 1, 2)
    # by hand: official P = R = 2/2 -> F1 1.0 (rounded); TC has neither -> F1 0; mF1 0.5.
    # pre-July-2023: P = R = 1/2 -> F1 0.5; mF1 0.25
    assert detection_scores([pred], [gt])["mf1"] == 0.5
    assert detection_scores([pred], [gt], order=MatchOrder.PRE_JULY_2023)["mf1"] == 0.25


def test_the_orders_differ_over_several_images_and_both_classes():
    gts = [np.array([[100, 100, 2], [120, 100, 2], [500, 500, 1]]), np.array([[50, 50, 1], [70, 50, 1]])]
    preds = [np.array([[110, 100, 2, 0.3],     # 10 px from both TC: ties go to the first GT
                       [101, 100, 2, 0.8],     # 1 px from TC 0, 19 from TC 1
                       [505, 500, 1, 0.5]]),   # BC 0: TP either way
             np.array([[60, 50, 1, 0.2], [50, 51, 1, 0.7]])]
    # official: image 0 TC: (101,100) p.8 takes TC 0, then (110,100) takes TC 1 -> TP 2;
    #           image 1 BC: (50,51) p.7 takes BC 0, (60,50) takes BC 1 -> TP 2; BC in all: TP 3, GT 3
    official = detection_scores(preds, gts)
    assert [official[k] for k in ("tp/BC", "fp/BC", "gt/BC", "tp/TC", "fp/TC", "gt/TC")] == [3, 0, 3, 2, 0, 2]
    assert official["mf1"] == 1.0
    # file order: (110,100) takes TC 0 (the first of two at 10 px), (101,100) has none left within 15 px -> TP 1,
    # FP 1; image 1: (60,50) takes BC 0 (10 px, first of the tie), (50,51) has BC 1 at 20 px -> FP
    old = detection_scores(preds, gts, order=MatchOrder.PRE_JULY_2023)
    assert [old[k] for k in ("tp/BC", "fp/BC", "gt/BC", "tp/TC", "fp/TC", "gt/TC")] == [2, 1, 3, 1, 1, 2]
    f1_bc, f1_tc = round(2 * (2 / 3) * (2 / 3) / (4 / 3), 4), round(2 * 0.5 * 0.5 / 1.0, 4)
    assert (old["f1/BC"], old["f1/TC"]) == (f1_bc, f1_tc) == (0.6667, 0.5)
    assert old["mf1"] == pytest.approx((0.6667 + 0.5) / 2, abs=1e-12)


def test_probabilities_tie_as_float32_as_in_the_official_scorer():
    gt = np.array([[10, 10, 1], [30, 10, 1]])
    tie = np.array([[15, 10, 1, 0.5], [10, 11, 1, 0.5]])
    # 0.5 + 1e-9 is 0.5 in float32: the official scorer sees a tie, not B first
    near = np.array([[15, 10, 1, 0.5], [10, 11, 1, 0.5 + 1e-9]])
    apart = np.array([[15, 10, 1, 0.5], [10, 11, 1, 0.5 + 1e-6]])
    assert match_counts(near, gt, 1) == match_counts(tie, gt, 1) == (1, 1, 2)  # a tie of two: file order
    assert match_counts(apart, gt, 1) == (2, 0, 2)


def test_official_rounding_before_the_mean_and_the_unrounded_kept():
    # BC: TP 2, FP 1, GT 2 -> P 2/3, R 1, F1 0.8; TC: TP 1, FP 0, GT 6 -> P 1, R 1/6, F1 2/7
    gts = [np.array([[10, 10, 1], [40, 10, 1], *[[100 + 40 * k, 200, 2] for k in range(6)]])]
    preds = [np.array([[10, 10, 1, 0.9], [40, 10, 1, 0.8], [300, 300, 1, 0.7], [100, 200, 2, 0.6]])]
    scores = detection_scores(preds, gts)
    assert scores["precision/BC"] == 0.6667 and scores["f1/TC"] == 0.2857 and scores["recall/TC"] == 0.1667
    assert scores["mf1"] == pytest.approx((0.8 + 0.2857) / 2, abs=1e-12)    # 0.54285, the official figure
    assert scores["unrounded/f1/TC"] == pytest.approx(2 / 7, abs=1e-6)
    assert scores["unrounded/mf1"] == pytest.approx((0.8 + 2 / 7) / 2, abs=1e-6)
    assert scores["mf1"] != pytest.approx(scores["unrounded/mf1"], abs=1e-6)


def official_reference(preds, gts, cutoff=15):
    """The current official rule written out plainly, step by step, per image and class."""
    f1s = []
    for cls in (1, 2):
        tp = fp = n_gt = 0
        for pred, gt in zip(preds, gts):
            p = np.array([r for r in pred.tolist() if r[2] == cls], np.float32).reshape(-1, 4)
            g = np.array([r for r in gt.tolist() if r[2] == cls], np.float32).reshape(-1, 3)
            n_gt += len(g)
            taken = set()
            for i in np.argsort(-p[:, 3]):
                near = [j for j in range(len(g)) if j not in taken
                        and np.linalg.norm(p[i, :2] - g[j, :2]) <= cutoff]
                if near:
                    taken.add(min(near, key=lambda j: np.linalg.norm(p[i, :2] - g[j, :2])))
                    tp += 1
                else:
                    fp += 1
        precision, recall = tp / (tp + fp + 1e-7), tp / (n_gt + 1e-7)
        f1s.append(round(2 * precision * recall / (precision + recall + 1e-7), 4))
    return sum(f1s) / 2


@pytest.mark.parametrize("seed", range(6))
def test_random_crowded_cases_match_the_official_rule(seed):
    """Clustered ground truth, jittered and mislabelled predictions with random (and tied) probabilities."""
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(int(rng.integers(1, 6))):
        centres = rng.uniform(100, 900, (3, 2))
        xy = np.clip(np.rint(centres[rng.integers(0, 3, 60)] + rng.normal(0, 40, (60, 2))), 0, 1023)
        gt = np.c_[xy, rng.integers(1, 3, len(xy))] if rng.random() > 0.15 else np.zeros((0, 3))
        n = int(rng.integers(0, 80))
        base = gt[rng.integers(0, len(gt), n)] if len(gt) else np.c_[rng.uniform(0, 1023, (n, 2)), np.ones(n)]
        jitter = np.clip(np.rint(base[:, :2] + rng.normal(0, 8, (n, 2))), 0, 1023)
        cls = np.where(rng.random(n) < 0.2, 3 - base[:, 2], base[:, 2])
        prob = np.where(rng.random(n) < 0.3, 0.5, rng.random(n).round(3))  # many ties
        preds.append(np.c_[jitter, cls, prob])
        gts.append(gt)
    assert detection_scores(preds, gts)["mf1"] == pytest.approx(official_reference(preds, gts), abs=1e-12)


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


@pytest.mark.parametrize("x, y", [(1024, 5), (5, 1023.6), (-1, 0)])
def test_points_json_refuses_points_outside_the_patch_and_writes_nothing(tmp_path, x, y):
    with pytest.raises(ValueError, match=r"image_1: point .* outside .*1024x1024"):
        write_points_json(tmp_path / "p.json", [np.zeros((0, 4)), np.array([[x, y, 1, 0.5]])])
    assert not (tmp_path / "p.json").exists()


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


def brute_force_per_class(probs, min_distance, threshold):
    """detect_cells(per_class=True) without smoothing, the slow obvious way: the local maxima of
    each class map, then one greedy pass over all of them by descending score (ties: row,
    column, class).
    """
    from scipy.ndimage import maximum_filter

    p = probs.numpy().astype(np.float32)
    window = 2 * min_distance + 1
    candidates = []
    for c in range(1, p.shape[0]):
        local_max = maximum_filter(p[c], size=window, mode="constant", cval=-np.inf)
        for y, x in zip(*np.nonzero((p[c] == local_max) & (p[c] > threshold))):
            candidates.append((float(p[c, y, x]), int(y), int(x), c))
    candidates.sort(key=lambda t: (-t[0], t[1], t[2], t[3]))
    kept = []
    for score, y, x, c in candidates:
        if all((x - kx) ** 2 + (y - ky) ** 2 >= min_distance ** 2 for _, ky, kx, _ in kept):
            kept.append((score, y, x, c))
    return np.array([[x, y, c, score] for score, y, x, c in kept], dtype=np.float64).reshape(-1, 4)


def test_per_class_peaks_equal_the_brute_force_greedy():
    torch.manual_seed(1)
    probs = (torch.randn(3, 80, 90) * 3).softmax(0)
    found = detect_cells(probs, sigma=0, min_distance=5, threshold=0.4, per_class=True)
    assert len(found) > 10 and set(found[:, 2]) == {1, 2}
    np.testing.assert_allclose(found, brute_force_per_class(probs, 5, 0.4), rtol=0, atol=1e-6)


def test_per_class_peaks_separate_touching_cells_that_the_foreground_merges():
    """Two touching TC cells and a BC cell beside them, as a centre-target model sees them:
    per-class peaks find all three; the foreground rule at the disk settings finds fewer.
    """
    from equiseg.data.targets import CellTarget, TargetKind

    cells = np.array([[30, 30, 2], [52, 30, 2], [41, 50, 1]])
    target = CellTarget(TargetKind.CENTRES, sigma=5.0)
    probs = target.soft(torch.as_tensor(target.encode(cells, (80, 80)))[None], 3)[0] * 0.8
    probs[0] = 1 - probs[1:].sum(0)
    found = detect_cells(probs, sigma=1.0, min_distance=8, threshold=0.3, per_class=True)
    assert sorted(map(tuple, found[:, :3].astype(int).tolist())) == sorted(map(tuple, cells.tolist()))
    assert len(detect_cells(probs, sigma=8.0, min_distance=15, threshold=0.3)) < 3


def test_the_separable_max_filter_equals_the_square_one_with_plateaus_and_edges():
    """Column then row maxima (peaks._max_filter) against the square max pool the detector used before,
    on a map with plateaus (ties) and at odd sizes: equal bit for bit.
    """
    from torch.nn import functional as F

    from equiseg.detection.peaks import _max_filter

    generator = torch.Generator().manual_seed(0)
    score = (torch.rand(37, 53, generator=generator) * 4).floor() / 4  # few values: many ties
    for window in (1, 3, 13, 31):
        square = F.max_pool2d(score[None, None], window, 1, window // 2)[0, 0]
        assert torch.equal(_max_filter(score, window), square)


def test_the_shifted_sum_blur_equals_a_depthwise_convolution():
    """peaks._gaussian_blur (shifted sums) against the depthwise F.conv2d it replaced, with and without
    replicate padding at the image's edges: the same sums, to float32 rounding.
    """
    from torch.nn import functional as F

    from equiseg.detection.peaks import _blur_radius, _gaussian_blur

    x = torch.rand(1, 3, 41, 58, generator=torch.Generator().manual_seed(1))
    for sigma, edges in [(1.0, (True,) * 4), (6.0, (False, True, True, False)), (2.5, (False,) * 4)]:
        radius = _blur_radius(sigma)
        t = torch.arange(-radius, radius + 1, dtype=x.dtype)
        kernel = torch.exp(-(t**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        top, bottom, left, right = (radius if edge else 0 for edge in edges)
        rows = F.conv2d(F.pad(x, (left, right, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1),
                        groups=3)
        expected = F.conv2d(F.pad(rows, (0, 0, top, bottom), mode="replicate"),
                            kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
        got = _gaussian_blur(x, sigma, edges)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max()) <= 1e-6
