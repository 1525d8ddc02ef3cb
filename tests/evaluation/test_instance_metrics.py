import math

import numpy as np
import pytest
import torch
from torchmetrics.detection import PanopticQuality

from equiseg.evaluation.instance_metrics import (
    AJICounts,
    InstanceCounts,
    PQCounts,
    aji,
    aji_counts,
    aji_plus,
    blended_share,
    instance_classes,
    instance_counts,
    instance_overlap,
    instance_scores,
    panoptic_counts,
    per_image_scores,
)


def grid(text: str) -> np.ndarray:
    """A label image from rows of single characters ('.' = 0, a digit or letter = its id)."""
    return np.array([[0 if ch == "." else int(ch, 36) for ch in row] for row in text.split()], dtype=np.int32)


# true: T1 3x3 = 9 px (class 1), T2 2x2 = 4 px (class 2), T3 2 px (class 1)
TRUE = grid("""
111...
111...
111...
...22.
...22.
33....
""")
# pred: P5 6 px inside T1 (class 1), P7 6 px over T2 (class 2), P9 2 px on background (class 2)
PRED = grid("""
555..9
555..9
......
...777
...777
......
""")
TRUE_CLASSES = {1: 1, 2: 2, 3: 1}
PRED_CLASSES = {5: 1, 7: 2, 9: 2}


def test_hand_computed_image():
    # T1-P5: inter 6, union 9, IoU 2/3 (match); T2-P7: inter 4, union 6, IoU 2/3 (match); T3 missed (FN,
    # class 1); P9 on background (FP, class 2).
    # class 1: TP 1, FN 1 -> SQ 2/3, RQ 1 / 1.5 = 2/3, PQ 4/9; class 2: TP 1, FP 1 -> the same
    # all nuclei: TP 2 (IoU sum 4/3), FP 1, FN 1 -> SQ 2/3, RQ 2 / 3, PQ 4/9
    # AJI: C = 6 + 4 = 10; U = 9 + 6 + |T3| 2 + unpicked |P9| 2 = 19 -> 10/19; AJI+ the same pairs
    counts = instance_counts(TRUE, PRED, TRUE_CLASSES, PRED_CLASSES)
    assert counts.per_class.tp.tolist() == [1, 1]
    assert counts.per_class.fp.tolist() == [0, 1] and counts.per_class.fn.tolist() == [1, 0]
    scores = instance_scores(counts)
    for key in ("pq/BC", "pq/TC", "pq/mean", "pq/all"):
        assert scores[key] == pytest.approx(4 / 9), key
    for key in ("sq/BC", "rq/BC", "sq/TC", "rq/TC", "sq/all", "rq/all"):
        assert scores[key] == pytest.approx(2 / 3), key
    assert scores["aji"] == pytest.approx(10 / 19) and scores["aji_plus"] == pytest.approx(10 / 19)
    assert aji_counts(TRUE, PRED) == AJICounts(10, 19)


def test_overlap_table():
    overlap = instance_overlap(TRUE, PRED)
    assert overlap.true_ids.tolist() == [1, 2, 3] and overlap.pred_ids.tolist() == [5, 7, 9]
    assert overlap.true_area.tolist() == [9, 4, 2] and overlap.pred_area.tolist() == [6, 6, 2]
    pairs = {(int(overlap.true_ids[t]), int(overlap.pred_ids[p])): int(n)
             for t, p, n in zip(overlap.pair_true, overlap.pair_pred, overlap.intersection)}
    assert pairs == {(1, 5): 6, (2, 7): 4}
    assert overlap.iou.tolist() == pytest.approx([2 / 3, 2 / 3])


