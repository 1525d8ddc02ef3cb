"""One slide and a list of slides analysed here: checks, the passes, the outputs and the summary."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from equiseg.data.context import ContextKind
from equiseg.data.ocelot import CELL_CLASSES
from equiseg.data.targets import Task
from equiseg.data.wsi import ScaledView, Slide, TissueMask, find_tissue
from equiseg.detection.instances import instance_outlines, measure_instances
from equiseg.files import owned_file
from equiseg.inference.instance_outputs import two_stage_tiles
from equiseg.inference.tiling import check_tiling, model_runtime
from equiseg.runtime import Runtime
from equiseg.slide.models import SlideModel, check_mpp
from equiseg.slide.passes import Progress, TissueMap, cell_pass, tissue_box, tissue_pass
from equiseg.slide.qupath import (
    InstanceWriter,
    SlideInstances,
    SlideOutputs,
    read_points,
    tissue_polygons,
    write_cells,
    write_thumbnail,
)

INSTANCE_LABELS_SUFFIX = ".instances.tif"  # what synth-slide writes beside a slide: its nuclei's labels
INSTANCE_TILE = 2048  # px of stage 2's view: a two-stage model's nuclei are pasted a tile of this side at a time


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


def _check_models(cell_model: SlideModel, tissue_model: SlideModel | None) -> bool:
    """Whether the cell model takes tissue context, after refusing models of the wrong task and a
    context model without a tissue model.
    """
    if cell_model.config.task is not Task.CELLS:
        raise ValueError(f"{cell_model.source}: a {cell_model.config.task.value} model, not a cell model")
    stage2 = cell_model.stage2
    if stage2 is not None and stage2.config.data.context is not ContextKind.NONE:
        raise ValueError(f"{stage2.source}: a stage 2 with tissue context does not run on slides yet")
    if tissue_model is not None and tissue_model.config.task is not Task.TISSUE:
        raise ValueError(f"{tissue_model.source}: a {tissue_model.config.task.value} model, not a tissue model")
    context = cell_model.config.data.context is not ContextKind.NONE
    if context and tissue_model is None:
        raise ValueError(f"{cell_model.source} takes tissue context: give --tissue-model")
    return context


def _write_outputs(outputs: SlideOutputs, slide: Slide, box: tuple[int, int, int, int], view: ScaledView,
                   found: np.ndarray, tissue: TissueMask, tissue_map: TissueMap | None,
                   run: tuple[SlideModel, Runtime, Progress | None]) -> np.ndarray:
    """The cells in level-0 px (each at its pixel's centre, off-tissue ones dropped, in the order
    found), written with the thumbnail and, given a tissue map, the cancer areas; for a two-stage
    model (``run``: the cell model, where it runs, the progress) as instances (`_write_instances`).
    """
    if tissue_map is not None:
        collection = tissue_polygons(tissue_map, tissue, box)
        with owned_file(outputs.tissue_geojson) as partial:
            partial.write_text(json.dumps(collection))
    cell_model, runtime, progress = run
    if cell_model.stage2 is not None:
        return _write_instances(outputs, slide, box, view, found, tissue, cell_model.stage2, runtime, progress)
    x0, y0 = view.level0(found[:, 0] + 0.5, found[:, 1] + 0.5)
    points = np.column_stack([x0, y0, found[:, 2], found[:, 3]]) if len(found) else np.zeros((0, 4))
    points = points[tissue.at(points[:, 0], points[:, 1])]
    write_cells(outputs, slide, points)
    write_thumbnail(outputs, slide, box, points)
    return points


def _write_instances(outputs: SlideOutputs, slide: Slide, box: tuple[int, int, int, int], view: ScaledView,
                     found: np.ndarray, tissue: TissueMask, stage2: SlideModel, runtime: Runtime,
                     progress: Progress | None) -> np.ndarray:
    """Stage 2 of a two-stage cell model on the cells ``found`` (view px) of stage 1: each cell's nucleus
    and class in its window of the slide at stage 2's resolution, a tile at a time
    (`two_stage_tiles`: each cell once and whole, in bounded memory), written as instances
    (`InstanceWriter`) in level-0 px, off-tissue cells dropped; returns their points.
    """
    side = stage2.config.window.side_px
    if side is None:
        raise ValueError(f"{stage2.source}: its config has no window.side_px (it is set when stage 2 trains)")
    view2 = ScaledView(slide, stage2.resolution.cell_mpp, box)
    x0, y0 = view.level0(found[:, 0] + 0.5, found[:, 1] + 0.5)
    proposals = found.copy()
    proposals[:, 0] = np.clip(np.floor((x0 - view2.x0) / view2.scale), 0, view2.width - 1)
    proposals[:, 1] = np.clip(np.floor((y0 - view2.y0) / view2.scale), 0, view2.height - 1)
    tiles = math.ceil(view2.height / INSTANCE_TILE) * math.ceil(view2.width / INSTANCE_TILE)
    kept = [np.zeros((0, 4))]
    with InstanceWriter(outputs, slide, box) as writer:
        for k, part in enumerate(two_stage_tiles(stage2.model, side, view2, proposals, runtime, tile=INSTANCE_TILE)):
            rows = proposals[part.rows]
            px, py = view2.level0(rows[:, 0] + 0.5, rows[:, 1] + 0.5)
            points = np.column_stack([px, py, part.classes, part.probability])
            rings = [np.column_stack(view2.level0(ring[:, 0], ring[:, 1]))
                     for ring in instance_outlines(part.labels, len(rows), offset=(part.left, part.top))]
            measured = measure_instances(part.labels, len(rows), view2.mpp)
            on = tissue.at(px, py)
            writer.add(SlideInstances(points[on], [ring for ring, keep in zip(rings, on) if keep],
                                      {key: values[on] for key, values in measured.items()}))
            kept.append(points[on])
            if progress is not None:
                progress("nuclei", k + 1, tiles)
    return np.concatenate(kept)


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
    _check_options(outputs, resume, mpp, tile, overlap)  # the region is checked on the slide opened below
    outputs.folder.mkdir(parents=True, exist_ok=True)
    with Slide(path, mpp) as slide:
        box = _check_region(slide, region)
        if outputs.summary.is_file():
            summary = json.loads(outputs.summary.read_text())
            return SlideCells(path, read_points(outputs, slide), summary, outputs)
        outputs.work.mkdir(exist_ok=True)
        with timer.stage("tissue mask"):
            tissue = find_tissue(slide)
        tissue_map = None
        if tissue_model is not None:
            with timer.stage("tissue model"):
                tissue_map = tissue_pass(tissue_model, slide, tissue_box(slide, box), tissue,
                                          outputs.work / "tissue.npy", tile, overlap, runtime, progress)
        with timer.stage("cell model"):
            view = ScaledView(slide, cell_model.resolution.cell_mpp, box)
            found = cell_pass(cell_model, view, tissue, tissue_map if context else None, tile, overlap, runtime,
                               outputs.work / "cells-state.pt", progress)
        with timer.stage("outputs"):
            points = _write_outputs(outputs, slide, box, view, found, tissue, tissue_map, (cell_model, runtime, progress))
        summary = _summary(slide, box, points, tissue, view, (cell_model, tissue_model), (tile, overlap, runtime), timer)
        del tissue_map  # the memory map holds the file open
        with owned_file(outputs.summary) as partial:
            partial.write_text(json.dumps(summary, indent=2) + "\n")
    _remove_work(outputs.work)
    return SlideCells(path, points, summary, outputs)


def _remove_work(work: Path) -> None:
    for item in work.glob("*"):
        item.unlink()
    with contextlib.suppress(OSError):
        os.rmdir(work)


def check_slides(paths: list[Path], out_dir: Path | str, resume: bool = False,
                 region: tuple[int, int, int, int] | None = None, mpp: float | None = None, tile: int = 1024,
                 overlap: int = 128) -> None:
    """Refuse, before any work: an ``mpp`` that is no positive number, windows that cannot cover
    an image (`check_tiling`), slides that OpenSlide cannot open or whose resolution is unknown,
    a region off a slide, outputs that would collide or overwrite finished ones.
    """
    labels = [Path(p).name for p in paths if Path(p).name.endswith(INSTANCE_LABELS_SUFFIX)]
    if labels:
        raise ValueError(f"{labels[0]}: the nucleus instance labels `equiseg synth-slide` writes beside a slide, "
                         "not a slide; leave it out")
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError("two slides share a name; their outputs would overwrite each other")
    for path in paths:
        _check_options(SlideOutputs(Path(out_dir), Path(path).stem), resume, mpp, tile, overlap)
        with Slide(path, mpp) as slide:
            _check_region(slide, region)


def _check_options(outputs: SlideOutputs, resume: bool, mpp: float | None, tile: int, overlap: int) -> None:
    """Refuse, before the slide is opened: an ``mpp`` that is no positive number, windows that cannot
    cover an image, and finished outputs without ``resume``.
    """
    check_mpp(mpp, "--mpp")
    check_tiling(tile, overlap)
    if outputs.summary.is_file() and not resume:
        raise ValueError(f"{outputs.summary} exists: use --resume to skip finished slides, or another --out")


def analyse_slides(paths: list[Path], cell_model: SlideModel, out_dir: Path | str,
                   tissue_model: SlideModel | None = None, on_slide: Callable[[int, int, SlideCells], None] | None = None,
                   **options) -> list[SlideCells]:
    """`analyse_slide` for each slide into ``out_dir``; ``on_slide(done, total, result)`` after
    each; a ``progress`` in ``options`` gets stages named "k/n NAME: stage".
    """
    check_slides(paths, out_dir, options.get("resume", False), options.get("region"), options.get("mpp"),
                 options.get("tile", 1024), options.get("overlap", 128))
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
