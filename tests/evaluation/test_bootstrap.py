"""The two-way bootstrap over seeds and test images: estimates, intervals, verdicts."""

import numpy as np
import pytest

from equiseg.detection import detection_scores
from equiseg.evaluation.bootstrap import Interval, counts_array, paired_difference, score_intervals


def random_counts(seeds, images, rng, skill=0.8):
    gt = rng.integers(5, 40, (seeds, images, 2))
    tp = rng.binomial(gt, skill)
    fp = rng.binomial(gt, 1 - skill)
    return np.stack([tp, fp, gt], axis=-1).astype(float)


def test_the_estimate_is_the_official_mf1_averaged_over_seeds():
    # one seed, two images, hand-made: BC 8 of 10 found with 2 false, TC 3 of 6 with 1 false (summed over images)
    per_image = [[{"tp/BC": 5, "fp/BC": 1, "gt/BC": 6, "tp/TC": 3, "fp/TC": 0, "gt/TC": 4},
                  {"tp/BC": 3, "fp/BC": 1, "gt/BC": 4, "tp/TC": 0, "fp/TC": 1, "gt/TC": 2}]]
    counts = counts_array(per_image)
    assert counts.shape == (1, 2, 2, 3)
    f1_bc, f1_tc = 2 * 0.8 * 0.8 / 1.6, 2 * 0.75 * 0.5 / 1.25
    result = score_intervals(counts, draws=200)
    assert result["f1/BC"].estimate == pytest.approx(f1_bc, abs=1e-6)
    assert result["mf1"].estimate == pytest.approx((f1_bc + f1_tc) / 2, abs=1e-6)
    # the same as the scorer on points that give these counts
    points = [np.array([[0, 0, 1, 0.9]] * 5 + [[500, 500, 1, 0.5]] + [[100, 0, 2, 0.9]] * 3),
              np.array([[0, 0, 1, 0.9]] * 3 + [[500, 500, 1, 0.5]] + [[600, 600, 2, 0.5]])]
    gts = [np.array([[0, 0, 1]] * 6 + [[100, 0, 2]] * 4), np.array([[0, 0, 1]] * 4 + [[100, 0, 2]] * 2)]
    assert detection_scores(points, gts)["unrounded/mf1"] == pytest.approx(result["mf1"].estimate, abs=1e-6)
    # two seeds: the mean of their mF1
    both = score_intervals(np.concatenate([counts, counts[:, ::-1]]), draws=200)
    assert both["mf1"].estimate == pytest.approx(result["mf1"].estimate)


def test_intervals_contain_the_estimate_and_shrink_with_more_data():
    rng = np.random.default_rng(0)
    small = score_intervals(random_counts(3, 6, rng), draws=1000)["mf1"]
    large = score_intervals(random_counts(12, 48, rng), draws=1000)["mf1"]
    assert small.low <= small.estimate <= small.high and large.low <= large.estimate <= large.high
    assert large.half_width < small.half_width


def test_a_clear_difference_is_resolved_and_a_null_one_is_not():
    rng = np.random.default_rng(1)
    base = random_counts(5, 16, rng, skill=0.7)
    better = base.copy()
    better[..., 0] = np.minimum(base[..., 2], base[..., 0] + 4)  # more found
    better[..., 1] = np.maximum(0, base[..., 1] - 3)             # fewer false
    diff = paired_difference(better, base, draws=1000)
    assert diff["mf1"].estimate > 0 and diff["mf1"].verdict() == "higher"
    assert paired_difference(base, better, draws=1000)["mf1"].verdict() == "lower"
    same = paired_difference(base, base, draws=200)["mf1"]
    assert same.estimate == 0 and same.low == same.high == 0
    noise = paired_difference(random_counts(5, 16, rng, 0.7), random_counts(5, 16, rng, 0.7), draws=1000)["mf1"]
    assert noise.verdict() == "not resolved"  # two draws of one model
    with pytest.raises(ValueError, match="one shape"):
        paired_difference(base, base[:4])


def test_verdicts():
    assert Interval(0.1, 0.02, 0.2).verdict() == "higher" and Interval(-0.1, -0.2, -0.01).verdict() == "lower"
    assert Interval(0.01, -0.02, 0.05).verdict() == "not resolved" and Interval(0, -0.02, 0.04).half_width == 0.03
