"""Comparisons that hold at a study's few seeds: intervals calibrated for them, corrected for many
comparisons, and a plan of the seeds and test images a stated precision needs.

A paired difference of two variants (same seeds, same test images) varies with the seeds and with
the test images. `equiseg.evaluation.bootstrap` resamples both; its percentile interval is too narrow
at few seeds (it covered 72-83 % at 5 seeds in issue 31's simulation): the bootstrap's variance of a
mean of S seeds is (S - 1) / S of the truth, and its quantiles are a normal's where a t's belong.
Here the difference's variance is split into its two parts, each from a bootstrap over that source
alone, each inflated by n / (n - 1), and the interval takes a t quantile with the Welch-Satterthwaite
degrees of freedom of the sum:

    V = a + b,   a = S / (S - 1) * Var_seeds,   b = I / (I - 1) * Var_images,
    df = V**2 / (a**2 / (S - 1) + b**2 / (I - 1)),   interval = estimate +- t(0.975, df) * sqrt(V).

Its coverage at the study's seed count is checked by a simulation with a known difference
(tests/evaluation/test_comparisons.py); the test fails when the interval is made narrower. Beside it,
a seed-level paired t-interval (each seed's difference over the whole test set; the test images
held fixed). A family of comparisons is judged with Holm's step-down correction of their p-values.

`variance_components` gives the per-seed and per-image variances (sigma_seed**2, sigma_image**2,
with Var(difference) = sigma_seed**2 / S + sigma_image**2 / I), which `plan` turns into the seeds
and test images a half-width or a power needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from equiseg.evaluation.bootstrap import KEYS, Interval, _draws, _statistics

LEVEL = 0.95


@dataclass(frozen=True)
class Difference:
    """A paired difference (variant minus baseline) of one statistic, with two intervals and a p-value.

    Attributes:
        estimate: the difference on the data as they are.
        interval: the calibrated two-way interval (seeds and test images).
        seed_interval: the seed-level paired t-interval (test images fixed); None with one seed.
        p: the two-sided p-value of "no difference" for the calibrated interval's t statistic.
        sigma_seed, sigma_image: the variance components (standard deviations per seed and per image).
    """

    estimate: float
    interval: Interval
    seed_interval: Interval | None
    p: float
    sigma_seed: float
    sigma_image: float


def seed_scores(counts: np.ndarray) -> np.ndarray:
    """(S, 1 + K): each seed's mF1 and per-class F1 over all its test images (counts summed), from
    (seeds, images, classes, 3) TP, FP, GT counts.
    """
    s, i = counts.shape[:2]
    return _statistics(counts, np.eye(s), np.ones((s, i)))  # draw k: seed k alone, every image once


def t_interval(values: np.ndarray, level: float = LEVEL) -> Interval | None:
    """The t-interval of the mean of ``values`` (None for fewer than two)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return None
    mean, half = float(values.mean()), 0.0
    spread = float(values.std(ddof=1))
    if spread > 0:
        half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * spread / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half)


def variance_parts(a: np.ndarray, b: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(estimate, Var over seeds, Var over images), each (1 + K,), of the paired difference a - b: the
    variances of bootstraps that resample one source each, the other held as it is.
    """
    if a.shape != b.shape:
        raise ValueError(f"paired counts must have one shape, got {a.shape} and {b.shape}")
    s, i = a.shape[:2]
    rng = np.random.default_rng(seed)
    ones_s, ones_i = np.ones((draws, s)), np.ones((draws, i))
    seed_w, image_w = _draws(s, i, draws, rng)
    estimate = _statistics(a, ones_s[:1], ones_i[:1])[0] - _statistics(b, ones_s[:1], ones_i[:1])[0]
    over_seeds = _statistics(a, seed_w, ones_i) - _statistics(b, seed_w, ones_i)
    over_images = _statistics(a, ones_s, image_w) - _statistics(b, ones_s, image_w)
    return estimate, over_seeds.var(axis=0), over_images.var(axis=0)


def calibrated_difference(a: np.ndarray, b: np.ndarray, draws: int = 2000, seed: int = 0,
                          level: float = LEVEL, scale: float = 1.0) -> dict[str, Difference]:
    """A minus b for mF1 and each class's F1 (`KEYS`), both (seeds, images, classes, 3) counts with seed k
    and image j the same in both: the calibrated interval (module docstring), the seed-level t-interval,
    the p-value and the variance components. ``scale`` multiplies the interval's half-width (1: as
    derived; the coverage test uses smaller ones to show that it can fail).
    """
    s, i = a.shape[:2]
    estimate, var_seeds, var_images = variance_parts(a, b, draws, seed)
    part_s = var_seeds * s / max(s - 1, 1)
    part_i = var_images * i / max(i - 1, 1)
    total = part_s + part_i
    per_seed = seed_scores(a) - seed_scores(b)
    out = {}
    for k, key in enumerate(KEYS):
        se = math.sqrt(total[k])
        terms = (part_s[k] ** 2 / max(s - 1, 1)) + (part_i[k] ** 2 / max(i - 1, 1))
        df = total[k] ** 2 / terms if terms > 0 else float("inf")
        half = scale * float(stats.t.ppf(0.5 + level / 2, df)) * se
        p = float(2 * stats.t.sf(abs(estimate[k]) / se, df)) if se > 0 else float(estimate[k] == 0)
        out[key] = Difference(float(estimate[k]), Interval(float(estimate[k]), float(estimate[k] - half),
                                                           float(estimate[k] + half)),
                              t_interval(per_seed[:, k], level), min(1.0, p),
                              math.sqrt(var_seeds[k] * s * s / max(s - 1, 1)) if s > 1 else 0.0,
                              math.sqrt(var_images[k] * i * i / max(i - 1, 1)) if i > 1 else 0.0)
    return out


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the k-th smallest times (m - k + 1), made
    non-decreasing, at most 1 (Holm, 1979). A comparison is resolved at level alpha when its adjusted
    p-value is below alpha; the family-wise error rate stays at most alpha.
    """
    order = np.argsort(np.asarray(p_values, np.float64), kind="stable")
    m = len(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[index])))
        adjusted[index] = running
    return adjusted.tolist()


