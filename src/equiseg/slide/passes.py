"""The two passes over a slide: the tissue model at its resolution into a float16 map on disk, and
the cell model streamed in stripes of blocks of overlapping tiles (resumable from the last saved block row).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from equiseg.data.targets import tissue_crop
from equiseg.data.wsi import ScaledView, Slide, TissueMask
from equiseg.detection import BlockDetector, detection_halo, suppress_peaks
from equiseg.files import written_whole
from equiseg.inference.readers import NpyBlocks
from equiseg.inference.tiling import Skip, StreamState, block_count, stream_blocks
from equiseg.runtime import Runtime
from equiseg.slide.models import SlideModel

TISSUE_CONTEXT_UM = 300.0  # µm of tissue the tissue model sees beyond a --region on each side
TISSUE_MAP_DTYPE = np.float16  # the tissue probabilities on disk: 4 bytes a tissue-model pixel
STRIPE_SIDE = 16384  # px of the cell model's view: the slide goes through in stripes about this wide
SAVE_EVERY_S = 60.0  # the cell pass saves its state at the end of a block row once this long has passed
Progress = Callable[[str, int, int], None]
"""(stage, done, total), called as the work goes."""


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
    block of them.
    """

    def __init__(self, path: Path, view: ScaledView) -> None:
        self.path, self.view = path, view
        self.probs = np.load(path, mmap_mode="r")

    def context(self, cell_view: ScaledView, window: tuple[int, int, int, int]) -> torch.Tensor:
        """(C, h, w) float32: the probabilities over ``window`` of ``cell_view`` resampled
        bilinearly onto its grid (zero outside this map), as an OCELOT pair's cell patch takes
        its block of the tissue patch.
        """
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


def tissue_pass(model: SlideModel, slide: Slide, box: tuple[int, int, int, int], tissue: TissueMask,
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


def stripes(width: int, tile: int, overlap: int, side: int) -> list[tuple[int, int]]:
    """Column ranges (c0, c1) that cut a view ``width`` px wide into stripes of at most about
    ``side`` px, each cut through the middle of a window where it overlaps no other (so that
    the two stripes share one column of windows).
    """
    count = max(1, math.ceil(width / side))
    step = tile - overlap
    cuts = [0]
    for k in range(1, count):
        cut = round((k * width / count - tile / 2) / step) * step + tile // 2
        if cuts[-1] < cut < width:
            cuts.append(cut)
    return list(itertools.pairwise([*cuts, width]))


def cell_pass(model: SlideModel, view: ScaledView, tissue: TissueMask, tissue_map: TissueMap | None,
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
    classes = model.config.out_channels  # glass windows: every channel, p(nucleus) 0 too
    if tissue_map is not None:
        def read(top: int, left: int, height: int, width: int) -> torch.Tensor:
            return torch.cat([view.window(top, left, height, width),
                              tissue_map.context(view, (top, left, height, width))])
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
            detector.add(top, left - m0, block[:model.config.class_channels])
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


def tissue_box(slide: Slide, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The analysed box grown by the tissue context's reach (TISSUE_CONTEXT_UM), clipped to the slide."""
    margin = round(TISSUE_CONTEXT_UM / slide.mpp)
    x, y, w, h = box
    left, top = max(0, x - margin), max(0, y - margin)
    return left, top, min(slide.width, x + w + margin) - left, min(slide.height, y + h + margin) - top
