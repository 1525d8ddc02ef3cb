"""Whole-slide images: read at any resolution a rectangle at a time, and find the tissue on the glass.

Slides are read with OpenSlide (``openslide-python`` and the ``openslide-bin`` wheel, the
optional extra ``equiseg[slide]``; no system package), so SVS, NDPI, MRXS, SCN, generic tiled
TIFF and the other formats OpenSlide knows all work. Facts relied on here (OpenSlide 4.0.1,
openslide-python 1.4.7): ``read_region`` takes its location in level-0 pixels and its size in
the level's pixels and returns RGBA, not premultiplied, with alpha 0 where the slide has no
data (drawn here over ``openslide.background-color``, white when absent); ``openslide.mpp-x``
/ ``mpp-y`` come from the vendor's metadata or, for generic TIFF, from the resolution tags of
the first page (centimetre or inch).

Coordinates: level-0 pixels, x = column, y = row, pixel i covering [i, i + 1). A
`ScaledView` is a box of the slide at another resolution: its pixel (i, j) covers
level-0 ``[x0 + j s, x0 + (j + 1) s) x [y0 + i s, y0 + (i + 1) s)`` with s = view mpp /
slide mpp.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from equiseg.data.ocelot import image_to_tensor

SLIDE_EXTRA = "pip install 'equiseg[slide]'"
SNAP = 0.02  # a requested resolution within 2 % of a level's own is read at the level's, unresampled
READ_TILE = 512  # px of a view: it reads and resamples the slide in squares of this side
CACHE_BYTES = 32 * 2**20  # resampled squares a view keeps for the next rectangles (a window's nine and more)
MASK_MPP = 8.0  # µm per pixel of the tissue mask
SATURATION_BOUNDS = (0.04, 0.10)  # Otsu's threshold on saturation is kept within these (glass: below 0.04)
MIN_TISSUE_MM2 = 0.01  # smaller specks of "tissue" are dropped (dust, pen)


def _openslide():
    try:
        import openslide
    except ImportError:  # an optional extra: say how to get it
        raise ModuleNotFoundError(f"reading whole slides needs OpenSlide: {SLIDE_EXTRA}") from None
    return openslide


def _colour(hex_rgb: str) -> np.ndarray:
    try:
        return np.array([int(hex_rgb[k:k + 2], 16) for k in (0, 2, 4)], np.float32)
    except ValueError:
        return np.full(3, 255, np.float32)


class Slide:
    """A whole-slide image opened with OpenSlide; `close` it (or use it in ``with``).

    Attributes:
        path: the file.
        width, height: level 0, px.
        mpp: µm per level-0 pixel: ``mpp`` given, else the mean of the file's ``openslide.mpp-x``
            and ``openslide.mpp-y``.
        vendor: OpenSlide's name for the format (``aperio``, ``generic-tiff``, ...).
        levels: (width, height) of each pyramid level, level 0 first.
        downsamples: each level's downsample from level 0.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file OpenSlide cannot read; no µm per pixel in its properties and no ``mpp``.
    """

    def __init__(self, path: Path | str, mpp: float | None = None) -> None:
        self.path = Path(path)
        openslide = _openslide()
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as error:
            raise ValueError(f"{self.path}: OpenSlide cannot read it ({error or type(error).__name__})") from None
        props = self._slide.properties
        self.width, self.height = self._slide.dimensions
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "")
        self.levels = tuple(tuple(d) for d in self._slide.level_dimensions)
        self.downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self._background = _colour(props.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "FFFFFF"))
        if mpp is None:
            try:
                mpp = (float(props[openslide.PROPERTY_NAME_MPP_X]) + float(props[openslide.PROPERTY_NAME_MPP_Y])) / 2
            except (KeyError, ValueError):
                self.close()
                raise ValueError(f"{self.path}: the file does not say its microns per pixel "
                                 f"({openslide.PROPERTY_NAME_MPP_X} is missing); give it with --mpp") from None
        if not (mpp > 0 and math.isfinite(mpp)):
            self.close()
            raise ValueError(f"{self.path}: microns per pixel must be positive, got {mpp}")
        self.mpp = float(mpp)
        self.quickhash = props.get(openslide.PROPERTY_NAME_QUICKHASH1, "")

    def __enter__(self) -> Slide:  # noqa: PYI034 (Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._slide.close()

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 of ``level`` from level-0 pixel (x, y); beyond the slide its
        background colour (OpenSlide's transparent pixels drawn over it).
        """
        rgba = np.asarray(self._slide.read_region((int(x), int(y)), level, (int(width), int(height))))
        alpha = rgba[..., 3:4].astype(np.float32) / 255
        if np.all(alpha == 1):
            return np.ascontiguousarray(rgba[..., :3])
        rgb = rgba[..., :3] * alpha + self._background * (1 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    def best_level(self, downsample: float) -> int:
        """The smallest level (fewest pixels) whose downsample is at most ``downsample``, with a
        `SNAP` tolerance (a level stored as 4.0003 serves a request for 4).
        """
        fits = [k for k, d in enumerate(self.downsamples) if d <= downsample * (1 + SNAP)]
        return fits[-1] if fits else 0

    def identity(self) -> dict[str, object]:
        """What names this slide in a summary: file, format, size, resolution, OpenSlide's quickhash."""
        return {"file": str(self.path.resolve()), "vendor": self.vendor, "width": self.width, "height": self.height,
                "mpp": self.mpp, "levels": len(self.levels), "quickhash": self.quickhash}


class ScaledView:
    """A box of a slide at ``mpp`` µm per pixel, read a rectangle at a time.

    Pixel (i, j) covers level-0 ``[x0 + j s, x0 + (j + 1) s) x [y0 + i s, y0 + (i + 1) s)``,
    s = `scale` = mpp / slide mpp. The view reads from the pyramid level with the fewest
    pixels that still has at least its resolution (`Slide.best_level`) and resamples it
    with PIL's antialiased bilinear filter, in squares of `READ_TILE` px each read with a
    margin of the level's pixels (so a square's pixels do not depend on where the square
    ends); squares are cached (`CACHE_BYTES`). Where the requested resolution is within
    `SNAP` of a level's own, the view takes the level's (`mpp` says which) and,
    when its box starts on a whole pixel of that level, copies pixels without resampling.

    Attributes:
        slide: the slide.
        mpp: µm per pixel of the view.
        scale: level-0 px per view px.
        x0, y0: the box's top-left corner, level-0 px.
        height, width: the view's size, px (the box's size / scale, rounded down).
        level: the pyramid level it reads.
    """

    def __init__(self, slide: Slide, mpp: float, box: tuple[int, int, int, int] | None = None) -> None:
        x0, y0, box_w, box_h = box if box is not None else (0, 0, slide.width, slide.height)
        if box_w < 1 or box_h < 1:
            raise ValueError(f"an empty box {box}")
        self.slide, self.x0, self.y0 = slide, int(x0), int(y0)
        self.level = slide.best_level(mpp / slide.mpp)
        downsample = slide.downsamples[self.level]
        ratio = mpp / slide.mpp / downsample  # view px per level px, >= 1 - SNAP
        self.scale = downsample if abs(ratio - 1) <= SNAP else mpp / slide.mpp
        self.mpp = self.scale * slide.mpp
        self.height, self.width = int(box_h / self.scale + 1e-9), int(box_w / self.scale + 1e-9)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"a {box_w}x{box_h} px box is less than one pixel at {mpp:g} µm/px")
        self._copy = (self.scale == downsample and all((v / downsample).is_integer() for v in (x0, y0)))
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # windows may be read ahead by a worker thread (tiling._batched)

    def level0(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 coordinates of view coordinates (continuous: the centre of view pixel j is j + 0.5)."""
        return self.x0 + np.asarray(x, np.float64) * self.scale, self.y0 + np.asarray(y, np.float64) * self.scale

    def region(self, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        """Rows top .. bottom - 1 and columns left .. right - 1: (bottom - top, right - left, 3) uint8."""
        with self._lock:  # one read at a time: the cache and the file's position are shared
            return self._region(top, bottom, left, right)

    def _region(self, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        if not (0 <= top < bottom <= self.height and 0 <= left < right <= self.width):
            raise ValueError(f"rows {top}..{bottom - 1}, columns {left}..{right - 1} of a "
                             f"{self.height}x{self.width} view")
        out = np.empty((bottom - top, right - left, 3), np.uint8)
        for ti in range(top // READ_TILE, (bottom - 1) // READ_TILE + 1):
            for tj in range(left // READ_TILE, (right - 1) // READ_TILE + 1):
                square = self._square(ti, tj)
                r0, c0 = ti * READ_TILE, tj * READ_TILE
                a, b = max(r0, top), min(r0 + square.shape[0], bottom)
                c, d = max(c0, left), min(c0 + square.shape[1], right)
                out[a - top:b - top, c - left:d - left] = square[a - r0:b - r0, c - c0:d - c0]
        return out

    def window(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """(3, h, w) float32 in [0, 1] of one window, as the models take it."""
        return image_to_tensor(self.region(top, top + height, left, left + width))

    def _square(self, ti: int, tj: int) -> np.ndarray:
        key = (ti, tj)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        r0, c0 = ti * READ_TILE, tj * READ_TILE
        rows, cols = min(READ_TILE, self.height - r0), min(READ_TILE, self.width - c0)
        d = self.slide.downsamples[self.level]
        if self._copy:  # whole level pixels: copied as stored
            square = self.slide.read(self.level, int(self.x0 + c0 * d), int(self.y0 + r0 * d), cols, rows)
        else:
            # the square's extent in the level's continuous pixels, read with a margin that covers
            # the filter's support, then resampled from exactly that extent
            fx0, fy0 = (self.x0 + c0 * self.scale) / d, (self.y0 + r0 * self.scale) / d
            fx1, fy1 = fx0 + cols * self.scale / d, fy0 + rows * self.scale / d
            pad = math.ceil(self.scale / d) + 2
            lx, ly = math.floor(fx0) - pad, math.floor(fy0) - pad
            lw, lh = math.ceil(fx1) + pad - lx, math.ceil(fy1) + pad - ly
            pixels = self.slide.read(self.level, round(lx * d), round(ly * d), lw, lh)
            square = np.asarray(Image.fromarray(pixels).resize(
                (cols, rows), Image.Resampling.BILINEAR, box=(fx0 - lx, fy0 - ly, fx1 - lx, fy1 - ly)))
        self._cache[key] = square
        while sum(s.nbytes for s in self._cache.values()) > CACHE_BYTES and len(self._cache) > 1:
            self._cache.popitem(last=False)
        return square


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut between bins that maximises the
    between-class variance of the histogram (Otsu 1979).
    """
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)  # pixels at or below each bin
    total = weight[-1]
    if total == 0:
        return 0.5
    mean = np.cumsum(hist * centres)
    between = (mean[-1] * weight - mean * total) ** 2 / np.maximum(weight * (total - weight), 1e-12)
    return float(edges[int(np.argmax(between[:-1])) + 1])


