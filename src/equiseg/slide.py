"""``equiseg slide``: cells (and tissue) on whole-slide images, as files a pathologist opens in QuPath.

A slide goes through in four steps, each in bounded memory whatever its size:

1. **Where**: the tissue on the glass, from a low-resolution read (`find_tissue`);
   windows with no tissue under them are not run, and no cell off the tissue is reported.
2. **Tissue** (a tissue model, when given): the slide at the tissue model's training
   resolution (``Run.resolution``: OCELOT's tissue patches are about 0.8 µm/px), in
   overlapping tiles blended as ``equiseg predict`` blends them; the probabilities are kept in
   a float16 file for step 3 and drawn as tissue-class polygons.
3. **Cells**: the slide at the cell model's resolution (about 0.2 µm/px), streamed in blocks of
   overlapping tiles (`stream_blocks`) and read by the
   block detector (`BlockDetector`), exactly as
   ``equiseg predict`` reads one large image: so the cells of a region equal ``predict``'s on the
   same region cut out at that resolution, and each cell is reported once, however the tiles
   fall. A cell model with tissue context takes, for each tile, its block of step 2's
   probabilities resampled onto its grid: the geometry of an OCELOT pair
   (`tissue_crop`).
4. **Outputs**, in level-0 pixels of the slide (see `SlideOutputs`).

A slide interrupted in step 3 resumes from the last block row it finished (``--resume``);
slides whose outputs are complete are skipped.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import contourpy
import lightning
import numpy as np
import torch
from PIL import Image
from torch import nn

from equiseg.config import Config
from equiseg.data.context import ContextKind
from equiseg.data.ocelot import CELL_CLASSES, Resolution
from equiseg.data.targets import Task, tissue_crop
from equiseg.data.wsi import ScaledView, Slide, TissueMask, find_tissue
from equiseg.evaluation.detection import BlockDetector, detection_halo, suppress_peaks
from equiseg.evaluation.inference import Skip, StreamState, block_count, model_runtime, stream_blocks
from equiseg.evaluation.predict import NpyBlocks
from equiseg.files import written_whole
from equiseg.report.pictures import CELL_COLOURS, TISSUE_COLOURS, dot_radius, draw_points
from equiseg.runs import Run, load_model
from equiseg.runtime import Runtime

# QuPath's names for the two OCELOT cell classes (BC, TC), and the colours of equiseg's pictures
CELL_NAMES = {1: "Background cell", 2: "Tumor cell"}
TISSUE_NAMES = {1: "Cancer area"}
TISSUE_CONTEXT_UM = 300.0  # µm of tissue the tissue model sees beyond a --region on each side
THUMBNAIL_SIDE = 2048  # px: the thumbnail's longer side at most
TISSUE_MAP_DTYPE = np.float16  # the tissue probabilities on disk: 4 bytes a tissue-model pixel
STRIPE_SIDE = 16384  # px of the cell model's view: the slide goes through in stripes about this wide
SAVE_EVERY_S = 60.0  # the cell pass saves its state at the end of a block row once this long has passed
_UUID_NAMESPACE = uuid.UUID("4f1c3a52-8e0b-4b7e-9a51-3d2f6c0e7b19")  # equiseg's: cell ids repeat across runs


@dataclass(frozen=True)
class SlideModel:
    """A trained model with the resolution it runs at.

    Attributes:
        model: eval mode.
        config: its run's config.
        resolution: µm per pixel of the data it trained on.
        source: the run folder or checkpoint it came from.
    """

    model: nn.Module
    config: Config
    resolution: Resolution
    source: Path

    @classmethod
    def load(cls, path: Path | str, device: str | torch.device = "cpu",
             resolution: Resolution | None = None) -> SlideModel:
        """The model of a run folder or checkpoint, with its run's resolution (``resolution``
        replaces it; needed for a checkpoint outside a run folder that recorded none)."""
        path = Path(path)
        model, config = load_model(path, device)
        resolution = resolution or Run.of(path).resolution()
        if resolution is None:
            raise ValueError(f"{path}: the run does not record the resolution of its training data "
                             "(resolution.yaml, or its dataset's metadata.json); give it with --cell-mpp/--tissue-mpp")
        return cls(model, config, resolution, path)

    def identity(self) -> dict[str, object]:
        m = self.config.model
        return {"source": str(self.source.resolve()), "task": self.config.task.value, "family": m.family.value,
                "width": m.width, "depth": m.depth, **self.resolution.to_dict()}


def load_slide_models(model: Path | str, tissue_model: Path | str | None = None, device: str | torch.device = "cpu",
                      cell_mpp: float | None = None) -> tuple[SlideModel, SlideModel | None]:
    """The cell model and the tissue model a slide analysis runs, as ``equiseg slide`` loads them.

    ``tissue_model`` defaults to the one the cell model's config names (``data.tissue_model``),
    and may stay None. ``cell_mpp`` runs the cell model at that resolution (µm/px) instead of its
    training data's; its tissue resolution stays the recorded one (4x the cell's without a record).

    Raises:
        ValueError: ``cell_mpp`` not positive, or no recorded resolution and none given.
    """
    resolution = None
    if cell_mpp is not None:
        if not cell_mpp > 0:
            raise ValueError(f"--cell-mpp must be positive, got {cell_mpp}")
        recorded = Run.of(model).resolution()
        resolution = Resolution(cell_mpp, recorded.tissue_mpp if recorded else 4 * cell_mpp)
    cells = SlideModel.load(model, device, resolution)
    tissue_source = tissue_model or cells.config.data.tissue_model
    return cells, SlideModel.load(tissue_source, device) if tissue_source else None


@dataclass(frozen=True)
class SlideOutputs:
    """The files ``equiseg slide`` writes for one slide into its output folder.

    - ``STEM.cells.geojson``: a FeatureCollection of Point detections that QuPath (0.4 and
      later) imports by drag and drop onto the open slide: ``properties.objectType``
      "detection", ``classification`` {name, color}, ``measurements`` {"Probability": p};
      coordinates in level-0 px, continuous (a pixel's centre is i + 0.5), used by QuPath as
      they are. Checked against QuPath's reader (qupath-core ``QuPathTypeAdapters.java`` and
      ``GsonTools.java`` at commit e7662d8, 0.8.0-SNAPSHOT, the same since v0.4.0): a
      classification object without ``color`` is refused, ``measurements`` may be a plain
      object of numbers, an ``id`` must be a UUID, unknown properties are ignored.
    - ``STEM.cells.csv``: x, y (the level-0 pixel holding the cell's centre), x_um, y_um (its
      centre from the slide's top-left corner, µm), class (1 BC, 2 TC), name, probability.
    - ``STEM.tissue.geojson`` (with a tissue model): the tissue found (annotation "Tissue")
      and the tissue model's cancer areas (annotation "Cancer area"), polygons with holes.
    - ``STEM.thumbnail.png``: the analysed box with the cells drawn.
    - ``STEM.summary.json``: counts per class, tumour-cell fraction, tissue area analysed (mm²),
      timings, the models' and the slide's identity. Written last: its presence means the
      slide is done.
    """

    folder: Path
    stem: str

    def _file(self, suffix: str) -> Path:
        return self.folder / f"{self.stem}.{suffix}"

    @property
    def cells_geojson(self) -> Path:
        return self._file("cells.geojson")

    @property
    def cells_csv(self) -> Path:
        return self._file("cells.csv")

    @property
    def tissue_geojson(self) -> Path:
        return self._file("tissue.geojson")

    @property
    def thumbnail(self) -> Path:
        return self._file("thumbnail.png")

    @property
    def summary(self) -> Path:
        return self._file("summary.json")

    @property
    def work(self) -> Path:
        """Working files (tissue probabilities, resume state), removed when the slide is done."""
        return self.folder / f".{self.stem}.work"


@dataclass(frozen=True)
class SlideCells:
    """What ``equiseg slide`` found on one slide.

    Attributes:
        slide: the slide file.
        points: (N, 4) rows (x, y, class, probability): x, y continuous level-0 px.
        summary: what ``STEM.summary.json`` holds.
        outputs: where the files are.
    """

    slide: Path
    points: np.ndarray
    summary: dict
    outputs: SlideOutputs


@dataclass
class _Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


Progress = Callable[[str, int, int], None]
"""(stage, done, total), called as the work goes."""


def parse_region(text: str) -> tuple[int, int, int, int]:
    """``x,y,w,h`` (level-0 px) as a tuple of ints."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--region must be x,y,w,h in level-0 pixels, got {text!r}") from None
    return x, y, w, h