def holm_verdict(difference: Difference, adjusted_p: float, alpha: float = 1 - LEVEL) -> str:
    """"higher" or "lower" where Holm's adjusted p-value is below ``alpha``, else "not resolved"."""
    if adjusted_p >= alpha:
        return "not resolved"
    return "higher" if difference.estimate > 0 else "lower"


@dataclass(frozen=True)
class Plan:
    """Seeds and test images for a stated precision, from a pilot's variance components."""

    seeds: int
    images: int
    half_width: float
    power: float | None


def _planned(sigma_seed: float, sigma_image: float, seeds: int, images: int, comparisons: int,
             level: float) -> tuple[float, float]:
    """(standard error, critical t) of a difference with ``seeds`` and ``images``: the t quantile at the
    level Bonferroni gives each of ``comparisons`` (Holm's first step, its strictest), with the
    Welch-Satterthwaite degrees of freedom, as `calibrated_difference` takes them.
    """
    part_s, part_i = sigma_seed**2 / seeds, sigma_image**2 / images
    terms = part_s**2 / max(seeds - 1, 1) + part_i**2 / max(images - 1, 1)
    df = (part_s + part_i) ** 2 / terms if terms > 0 else float("inf")
    alpha = (1 - level) / comparisons
    return math.sqrt(part_s + part_i), float(stats.t.ppf(1 - alpha / 2, df))


def half_width(sigma_seed: float, sigma_image: float, seeds: int, images: int, comparisons: int = 1,
               level: float = LEVEL) -> float:
    """The expected half-width of a difference's interval with ``seeds`` and ``images`` (`_planned`)."""
    se, critical = _planned(sigma_seed, sigma_image, seeds, images, comparisons, level)
    return critical * se


def power(sigma_seed: float, sigma_image: float, seeds: int, images: int, difference: float,
          comparisons: int = 1, level: float = LEVEL) -> float:
    """The chance that a true ``difference`` is resolved (two-sided, at Bonferroni's level; the
    difference's estimate taken as normal about it).
    """
    se, critical = _planned(sigma_seed, sigma_image, seeds, images, comparisons, level)
    if se == 0:  # no variance at all: any difference shows
        return float(difference != 0)
    shift = abs(difference) / se
    return float(stats.norm.sf(critical - shift) + stats.norm.cdf(-critical - shift))


def plan(sigma_seed: float, sigma_image: float, images: int, target_half_width: float | None = None,
         difference: float | None = None, target_power: float = 0.8, comparisons: int = 1,
         most_seeds: int = 1000) -> Plan | None:
    """The fewest seeds (at ``images`` test images) whose interval reaches ``target_half_width``, or that
    resolve a true ``difference`` with ``target_power``, after Bonferroni over ``comparisons``; None when
    more than ``most_seeds`` would not do (the test images' part alone is too wide: add images).
    """
    if (target_half_width is None) == (difference is None):
        raise ValueError("give a target half-width or a difference to resolve, one of them")
    for seeds in range(2, most_seeds + 1):
        width = half_width(sigma_seed, sigma_image, seeds, images, comparisons)
        if difference is None:
            if target_half_width is not None and width <= target_half_width:
                return Plan(seeds, images, width, None)
            continue
        reached = power(sigma_seed, sigma_image, seeds, images, difference, comparisons)
        if reached >= target_power:
            return Plan(seeds, images, width, reached)
    return None