def test_iou_of_exactly_one_half_does_not_match():
    # T1 4 px; P2 covers 2 of them: IoU 2/4 = 0.5 -> no match: TP 0, FP 1, FN 1 -> PQ = SQ = RQ = 0
    # (with IoU >= 0.5 it would match: PQ 0.5). AJI still counts the pair: 2/4.
    true, pred = grid("1111"), grid("22..")
    counts = panoptic_counts(true, pred)
    assert (counts.tp[0], counts.fp[0], counts.fn[0]) == (0, 1, 1)
    assert counts.pq()[0] == 0.0 and counts.sq()[0] == 0.0 and counts.rq()[0] == 0.0
    assert aji(true, pred) == 0.5


def test_two_halves_would_both_match_with_greater_or_equal():
    # T1 4 px split by P2 and P3 of 2 px each: both IoU 0.5. With > nothing matches (TP 0, FP 2, FN 1,
    # PQ 0); with >= both would match the same nucleus (TP 2 for one true instance, PQ 1/2 / ... > 0).
    counts = panoptic_counts(grid("1111"), grid("2233"))
    assert (counts.tp[0], counts.fp[0], counts.fn[0]) == (0, 2, 1)
    assert counts.pq()[0] == 0.0


def test_just_over_one_half_matches():
    # T1 5 px, P2 covers 3: IoU 3/5 > 0.5 -> TP 1, SQ 0.6, RQ 1, PQ 0.6
    counts = panoptic_counts(grid("11111"), grid("222.."))
    assert counts.tp[0] == 1 and counts.pq()[0] == pytest.approx(0.6) and counts.rq()[0] == 1.0


def test_class_mismatch_matches_only_class_agnostically():
    # the same 2x2 nucleus, true class 1, predicted class 2: class 1 FN, class 2 FP -> both PQ 0;
    # all nuclei: TP 1 with IoU 1 -> PQ 1; AJI 1
    true = grid("11 11")
    scores = instance_scores(instance_counts(true, true * 4, {1: 1}, {4: 2}))
    assert scores["pq/BC"] == 0.0 and scores["pq/TC"] == 0.0 and scores["pq/mean"] == 0.0
    assert scores["pq/all"] == 1.0 and scores["aji"] == 1.0 and scores["aji_plus"] == 1.0


def test_a_class_absent_everywhere_is_nan_and_left_out_of_the_mean():
    true = grid("11. 11.")
    scores = instance_scores(instance_counts(true, true, {1: 1}, {1: 1}))
    assert scores["pq/BC"] == 1.0 and math.isnan(scores["pq/TC"]) and math.isnan(scores["sq/TC"])
    assert scores["pq/mean"] == 1.0


def test_aji_picks_by_iou_not_by_intersection():
    # T1 2x3 = 6 px. P2 (12 px) covers 4 of them: IoU 4 / (6 + 12 - 4) = 4/14; P3 (2 px) covers 2:
    # IoU 2/6, the larger. Kumar: T1 picks P3 -> C 2, U 6, unpicked P2 adds 12 -> AJI 2/18 = 1/9 (picking
    # P2 by intersection would give 4 / (14 + 2) = 1/4). AJI+: the single pair of largest IoU, the same.
    true = grid("""
    111...
    111...
    ......
    """)
    pred = grid("""
    332222
    222222
    22....
    """)
    assert aji_counts(true, pred) == AJICounts(2, 18)
    assert aji(true, pred) == pytest.approx(1 / 9) and aji_plus(true, pred) == pytest.approx(1 / 9)


def test_aji_tie_goes_to_the_larger_intersection():
    # P2 cut to 10 px: IoU(T1, P2) = 4 / (6 + 10 - 4) = 1/3 = IoU(T1, P3) = 2/6. The larger intersection
    # wins: C 4, U 12 + unpicked |P3| 2 = 14
    true = grid("111... 111...")
    pred = grid("332222 222222")
    assert aji_counts(true, pred) == AJICounts(4, 14)


def test_one_prediction_picked_by_two_nuclei_counts_twice_in_aji_once_in_aji_plus():
    # T1, T2 2 px each; P3 4 px covers both: IoU 1/2 each. AJI: both pick P3 -> C 2 + 2, U 4 + 4 -> 1/2.
    # AJI+: P3 pairs with one (T1: equal IoU, the assignment takes the first) -> C 2, U 4 + |T2| 2 -> 1/3
    true, pred = grid("1122"), grid("3333")
    assert aji(true, pred) == 0.5
    assert aji_plus(true, pred) == pytest.approx(1 / 3)