def _check_region(slide: Slide, region: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    if region is None:
        return 0, 0, slide.width, slide.height
    x, y, w, h = region
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > slide.width or y + h > slide.height:
        raise ValueError(f"{slide.path.name}: region {x},{y},{w},{h} is not inside the "
                         f"{slide.width}x{slide.height} slide")
    return region


def _window_box(view: ScaledView, window: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
    """A window (top, left, h, w) of a view as a level-0 box (x0, y0, x1, y1)."""
    top, left, h, w = window
    (x0, x1), (y0, y1) = view.level0(np.array([left, left + w]), np.array([top, top + h]))
    return float(x0), float(y0), float(x1), float(y1)


def _glass(view: ScaledView, tissue: TissueMask, classes: int) -> Skip:
    return Skip(lambda window: not tissue.any_in(*_window_box(view, window)), classes)


class TissueMap:
    """A tissue model's probabilities over a view of the slide, on disk as (C, H, W)
    `TISSUE_MAP_DTYPE` (float16: the context differs from float32's by at most 5e-4, half
    the disk: about 6 MB per mm² of slide), and how a cell window of another view takes its
    block of them."""

    def __init__(self, path: Path, view: ScaledView) -> None:
        self.path, self.view = path, view
        self.probs = np.load(path, mmap_mode="r")

    def context(self, cell_view: ScaledView, window: tuple[int, int, int, int]) -> torch.Tensor:
        """(C, h, w) float32: the probabilities over ``window`` of ``cell_view`` resampled
        bilinearly onto its grid (zero outside this map), as an OCELOT pair's cell patch takes
        its block of the tissue patch."""
        _, _, h, w = window
        x0, y0, x1, y1 = _window_box(cell_view, window)
        tissue = self.view
        # the block in the map's continuous px, and the map's rows and columns around it
        # (bilinear samples read their four neighbours; one more on each side is plenty)
        bx0, bx1 = (x0 - tissue.x0) / tissue.scale, (x1 - tissue.x0) / tissue.scale
        by0, by1 = (y0 - tissue.y0) / tissue.scale, (y1 - tissue.y0) / tissue.scale
        _, height, width = self.probs.shape
        r0, r1 = max(0, math.floor(by0) - 2), min(height, math.ceil(by1) + 2)
        c0, c1 = max(0, math.floor(bx0) - 2), min(width, math.ceil(bx1) + 2)
        if r0 >= r1 or c0 >= c1:
            return torch.zeros(self.probs.shape[0], h, w)
        part = torch.from_numpy(np.array(self.probs[:, r0:r1, c0:c1], np.float32))
        block = torch.tensor([[bx0 - c0, by0 - r0, bx1 - c0, by1 - r0]], dtype=torch.float64)
        return tissue_crop(part[None], block, (h, w), mode="bilinear")[0]


def _tissue_pass(model: SlideModel, slide: Slide, box: tuple[int, int, int, int], tissue: TissueMask,
                 path: Path, tile: int, overlap: int, runtime: Runtime,
                 progress: Progress | None) -> TissueMap:
    """Run the tissue model over ``box`` at its resolution into ``path`` (float16 .npy)."""
    view = ScaledView(slide, model.resolution.tissue_mpp, box)
    classes = len(model.config.task.class_names)
    total = block_count(view.height, view.width, tile, overlap)
    npy = NpyBlocks(path, (classes, view.height, view.width), TISSUE_MAP_DTYPE)
    for k, (top, left, block) in enumerate(stream_blocks(model.model, view.window, view.height, view.width, tile,
                                                         overlap, runtime, skip=_glass(view, tissue, classes))):
        npy.write(top, left, block)
        if progress is not None:
            progress("tissue", k + 1, total)
    return TissueMap(path, view)


def _tissue_polygons(tissue_map: TissueMap | None, tissue: TissueMask, box: tuple[int, int, int, int]) -> dict:
    """A FeatureCollection of annotations: the tissue found, and the tissue model's cancer areas
    inside it, on the tissue mask's grid (level-0 coordinates)."""
    x, y, w, h = box
    rows, cols = tissue.pixels(x, y, x + w, y + h)
    found = tissue.mask[rows, cols]
    layers = [("Tissue", (120, 120, 120), found)]
    if tissue_map is not None:
        # the map's mean probability per mask pixel, read a strip of mask rows at a time
        cancer = np.zeros(found.shape, bool)
        view, probs = tissue_map.view, tissue_map.probs
        for i in range(found.shape[0]):
            top = ((rows.start + i) * tissue.scale - view.y0) / view.scale
            bottom = ((rows.start + i + 1) * tissue.scale - view.y0) / view.scale
            a, b = max(0, int(top)), min(probs.shape[1], max(int(top) + 1, int(bottom)))
            if a >= b:
                continue
            strip = np.asarray(probs[1, a:b], np.float32).mean(axis=0)  # (W,)
            edges = ((np.arange(cols.start, cols.start + found.shape[1] + 1) * tissue.scale - view.x0) / view.scale)
            edges = np.clip(edges.astype(np.int64), 0, probs.shape[2])
            sums = np.add.reduceat(np.append(strip, 0), edges[:-1])
            counts = np.maximum(np.diff(edges), 1)
            cancer[i] = (sums / counts > 0.5) & (np.diff(edges) > 0)
        layers.append((TISSUE_NAMES[1], TISSUE_COLOURS[1], cancer & found))
    features = []
    for name, colour, mask in layers:
        for polygon in _polygons(mask):
            # mask pixel j's centre is at level-0 (start + j + 0.5) * scale
            rings = [[[round((cols.start + px + 0.5) * tissue.scale, 2), round((rows.start + py + 0.5) * tissue.scale, 2)]
                      for px, py in ring] for ring in polygon]
            features.append({"type": "Feature", "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{name}{rings[0][:3]}")),
                             "geometry": {"type": "Polygon", "coordinates": rings},
                             "properties": {"objectType": "annotation", "isLocked": False,
                                            "classification": {"name": name, "color": list(colour)}}})
    return {"type": "FeatureCollection", "features": features}


