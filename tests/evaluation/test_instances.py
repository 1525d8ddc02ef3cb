"""Cells as instances (equiseg.detection.instances): growing labels from centres, their classes,
measurements, outlines and QuPath polygons.
"""

import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from shapely.geometry import Point, Polygon

from equiseg.detection.instances import (
    MEASUREMENT_NAMES,
    grow_instances,
    instance_classes,
    instance_outlines,
    measure_instances,
    polygon_features,
)
from equiseg.groups import D4


def random_scene(seed, shape=(40, 56), n=30):
    """A smooth random foreground map and n cells on distinct pixels (some below 0.5), random
    classes and random float scores.
    """
    rng = np.random.default_rng(seed)
    foreground = ndimage.gaussian_filter(rng.random(shape), 2.5)
    foreground = (foreground - foreground.min()) / (foreground.max() - foreground.min())
    pixels = rng.choice(shape[0] * shape[1], n, replace=False)
    cells = np.stack([pixels % shape[1], pixels // shape[1], rng.integers(1, 3, n), rng.random(n)], 1)
    return foreground, cells.astype(np.float64)


def turn(g, image):
    return D4.act_on_image(g, torch.from_numpy(np.ascontiguousarray(image))).numpy()


def turn_cells(g, cells, shape):
    """The cells' centres where T_g takes their pixels (read off the turned coordinate grids)."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    old_rows, old_cols = turn(g, rows), turn(g, cols)  # at each new pixel, the old one it came from
    new_row, new_col = np.empty(shape, np.int64), np.empty(shape, np.int64)
    new_row[old_rows, old_cols], new_col[old_rows, old_cols] = np.mgrid[0:old_rows.shape[0], 0:old_rows.shape[1]]
    out = cells.copy()
    y, x = cells[:, 1].astype(np.int64), cells[:, 0].astype(np.int64)
    out[:, 0], out[:, 1] = new_col[y, x], new_row[y, x]
    return out


def reference_instances(foreground, cells, threshold, max_radius):
    """grow_instances by brute force over the whole map (no windows)."""
    components = ndimage.label(foreground >= threshold, structure=np.ones((3, 3)))[0]
    rows, cols = np.mgrid[0:foreground.shape[0], 0:foreground.shape[1]]
    n = len(cells)
    d2 = np.stack([(cols - x) ** 2 + (rows - y) ** 2 for x, y in cells[:, :2]])  # (N, H, W)
    own = np.stack([components == components[int(y), int(x)] for x, y in cells[:, :2]]) & (components > 0)
    allowed = own & (d2 <= max_radius ** 2)
    key = np.where(allowed, d2, np.inf)
    labels = np.zeros(foreground.shape, np.int32)
    for i, j in zip(*np.nonzero(allowed.any(0))):
        order = sorted(range(n), key=lambda k: (key[k, i, j], -cells[k, 3], -cells[k, 2], k))
        labels[i, j] = order[0] + 1
    for k, (x, y) in enumerate(cells[:, :2].astype(int)):
        labels[y, x] = k + 1  # distinct pixels: each centre its own
    for k, (x, y) in enumerate(cells[:, :2].astype(int)):
        pieces = ndimage.label(labels == k + 1)[0]
        labels[(labels == k + 1) & (pieces != pieces[y, x])] = 0
    return labels


@pytest.mark.parametrize("seed", [0, 1])
def test_grow_instances_commutes_with_d4(seed):
    foreground, cells = random_scene(seed)
    labels = grow_instances(foreground, cells, 0.5, max_radius=9)
    sizes = np.bincount(labels.ravel(), minlength=len(cells) + 1)[1:]
    assert (sizes >= 1).all() and (sizes > 20).sum() >= 5  # a real test: many grown instances
    for g in D4.elements:
        turned = grow_instances(turn(g, foreground), turn_cells(g, cells, foreground.shape), 0.5, max_radius=9)
        np.testing.assert_array_equal(turned, turn(g, labels), err_msg=str(g))


def test_grow_instances_matches_brute_force_and_ignores_row_order():
    for seed, radius in [(2, 6), (3, 9.5), (4, 100)]:
        foreground, cells = random_scene(seed, (33, 45), 25)
        labels = grow_instances(foreground, cells, 0.5, radius)
        np.testing.assert_array_equal(labels, reference_instances(foreground, cells, 0.5, radius))
        order = np.random.default_rng(seed).permutation(len(cells))
        relabel = np.concatenate([[0], np.argsort(order) + 1])  # old label k -> its new row + 1
        np.testing.assert_array_equal(grow_instances(foreground, cells[order], 0.5, radius), relabel[labels])


def two_disks(shape=(25, 35)):
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    return (((cols - 10) ** 2 + (rows - 12) ** 2 <= 64) | ((cols - 24) ** 2 + (rows - 12) ** 2 <= 64)).astype(float)


def test_two_touching_disks_split_on_the_bisector():
    foreground = two_disks()
    cols = np.arange(foreground.shape[1])[None, :].repeat(foreground.shape[0], 0)
    labels = grow_instances(foreground, np.array([[10, 12, 1, 0.9], [24, 12, 1, 0.8]]), 0.5, 30)
    # the disks (radius 8, centres 14 px apart) overlap in columns 16 .. 18; the bisector is x = 17,
    # whose pixels lie at equal distance: the higher score (row 0) takes them
    expected = np.where(foreground > 0, np.where(cols <= 17, 1, 2), 0)
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize(("cells", "bisector_label"), [
    ([[10, 12, 1, 0.8], [24, 12, 1, 0.9]], 2),  # the higher score wins
    ([[10, 12, 2, 0.5], [24, 12, 1, 0.5]], 1),  # equal scores: the higher class
    ([[10, 12, 1, 0.5], [24, 12, 2, 0.5]], 2),
    ([[10, 12, 1, 0.5], [24, 12, 1, 0.5]], 1),  # an exact tie: the lower row index
    ([[10, 12, 1], [24, 12, 2]], 2),  # no scores: the class decides
])
def test_ties_on_the_bisector(cells, bisector_label):
    labels = grow_instances(two_disks(), np.array(cells, float), 0.5, 30)
    column = labels[:, 17]
    assert set(column[column > 0].tolist()) == {bisector_label}
    assert (labels[:, :17][labels[:, :17] > 0] == 1).all() and (labels[:, 18:][labels[:, 18:] > 0] == 2).all()


def test_a_centre_below_the_threshold_owns_its_pixel():
    foreground = np.zeros((20, 20))
    foreground[2:15, 2:15] = 0.9
    foreground[8, 8] = 0.2  # a hole under cell 2's centre
    cells = np.array([[4, 4, 1, 0.9], [8, 8, 2, 0.9], [17, 17, 1, 0.5]])  # cell 3 on background
    labels = grow_instances(foreground, cells, 0.5, 30)
    assert labels[8, 8] == 2 and (labels == 2).sum() == 1  # cell 2 has no component: only its pixel
    assert labels[17, 17] == 3 and (labels == 3).sum() == 1
    expected_one = foreground >= 0.5
    np.testing.assert_array_equal(labels == 1, expected_one)


def test_a_disconnected_piece_is_dropped():
    # a U: arms in columns 0..2 and 12..14 (rows 0..26), joined by the rows 24..26
    foreground = np.zeros((30, 18))
    foreground[0:27, 0:3] = foreground[0:27, 12:15] = foreground[24:27, 0:15] = 1
    labels = grow_instances(foreground, np.array([[1, 1, 1, 0.5], [7, 25, 1, 0.5]]), 0.5, 40)
    # the right arm's top (e.g. (13, 1): 12 px from cell 1, 24.7 from cell 2) is nearer to cell 1,
    # but cut off from its centre by cell 2's pixels: background
    assert labels[1, 13] == 0 and (labels[0:8, 12:15] == 0).all()
    assert labels[1, 1] == 1 and labels[5, 1] == 1 and labels[25, 7] == 2 and labels[25, 13] == 2
    assert ndimage.label(labels == 1)[1] == 1 and ndimage.label(labels == 2)[1] == 1
    # the same foreground with a corner-only neighbour: 8-connected to cell 1's blob, so assigned, then
    # dropped (not 4-connected to its centre)
    blob = np.zeros((10, 10))
    blob[2:5, 2:5] = blob[5, 5] = 1
    labels = grow_instances(blob, np.array([[3, 3, 1]]), 0.5, 30)
    np.testing.assert_array_equal(labels, (blob > 0) & ~((np.arange(10)[:, None] == 5) & (np.arange(10) == 5)))


@pytest.mark.parametrize("radius", [0, 3, 5.5])
def test_max_radius_is_respected(radius):
    foreground = np.ones((21, 21))
    labels = grow_instances(foreground, np.array([[10, 10, 1]]), 0.5, radius)
    rows, cols = np.mgrid[0:21, 0:21]
    np.testing.assert_array_equal(labels, ((cols - 10) ** 2 + (rows - 10) ** 2 <= radius ** 2).astype(np.int32))


def test_grow_instances_refuses_bad_input():
    with pytest.raises(ValueError, match="outside"):
        grow_instances(np.ones((5, 5)), np.array([[5, 1, 1]]))
    with pytest.raises(ValueError, match="rows"):
        grow_instances(np.ones((5, 5)), np.ones((2, 5)))
    assert grow_instances(np.ones((5, 5)), np.zeros((0, 4))).sum() == 0


def test_instance_classes_by_hand():
    labels = np.array([[1, 1, 0], [2, 0, 3]])
    probs = np.zeros((3, 2, 3))
    probs[1] = [[0.6, 0.2, 0.0], [0.3, 0.0, 0.25]]
    probs[2] = [[0.2, 0.4, 0.0], [0.6, 0.0, 0.25]]
    probs[0] = 1 - probs[1] - probs[2]
    classes, probability = instance_classes(probs, labels, 4)
    # 1: means (0.4, 0.3) -> class 1, 0.4 / 0.7; 2: (0.3, 0.6) -> 2, 0.6 / 0.9;
    # 3: (0.25, 0.25), a tie -> the higher class 2, 0.5; 4: no pixels -> 0, NaN
    assert classes.tolist() == [1, 2, 2, 0]
    np.testing.assert_allclose(probability[:3], [0.4 / 0.7, 0.6 / 0.9, 0.5])
    assert math.isnan(probability[3])
    with pytest.raises(ValueError):
        instance_classes(probs, labels, 2)


def disk(radius, size):
    rows, cols = np.mgrid[0:size, 0:size]
    return (((rows - size // 2) ** 2 + (cols - size // 2) ** 2) <= radius ** 2).astype(np.int32)


def test_measurements_of_a_disk_an_ellipse_an_l_and_a_pixel():
    r, mpp = 20, 0.25
    m = measure_instances(disk(r, 61), 1, mpp)
    assert m["area_um2"][0] == pytest.approx(math.pi * r * r * mpp * mpp, rel=0.01)
    # the contour through the midpoints between pixel centres zigzags on the digital circle: its
    # length is 134.7 px for r = 20, 7.2 % over 2 pi r (and what QuPath measures on the polygon)
    assert 2 * math.pi * r * mpp < m["perimeter_um"][0] < 1.08 * 2 * math.pi * r * mpp
    assert m["eccentricity"][0] < 0.05 and m["solidity"][0] > 0.97
    assert (m["centroid_x"][0], m["centroid_y"][0]) == (30.5, 30.5)

    a, b = 30, 15
    rows, cols = np.mgrid[0:50, 0:80]
    ellipse = ((((cols - 40) / a) ** 2 + ((rows - 25) / b) ** 2) <= 1).astype(np.int32)
    assert measure_instances(ellipse, 1, 1.0)["eccentricity"][0] == pytest.approx(math.sqrt(1 - b * b / (a * a)),
                                                                                   abs=0.02)

    letter = np.zeros((12, 12), np.int32)
    letter[0:10, 0:3] = letter[7:10, 3:10] = 1  # an L of 30 + 21 = 51 px in the box [0, 10]²
    # the outline cuts each of the 5 convex corners by a triangle of 1/8 and adds 1/8 at the concave
    # one: area 51 - 5/8 + 1/8 = 50.5. Its hull is the box less three corner triangles of 1/8 and
    # the part above the line from (3, 0.5) to (9.5, 7): the pentagon (2.5, 0) (10, 0) (10, 7.5)
    # (9.5, 7) (3, 0.5) of area 28.125, so 100 - 0.375 - 28.125 = 71.5
    m = measure_instances(letter, 1, 1.0)
    assert m["solidity"][0] == pytest.approx(50.5 / 71.5) and m["area_um2"][0] == 51

    pixel = np.zeros((4, 5), np.int32)
    pixel[1, 3] = 1
    m = measure_instances(pixel, 2, 0.5)  # instance 2 has no pixels
    assert m["area_um2"].tolist() == [0.25, 0.0] and m["eccentricity"][0] == 0 and m["solidity"][0] == 1
    assert m["perimeter_um"][0] == pytest.approx(4 * math.sqrt(0.5) * 0.5)  # a diamond through the edges' midpoints
    assert (m["centroid_x"][0], m["centroid_y"][0]) == (3.5, 1.5) and math.isnan(m["solidity"][1])


def test_outlines_are_valid_counter_clockwise_polygons_around_their_pixels_and_centres():
    foreground, cells = random_scene(5, (48, 64), 30)
    labels = grow_instances(foreground, cells, 0.5, 10)
    outlines = instance_outlines(labels, len(cells))
    shifted = instance_outlines(labels, len(cells), offset=(1000.0, 2000.5))
    perimeters = measure_instances(labels, len(cells), 1.0)["perimeter_um"]
    for k, (ring, (x, y)) in enumerate(zip(outlines, cells[:, :2])):
        assert np.array_equal(ring[0], ring[-1]) and len(ring) >= 5
        polygon = Polygon(ring)
        assert polygon.is_valid and polygon.exterior.is_ccw  # positive shoelace area: RFC 7946's rule
        count = (labels == k + 1).sum()
        assert abs(polygon.area - count) <= polygon.length and polygon.area > 0
        assert polygon.length == pytest.approx(perimeters[k])
        assert polygon.contains(Point(x + 0.5, y + 0.5))  # the centre's pixel centre
        rows, cols = np.nonzero(labels == k + 1)
        assert all(polygon.contains(Point(c + 0.5, r + 0.5)) for r, c in zip(rows, cols))
        np.testing.assert_array_equal(shifted[k], ring + [1000.0, 2000.5])
    single = np.zeros((3, 3), np.int32)
    single[0, 2] = 1
    ring = instance_outlines(single, 2)[0]
    assert Polygon(ring).area == 0.5 and Polygon(ring).is_valid
    assert instance_outlines(single, 2)[1].shape == (0, 2)


def test_polygon_features_for_qupath():
    labels = np.zeros((10, 10), np.int32)
    labels[1:4, 1:4], labels[6:9, 5:9] = 1, 3  # instance 2 has no pixels
    outlines = instance_outlines(labels, 3, offset=(100.0, 200.0))
    classes, probability = np.array([1, 0, 2]), np.array([0.75, np.nan, 0.6])
    measurements = measure_instances(labels, 3, 0.5)
    ids = ["00000000-0000-4000-8000-000000000001", "x", "00000000-0000-4000-8000-000000000003"]
    features = polygon_features(outlines, classes, probability, measurements, {1: "Background cell", 2: "Tumor cell"},
                                {1: (0, 0, 255), 2: (255, 0, 0)}, ids)
    assert len(features) == 2 and json.loads(json.dumps(features)) == features
    first, second = features
    assert first["id"] == ids[0] and second["id"] == ids[2]
    ring = first["geometry"]["coordinates"][0]
    assert first["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and ring[0] == [101.0, 201.5]
    properties = second["properties"]
    assert properties["objectType"] == "detection"
    assert properties["classification"] == {"name": "Tumor cell", "color": [255, 0, 0]}
    assert properties["measurements"] == {"Probability": 0.6, "Area µm^2": 3.0, "Length µm": round(
        measurements["perimeter_um"][2], 4), "Solidity": round(measurements["solidity"][2], 4), "Eccentricity": round(
        measurements["eccentricity"][2], 4)}
    assert set(MEASUREMENT_NAMES.values()) < set(properties["measurements"])
    assert "id" not in polygon_features(outlines, classes, probability, {}, {}, {})[0]


def one_stage_map(shape=(40, 48)):
    """A hand-made (4, H, W) probability map of a one-stage model: a BC cell at (x, y) = (12, 14) and a
    TC cell at (32, 20), each a Gaussian peak of its class over the background and a nucleus of radius 5
    (p = 0.9; 0.1 elsewhere). Inside the BC nucleus a strip of pixels leans TC, as a model's map can.
    """
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    probs = np.zeros((4, *shape), np.float32)
    for (x, y), cls in (((12, 14), 1), ((32, 20), 2)):
        d2 = (cols - x) ** 2 + (rows - y) ** 2
        probs[cls] = np.maximum(probs[cls], 0.95 * np.exp(-d2 / (2 * 4.0**2)))
        probs[3] = np.maximum(probs[3], np.where(d2 <= 25, 0.9, 0.1))
    strip = (rows == 10) & (abs(cols - 12) <= 2)  # the BC peak's 0.46-0.53 there, shared 45 : 55 with TC
    probs[2][strip], probs[1][strip] = 0.55 * probs[1][strip], 0.45 * probs[1][strip]
    probs[0] = 1 - probs[1] - probs[2]
    assert probs.min() >= 0
    return probs, rows, cols


def test_one_stage_instances_grow_nuclei_from_the_centres_with_one_class_each():
    from equiseg.config import DetectConfig
    from equiseg.detection.instances import cell_class_map, one_stage_instances
    from equiseg.evaluation.instance_metrics import blended_share

    probs, rows, cols = one_stage_map()
    detect = DetectConfig(sigma=1.0, min_distance=6, threshold=0.5)
    for given in (probs, torch.from_numpy(probs)):
        labels, cells = one_stage_instances(given, detect)
        assert labels.dtype == np.int32 and cells.shape == (2, 4)
        assert sorted(map(tuple, cells[:, :3].tolist())) == [(12.0, 14.0, 1.0), (32.0, 20.0, 2.0)]
        for k, (x, y, cls, probability) in enumerate(cells):
            disk = (cols - x) ** 2 + (rows - y) ** 2 <= 25
            np.testing.assert_array_equal(labels == k + 1, disk)  # the nucleus, nothing more
            # one class per instance: the mean class probability's; the strip does not make it TC
            classes, shares = instance_classes(probs[:3], labels, 2)
            assert classes[k] == cls and probability == pytest.approx(shares[k]) and 0.5 < probability <= 1
    # the per-pixel classes mix BC and TC inside the BC nucleus only: one instance of two is blended
    pixel_classes = cell_class_map(probs)
    assert pixel_classes.dtype == np.int64 and set(np.unique(pixel_classes)) == {1, 2}
    assert np.array_equal(pixel_classes, cell_class_map(probs[:3], classes=3))
    assert blended_share(labels, pixel_classes) == 0.5


def test_one_stage_instances_refuse_a_map_without_a_nucleus_channel():
    from equiseg.config import DetectConfig
    from equiseg.detection.instances import cell_class_map, one_stage_instances

    with pytest.raises(ValueError, match=r"p\(nucleus\) last, C >= 3, got \(2, 8, 8\)"):
        one_stage_instances(np.zeros((2, 8, 8)), DetectConfig())
    with pytest.raises(ValueError, match="at least one cell class"):
        cell_class_map(np.zeros((4, 8, 8)), classes=1)
