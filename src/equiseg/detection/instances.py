"""Cells as instances: the points of `equiseg.detection.peaks` grown into nucleus label images
on a foreground probability map, one class per instance, shape measurements, outlines as
polygons, and QuPath GeoJSON detections with Polygon geometry. Numpy in, numpy out (the
probability maps of `one_stage_instances` and `cell_class_map` may also be tensors).

Conventions shared by every function here:

* A cell row is (x, y, class[, score]) with x the column and y the row of its centre pixel
  (pixel indices, as `detect_cells` gives them). Label k of a label image is row k - 1
  (k = 1 .. N); 0 is background.
* Polygons and centroids are in continuous pixel coordinates: pixel (row i, column j) spans
  [j, j + 1) x [i, i + 1), so its centre is (j + 0.5, i + 0.5), as in ``slide/qupath.py``.
* Rings are closed (the first vertex repeated last) and run counter-clockwise by their numbers,
  i.e. their shoelace area is positive (``shapely``'s ``is_ccw``): RFC 7946's right-hand rule for
  exterior rings, read in a y-up frame. Drawn in the image's y-down frame they run clockwise.
  QuPath does not care: its reader (qupath-core ``ROITypeAdapters.parsePolygon``) builds a JTS
  ``LinearRing`` from the first ring as it comes (holes from the others) without checking or
  changing the orientation; JTS only asks that a ring be closed and have at least 4 points.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from equiseg.config import DetectConfig
from equiseg.data.targets import DEFAULT_RADIUS
from equiseg.detection.peaks import find_cells

# measure_instances' keys -> the QuPath measurement names that polygon_features writes; QuPath's own
# shape features use the same names ("Length" is its perimeter of an area), so that "Add shape
# features" in QuPath overwrites them with like values. The probability goes in as "Probability".
# Checked against qupath-core-processing ObjectMeasurements.java (commit 00262d7, 0.8.0-SNAPSHOT):
# "Area " + unit + "^2" and "Length " + unit, "Solidity" = the polygon's area / its convex hull's. QuPath's
# area is the polygon's; ours counts the nucleus's pixels (the outline's corners are cut, so a little more).
# QuPath's shape features have no eccentricity (its old cell detection wrote "Nucleus: Eccentricity").
MEASUREMENT_NAMES = {"area_um2": "Area µm^2", "perimeter_um": "Length µm", "solidity": "Solidity",
                     "eccentricity": "Eccentricity"}
NUCLEUS_THRESHOLD = 0.5  # the least p(nucleus) of an instance's pixel, unless a caller gives another
_EIGHT = np.ones((3, 3), bool)  # 8-connectivity for ndimage.label (its default is 4-connectivity)


@dataclass(frozen=True)
class _Cells:
    """The cell rows as columns: centre (x, y), class, score, and the centre's pixel (row, col)."""

    x: np.ndarray
    y: np.ndarray
    cls: np.ndarray
    score: np.ndarray
    row: np.ndarray
    col: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def _read_cells(cells: np.ndarray, shape: tuple[int, int]) -> _Cells:
    table = np.asarray(cells, dtype=np.float64)
    if table.size == 0:
        table = table.reshape(0, 3)
    if table.ndim != 2 or table.shape[1] not in (3, 4):
        raise ValueError(f"expected cells as (N, 3) or (N, 4) rows (x, y, class[, score]), got {table.shape}")
    if not np.isfinite(table).all():
        raise ValueError("cell rows must be finite (no NaN or infinite coordinates, classes or scores)")
    score = table[:, 3] if table.shape[1] == 4 else np.zeros(len(table))
    row, col = np.rint(table[:, 1]).astype(np.int64), np.rint(table[:, 0]).astype(np.int64)
    outside = (row < 0) | (row >= shape[0]) | (col < 0) | (col >= shape[1])
    if outside.any():
        raise ValueError(f"{int(outside.sum())} cell centre(s) lie outside the {shape[0]}x{shape[1]} map, "
                         f"the first at (x, y) = {tuple(table[outside][0, :2].tolist())}")
    return _Cells(table[:, 0], table[:, 1], table[:, 2], score, row, col)