def _polygons(mask: np.ndarray) -> list[list[list[tuple[float, float]]]]:
    """The outlines of a boolean map's regions, each an outer ring then its holes, closed rings
    of (x, y) in pixel-centre coordinates (contourpy's filled contours at 0.5)."""
    if not mask.any():
        return []
    padded = np.pad(mask.astype(np.float64), 1)  # so that regions at the border close
    generator = contourpy.contour_generator(z=padded, fill_type=contourpy.FillType.OuterOffset)
    points, offsets = generator.filled(0.5, 2.0)
    polygons = []
    for outline, cuts in zip(points, offsets):
        rings = [[(float(px) - 1, float(py) - 1) for px, py in outline[a:b]] for a, b in itertools.pairwise(cuts)]
        polygons.append([ring if ring[0] == ring[-1] else [*ring, ring[0]] for ring in rings])
    return polygons


def stripes(width: int, tile: int, overlap: int, side: int) -> list[tuple[int, int]]:
    """Column ranges (c0, c1) that cut a view ``width`` px wide into stripes of at most about
    ``side`` px, each cut through the middle of a window where it overlaps no other (so that
    the two stripes share one column of windows)."""
    count = max(1, math.ceil(width / side))
    step = tile - overlap
    cuts = [0]
    for k in range(1, count):
        cut = round((k * width / count - tile / 2) / step) * step + tile // 2
        if cuts[-1] < cut < width:
            cuts.append(cut)
    return list(itertools.pairwise([*cuts, width]))