@dataclass(frozen=True)
class TissueMask:
    """Where the slide has tissue: a boolean map over the whole slide at `MASK_MPP`.

    Mask pixel (i, j) covers level-0 ``[j s, (j + 1) s) x [i s, (i + 1) s)``, s = `scale`.

    Attributes:
        mask: (H, W) bool, True on tissue.
        scale: level-0 px per mask px.
        mpp: µm per mask px.
        threshold: the saturation threshold used.
    """

    mask: np.ndarray
    scale: float
    mpp: float
    threshold: float

    def at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether each level-0 point (x, y) lies on tissue (False outside the slide)."""
        i = np.floor(np.asarray(y, np.float64) / self.scale).astype(np.int64)
        j = np.floor(np.asarray(x, np.float64) / self.scale).astype(np.int64)
        inside = (i >= 0) & (i < self.mask.shape[0]) & (j >= 0) & (j < self.mask.shape[1])
        out = np.zeros(np.shape(i), bool)
        out[inside] = self.mask[i[inside], j[inside]]
        return out

    def pixels(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
        """The mask pixels that the level-0 box [x0, x1) x [y0, y1) touches."""
        rows = slice(max(0, math.floor(y0 / self.scale)), max(0, math.ceil(y1 / self.scale)))
        cols = slice(max(0, math.floor(x0 / self.scale)), max(0, math.ceil(x1 / self.scale)))
        return rows, cols

    def any_in(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """Whether the level-0 box [x0, x1) x [y0, y1) touches tissue."""
        return bool(self.mask[self.pixels(x0, y0, x1, y1)].any())

    def area_mm2(self, x0: float, y0: float, x1: float, y1: float) -> float:
        """mm² of tissue in the mask pixels the level-0 box touches."""
        return float(self.mask[self.pixels(x0, y0, x1, y1)].sum()) * self.mpp ** 2 / 1e6


def find_tissue(slide: Slide, mpp: float = MASK_MPP) -> TissueMask:
    """The tissue on a slide, from its saturation at ``mpp`` µm/px (a low-resolution read).

    Glass is bright and grey, stained tissue coloured: a mask pixel is tissue where its HSV
    saturation (max - min) / max is above Otsu's threshold over the slide, that threshold kept
    within `SATURATION_BOUNDS` (so that a slide that is all glass, or all tissue, is not
    split in two by it). Then the mask is cleaned: an opening removes single-pixel specks,
    holes (lumens, fat) are filled, parts under `MIN_TISSUE_MM2` dropped, and the rest
    grown by one mask pixel so that cells on the tissue's edge stay inside.
    """
    view = ScaledView(slide, mpp)
    rgb = np.concatenate([view.region(r, min(r + 4 * READ_TILE, view.height), 0, view.width)
                          for r in range(0, view.height, 4 * READ_TILE)]).astype(np.float32)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1), 0.0)
    threshold = float(np.clip(otsu_threshold(saturation), *SATURATION_BOUNDS))
    mask = ndimage.binary_opening(saturation > threshold)
    mask = ndimage.binary_fill_holes(mask)
    labels, count = cast(tuple[np.ndarray, int], ndimage.label(mask))  # without `output`: (labels, count)
    if count:
        sizes = np.bincount(labels.ravel())[1:] * view.mpp ** 2 / 1e6
        mask = np.isin(labels, np.flatnonzero(sizes >= MIN_TISSUE_MM2) + 1)
    mask = ndimage.binary_dilation(mask)
    return TissueMask(mask, view.scale, view.mpp, threshold)