def grow_instances(foreground: np.ndarray, cells: np.ndarray, threshold: float = NUCLEUS_THRESHOLD,
                   max_radius: float = DEFAULT_RADIUS) -> np.ndarray:
    """Nucleus instance labels grown from cell centres on a foreground probability map.

    A pixel belongs to the instance of a cell when its foreground is >= ``threshold``, it lies
    within ``max_radius`` px of the cell's centre (Euclidean, between pixel indices), in the
    same 8-connected foreground component as the centre's pixel, and that centre is its nearest
    such one: the watershed of the distance to the centres, restricted to the foreground.

    Ties: at equal distance the higher score wins, then the higher class; only exact ties of
    (distance, score, class) go to the lower row index. The rule does not depend on
    coordinates, so the result commutes with the D4 actions on the pixel grid: for every element
    g, ``grow_instances(T_g foreground, T_g cells) == T_g grow_instances(foreground, cells)``,
    exactly for centres on whole pixels (as `detect_cells` gives them) when there is no exact tie,
    and it does not depend on the order of the rows but for the labels' numbering.

    Then every cell owns its centre's pixel (the nearest pixel to (x, y)), even where the
    foreground is below the threshold, so that points and outlines always agree (two centres on one
    pixel: the tie rule picks one, the other gets no pixel); and each instance keeps only the
    4-connected piece holding its centre, the others becoming background. 4-connected, because
    the outlines (`instance_outlines`, contours at 0.5) part pixels that touch only at a corner.

    Each cell is handled in its own window of ``2 max_radius + 1`` px square (the cost grows with
    the cells' number times the window's area, not with the map's).

    Args:
        foreground: (H, W) nucleus foreground probabilities (e.g. 1 - p(background)).
        cells: (N, 3) or (N, 4) rows (x, y, class[, score]) of centres inside the map (without
            scores all are equal, so the class decides ties).
        threshold: the least foreground of a pixel of an instance.
        max_radius: the farthest a pixel of an instance lies from its centre, px (the default is
            the radius of the disks that the models learn, `equiseg.data.targets.DEFAULT_RADIUS`).

    Returns:
        (H, W) int32 labels: k for row k - 1 of ``cells``, 0 background.

    Raises:
        ValueError: the map is not 2-D, a cell row is not finite or a centre lies outside the map.
    """
    fg = np.asarray(foreground)
    if fg.ndim != 2:
        raise ValueError(f"expected an (H, W) foreground map, got shape {fg.shape}")
    if max_radius < 0:
        raise ValueError(f"max_radius must be >= 0, got {max_radius}")
    table = _read_cells(cells, (fg.shape[0], fg.shape[1]))
    components, _ = _label(fg >= threshold, _EIGHT)
    labels = _nearest_within(components, table, float(max_radius))
    return settle_instances(labels, table)


def settle_instances(labels: np.ndarray, cells: np.ndarray | _Cells) -> np.ndarray:
    """``labels`` (H, W) int32 made to agree with the cells' points, in place, and returned: every cell
    owns its centre's pixel (cells on one pixel: the tie rule of `grow_instances`), then each instance
    keeps only the 4-connected piece holding its centre. Label k is row k - 1 of ``cells`` ((N, 3) or
    (N, 4) rows (x, y, class[, score])).
    """
    table = cells if isinstance(cells, _Cells) else _read_cells(cells, (labels.shape[0], labels.shape[1]))
    _own_centres(labels, table)
    _keep_centre_pieces(labels, table)
    return labels