def _cell_pass(model: SlideModel, view: ScaledView, tissue: TissueMask, tissue_map: TissueMap | None,
               tile: int, overlap: int, runtime: Runtime, state_path: Path,
               progress: Progress | None) -> np.ndarray:
    """The cells of ``view`` as (N, 4) rows (x, y, class, probability) in view px; resumable from
    ``state_path`` (saved at the end of a block row when `SAVE_EVERY_S` have passed).

    The view goes through in stripes of `STRIPE_SIDE` px (`stripes`), each
    streamed in blocks (`stream_blocks` with ``columns``)
    with the detection halo on each side, so that memory follows the stripe's width, not the
    slide's. Each stripe keeps the candidates of its own columns; suppression runs over all
    of them at the end: the cells equal those of the whole view in one stream.
    """
    detect = model.config.detect
    classes = len(model.config.task.class_names)
    if tissue_map is not None:
        def read(top: int, left: int, h: int, w: int) -> torch.Tensor:
            return torch.cat([view.window(top, left, h, w), tissue_map.context(view, (top, left, h, w))])
    else:
        read = view.window
    halo = detection_halo(detect.sigma, detect.min_distance)
    plan = [(c0, c1, max(0, c0 - halo), min(view.width, c1 + halo))
            for c0, c1 in stripes(view.width, tile, overlap, STRIPE_SIDE)]
    total = sum(block_count(view.height, view.width, tile, overlap, columns=(m0, m1)) for _, _, m0, m1 in plan)
    stripe, kept, done = 0, [np.zeros((0, 5))], 0
    saved = torch.load(state_path, weights_only=True) if state_path.is_file() else None
    if saved is not None:
        stripe, kept, done = saved["stripe"], [saved["kept"].numpy()], saved["done"]
    saved_at = time.monotonic()
    for k in range(stripe, len(plan)):
        c0, c1, m0, m1 = plan[k]
        detector = BlockDetector(view.height, m1 - m0, detect.sigma, detect.min_distance, detect.threshold,
                                 per_class=detect.per_class)
        state = StreamState()
        if saved is not None and k == stripe:
            state.load_state_dict(saved["stream"])
            detector.load_state_dict(saved["detector"])
        first = done - state.blocks_done  # blocks of the earlier stripes
        for top, left, block in stream_blocks(model.model, read, view.height, view.width, tile, overlap, runtime,
                                              skip=_glass(view, tissue, classes), state=state, columns=(m0, m1)):
            detector.add(top, left - m0, block)
            done = first + state.blocks_done
            if progress is not None:
                progress("cells", done, total)
            if left + block.shape[2] == m1 and time.monotonic() - saved_at >= SAVE_EVERY_S:  # a block row is done
                with written_whole(state_path) as partial:
                    torch.save({"stripe": k, "done": done, "kept": torch.from_numpy(np.concatenate(kept)),
                                "stream": state.state_dict(), "detector": detector.state_dict()}, partial)
                saved_at = time.monotonic()
        candidates = detector.candidates()
        candidates[:, 0] += m0
        kept.append(candidates[(candidates[:, 0] >= c0) & (candidates[:, 0] < c1)])
    return suppress_peaks(np.concatenate(kept), detect.min_distance)