def random_image(rng: np.random.Generator, size: int = 24, boxes: int = 8,
                 first: int = 1) -> tuple[np.ndarray, dict[int, int]]:
    """Non-overlapping-by-construction label image: boxes painted in order (later ones cover earlier ones)."""
    labels = np.zeros((size, size), np.int32)
    for k in range(first, first + boxes):
        y, x = rng.integers(0, size - 3, 2)
        h, w = rng.integers(2, 8, 2)
        labels[y:y + h, x:x + w] = k
    classes = {int(k): int(rng.integers(1, 3)) for k in np.unique(labels) if k}
    return labels, classes


def perturbed(rng: np.random.Generator, labels: np.ndarray, classes: dict[int, int]) -> tuple[np.ndarray, dict]:
    """A prediction: shifted by a pixel, a few classes flipped, one extra box."""
    pred = np.roll(labels, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 2))) * 3
    y, x = rng.integers(0, labels.shape[0] - 4, 2)
    pred[y:y + 3, x:x + 4] = 1000
    pred_classes = {int(k): (classes[k // 3] if rng.random() < 0.8 else 3 - classes[k // 3])
                    for k in np.unique(pred) if k and k != 1000}
    pred_classes[1000] = 2
    return pred, pred_classes


def test_counts_add_up_like_images_side_by_side():
    rng = np.random.default_rng(1)
    true_a, classes_a = random_image(rng)
    true_b, classes_b = random_image(rng, first=100)
    pred_a, pred_classes_a = perturbed(rng, true_a, classes_a)
    pred_b, pred_classes_b = perturbed(rng, true_b, classes_b)
    pred_b = np.where(pred_b > 0, pred_b + 5000, 0)  # ids apart from image a's
    pred_classes_b = {k + 5000: c for k, c in pred_classes_b.items()}
    summed = (instance_counts(true_a, pred_a, classes_a, pred_classes_a)
              + instance_counts(true_b, pred_b, classes_b, pred_classes_b))
    both = instance_counts(np.hstack([true_a, true_b]), np.hstack([pred_a, pred_b]), classes_a | classes_b,
                           pred_classes_a | pred_classes_b)
    assert instance_scores(summed) == pytest.approx(instance_scores(both), nan_ok=True)
    assert summed.aji == both.aji and summed.aji_plus == both.aji_plus
    assert summed.per_class.tp.tolist() == both.per_class.tp.tolist()
    assert (InstanceCounts.zeros() + summed).all.fn.tolist() == summed.all.fn.tolist()


def test_per_image_scores_average_the_images():
    # image 1 the hand-computed one (PQ 4/9 per class), image 2 perfect with class 1 only (PQ BC 1, TC NaN)
    perfect = instance_counts(grid("11. 11."), grid("11. 11."), {1: 1}, {1: 1})
    scores = per_image_scores([instance_counts(TRUE, PRED, TRUE_CLASSES, PRED_CLASSES), perfect])
    assert scores["pq/BC"] == pytest.approx((4 / 9 + 1) / 2)
    assert scores["pq/TC"] == pytest.approx(4 / 9)  # image 2 has no TC: left out
    assert scores["pq/mean"] == pytest.approx((4 / 9 + 1) / 2)
    assert scores["aji"] == pytest.approx((10 / 19 + 1) / 2)
    assert math.isnan(per_image_scores([])["pq/BC"])


def test_per_image_scores_with_pannukes_rule_skip_images_without_truth():
    # image 2 has a TC false positive only: PQ TC 0 there (mean (4/9 + 0) / 2), or skipped by PanNuke's rule
    invented = instance_counts(grid("11. 11."), grid("..2 ..2"), {1: 1}, {2: 2})  # BC missed, TC invented
    hand = instance_counts(TRUE, PRED, TRUE_CLASSES, PRED_CLASSES)
    assert per_image_scores([hand, invented])["pq/TC"] == pytest.approx(2 / 9)
    pannuke = per_image_scores([hand, invented], truth_only=True)
    assert pannuke["pq/TC"] == pytest.approx(4 / 9) and pannuke["pq/BC"] == pytest.approx(2 / 9)
    # image 2 per class: BC 0 (missed), TC skipped -> its class mean 0; image 1 4/9 -> mean 2/9
    assert pannuke["pq/mean"] == pytest.approx(2 / 9)
    empty_truth = instance_counts(np.zeros((2, 2), int), grid("11 11"), {}, {1: 1})
    assert math.isnan(per_image_scores([empty_truth], truth_only=True)["pq/all"])


def test_relabelling_instance_ids_changes_nothing():
    rng = np.random.default_rng(2)
    true, classes = random_image(rng, size=32, boxes=12)
    pred, pred_classes = perturbed(rng, true, classes)
    before = instance_scores(instance_counts(true, pred, classes, pred_classes))
    new_true = {k: int(v) for k, v in zip(classes, rng.permutation(len(classes)) * 11 + 7)}
    new_pred = {k: int(v) for k, v in zip(pred_classes, rng.permutation(len(pred_classes)) + 70000)}
    relabel_true = np.vectorize(lambda k: new_true.get(k, 0))(true)
    relabel_pred = np.vectorize(lambda k: new_pred.get(k, 0))(pred).astype(np.uint32)
    after = instance_scores(instance_counts(relabel_true, relabel_pred, {new_true[k]: c for k, c in classes.items()},
                                            {new_pred[k]: c for k, c in pred_classes.items()}))
    assert after == pytest.approx(before, nan_ok=True)


def test_huge_ids_and_class_arrays():
    # ids far above the pixel count go through np.unique instead of a lookup table; an array of classes
    # indexed by id works like a mapping
    true = grid("11. 11.")
    pred = true.astype(np.int64) * 10**12
    counts = panoptic_counts(true, pred)
    assert counts.tp.tolist() == [1] and counts.pq()[0] == 1.0
    classes = np.array([0, 2])
    assert panoptic_counts(true, true, classes, classes).pq().tolist()[1] == 1.0


def test_empty_images():
    empty = np.zeros((4, 4), np.int32)
    scores = instance_scores(instance_counts(empty, empty, {}, {}))
    assert all(math.isnan(v) for v in scores.values())
    one = grid("11.. 11.. .... ....")
    missed = instance_scores(instance_counts(one, empty, {1: 2}, {}))
    assert missed["pq/TC"] == 0.0 and missed["rq/TC"] == 0.0 and missed["sq/TC"] == 0.0
    assert math.isnan(missed["pq/BC"]) and missed["pq/mean"] == 0.0 and missed["aji"] == 0.0
    invented = instance_scores(instance_counts(empty, one, {}, {1: 1}))
    assert invented["pq/BC"] == 0.0 and invented["pq/all"] == 0.0 and invented["aji_plus"] == 0.0
    assert instance_overlap(np.zeros((0, 0), np.int32), np.zeros((0, 0), np.int32)).true_ids.size == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        instance_overlap(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="integers"):
        instance_overlap(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="no class"):
        instance_counts(TRUE, PRED, {1: 1}, PRED_CLASSES)
    with pytest.raises(ValueError, match="not in 1..2"):
        instance_counts(TRUE, PRED, TRUE_CLASSES | {3: 3}, PRED_CLASSES)
    with pytest.raises(ValueError, match="both"):
        panoptic_counts(TRUE, PRED, TRUE_CLASSES)
    with pytest.raises(ValueError, match="do not add"):
        PQCounts.zeros(2) + PQCounts.zeros(1)


def panoptic_pairs(labels: np.ndarray, classes: dict[int, int]) -> torch.Tensor:
    """The (1, H, W, 2) input of torchmetrics: (category, instance) per pixel, background category 0."""
    category = np.vectorize(lambda k: classes.get(int(k), 0))(labels)
    return torch.from_numpy(np.stack([category, labels], -1)[None].astype(np.int64))


def test_per_class_counts_equal_torchmetrics_with_background_as_stuff():
    rng = np.random.default_rng(3)
    ours, ours_all = PQCounts.zeros(2), PQCounts.zeros(1)
    metric = PanopticQuality(things={1, 2}, stuffs={0}, return_per_class=True, return_sq_and_rq=True)
    metric_all = PanopticQuality(things={1}, stuffs={0})  # every nucleus of category 1: the class-agnostic PQ
    for _ in range(4):
        true, classes = random_image(rng, size=32, boxes=14)
        pred, pred_classes = perturbed(rng, true, classes)
        ours = ours + panoptic_counts(true, pred, classes, pred_classes)
        ours_all = ours_all + panoptic_counts(true, pred)
        metric.update(panoptic_pairs(pred, pred_classes), panoptic_pairs(true, classes))
        metric_all.update(panoptic_pairs(pred, dict.fromkeys(pred_classes, 1)),
                          panoptic_pairs(true, dict.fromkeys(classes, 1)))
    assert ours.tp.min() > 0 and ours.fp.min() > 0 and ours.fn.min() > 0  # every term is exercised
    # rows of torchmetrics' state: things 1, 2, then the stuff 0 (background, not a cell class)
    assert metric.true_positives[:2].tolist() == ours.tp.tolist()
    assert metric.false_positives[:2].tolist() == ours.fp.tolist()
    assert metric.false_negatives[:2].tolist() == ours.fn.tolist()
    assert metric.iou_sum[:2].tolist() == pytest.approx(ours.iou_sum.tolist())
    pq_sq_rq = metric.compute()[:2].numpy()
    assert pq_sq_rq == pytest.approx(np.stack([ours.pq(), ours.sq(), ours.rq()], 1))
    assert metric_all.true_positives[:1].tolist() == ours_all.tp.tolist()
    assert metric_all.false_positives[:1].tolist() == ours_all.fp.tolist()
    assert metric_all.false_negatives[:1].tolist() == ours_all.fn.tolist()


def test_torchmetrics_with_background_as_void_is_another_definition():
    # a predicted nucleus on background: a false positive for PanNuke/CoNIC (PQ 0), but torchmetrics
    # without a background stuff treats background as void and drops a segment lying mostly in void
    true, pred = grid("11.... 11...."), grid("11..22 11..22")
    ours = panoptic_counts(true, pred, {1: 1}, {1: 1, 2: 1})
    assert ours.fp.tolist() == [1, 0] and ours.pq()[0] == pytest.approx(1 / 1.5)
    metric = PanopticQuality(things={1, 2}, stuffs=set(), allow_unknown_preds_category=True)
    metric.update(panoptic_pairs(pred, {1: 1, 2: 1}), panoptic_pairs(true, {1: 1}))
    assert metric.false_positives.tolist() == [0, 0] and float(metric.compute()) == 1.0


def test_blended_share_and_instance_classes():
    labels = grid("""
    11.22
    11.22
    ..333
    """)
    # instance 1 pixels classes {1, 2} -> blended; 2: {2} (the 0 pixel ignored); 3: {1, 1, 2} -> blended
    class_map = np.array([[1, 2, 0, 2, 0],
                          [1, 1, 0, 2, 2],
                          [0, 0, 1, 1, 2]])
    assert blended_share(labels, class_map) == pytest.approx(2 / 3)
    assert instance_classes(labels, class_map) == {1: 1, 2: 2, 3: 1}
    assert blended_share(labels, (labels > 0).astype(int)) == 0.0
    assert math.isnan(blended_share(np.zeros((2, 2), int), np.zeros((2, 2), int)))
