"""Instance scores for nuclei: panoptic quality (per class and class-agnostic), AJI and AJI+, blended instances.

Inputs are instance label images, (H, W) arrays of non-negative integers: 0 is background, k > 0 is
instance k (ids need not be contiguous; only which pixels share an id matters). Each instance has one
class, given apart from the image: a mapping ``{id: class}`` or an array indexed by id. Classes are
1..``num_classes`` (1 BC, 2 TC for OCELOT); background is not a class. Every score comes from one
overlap table per image pair (:func:`instance_overlap`: a single ``bincount`` over paired labels).

Panoptic quality (Kirillov et al., "Panoptic Segmentation", CVPR 2019), as PanNuke, Lizard and CoNIC
score nuclei: a true and a predicted instance match when their IoU is > 0.5 (strictly; instances of a
label image are disjoint, so each instance has at most one such match). Per class c, with TP, FP, FN counted among the
instances of class c only (instances of different classes never match)::

    SQ = sum of matched IoUs / TP        RQ = TP / (TP + FP/2 + FN/2)
    PQ = SQ * RQ = sum of matched IoUs / (TP + FP/2 + FN/2)

A class with TP + FP + FN = 0 has no score: its SQ, RQ and PQ are NaN and left out of the means. A class
with TP = 0 but FP or FN scores SQ = RQ = PQ = 0 (as torchmetrics and HoVer-Net). The class-agnostic
("all") PQ matches all nuclei regardless of class (HoVer-Net's ``get_fast_pq`` on binary instances,
PanNuke's bPQ per image). :class:`PQCounts` add up over images: PQ from the summed counts of a split is
CoNIC's multi-class PQ ("mPQ+": ``pq/mean`` of :func:`instance_scores` is the mean over classes of the
per-class PQ); :func:`per_image_scores` averages per-image scores instead (PanNuke's way; an image where a
class is NaN is left out of that class's average; PanNuke's script also skips an image whose ground
truth lacks the class although it predicts some, where here those false positives score 0 unless
``truth_only=True`` asks for PanNuke's rule).

AJI, the Aggregated Jaccard Index (Kumar et al., IEEE TMI 36(7), 2017), as published: each true instance
G picks the predicted instance S with the largest IoU among those it overlaps (ties: the larger
intersection, then the lower id); C += |G ∩ S|, U += |G ∪ S|; a G overlapping no prediction adds |G| to U;
every predicted instance that no G picked adds its area to U; AJI = C / U. A prediction may be picked by
several true instances (the original definition: its pixels then count in U more than once). AJI+
(Graham et al., HoVer-Net, 2019) pairs one-to-one instead, maximising the summed IoU over pairs that
overlap (``scipy.optimize.linear_sum_assignment``); unpaired instances of both sides add their areas to U.
Both are class-agnostic. :class:`AJICounts` (C, U) add up over images: :func:`instance_scores` of summed
counts gives the split's AJI from all its pixels, :func:`per_image_scores` the mean of the per-image AJIs.
AJI is NaN when U = 0 (no instance on either side).

torchmetrics (checked against version 1.9.0, ``torchmetrics.detection.PanopticQuality`` and
``functional/detection/_panoptic_quality_common.py``): its per-class PQ is the published one (IoU > 0.5,
same category only, sums of IoU/TP/FP/FN over all images of all updates, SQ = 0 where TP = 0, per-class
PQ 0 and left out of the mean where TP + FP + FN = 0). It is not used here because (a) its input is
(B, H, W, 2) pairs (category, instance) as tensors; (b) pixels whose category is neither a "thing" nor a
"stuff" are *void*: void pixels are taken out of each segment's union, and a segment lying more than half
in void on the other side is neither FP nor FN, so background must be declared a stuff category (things
= {1, 2}, stuffs = {0}) to get the nuclei definition, with background then scored as a class of its own
(ignored); (c) it matches segments in a Python loop over overlapping pairs after a row-wise
``torch.unique`` of (category, instance) pairs (about 5 s for a 1024² image with 400 nuclei on a CPU,
against about 10-20 ms here); (d) it has no per-image scores and no AJI, and a class-agnostic PQ only
through a second metric with every nucleus in one category. tests/evaluation/test_instance_metrics.py
checks that the per-class TP, FP, FN and IoU sums here equal torchmetrics' with things = {1, 2},
stuffs = {0} (and the class-agnostic counts with things = {1}) on random images, and that background
as void gives another result.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from equiseg.data.ocelot import CELL_CLASSES

MATCH_IOU = 0.5  # a true and a predicted instance match when IoU > MATCH_IOU (strictly)
ClassLookup = Mapping[int, int] | np.ndarray | Sequence[int]  # an instance id's class: {id: class} or array[id]
DEFAULT_CLASS_NAMES = tuple(CELL_CLASSES[c] for c in sorted(CELL_CLASSES))
_DENSE_PAIRS = 1 << 22  # at most this many (true, pred) cells: one dense bincount, else np.unique over pairs


@dataclass(frozen=True)
class InstanceOverlap:
    """The overlap table of a true and a predicted label image.

    Attributes:
        true_ids, pred_ids: the instance ids present (ascending, 0 excluded), (T,) and (P,).
        true_area, pred_area: their pixel counts, (T,) and (P,).
        pair_true, pair_pred: for each overlapping (true, pred) pair, indices into the id arrays, (M,).
        intersection: the pixels the pair shares, (M,).
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    intersection: np.ndarray

    @property
    def union(self) -> np.ndarray:
        """|G ∪ S| of each overlapping pair, (M,)."""
        return self.true_area[self.pair_true] + self.pred_area[self.pair_pred] - self.intersection

    @property
    def iou(self) -> np.ndarray:
        """IoU of each overlapping pair (float64, (M,); every pair overlaps, so no division by 0)."""
        return self.intersection / self.union


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, index, area) of a label image.

    The ids present (ascending, no 0), each pixel's position in ``ids`` + 1 (0 for background), and each
    id's pixel count.
    """
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"instance labels must be integers, not {labels.dtype}")
    flat = labels.ravel()
    if flat.size == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    if flat.min() < 0:
        raise ValueError("instance labels must be >= 0 (0 = background)")
    flat = flat.astype(np.int64, copy=False)
    top = int(flat.max())
    if top <= max(4 * flat.size, 1 << 16):  # a lookup table over the ids is cheaper than sorting the pixels
        counts = np.bincount(flat, minlength=1)
        ids = np.flatnonzero(counts[1:]) + 1
        table = np.zeros(top + 1, np.int64)
        table[ids] = np.arange(1, ids.size + 1)
        return ids, table[flat], counts[ids]
    ids, index, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if ids[0] == 0:
        return ids[1:], index.ravel(), counts[1:]
    return ids, index.ravel() + 1, counts


def instance_overlap(true: np.ndarray, pred: np.ndarray) -> InstanceOverlap:
    """The areas of all instances and the intersections of all overlapping (true, pred) pairs.

    Args:
        true, pred: instance label images of the same shape (0 background, k > 0 instance k).

    Returns:
        The overlap table, from one ``bincount`` (or ``np.unique`` for very many instances) over the
        paired per-pixel instance positions.

    Raises:
        ValueError: if the shapes differ or the labels are not non-negative integers.
    """
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"true {true.shape} and predicted {pred.shape} label images differ in shape")
    true_ids, true_index, true_area = _compact(true)
    pred_ids, pred_index, pred_area = _compact(pred)
    width = pred_ids.size + 1
    keys = true_index * width + pred_index
    if (true_ids.size + 1) * width <= _DENSE_PAIRS:
        counts = np.bincount(keys, minlength=1)
        cells = np.flatnonzero(counts)
        counts = counts[cells]
    else:
        cells, counts = np.unique(keys, return_counts=True)
    rows, cols = np.divmod(cells, width)
    both = (rows > 0) & (cols > 0)
    return InstanceOverlap(true_ids, pred_ids, true_area, pred_area, rows[both] - 1, cols[both] - 1, counts[both])


def _classes_of(ids: np.ndarray, classes: ClassLookup, num_classes: int, side: str) -> np.ndarray:
    """The class (1..num_classes) of each id, from a mapping or an array indexed by id."""
    if isinstance(classes, Mapping):
        missing = [int(i) for i in ids if int(i) not in classes]
        if missing:
            raise ValueError(f"{side} instances {missing[:5]} have no class")
        found = np.array([classes[int(i)] for i in ids], dtype=np.int64)
    else:
        table = np.asarray(classes)
        if ids.size and ids.max() >= table.shape[0]:
            raise ValueError(f"{side} instance {int(ids.max())} has no class (the class array has {table.shape[0]})")
        found = table[ids].astype(np.int64)
    bad = (found < 1) | (found > num_classes)
    if bad.any():
        raise ValueError(f"{side} instance {int(ids[bad][0])} has class {int(found[bad][0])}, not in 1..{num_classes}")
    return found


@dataclass(frozen=True)
class PQCounts:
    """Per-class TP, FP, FN and sum of matched IoUs; entry c - 1 is class c. Counts of images add (``+``).

    Attributes:
        tp, fp, fn: int64 counts, (num_classes,).
        iou_sum: the IoUs of the true positives summed, float64, (num_classes,).
    """

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    iou_sum: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> PQCounts:
        """No instance of any of ``num_classes`` classes."""
        counts = np.zeros(num_classes, np.int64)
        return cls(counts, counts.copy(), counts.copy(), np.zeros(num_classes, np.float64))

    def __add__(self, other: PQCounts) -> PQCounts:
        """The counts of both, class by class."""
        if self.tp.shape != other.tp.shape:
            raise ValueError(f"counts of {self.tp.size} and {other.tp.size} classes do not add")
        return PQCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.iou_sum + other.iou_sum)

    def _ratio(self, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        scored = (self.tp + self.fp + self.fn) > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.where(denominator > 0, numerator / np.maximum(denominator, 1e-300), 0.0)
        return np.where(scored, value, np.nan)

    def sq(self) -> np.ndarray:
        """Segmentation quality per class: mean IoU of the matches (0 without TP, NaN without any instance)."""
        return self._ratio(self.iou_sum, self.tp.astype(np.float64))

    def rq(self) -> np.ndarray:
        """Recognition quality per class: TP / (TP + FP/2 + FN/2) (NaN without any instance)."""
        return self._ratio(self.tp.astype(np.float64), self.tp + 0.5 * self.fp + 0.5 * self.fn)

    def pq(self) -> np.ndarray:
        """Panoptic quality per class: sum IoU / (TP + FP/2 + FN/2) = SQ * RQ (NaN without any instance)."""
        return self._ratio(self.iou_sum, self.tp + 0.5 * self.fp + 0.5 * self.fn)


def _pq_counts(overlap: InstanceOverlap, true_class: np.ndarray, pred_class: np.ndarray,
               num_classes: int) -> PQCounts:
    """TP, FP, FN, IoU sum per class from the pairs of the same class with IoU > 0.5."""
    iou = overlap.iou
    match = (iou > MATCH_IOU) & (true_class[overlap.pair_true] == pred_class[overlap.pair_pred])
    matched_class = true_class[overlap.pair_true[match]] - 1
    tp = np.bincount(matched_class, minlength=num_classes).astype(np.int64)
    iou_sum = np.bincount(matched_class, weights=iou[match], minlength=num_classes).astype(np.float64)
    fn = np.bincount(true_class - 1, minlength=num_classes).astype(np.int64) - tp
    fp = np.bincount(pred_class - 1, minlength=num_classes).astype(np.int64) - tp
    return PQCounts(tp, fp, fn, iou_sum)


def panoptic_counts(true: np.ndarray, pred: np.ndarray, true_classes: ClassLookup | None = None,
                    pred_classes: ClassLookup | None = None, num_classes: int = 2) -> PQCounts:
    """PQ counts of one image pair, per class or (without classes) class-agnostic.

    Args:
        true, pred: instance label images of the same shape.
        true_classes, pred_classes: each instance id's class in 1..``num_classes`` (``{id: class}`` or an
            array indexed by id). Both None: one class, all nuclei (the class-agnostic PQ).
        num_classes: the number of cell classes (ignored without classes).

    Returns:
        The counts; add those of several images and read ``.pq()``, ``.sq()``, ``.rq()`` of the sum.

    Raises:
        ValueError: if only one side has classes, or an instance has no class or one outside 1..num_classes.
    """
    overlap = instance_overlap(true, pred)
    if true_classes is None and pred_classes is None:
        return _pq_counts(overlap, np.ones(overlap.true_ids.size, np.int64), np.ones(overlap.pred_ids.size, np.int64),
                          1)
    if true_classes is None or pred_classes is None:
        raise ValueError("give the classes of both the true and the predicted instances, or of neither")
    return _pq_counts(overlap, _classes_of(overlap.true_ids, true_classes, num_classes, "true"),
                      _classes_of(overlap.pred_ids, pred_classes, num_classes, "predicted"), num_classes)


@dataclass(frozen=True)
class AJICounts:
    """The aggregated intersection C and union U of AJI (or AJI+); counts of images add (``+``)."""

    intersection: int = 0
    union: int = 0

    def __add__(self, other: AJICounts) -> AJICounts:
        """C and U of both."""
        return AJICounts(self.intersection + other.intersection, self.union + other.union)

    @property
    def value(self) -> float:
        """C / U; NaN when U = 0 (no instance on either side)."""
        return self.intersection / self.union if self.union else float("nan")


def _aji_from_picks(overlap: InstanceOverlap, picked: np.ndarray) -> AJICounts:
    """C and U from the overlapping pairs that are picked (at most one per true instance)."""
    inter = overlap.intersection[picked]
    union = overlap.union[picked]
    true_left = np.ones(overlap.true_ids.size, bool)
    true_left[overlap.pair_true[picked]] = False
    pred_left = np.ones(overlap.pred_ids.size, bool)
    pred_left[overlap.pair_pred[picked]] = False
    total = union.sum() + overlap.true_area[true_left].sum() + overlap.pred_area[pred_left].sum()
    return AJICounts(int(inter.sum()), int(total))


def _aji_counts(overlap: InstanceOverlap) -> AJICounts:
    """C and U of Kumar's AJI.

    Each true instance picks its overlapping prediction of largest IoU (ties: the larger intersection,
    then the lower id); a prediction may be picked more than once.
    """
    # pairs sorted by true instance, then IoU descending, then intersection descending, then pred id
    order = np.lexsort((overlap.pair_pred, -overlap.intersection, -overlap.iou, overlap.pair_true))
    first = np.unique(overlap.pair_true[order], return_index=True)[1]
    return _aji_from_picks(overlap, order[first])


def _aji_plus_counts(overlap: InstanceOverlap) -> AJICounts:
    """AJI+: one-to-one pairs of largest summed IoU among overlapping instances (linear_sum_assignment)."""
    if overlap.intersection.size == 0:
        return _aji_from_picks(overlap, np.zeros(0, np.int64))
    rows, pair_row = np.unique(overlap.pair_true, return_inverse=True)
    cols, pair_col = np.unique(overlap.pair_pred, return_inverse=True)
    pair_of = np.full((rows.size, cols.size), -1, np.int64)  # the pair index of each cell, -1 if none
    pair_of[pair_row, pair_col] = np.arange(overlap.intersection.size)
    iou = np.zeros(pair_of.shape, np.float64)
    iou[pair_row, pair_col] = overlap.iou
    assigned_rows, assigned_cols = linear_sum_assignment(iou, maximize=True)
    picked = pair_of[assigned_rows, assigned_cols]
    return _aji_from_picks(overlap, picked[picked >= 0])


def aji_counts(true: np.ndarray, pred: np.ndarray, plus: bool = False) -> AJICounts:
    """C and U of AJI (Kumar et al. 2017) or, with ``plus``, of AJI+ (one-to-one pairs), for one image pair."""
    overlap = instance_overlap(true, pred)
    return _aji_plus_counts(overlap) if plus else _aji_counts(overlap)


def aji(true: np.ndarray, pred: np.ndarray) -> float:
    """The Aggregated Jaccard Index of one image pair (Kumar's definition; NaN if both are empty)."""
    return aji_counts(true, pred).value


def aji_plus(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI+ of one image pair: predictions paired one-to-one by largest summed IoU (NaN if both are empty)."""
    return aji_counts(true, pred, plus=True).value


@dataclass(frozen=True)
class InstanceCounts:
    """All instance counts of one image pair or, summed (``+``), of several.

    Attributes:
        per_class: PQ counts with matching inside each class.
        all: PQ counts of all nuclei, matched regardless of class (one class).
        aji, aji_plus: C and U of AJI and AJI+.
    """

    per_class: PQCounts
    all: PQCounts
    aji: AJICounts
    aji_plus: AJICounts

    @classmethod
    def zeros(cls, num_classes: int = 2) -> InstanceCounts:
        """Counts of no image: the start of a sum."""
        return cls(PQCounts.zeros(num_classes), PQCounts.zeros(1), AJICounts(), AJICounts())

    def __add__(self, other: InstanceCounts) -> InstanceCounts:
        """The counts of both."""
        return InstanceCounts(self.per_class + other.per_class, self.all + other.all, self.aji + other.aji,
                              self.aji_plus + other.aji_plus)


def instance_counts(true: np.ndarray, pred: np.ndarray, true_classes: ClassLookup, pred_classes: ClassLookup,
                    num_classes: int = 2) -> InstanceCounts:
    """Every instance count of one image pair from a single overlap table.

    Args:
        true, pred: instance label images of the same shape.
        true_classes, pred_classes: each instance id's class in 1..``num_classes`` (``{id: class}`` or an
            array indexed by id).
        num_classes: the number of cell classes.

    Returns:
        Per-class and class-agnostic PQ counts, AJI and AJI+ counts.

    Raises:
        ValueError: if the shapes differ, or an instance has no class or one outside 1..num_classes.
    """
    overlap = instance_overlap(true, pred)
    true_class = _classes_of(overlap.true_ids, true_classes, num_classes, "true")
    pred_class = _classes_of(overlap.pred_ids, pred_classes, num_classes, "predicted")
    agnostic = _pq_counts(overlap, np.ones_like(true_class), np.ones_like(pred_class), 1)
    return InstanceCounts(_pq_counts(overlap, true_class, pred_class, num_classes), agnostic,
                          _aji_counts(overlap), _aji_plus_counts(overlap))


def _nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    with warnings.catch_warnings():  # all-NaN slices are NaN by definition here
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(np.nanmean(values, axis=axis))


def instance_scores(counts: InstanceCounts, class_names: Sequence[str] = DEFAULT_CLASS_NAMES) -> dict[str, float]:
    """Scores from (summed) counts.

    Args:
        counts: the counts of one image or the sum over a split.
        class_names: the names of classes 1..num_classes.

    Returns:
        ``pq/<name>``, ``sq/<name>``, ``rq/<name>`` per class; ``pq/mean`` (mean over the classes with a
        score: mPQ+ for summed counts); ``pq/all``, ``sq/all``, ``rq/all`` (class-agnostic); ``aji``,
        ``aji_plus``. NaN where undefined.
    """
    if len(class_names) != counts.per_class.tp.size:
        raise ValueError(f"{len(class_names)} class names for {counts.per_class.tp.size} classes")
    per_class = counts.per_class
    scores: dict[str, float] = {}
    for kind, values in (("pq", per_class.pq()), ("sq", per_class.sq()), ("rq", per_class.rq())):
        scores |= {f"{kind}/{name}": float(v) for name, v in zip(class_names, values)}
    scores["pq/mean"] = float(_nanmean(per_class.pq()))
    for kind, values in (("pq", counts.all.pq()), ("sq", counts.all.sq()), ("rq", counts.all.rq())):
        scores[f"{kind}/all"] = float(values[0])
    scores["aji"] = counts.aji.value
    scores["aji_plus"] = counts.aji_plus.value
    return scores


def _without_truth_left_out(scores: dict[str, float], image: InstanceCounts,
                            class_names: Sequence[str]) -> dict[str, float]:
    """``scores`` of one image with the PQ terms of classes (and of "all") that have no true instance NaN."""
    truth = image.per_class.tp + image.per_class.fn
    for name, count in [*zip(class_names, truth), ("all", image.all.tp[0] + image.all.fn[0])]:
        if count == 0:
            scores |= {f"{kind}/{name}": float("nan") for kind in ("pq", "sq", "rq")}
    scores["pq/mean"] = float(_nanmean(np.array([scores[f"pq/{name}"] for name in class_names])))
    return scores


def per_image_scores(counts: Sequence[InstanceCounts], class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
                     truth_only: bool = False) -> dict[str, float]:
    """The per-image average of :func:`instance_scores` (PanNuke's way of averaging).

    Args:
        counts: the counts of each image.
        class_names: the names of classes 1..num_classes.
        truth_only: PanNuke's rule: an image scores a class (or "all") only where its ground truth has an
            instance of it. Otherwise where TP + FP + FN > 0: an image with false positives alone scores 0.

    Returns:
        Each score of :func:`instance_scores` averaged over the images where it is defined (not NaN); NaN
        where it is defined in none. ``pq/mean`` is the mean over images of each image's mean over classes.
    """
    if not counts:
        return instance_scores(InstanceCounts.zeros(len(class_names)), class_names)
    rows = [instance_scores(image, class_names) for image in counts]
    if truth_only:
        rows = [_without_truth_left_out(row, image, class_names) for row, image in zip(rows, counts)]
    table = np.array([[row[key] for key in rows[0]] for row in rows], dtype=np.float64)
    return {key: float(v) for key, v in zip(rows[0], _nanmean(table, axis=0))}


def _class_histogram(labels: np.ndarray, class_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, histogram): the instance ids and, per instance, its pixel count of each class (column k)."""
    labels, class_map = np.asarray(labels), np.asarray(class_map)
    if labels.shape != class_map.shape:
        raise ValueError(f"labels {labels.shape} and class map {class_map.shape} differ in shape")
    if class_map.size and (not np.issubdtype(class_map.dtype, np.integer) or class_map.min() < 0):
        raise ValueError("the class map must hold non-negative integer classes (0 = background)")
    ids, index, _ = _compact(labels)
    width = int(class_map.max()) + 1 if class_map.size else 1
    counts = np.bincount(index * width + class_map.ravel().astype(np.int64), minlength=(ids.size + 1) * width)
    return ids, counts.reshape(ids.size + 1, width)[1:]


def instance_classes(labels: np.ndarray, class_map: np.ndarray) -> dict[int, int]:
    """Each instance's class by majority of its pixels in a per-pixel class map.

    Background pixels (class 0) are ignored; a tie goes to the lower class; an instance with no classed
    pixel gets 0. For class maps as PanNuke and CoNIC give them.
    """
    ids, histogram = _class_histogram(labels, class_map)
    histogram[:, 0] = 0
    majority = np.where(histogram.any(axis=1), histogram.argmax(axis=1), 0)
    return {int(i): int(c) for i, c in zip(ids, majority)}


def blended_share(labels: np.ndarray, class_map: np.ndarray) -> float:
    """The share of instances whose pixels carry more than one cell class in ``class_map``.

    Args:
        labels: an instance label image (0 background).
        class_map: a per-pixel class map of the same shape (0 background, ignored).

    Returns:
        Blended instances / instances; NaN without instances.
    """
    _, histogram = _class_histogram(labels, class_map)
    if histogram.shape[0] == 0:
        return float("nan")
    blended = (histogram[:, 1:] > 0).sum(axis=1) > 1
    return float(blended.mean())