def _feature(slide_id: str, x: float, y: float, cls: int, probability: float) -> dict:
    return {"type": "Feature", "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{slide_id}/{x:.2f}/{y:.2f}/{cls}")),
            "geometry": {"type": "Point", "coordinates": [round(x, 2), round(y, 2)]},
            "properties": {"objectType": "detection", "isLocked": False,
                           "classification": {"name": CELL_NAMES.get(cls, str(cls)),
                                              "color": list(CELL_COLOURS.get(cls, (0, 0, 0)))},
                           "measurements": {"Probability": round(probability, 4)}}}


def _write_cells(outputs: SlideOutputs, slide: Slide, points: np.ndarray) -> None:
    slide_id = slide.quickhash or slide.path.name
    with written_whole(outputs.cells_geojson) as partial, open(partial, "w") as file:
        # one feature a line: the file streams out, and a reader sees where each cell starts
        file.write('{"type": "FeatureCollection", "features": [\n')
        file.writelines(("" if k == 0 else ",\n") + json.dumps(_feature(slide_id, x, y, int(cls), float(p)))
                        for k, (x, y, cls, p) in enumerate(points))
        file.write("\n]}\n")
    with written_whole(outputs.cells_csv) as partial, open(partial, "w") as file:
        file.write("x,y,x_um,y_um,class,name,probability\n")
        file.writelines(f"{int(x)},{int(y)},{x * slide.mpp:.2f},{y * slide.mpp:.2f},{int(cls)},"
                       f"{CELL_NAMES.get(int(cls), int(cls))},{p:.4f}\n" for x, y, cls, p in points)


def _write_thumbnail(outputs: SlideOutputs, slide: Slide, box: tuple[int, int, int, int], points: np.ndarray) -> None:
    x, y, w, h = box
    view = ScaledView(slide, slide.mpp * max(1.0, max(w, h) / THUMBNAIL_SIDE), box)
    picture = view.region(0, view.height, 0, view.width)
    scaled = np.array(points, dtype=np.float64).reshape(-1, 4)
    scaled[:, 0] = (scaled[:, 0] - x) / view.scale
    scaled[:, 1] = (scaled[:, 1] - y) / view.scale
    radius = max(1, min(dot_radius(view.height), round(6 / view.scale)))
    with written_whole(outputs.thumbnail) as partial:
        Image.fromarray(draw_points(picture, scaled, radius=radius)).save(partial, format="PNG")