def _label(mask: np.ndarray, structure: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``ndimage.label`` (4-connected without a structure), typed: (labels, count)."""
    from scipy import ndimage  # imported where used: scipy.ndimage costs predict's start-up
    return cast(tuple[np.ndarray, int], ndimage.label(mask, structure=structure))


def _nearest_within(components: np.ndarray, cells: _Cells, max_radius: float) -> np.ndarray:
    """Each foreground pixel's nearest centre (ties as `grow_instances` says) among the centres
    within ``max_radius`` px in its component; one bounded window per cell.
    """
    height, width = components.shape
    labels = np.zeros((height, width), np.int32)
    best = np.full((height, width), np.inf)  # the winner's squared distance, score and class
    best_score = np.full((height, width), -np.inf)
    best_class = np.full((height, width), -np.inf)
    reach, limit = min(max_radius, height + width), max_radius * max_radius
    for k in range(len(cells)):  # in row order: an exact tie keeps the earlier row
        component = components[cells.row[k], cells.col[k]]
        if component == 0:
            continue
        x, y, score, cls = cells.x[k], cells.y[k], cells.score[k], cells.cls[k]
        y0, y1 = max(0, math.floor(y - reach)), min(height, math.ceil(y + reach) + 1)
        x0, x1 = max(0, math.floor(x - reach)), min(width, math.ceil(x + reach) + 1)
        rows, cols = np.ogrid[y0:y1, x0:x1]
        d2 = (cols - x) ** 2 + (rows - y) ** 2
        here, here_score, here_class = best[y0:y1, x0:x1], best_score[y0:y1, x0:x1], best_class[y0:y1, x0:x1]
        beats = (d2 < here) | ((d2 == here) & ((score > here_score) | ((score == here_score) & (cls > here_class))))
        win = beats & (d2 <= limit) & (components[y0:y1, x0:x1] == component)
        here[win] = d2[win]
        here_score[win] = score
        here_class[win] = cls
        labels[y0:y1, x0:x1][win] = k + 1
    return labels


def _own_centres(labels: np.ndarray, cells: _Cells) -> None:
    """Give each centre's pixel to its cell; cells sharing a pixel: the tie rule of `grow_instances`."""
    if not len(cells):
        return
    pixel = cells.row * labels.shape[1] + cells.col
    d2 = (cells.col - cells.x) ** 2 + (cells.row - cells.y) ** 2
    order = np.lexsort((np.arange(len(cells)), -cells.cls, -cells.score, d2, pixel))
    first = np.ones(len(order), bool)
    first[1:] = pixel[order][1:] != pixel[order][:-1]
    winners = order[first]
    labels.reshape(-1)[pixel[winners]] = winners + 1


def _keep_centre_pieces(labels: np.ndarray, cells: _Cells) -> None:
    """Clear every pixel of an instance outside the 4-connected piece that holds its centre."""
    from scipy import ndimage  # imported where used: scipy.ndimage costs predict's start-up
    for k, box in enumerate(ndimage.find_objects(labels, max_label=len(cells))):
        if box is None:
            continue
        region = labels[box]  # a view: writes go to labels
        mine = region == k + 1
        r, c = cells.row[k] - box[0].start, cells.col[k] - box[1].start
        if not (0 <= r < mine.shape[0] and 0 <= c < mine.shape[1] and mine[r, c]):
            region[mine] = 0  # lost its centre's pixel to a cell on the same pixel
            continue
        pieces, count = _label(mine)
        if count > 1:
            region[mine & (pieces != pieces[r, c])] = 0


def instance_classes(probs: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One class per instance from class probability maps.

    For each instance, the mean of each cell class's probability over its pixels; its class is
    the one with the largest mean (ties go to the higher class), and its probability is that mean
    divided by the sum of the cell classes' means (where all are 0: 1 / (C - 1)).

    Args:
        probs: (C, H, W) class probabilities, channel 0 background, 1 .. C-1 the cell classes.
        labels: (H, W) instance labels 0 .. n (as `grow_instances` gives).
        n: the number of instances (labels 1 .. n).

    Returns:
        ``classes`` (n,) int64 in 1 .. C-1, and ``probability`` (n,) float64; an instance without
        pixels has class 0 and probability NaN.

    Raises:
        ValueError: the shapes disagree, or a label lies outside 0 .. n.
    """
    probs, flat = np.asarray(probs), _flat_labels(labels, n)
    if probs.ndim != 3 or probs.shape[0] < 2 or probs.shape[1:] != np.shape(labels):
        raise ValueError(f"expected (C, H, W) probabilities with C >= 2 over the {np.shape(labels)} labels, "
                         f"got {probs.shape}")
    counts = np.bincount(flat, minlength=n + 1)[1:n + 1]
    sums = np.stack([np.bincount(flat, weights=probs[c].reshape(-1), minlength=n + 1)[1:n + 1]
                     for c in range(1, probs.shape[0])])  # (C - 1, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    cell_classes = probs.shape[0] - 1
    index = cell_classes - 1 - np.argmax(means[::-1], axis=0)  # the last maximum: ties to the higher class
    best, total = means[index, np.arange(n)], means.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        probability = np.where(total > 0, best / np.where(total > 0, total, 1), 1 / cell_classes)
    empty = counts == 0
    return np.where(empty, 0, index + 1).astype(np.int64), np.where(empty, np.nan, probability)


def _nucleus_map(probs: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``probs`` as a (C, H, W) float32 CPU tensor of class probabilities and p(nucleus) last, C >= 3."""
    maps = torch.as_tensor(probs).detach().cpu().float()
    if maps.ndim != 3 or maps.shape[0] < 3:
        raise ValueError("expected (C, H, W) probabilities of the classes (channel 0 background) and p(nucleus) "
                         f"last, C >= 3, got {tuple(maps.shape)}")
    return maps


def one_stage_instances(probs: np.ndarray | torch.Tensor, detect: DetectConfig, threshold: float = NUCLEUS_THRESHOLD,
                        max_radius: float = DEFAULT_RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """The cells of a one-stage model (a cell U-Net with a nucleus output, ``data.nuclei``) as instances.

    The cells are found on the class channels (`find_cells` with ``detect``), grown into instances
    on p(nucleus) (`grow_instances`, each cell with its detection probability as its score), and each
    instance gets the one class of the largest mean class probability inside it (`instance_classes`),
    so a class never changes inside an outline.

    Args:
        probs: (C, H, W) probabilities, as `equiseg.models.unet.probabilities` gives them: channels
            0 .. C - 2 the classes (0 background, then BC, TC), channel C - 1 p(nucleus); C = 4 for
            a cell model.
        detect: the run's detection settings (``config.detect``).
        threshold: the least p(nucleus) of an instance's pixel.
        max_radius: the farthest a pixel of an instance lies from its centre, px.

    Returns:
        ``labels`` (H, W) int32 (k: the cell of row k - 1, 0 background) and ``cells`` (N, 4) float64
        rows (x, y, class, probability): the detected centre, its instance's class and that class's
        share of the instance's mean cell-class probabilities (a cell whose instance has no pixel,
        which cannot happen for cells at least a pixel apart, keeps its detected class and probability).

    Raises:
        ValueError: ``probs`` is not (C, H, W) with C >= 3.
    """
    maps = _nucleus_map(probs)
    return instances_of_cells(maps, find_cells(maps[:-1], detect), threshold, max_radius)


def instances_of_cells(probs: np.ndarray | torch.Tensor, found: np.ndarray, threshold: float = NUCLEUS_THRESHOLD,
                       max_radius: float = DEFAULT_RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """`one_stage_instances` for cells already found (``found`` (N, 4) rows (x, y, class, probability), as
    a streamed detector gives them): grown on p(nucleus), one class each. Returns (labels, cells).
    """
    maps = _nucleus_map(probs)
    classes = maps[:-1]
    labels = grow_instances(maps[-1].numpy(), found, threshold, max_radius)
    cls, probability = instance_classes(classes.numpy(), labels, len(found))
    cells = np.asarray(found, np.float64).reshape(-1, 4).copy()
    kept = cls > 0
    cells[kept, 2], cells[kept, 3] = cls[kept], probability[kept]
    return labels, cells


def cell_class_map(probs: np.ndarray | torch.Tensor, classes: int | None = None) -> np.ndarray:
    """(H, W) int64 the most probable cell class of each pixel, background left out: 1 + the argmax
    over channels 1 .. ``classes`` - 1 (ties to the higher class, as `instance_classes` breaks them).
    With the instance labels, what `equiseg.evaluation.instance_metrics.blended_share` reads to count
    the instances whose pixels mix BC and TC.

    Args:
        probs: (C, H, W) probabilities, channel 0 background.
        classes: the class channels (3 for cells); None: all but the last (a map with p(nucleus) last,
            as `one_stage_instances` takes it).
    """
    maps = torch.as_tensor(probs).detach().cpu()
    count = (maps.shape[0] - 1 if maps.ndim else 0) if classes is None else classes
    if maps.ndim != 3 or not 2 <= count <= maps.shape[0]:
        raise ValueError(f"expected (C, H, W) probabilities with background and at least one cell class among "
                         f"{count} class channels, got {tuple(maps.shape)}")
    cell = maps[1:count].numpy()  # (count - 1, H, W)
    return (count - 1 - np.argmax(cell[::-1], axis=0)).astype(np.int64)


def _flat_labels(labels: np.ndarray, n: int) -> np.ndarray:
    flat = np.asarray(labels).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() > n):
        raise ValueError(f"labels must lie in 0 .. {n}, got {flat.min()} .. {flat.max()}")
    return flat.astype(np.int64, copy=False)


def _instances(labels: np.ndarray, n: int) -> Iterator[tuple[int, np.ndarray, int, int]]:
    """(k, mask, row0, col0) for each instance k = 0 .. n-1 with pixels: its mask in its bounding box."""
    from scipy import ndimage  # imported where used: scipy.ndimage costs predict's start-up
    labels = np.asarray(labels)
    _flat_labels(labels, n)
    for k, box in enumerate(ndimage.find_objects(labels.astype(np.int64, copy=False), max_label=n)):
        if box is not None:
            yield k, labels[box] == k + 1, box[0].start, box[1].start


def _ring(mask: np.ndarray) -> np.ndarray:
    """The outer ring (M, 2) of (x, y) of a boolean mask's pixels, pixel (i, j) spanning [j, j + 1) x
    [i, i + 1): contourpy's filled contour at 0.5 of the mask padded by a pixel, the longest ring
    (holes ignored), closed, counter-clockwise by its numbers (contourpy's outer rings are).
    """
    import contourpy
    padded = np.pad(mask, 1).astype(np.float64)
    generator = contourpy.contour_generator(z=padded, fill_type=contourpy.FillType.OuterOffset)
    # with FillType.OuterOffset: (points, offsets), one array of each per outline; its outer ring first
    points, offsets = cast(tuple[list[np.ndarray], list[np.ndarray]], generator.filled(0.5, 2.0))
    rings = [outline[cuts[0]:cuts[1]] for outline, cuts in zip(points, offsets)]
    ring = max(rings, key=_length)
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.concatenate([ring, ring[:1]])
    # padded index i is pixel i - 1, whose centre lies at i - 1 + 0.5
    return ring.astype(np.float64) - 0.5


def _length(ring: np.ndarray) -> float:
    return float(np.hypot(*np.diff(ring, axis=0).T).sum())


def _area(ring: np.ndarray) -> float:
    """The signed (shoelace) area of a closed ring: positive when counter-clockwise by its numbers."""
    x, y = ring[:, 0], ring[:, 1]
    return float(0.5 * (x[:-1] * y[1:] - x[1:] * y[:-1]).sum())


def _solidity(ring: np.ndarray) -> float:
    from scipy.spatial import ConvexHull, QhullError  # pyright: ignore[reportAttributeAccessIssue]
    area = abs(_area(ring))
    try:
        hull = float(ConvexHull(ring[:-1]).volume)  # in 2-D its "volume" is the area
    except QhullError:
        return 1.0
    return min(1.0, area / hull) if hull > 0 else 1.0


def _eccentricity(mask: np.ndarray) -> float:
    """sqrt(1 - l2 / l1) of the pixels' inertia tensor's eigenvalues l1 >= l2 (scikit-image's
    ``regionprops``); 0 when l1 is 0 (a single pixel).
    """
    rows, cols = np.nonzero(mask)
    dr, dc = rows - rows.mean(), cols - cols.mean()
    a, b, c = (dc * dc).mean(), (dc * dr).mean(), (dr * dr).mean()  # the central moments over the count
    half, spread = (a + c) / 2, math.hypot((a - c) / 2, b)
    l1, l2 = half + spread, max(0.0, half - spread)
    return math.sqrt(max(0.0, 1 - l2 / l1)) if l1 > 0 else 0.0


def measure_instances(labels: np.ndarray, n: int, mpp: float) -> dict[str, np.ndarray]:
    """Shape measurements of each instance, in its own bounding box.

    Args:
        labels: (H, W) instance labels 0 .. n.
        n: the number of instances.
        mpp: µm per pixel.

    Returns:
        (n,) float64 arrays: ``area_um2`` (pixel count x mpp²), ``perimeter_um`` (the length of
        the `instance_outlines` polygon x mpp), ``solidity`` (the polygon's area over its convex
        hull's; 1.0 for a degenerate hull), ``eccentricity`` (scikit-image's ``regionprops``
        definition from the pixels' second central moments; 0 for a single pixel), ``centroid_x``
        and ``centroid_y`` (the mean pixel centre, continuous coordinates, px). An instance
        without pixels has area 0 and NaN elsewhere.
    """
    out = {key: np.full(n, np.nan) for key in ("area_um2", "perimeter_um", "solidity", "eccentricity",
                                               "centroid_x", "centroid_y")}
    out["area_um2"][:] = 0.0
    for k, mask, row0, col0 in _instances(labels, n):
        ring = _ring(mask)
        rows, cols = np.nonzero(mask)
        out["area_um2"][k] = len(rows) * mpp * mpp
        out["perimeter_um"][k] = _length(ring) * mpp
        out["solidity"][k] = _solidity(ring)
        out["eccentricity"][k] = _eccentricity(mask)
        out["centroid_x"][k] = col0 + cols.mean() + 0.5
        out["centroid_y"][k] = row0 + rows.mean() + 0.5
    return out


def instance_outlines(labels: np.ndarray, n: int, offset: tuple[float, float] = (0.0, 0.0)) -> list[np.ndarray]:
    """Each instance's outer boundary as a closed polygon.

    The filled contour at 0.5 (contourpy) of the instance's mask padded by a pixel: vertices on
    the edges' midpoints between pixel centres, corners cut, so that a disk's outline is round
    and a single pixel gives a diamond of area 1/2. The longest ring is kept (after
    `grow_instances`, an instance is 4-connected and has just one); holes are ignored.

    Args:
        labels: (H, W) instance labels 0 .. n.
        n: the number of instances.
        offset: (x, y) added to every vertex, e.g. the map's level-0 corner on a slide.

    Returns:
        n arrays (M, 2) float64 of (x, y) in continuous pixel coordinates (pixel (row i, column j)
        spans [j, j + 1) x [i, i + 1)), the first vertex repeated last, counter-clockwise by
        their numbers (positive shoelace area; clockwise as drawn with y down); (0, 2) for an
        instance without pixels.
    """
    outlines = [np.zeros((0, 2)) for _ in range(n)]
    for k, mask, row0, col0 in _instances(labels, n):
        outlines[k] = _ring(mask) + np.array([col0 + offset[0], row0 + offset[1]])
    return outlines


def polygon_features(outlines: Sequence[np.ndarray], classes: np.ndarray, probability: np.ndarray,
                     measurements: Mapping[str, np.ndarray], names: Mapping[int, str],
                     colours: Mapping[int, Sequence[int]], ids: Sequence[str] | None = None) -> list[dict]:
    """QuPath detections with Polygon geometry, as GeoJSON Feature dicts (``json.dumps`` writes them).

    Built as ``slide/qupath.py`` builds its Point detections: ``properties.objectType``
    "detection", ``classification`` {name, color}, ``measurements`` a plain object of numbers:
    "Probability" and, of the `measure_instances` keys present, `MEASUREMENT_NAMES` ("Area µm^2",
    "Length µm" (QuPath's name for a perimeter), "Solidity", "Eccentricity"), rounded to 4
    decimals; the centroids are left to QuPath. Coordinates are rounded to 2 decimals (as QuPath
    writes them). Instances without pixels (an empty outline) are left out.

    Args:
        outlines: n closed rings (M, 2) (x, y), as `instance_outlines` gives them (with the offset
            that puts them in level-0 slide pixels).
        classes, probability: (n,) as `instance_classes` gives them.
        measurements: (n,) arrays by `measure_instances` key.
        names, colours: each class's QuPath name and (r, g, b) colour (a class not named: its
            number and black).
        ids: n UUID strings for the features' ``id`` (QuPath refuses other ids); none by default,
            and QuPath makes its own.

    Returns:
        One Feature dict per instance with pixels, in label order.

    Raises:
        ValueError: a probability or measurement of an instance with an outline is not finite.
    """
    features = []
    for k, ring in enumerate(outlines):
        if len(ring) == 0:
            continue
        values = {"Probability": float(probability[k])}
        values |= {name: float(measurements[key][k]) for key, name in MEASUREMENT_NAMES.items() if key in measurements}
        if not all(math.isfinite(v) for v in values.values()):
            raise ValueError(f"instance {k + 1} has non-finite values: {values}")
        cls = int(classes[k])
        feature: dict = {"type": "Feature"}
        if ids is not None:
            feature["id"] = str(ids[k])
        feature["geometry"] = {"type": "Polygon", "coordinates": [np.round(np.asarray(ring, np.float64), 2).tolist()]}
        feature["properties"] = {"objectType": "detection", "isLocked": False,
                                 "classification": {"name": names.get(cls, str(cls)),
                                                    "color": [int(v) for v in colours.get(cls, (0, 0, 0))]},
                                 "measurements": {name: round(v, 4) for name, v in values.items()}}
        features.append(feature)
    return features
