"""Confidence intervals for OCELOT scores, by a bootstrap over seeds and test images.

A study's question is a difference between two variants trained with the same seeds on the
same data subsets and tested on the same images. Its uncertainty has two sources: which seeds
(initialisation, data order, augmentation) and which test images. Both are resampled here
together (a two-way bootstrap): each draw picks S seeds with replacement and I test images
with replacement; per picked seed, the F1 of each class comes from the TP, FP and ground-truth
counts summed over the picked images (as the official scorer sums them over a test set), mF1
is their mean, and the draw's statistic is the mean over the picked seeds. For a paired
difference the same seeds and images are picked for both variants. The interval is the 2.5th
and 97.5th percentile of the draws (a percentile interval), the estimate the statistic on the
data as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from equiseg.data.ocelot import CELL_CLASSES

KEYS = ("mf1", *(f"f1/{name}" for name in CELL_CLASSES.values()))
"""The statistics each bootstrap gives: mF1 and the F1 of each cell class."""

_EPS = 1e-7  # as the official scorer guards its divisions


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95 % interval."""

    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """Half the interval's width: about the smallest difference the design resolves."""
        return (self.high - self.low) / 2

    def verdict(self) -> str:
        """For a difference: "higher" or "lower" where the interval excludes 0, else "not resolved"."""
        if self.low > 0:
            return "higher"
        if self.high < 0:
            return "lower"
        return "not resolved"


def counts_array(per_image: list[list[dict]]) -> np.ndarray:
    """(seeds, images, classes, 3) int counts (TP, FP, GT) from each seed's per-image scores
    (``tp/BC``, ``fp/BC``, ``gt/BC``, ... as `evaluate_model`
    records them).
    """
    return np.array([[[[image[f"{kind}/{name}"] for kind in ("tp", "fp", "gt")] for name in CELL_CLASSES.values()]
                      for image in seed] for seed in per_image], dtype=np.float64)


def f1_of_counts(sums: np.ndarray) -> np.ndarray:
    """F1 over the last axis (TP, FP, GT) as the official scorer computes it (unrounded)."""
    tp, fp, gt = sums[..., 0], sums[..., 1], sums[..., 2]
    precision, recall = tp / (tp + fp + _EPS), tp / (gt + _EPS)
    return 2 * precision * recall / (precision + recall + _EPS)


def _statistics(counts: np.ndarray, seed_weights: np.ndarray, image_weights: np.ndarray) -> np.ndarray:
    """(draws, 1 + classes): mF1 and per-class F1 of each draw, from (S, I, K, 3) counts and the
    draws' multiplicities of each seed (draws, S) and image (draws, I).
    """
    sums = np.einsum("bi,sikc->bskc", image_weights, counts)  # (draws, S, K, 3)
    f1 = f1_of_counts(sums)  # (draws, S, K)
    per_seed = np.concatenate([f1.mean(axis=2, keepdims=True), f1], axis=2)  # (draws, S, 1 + K)
    return np.einsum("bs,bsk->bk", seed_weights, per_seed) / seed_weights.sum(axis=1, keepdims=True)


def _draws(seeds: int, images: int, draws: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    seed_weights = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=draws).astype(np.float64)
    image_weights = rng.multinomial(images, np.full(images, 1 / images), size=draws).astype(np.float64)
    return seed_weights, image_weights


def _intervals(point: np.ndarray, draws: np.ndarray) -> dict[str, Interval]:
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    return {key: Interval(float(point[k]), float(low[k]), float(high[k])) for k, key in enumerate(KEYS)}


def score_intervals(counts: np.ndarray, draws: int = 2000, seed: int = 0) -> dict[str, Interval]:
    """mF1 and per-class F1 (mean over seeds) of one variant, with 95 % intervals.

    Args:
        counts: (seeds, images, classes, 3) TP, FP, GT (`counts_array`).
    """
    s, i = counts.shape[:2]
    point = _statistics(counts, np.ones((1, s)), np.ones((1, i)))[0]
    weights = _draws(s, i, draws, np.random.default_rng(seed))
    return _intervals(point, _statistics(counts, *weights))


def paired_difference(a: np.ndarray, b: np.ndarray, draws: int = 2000, seed: int = 0) -> dict[str, Interval]:
    """A minus b, for mF1 and per-class F1 (means over seeds), with 95 % intervals; both
    (seeds, images, classes, 3), seed k and image j the same in both.
    """
    if a.shape != b.shape:
        raise ValueError(f"paired counts must have one shape, got {a.shape} and {b.shape}")
    s, i = a.shape[:2]
    ones = np.ones((1, s)), np.ones((1, i))
    point = _statistics(a, *ones)[0] - _statistics(b, *ones)[0]
    weights = _draws(s, i, draws, np.random.default_rng(seed))
    return _intervals(point, _statistics(a, *weights) - _statistics(b, *weights))