def _check_models(cell_model: SlideModel, tissue_model: SlideModel | None) -> bool:
    """Whether the cell model takes tissue context, after refusing models of the wrong task and a
    context model without a tissue model."""
    if cell_model.config.task is not Task.CELLS:
        raise ValueError(f"{cell_model.source}: a {cell_model.config.task.value} model, not a cell model")
    if tissue_model is not None and tissue_model.config.task is not Task.TISSUE:
        raise ValueError(f"{tissue_model.source}: a {tissue_model.config.task.value} model, not a tissue model")
    context = cell_model.config.data.context is not ContextKind.NONE
    if context and tissue_model is None:
        raise ValueError(f"{cell_model.source} takes tissue context: give --tissue-model")
    return context


def _tissue_box(slide: Slide, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The analysed box grown by the tissue context's reach (TISSUE_CONTEXT_UM), clipped to the slide."""
    margin = round(TISSUE_CONTEXT_UM / slide.mpp)
    x, y, w, h = box
    left, top = max(0, x - margin), max(0, y - margin)
    return left, top, min(slide.width, x + w + margin) - left, min(slide.height, y + h + margin) - top


def _write_outputs(outputs: SlideOutputs, slide: Slide, box: tuple[int, int, int, int], view: ScaledView,
                   found: np.ndarray, tissue: TissueMask, tissue_map: TissueMap | None) -> np.ndarray:
    """The cells in level-0 px (each at its pixel's centre, off-tissue ones dropped, in the order
    found), written with the thumbnail and, given a tissue map, the cancer areas."""
    x0, y0 = view.level0(found[:, 0] + 0.5, found[:, 1] + 0.5)
    points = np.column_stack([x0, y0, found[:, 2], found[:, 3]]) if len(found) else np.zeros((0, 4))
    points = points[tissue.at(points[:, 0], points[:, 1])]
    _write_cells(outputs, slide, points)
    if tissue_map is not None:
        collection = _tissue_polygons(tissue_map, tissue, box)
        with written_whole(outputs.tissue_geojson) as partial:
            partial.write_text(json.dumps(collection))
    _write_thumbnail(outputs, slide, box, points)
    return points


def _summary(slide: Slide, box: tuple[int, int, int, int], points: np.ndarray, tissue: TissueMask, view: ScaledView,
             models: tuple[SlideModel, SlideModel | None], settings: tuple[int, int, Runtime], timer: _Timer) -> dict:
    """What ``STEM.summary.json`` holds: the slide, the box, the cell counts, the models and settings."""
    cell_model, tissue_model = models
    tile, overlap, runtime = settings
    counts = {CELL_CLASSES[k]: int(np.sum(points[:, 2] == k)) for k in CELL_CLASSES}
    x, y, w, h = box
    return {
        "slide": slide.identity(),
        "region": {"x": x, "y": y, "width": w, "height": h},
        "cells": counts,
        "tumour_cell_fraction": round(counts["TC"] / max(1, sum(counts.values())), 4),
        "tissue_mm2": round(tissue.area_mm2(x, y, x + w, y + h), 4),
        "cell_view": {"mpp": view.mpp, "level": view.level, "width": view.width, "height": view.height},
        "models": {"cell": cell_model.identity(),
                   **({"tissue": tissue_model.identity()} if tissue_model is not None else {})},
        "settings": {"tile": tile, "overlap": overlap, "runtime": str(runtime), "detect": {
            "sigma": cell_model.config.detect.sigma, "min_distance": cell_model.config.detect.min_distance,
            "threshold": cell_model.config.detect.threshold, "per_class": cell_model.config.detect.per_class}},
        "tissue_threshold": round(tissue.threshold, 4),
        "seconds": timer.seconds,
        "equiseg": importlib.metadata.version("equiseg"),
    }


def analyse_slide(path: Path | str, cell_model: SlideModel, out_dir: Path | str,
                  tissue_model: SlideModel | None = None, region: tuple[int, int, int, int] | None = None,
                  mpp: float | None = None, tile: int = 1024, overlap: int = 128, runtime: Runtime | None = None,
                  resume: bool = False, progress: Progress | None = None) -> SlideCells:
    """Find the cells on one slide and write `SlideOutputs` into ``out_dir``.

    The cells equal what ``equiseg predict`` finds on the analysed box cut out at the cell
    model's resolution (`ScaledView`), bit for bit with batch 1
    where every window has tissue under it (windows without are not run: they count as
    background), less those off the tissue mask. Memory: one block of windows, strips across
    the box's width (``predict``'s) and the tissue mask; not the slide.

    Args:
        path: the slide (any format OpenSlide reads).
        cell_model: the cell model; one with tissue context needs ``tissue_model``.
        out_dir: the output folder (made if missing).
        tissue_model: a tissue model: its cancer areas are drawn, and it gives a context model its context.
        region: (x, y, w, h) level-0 px to analyse (default: the whole slide).
        mpp: µm per level-0 pixel, replacing the file's.
        tile, overlap: the windows, px at each model's resolution.
        runtime: device, batch and precision (default: the cell model's device, batch 1, float32).
        resume: continue an interrupted run of this slide (without it, existing outputs are refused).
        progress: called with (stage, done, total).

    Raises:
        ValueError: an unreadable slide, no resolution, a region off the slide, a context model
            without a tissue model, outputs that exist (without ``resume``).
    """
    runtime = runtime or model_runtime(cell_model.model)
    timer = _Timer()
    context = _check_models(cell_model, tissue_model)
    path = Path(path)
    outputs = SlideOutputs(Path(out_dir), path.stem)
    check_slides([path], out_dir, resume, region, mpp)
    outputs.folder.mkdir(parents=True, exist_ok=True)
    with Slide(path, mpp) as slide:
        box = _check_region(slide, region)
        if outputs.summary.is_file():
            summary = json.loads(outputs.summary.read_text())
            return SlideCells(path, _read_points(outputs, slide), summary, outputs)
        outputs.work.mkdir(exist_ok=True)
        with timer.stage("tissue mask"):
            tissue = find_tissue(slide)
        tissue_map = None
        if tissue_model is not None:
            with timer.stage("tissue model"):
                tissue_map = _tissue_pass(tissue_model, slide, _tissue_box(slide, box), tissue,
                                          outputs.work / "tissue.npy", tile, overlap, runtime, progress)
        with timer.stage("cell model"):
            view = ScaledView(slide, cell_model.resolution.cell_mpp, box)
            found = _cell_pass(cell_model, view, tissue, tissue_map if context else None, tile, overlap, runtime,
                               outputs.work / "cells-state.pt", progress)
        with timer.stage("outputs"):
            points = _write_outputs(outputs, slide, box, view, found, tissue, tissue_map)
        summary = _summary(slide, box, points, tissue, view, (cell_model, tissue_model), (tile, overlap, runtime), timer)
        del tissue_map  # the memory map holds the file open
        with written_whole(outputs.summary) as partial:
            partial.write_text(json.dumps(summary, indent=2) + "\n")
    _remove_work(outputs.work)
    return SlideCells(path, points, summary, outputs)


def _read_points(outputs: SlideOutputs, slide: Slide) -> np.ndarray:
    """The cells of a finished slide, from its CSV (x, y as the pixel centres in level-0 px)."""
    rows = np.loadtxt(outputs.cells_csv, delimiter=",", skiprows=1, usecols=(2, 3, 4, 6), ndmin=2)
    rows[:, :2] /= slide.mpp
    return rows


def _remove_work(work: Path) -> None:
    for item in work.glob("*"):
        item.unlink()
    with contextlib.suppress(OSError):
        os.rmdir(work)


def check_slides(paths: list[Path], out_dir: Path | str, resume: bool = False,
                 region: tuple[int, int, int, int] | None = None, mpp: float | None = None) -> None:
    """Refuse, before any work: slides that OpenSlide cannot open or whose resolution is
    unknown, a region off a slide, outputs that would collide or overwrite finished ones."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError("two slides share a name; their outputs would overwrite each other")
    for path in paths:
        summary = SlideOutputs(Path(out_dir), Path(path).stem).summary
        if summary.is_file() and not resume:
            raise ValueError(f"{summary} exists: use --resume to skip finished slides, or another --out")
        with Slide(path, mpp) as slide:
            _check_region(slide, region)


def analyse_slides(paths: list[Path], cell_model: SlideModel, out_dir: Path | str,
                   tissue_model: SlideModel | None = None, on_slide: Callable[[int, int, SlideCells], None] | None = None,
                   **options) -> list[SlideCells]:
    """`analyse_slide` for each slide into ``out_dir``; ``on_slide(done, total, result)`` after
    each; a ``progress`` in ``options`` gets stages named "k/n NAME: stage"."""
    check_slides(paths, out_dir, options.get("resume", False), options.get("region"), options.get("mpp"))
    progress = options.pop("progress", None)
    results = []
    for k, path in enumerate(paths):
        named = (None if progress is None else
                 lambda stage, done, total, k=k, name=Path(path).name: progress(f"{k + 1}/{len(paths)} {name}: {stage}",
                                                                               done, total))
        results.append(analyse_slide(path, cell_model, out_dir, tissue_model, progress=named, **options))
        if on_slide is not None:
            on_slide(k + 1, len(paths), results[-1])
    return results


class _EveryNth(torch.utils.data.Sampler):
    """Slides ``rank``, ``rank + n``, ... of the list: each once over all processes (Lightning's
    distributed sampler would repeat slides to even out the counts, and two processes would
    then write the same slide's files)."""

    def __init__(self, count: int, rank: int, n: int) -> None:
        self.indices = list(range(rank, count, n))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _SlideTask(lightning.LightningModule):
    """``equiseg slide`` as Lightning's predict loop: one slide per step, on this process's device."""

    def __init__(self, paths: list[Path], cell: SlideModel, tissue: SlideModel | None, out_dir: Path,
                 runtime: Runtime, options: dict) -> None:
        super().__init__()
        self.paths, self.out_dir, self.runtime, self.options = paths, out_dir, runtime, options
        self.cell_info, self.tissue_info = cell, tissue
        # registered, so that Lightning moves them to the process's device
        self.cell = cell.model
        self.tissue = tissue.model if tissue is not None else None

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        sampler = _EveryNth(len(self.paths), self.trainer.global_rank, self.trainer.world_size)
        return torch.utils.data.DataLoader(self.paths, batch_size=None, sampler=sampler)

    def predict_step(self, path: Path, batch_idx: int) -> dict:
        runtime = Runtime(self.device, self.runtime.batch, self.runtime.precision, self.runtime.optimize)
        cell = SlideModel(self.cell, self.cell_info.config, self.cell_info.resolution, self.cell_info.source)
        tissue = (SlideModel(self.tissue, self.tissue_info.config, self.tissue_info.resolution, self.tissue_info.source)
                  if self.tissue_info is not None else None)
        return analyse_slide(path, cell, self.out_dir, tissue, runtime=runtime, **self.options).summary


def analyse_slides_distributed(paths: list[Path], cell_model: SlideModel, out_dir: Path | str,
                               tissue_model: SlideModel | None = None, devices: int = 2, nodes: int = 1,
                               runtime: Runtime | None = None, **options) -> tuple[int, list[dict]]:
    """`analyse_slide` for each slide, the slides spread over ``devices`` processes by
    Lightning (``Trainer.predict`` with the DDP strategy: one process per GPU, or per CPU
    share on ``runtime.device`` = cpu), each slide in one of them, once.

    Returns (this process's rank, the summaries this process made). Lightning starts the other
    processes by running the same command again, so a caller prints only on rank 0. Across
    ``nodes`` machines sharing the output folder: start the same command on each, with
    Lightning's ``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK`` set.
    """
    runtime = runtime or model_runtime(cell_model.model)
    check_slides(paths, out_dir, options.get("resume", False), options.get("region"), options.get("mpp"))
    accelerator = "gpu" if runtime.device.type == "cuda" else "cpu"
    # Lightning 2.6's own use of a torch 2.13 deprecation, once per process: nothing a user can act on
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")
    trainer = lightning.Trainer(accelerator=accelerator, devices=devices, strategy="ddp", logger=False,
                                enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                                num_nodes=nodes)
    task = _SlideTask(list(paths), cell_model, tissue_model, Path(out_dir), runtime, options)
    summaries = trainer.predict(task, return_predictions=True) or []
    trainer.strategy.barrier()  # every slide done before rank 0 reports
    return trainer.global_rank, summaries
