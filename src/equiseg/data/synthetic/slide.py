"""A synthetic whole-slide image: the procedural world of `equiseg.data.synthetic` over a
square slide with a tissue section on glass, written as a pyramidal tiled TIFF with its true cells.

Level 0 is at ``mpp`` µm/px (by default the synthetic cell patches' 0.2 µm/px, so a model trained
on ``equiseg synth`` data runs on level 0 at scale 1). Inside the section the world is the patch
world (stroma and collagen, cancer areas, lumens, tumour cells, lymphocytes, fibroblasts, H&E by
Beer-Lambert), sparse at ``crowding`` 0 and crowded at 1; outside it is bare glass: the
illumination through the mounting (``od0``) with pixel noise, no stain and no nuclei. The patch
world's *unknown* region is left out, since on a slide it would read as glass inside the section.

What changes against the patch world, so that a 48000 px (9.6 mm) slide stays in bounded memory:

* level 0 is rendered analytically in square blocks of `BLOCK` px, one row of blocks at a
  time; a block that is all glass is filled without rendering (bit for bit what rendering gives);
* the 0.8 µm chromatin texture is an unbounded field (`_TiledNoise`) whose coefficients are
  drawn per block from a generator keyed by the block's index: each render block takes a window of
  one function, so there are no seams and no array for the whole slide;
* nuclei are placed in bands of ``_BAND`` µm by the rules of
  `equiseg.data.synthetic.world.place_nuclei` (tumour cells on one hexagonal lattice thinned by
  context, lymphocyte aggregates, fibroblasts along the collagen; minimum distances hold across
  band edges), and only where the section is fully stained;
* the pixel noise of each render block comes from a generator keyed by the block's position.

Every draw is keyed by ``seed`` and by what it is for, so the same arguments give the same pixels
and cells bit for bit. Conventions: µm with the origin at the slide's top-left corner, x to the
right, y down; level-0 pixel (row i, column j) covers µm ``[j, j + 1) * mpp x [i, i + 1) * mpp``;
cells are ``(x, y, class)`` with ``(x, y) = (column, row)``, class 1 = BC, 2 = TC.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np
import tifffile

from equiseg.data.synthetic.world import (
    CELL_MPP,
    MARGIN,
    SPLINE_STD,
    Noise,
    Nuclei,
    NucleusKind,
    View,
    World,
    cells_in,
    child,
    clear_of,
    colour,
    fibre_angles,
    instance_labels,
    lymphocyte_intensity,
    make_nuclei,
    render,
    world_fields,
)
from equiseg.files import owned_file

BLOCK = 1024  # px of level 0 rendered at once (a square view), and the height of a band of rows
MIN_SIZE = 1024  # px: at least one whole render block
MAX_SIZE = 131072  # px (26 mm at 0.2 µm/px); level 1 is held in memory: 3 * (size / 4)² bytes
LAST_LEVEL = 1024  # px: the pyramid stops at the first level whose side is at most this
LEVEL_SCALE = 4  # each level is the mean of 4 x 4 pixels of the one above

_SLIDE = 1000  # root of a slide's streams under its seed, apart from render_pair's streams 0-3
_BAND = 256.0  # µm, height of the bands in which nuclei are placed (and width of the lattice's chunks)
_EDGE = 4.0  # µm over which the stain fades from full to none across the section's outline
_BORDER = 20.0  # outline-field units subtracted at the slide's edges: far beyond the field's range
_BORDER_WIDTH = 0.05  # fraction of the side over which that fall-off acts
_BOWL = 3.0  # outline-field units subtracted at the middle of each edge by the bowl that keeps the section central
_CHROMATIN_SPACING = 0.8  # µm, as the patch world's chromatin
_DESCRIPTION = "equiseg synthetic slide"


class _Stream(IntEnum):
    """What each random stream of a slide draws; the key of a stream is (_SLIDE, stream, *index)."""

    WORLD = 0  # the patch world's fields, style and stains
    OUTLINE = 1  # the tissue section
    NUCLEI = 2  # the placement's slide-wide parameters (lattice, densities, aggregates)
    PLACE = 3  # per (kind, band): candidate positions
    SHAPES = 4  # per (kind, band): each nucleus's shape and stain
    CHROMATIN = 5  # per coefficient block (i, j)
    PIXELS = 6  # per render block (row, column): the pixel noise


@dataclass(frozen=True)
class SyntheticSlide:
    """A synthetic slide as written by `write_synthetic_slide`.

    Attributes:
        path: the pyramidal TIFF.
        cells_path: the true cells beside it, ``NAME.cells.csv``: header ``x,y,class``, one row a
            nucleus, level-0 px.
        width: level-0 width, px.
        height: level-0 height, px (equal to ``width``: slides are square).
        mpp: µm per level-0 px.
        levels: (width, height) px of each pyramid level, level 0 first, each 4x smaller (floored).
        cells: (N, 3) int64 rows (x, y, class): the pixel of level 0 that holds each nucleus
            centre, ``floor(µm / mpp)``, (x, y) = (column, row), class 1 = BC (lymphocytes,
            fibroblasts), 2 = TC (tumour); every nucleus of the slide, all on tissue; sorted by (y, x).
        seed: the seed it was drawn from.
        crowding: the crowding it was drawn with, in [0, 1].
        instances_path: the nucleus instance labels beside it, ``NAME.instances.tif``: one tiled
            (``tile`` px, deflate) uint32 page of level 0's size, 0 background and k the nucleus of
            the k-th data row of ``NAME.cells.csv`` (1-based, header not counted), drawn as the
            patches' labels are (`equiseg.data.synthetic.world.instance_labels`), one render block at
            a time; each cell's point lies in its label.

    `tissue_mask` gives the true section, `render_region` level-0 pixels afresh.
    """

    path: Path
    cells_path: Path
    width: int
    height: int
    mpp: float
    levels: tuple[tuple[int, int], ...]
    cells: np.ndarray
    seed: int
    crowding: float
    instances_path: Path | None = None

    def tissue_mask(self, downsample: int = 1) -> np.ndarray:
        """The true tissue section, ``(height // downsample, width // downsample)`` bool.

        Pixel (i, j) is True where the outline field at the centre of level-0 px
        ``[j * downsample, (j + 1) * downsample) x [i * downsample, ...)`` is at or above its level:
        there the stain is at least half of full (it fades to glass over ~4 µm across the outline).
        Lumens (small pale holes, up to 5 % of the tissue in some slides) lie inside the mask.
        Cheap (no nuclei are placed); holds a few float32 arrays of the mask's shape.
        """
        if isinstance(downsample, bool) or not isinstance(downsample, (int, np.integer)) or downsample < 1:
            raise ValueError(f"downsample must be an integer >= 1, got {downsample!r}")
        outline = _draw_outline(_root(self.seed), self.width, self.mpp)
        view = View(0.0, 0.0, self.mpp * downsample, self.width // downsample, 1)
        return outline.field_on(view) >= outline.level

    def render_region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Level-0 px ``[x, x + width) x [y, y + height)`` rendered afresh from the slide's arguments:
        (height, width, 3) uint8, bit for bit what the TIFF holds there. Rebuilds the world first
        (placing all nuclei takes ~1.5 s for a 48000 px slide), then renders the blocks it touches.
        """
        if min(width, height) < 1 or x < 0 or y < 0 or x + width > self.width or y + height > self.height:
            raise ValueError(f"region x={x}, y={y}, {width} x {height} px is not inside the "
                             f"{self.width} x {self.height} px slide")
        slide = _Slide.make(self.seed, self.width, self.mpp, self.crowding)
        rows, cols = range(y // BLOCK, (y + height - 1) // BLOCK + 1), range(x // BLOCK, (x + width - 1) // BLOCK + 1)
        out = np.empty((len(rows) * BLOCK, len(cols) * BLOCK, 3), np.uint8)
        for i, row in enumerate(rows):
            for j, col in enumerate(cols):
                block = slide.block(row, col)
                out[i * BLOCK:i * BLOCK + block.shape[0], j * BLOCK:j * BLOCK + block.shape[1]] = block
        top, left = y - rows[0] * BLOCK, x - cols[0] * BLOCK
        return out[top:top + height, left:left + width].copy()


def write_synthetic_slide(path: Path | str, size: int = 12000, seed: int = 0, crowding: float = 1.0,
                          mpp: float = CELL_MPP, tile: int = 256,
                          on_progress: Callable[[int, int], None] | None = None) -> SyntheticSlide:
    """Draw a synthetic slide and write it to ``path`` (a pyramidal TIFF), its true cells and their instance
    labels beside it (``NAME.cells.csv``, ``NAME.instances.tif``: see `SyntheticSlide`).

    The TIFF is a generic tiled pyramid, as OpenSlide reads it (vendor ``generic-tiff``,
    ``openslide.mpp-x`` = ``mpp``): one page per level, level 0 first, each next level 4x smaller
    (floored) until a level's side is at most 1024 px. Level k is the area mean of level 0: the
    mean of its uint8 values over each 4^k x 4^k block, rounded half to even (not a mean of the
    rounded level above). RGB, tiles of ``tile`` px, deflate (zlib), resolution tags in pixels
    per cm, lower pages marked reduced-resolution, an ImageDescription naming equiseg, the seed,
    size, mpp and crowding; BigTIFF only when the pixels exceed 2 GiB. All three files are written
    beside their destinations as ``.NAME.partial-PID`` and renamed over them at the end, so a
    failure leaves whatever was there before and no partial file.

    Args:
        path: the ``.tif`` to write; its folder is created. The cells go to ``path`` with its
            suffix replaced by ``.cells.csv``.
        size: side of the square level 0, px: a multiple of 16 (so the first two reduced levels
            are exact means of the whole level 0) in [1024, 131072].
        seed: a non-negative integer; the same arguments give identical files.
        crowding: in [0, 1]: 0 the sparse patch world, 1 crowded tissue (touching tumour nuclei).
        mpp: µm per level-0 px, > 0; the world's features keep their size in µm.
        tile: TIFF tile side, px: a power of two in [16, 1024].
        on_progress: called as ``on_progress(done, total)`` after each row of render blocks
            (``total = ceil(size / 1024)``).

    Returns:
        The `SyntheticSlide`.

    Raises:
        ValueError: an argument out of its range, or ``path`` an existing folder.
    """
    check_arguments(size, seed, crowding, mpp, tile)
    dest = Path(path)
    if dest.is_dir():
        raise ValueError(f"{dest}: is a folder; give the path of the .tif to write")
    cells_dest, instances_dest = dest.with_suffix(".cells.csv"), dest.with_suffix(".instances.tif")
    dest.parent.mkdir(parents=True, exist_ok=True)  # before the world is drawn: a bad folder fails at once
    slide = _Slide.make(seed, size, mpp, crowding)
    cells, sources = slide.cell_sources()
    levels = _level_sides(size)
    description = (f"{_DESCRIPTION}: seed {seed}, {size} x {size} px at {mpp:g} um/px, "
                   f"crowding {crowding:g}, {len(cells)} cells")
    with (owned_file(dest) as tif_partial, owned_file(cells_dest) as cells_partial,
          owned_file(instances_dest) as instances_partial):
        _write_tiff(tif_partial, slide, levels, tile, description, on_progress)
        _write_cells(cells_partial, cells)
        _write_instances(instances_partial, slide, cells, sources, tile, description)
    return SyntheticSlide(dest, cells_dest, size, size, float(mpp), tuple((side, side) for side in levels),
                          cells, int(seed), float(crowding), instances_dest)


def check_arguments(size: int, seed: int, crowding: float, mpp: float, tile: int = 256) -> None:
    """Refuse arguments `write_synthetic_slide` cannot use, with a ValueError saying which."""
    def integer(value: object) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not integer(size) or not MIN_SIZE <= size <= MAX_SIZE or size % 16:
        raise ValueError(f"size must be a multiple of 16 px in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    if not integer(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0 <= crowding <= 1:
        raise ValueError(f"crowding must lie in [0, 1], got {crowding!r}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp (µm per px) must be a finite number > 0, got {mpp!r}")
    if not integer(tile) or not 16 <= tile <= BLOCK or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two in [16, {BLOCK}] px, got {tile!r}")


def _level_sides(size: int) -> list[int]:
    """Side in px of each pyramid level: level 0, then each 4x smaller (floored) while the last is above 1024."""
    sides = [size]
    while sides[-1] > LAST_LEVEL:
        sides.append(sides[-1] // LEVEL_SCALE)
    return sides


def _root(seed: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(seed, spawn_key=(_SLIDE,))


# --- the tissue section ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outline:
    """The tissue section: where ``field(x, y) >= level`` (µm); glass elsewhere.

    ``field = large + 0.3 detail - border(x) - border(y)``: a smooth field with a few lobes over
    the slide, a finer one that makes the outline ragged, and a fall-off over the outer 10 % of
    each side that keeps the section off the slide's edges (and makes everything beyond them glass).
    """

    large: Noise
    detail: Noise
    side: float  # µm
    level: float = 0.0
    ramp: float = 1.0  # field units over which the stain goes from none to full (~_EDGE µm across the outline)

    def _border(self, t: np.ndarray) -> np.ndarray:
        """The fall-off at µm ``t`` along one axis: a bowl that favours the centre (its sum over the two
        axes depends only on the distance to the centre, so the section is round at large), and a wall
        that rises to ``_BORDER`` at the slide's edge and stays there beyond.
        """
        inside = np.minimum(t, self.side - t)
        wall = _BORDER * np.clip(1 - inside / (_BORDER_WIDTH * self.side), 0, 1) ** 2
        return _BOWL * (2 * t / self.side - 1) ** 2 + wall

    def field_on(self, view: View) -> np.ndarray:
        """The field over ``view``: (size, size) float32, rows = y; the fall-off at pixel centres."""
        border = self._border(view.centres(view.y0))[:, None] + self._border(view.centres(view.x0))[None, :]
        return self.large.on(view) + np.float32(0.3) * self.detail.on(view) - border.astype(np.float32)

    def field_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The field at µm points (x, y): same shape as x, float32."""
        return (self.large.at(x, y) + np.float32(0.3) * self.detail.at(x, y)
                - (self._border(np.asarray(x)) + self._border(np.asarray(y))).astype(np.float32))

    def stain_on(self, view: View) -> np.ndarray:
        """Fraction of the stain kept over ``view``: (size, size) float32 in [0, 1], 0 on glass."""
        return np.clip((self.field_on(view) - np.float32(self.level)) / np.float32(self.ramp) + np.float32(0.5),
                       0, 1)


def _draw_outline(root: np.random.SeedSequence, size: int, mpp: float) -> _Outline:
    """The section of a slide of ``size`` px at ``mpp``: 45-65 % of the slide, a few lobes, ragged edges."""
    rng = child(root, _Stream.OUTLINE)
    side, extent = size * mpp, _rendered(size) * mpp
    large = Noise.random(rng, 0.0, extent, side * rng.uniform(0.25, 0.4))
    detail = Noise.random(rng, 0.0, extent, min(0.06 * side, 150.0) * rng.uniform(0.7, 1.3))
    coverage = rng.uniform(0.4, 0.6)
    outline = _Outline(large, detail, side)
    grid = 256  # point samples over the slide: enough for the level and the slope of the field at it
    field = outline.field_on(View(0.0, 0.0, side / grid, grid, 1))
    level = float(np.quantile(field, 1 - coverage))
    gy, gx = np.gradient(field, side / grid)  # field units per µm
    offset = np.abs(field - level)
    slope = float(np.median(np.hypot(gx, gy)[offset <= np.quantile(offset, 0.02)]))  # at the outline
    return dataclasses.replace(outline, level=level, ramp=_EDGE * slope)


def _rendered(size: int) -> int:
    """Level-0 px covered by whole render blocks: the fields must reach the far edge of the last block."""
    return math.ceil(size / BLOCK) * BLOCK


# --- chromatin: an unbounded field ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TiledNoise:
    """An unbounded smooth random field like `equiseg.data.synthetic.world.Noise` (a cubic B-spline
    over unit-variance coefficients every ``spacing`` µm) whose coefficients are drawn per block of
    ``block`` x ``block`` from a generator keyed by the block's index (i, j): every window is a piece
    of the same function, so render blocks meet without seams, and only a window is ever held.

    Coefficient (i, j) sits at µm ``((j - block) * spacing, (i - block) * spacing)``, so block indices
    stay non-negative for all views with x, y >= -block * spacing.
    """

    root: np.random.SeedSequence
    spacing: float = _CHROMATIN_SPACING
    block: int = 256

    def window(self, view: View) -> Noise:
        """A `Noise` holding just the coefficients that ``view``'s pixels need (4 taps each)."""
        b, s = self.block, self.spacing

        def span(start: float) -> tuple[int, int]:  # first and last coefficient index along one axis
            return math.floor(start / s) + b - 2, math.floor((start + view.size * view.mpp) / s) + b + 3

        (i0, i1), (j0, j1) = span(view.y0), span(view.x0)
        if min(i0, j0) < 0:
            raise ValueError(f"view at µm ({view.x0}, {view.y0}) is outside the field (x, y >= {-b * s})")
        coef = np.empty((i1 - i0 + 1, j1 - j0 + 1), np.float32)
        for bi in range(i0 // b, i1 // b + 1):
            rows = np.arange(max(i0, bi * b), min(i1 + 1, (bi + 1) * b))
            for bj in range(j0 // b, j1 // b + 1):
                cols = np.arange(max(j0, bj * b), min(j1 + 1, (bj + 1) * b))
                part = self._block(bi, bj)
                coef[rows[0] - i0:rows[-1] - i0 + 1, cols[0] - j0:cols[-1] - j0 + 1] = \
                    part[rows[0] - bi * b:rows[-1] - bi * b + 1, cols[0] - bj * b:cols[-1] - bj * b + 1]
        return Noise(coef, ((j0 - b) * s, (i0 - b) * s), s)

    def _block(self, bi: int, bj: int) -> np.ndarray:
        rng = child(self.root, _Stream.CHROMATIN, bi, bj)
        return (rng.standard_normal((self.block, self.block)) / SPLINE_STD).astype(np.float32)


# --- nuclei --------------------------------------------------------------------------------------------------------


_NUCLEUS_FIELDS = tuple(f.name for f in dataclasses.fields(Nuclei) if f.name != "kind")


def _place_slide_nuclei(root: np.random.SeedSequence, world: World, outline: _Outline, side: float,
                        crowding: float) -> tuple[Nuclei, ...]:
    """The nuclei of a slide of ``side`` µm, one `Nuclei` per kind, each sorted by y.

    The rules and numbers of `equiseg.data.synthetic.world.place_nuclei`, drawn band by band: a
    tumour cell on each site of one rotated hexagonal lattice (16-22 µm sparse, 10.5-13 µm crowded),
    jittered, kept in cancer areas (55-97 %) and rarely in stroma (1.2 %); lymphocytes from an
    inhomogeneous Poisson process (aggregates of ~50 µm, rare in cancer areas), at least
    8.5 - 2 crowding µm from tumour cells and from earlier lymphocytes; fibroblasts in stroma along
    the collagen, 7.5 µm from everything earlier. "Earlier" runs band by band, so the distances hold
    across band edges. Then every nucleus outside the fully stained section or in a lumen goes.
    """
    rng = child(root, _Stream.NUCLEI)
    spacing, turn = rng.uniform(16, 22), rng.uniform(0, np.pi / 3)
    spacing += crowding * (rng.uniform(10.5, 13.0) - spacing)
    kept = rng.uniform(0.55, 0.9)
    kept += crowding * (0.97 - kept)
    gain, density = rng.uniform(0.5, 1.5), math.exp(rng.uniform(math.log(300), math.log(3000)))
    gain, density = gain + 0.5 * crowding, density * (1 + 5 * crowding)
    cap = math.exp(2.5 * gain - gain ** 2 / 2)
    aggregates = Noise.random(rng, 0.0, side, 50.0)
    fibro_density = rng.uniform(300, 900)
    bands = [(k * _BAND, min((k + 1) * _BAND, side)) for k in range(math.ceil(side / _BAND))]

    def place(kind: NucleusKind, k: int) -> np.random.Generator:
        return child(root, _Stream.PLACE, kind, k)

    def around(per_band: list[np.ndarray], k: int) -> np.ndarray:
        """Points of bands k - 1 to k + 1: all that can lie within a clearance of band k (jitter < 20 µm)."""
        return np.concatenate(per_band[max(k - 1, 0):k + 2])

    tumour = [_lattice_band(place(NucleusKind.TUMOUR, k), world, spacing, turn, kept, side, y0, y1)
              for k, (y0, y1) in enumerate(bands)]
    lymph: list[np.ndarray] = []
    earlier = np.empty((0, 2))
    for k, (y0, y1) in enumerate(bands):
        band = place(NucleusKind.LYMPHOCYTE, k)
        points = _uniform_band(band, density * cap, side, y0, y1)
        points = points[band.uniform(0, cap, len(points)) < lymphocyte_intensity(world, aggregates, gain, cap, points)]
        lymph.append(clear_of(points, around(tumour, k), earlier, 8.5 - 2 * crowding))
        earlier = points
    fibro: list[np.ndarray] = []
    earlier = np.empty((0, 2))
    for k, (y0, y1) in enumerate(bands):
        points = _uniform_band(place(NucleusKind.FIBROBLAST, k), fibro_density, side, y0, y1)
        points = points[world.cancer_at(points[:, 0], points[:, 1]) < world.cancer_level - 0.1]
        fibro.append(clear_of(points, np.concatenate([around(tumour, k), around(lymph, k)]), earlier, 7.5))
        earlier = points

    return _kept_nuclei(root, world, outline, {NucleusKind.TUMOUR: tumour, NucleusKind.LYMPHOCYTE: lymph,
                                              NucleusKind.FIBROBLAST: fibro})


def _kept_nuclei(root: np.random.SeedSequence, world: World, outline: _Outline,
                 bands: dict[NucleusKind, list[np.ndarray]]) -> tuple[Nuclei, ...]:
    """Each kind's centres (per band) that lie on the fully stained section and outside lumens, with
    their shapes drawn, as one `Nuclei` per kind sorted by y.
    """
    groups = []
    for kind, per_band in bands.items():
        parts = []
        for k, points in enumerate(per_band):
            x, y = points[:, 0], points[:, 1]
            # fully stained only: no nuclei on glass, nor half-faded ones on the outline
            alive = outline.field_at(x, y) >= outline.level + outline.ramp / 2
            if world.holes is not None:
                alive &= world.holes.at(x, y) < world.hole_level - 0.3
            x, y = x[alive], y[alive]
            shapes = child(root, _Stream.SHAPES, kind, k)
            parts.append(make_nuclei(shapes, kind, x, y, world.style, fibre_angles(world, kind, x, y, shapes)))
        nuclei = Nuclei(kind, *(np.concatenate([getattr(part, name) for part in parts]) for name in _NUCLEUS_FIELDS))
        groups.append(nuclei.take(np.argsort(nuclei.y, kind="stable")))
    return tuple(groups)


def _lattice_band(rng: np.random.Generator, world: World, spacing: float, turn: float, kept: float,
                  side: float, y0: float, y1: float) -> np.ndarray:
    """Tumour cells of one band, (N, 2) µm: the sites of the hexagonal lattice (``spacing`` µm, turned
    by ``turn`` rad about the slide's centre) that lie in [0, side) x [y0, y1), jittered by 12 % of
    the spacing, each kept with probability ``kept`` in cancer areas and 0.012 elsewhere.
    """
    mid, height = side / 2, spacing * math.sqrt(3) / 2
    cos, sin = math.cos(turn), math.sin(turn)
    xs, ys = [], []
    for x0 in np.arange(0.0, side, _BAND):  # square chunks: a turned band's bounding box would be huge
        x1 = min(x0 + _BAND, side)
        corners = np.array([(x0, y0), (x1, y0), (x0, y1), (x1, y1)]) - mid
        along = corners[:, 0] * cos + corners[:, 1] * sin  # µm in the lattice's frame
        across = corners[:, 1] * cos - corners[:, 0] * sin
        i, j = np.meshgrid(np.arange(math.floor(across.min() / height) - 1, math.ceil(across.max() / height) + 2),
                           np.arange(math.floor(along.min() / spacing) - 2, math.ceil(along.max() / spacing) + 2),
                           indexing="ij")
        px, py = (j + 0.5 * (i % 2)) * spacing, i * height
        x, y = mid + px * cos - py * sin, mid + px * sin + py * cos
        inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        xs.append(x[inside])
        ys.append(y[inside])
    x, y = np.concatenate(xs), np.concatenate(ys)
    x, y = x + rng.normal(0, 0.12 * spacing, len(x)), y + rng.normal(0, 0.12 * spacing, len(y))
    in_cancer = world.cancer_at(x, y) > world.cancer_level
    keep = rng.uniform(0, 1, len(x)) < np.where(in_cancer, kept, 0.012)
    return np.stack([x[keep], y[keep]], axis=1)


def _uniform_band(rng: np.random.Generator, density: float, side: float, y0: float, y1: float) -> np.ndarray:
    """A Poisson process of ``density`` per mm² over [0, side) x [y0, y1) µm: (N, 2) µm."""
    n = rng.poisson(density * side * (y1 - y0) / 1e6)
    return np.stack([rng.uniform(0, side, n), rng.uniform(y0, y1, n)], axis=1)


# --- the slide -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slide:
    """Everything random about one slide; rendering a block of it is deterministic."""

    root: np.random.SeedSequence
    size: int  # px, level 0
    mpp: float
    world: World  # the patch world's fields over the rendered blocks, all nuclei (each kind sorted by y)
    outline: _Outline
    chromatin: _TiledNoise
    reach: float  # µm: no nucleus has density farther than this from its centre

    @classmethod
    def make(cls, seed: int, size: int, mpp: float, crowding: float) -> _Slide:
        root = _root(seed)
        extent = _rendered(size) * mpp
        fields = world_fields(child(root, _Stream.WORLD), -MARGIN, extent + MARGIN, crowding, chromatin=None)
        fields["unknown"] = None  # on a slide an unknown region would read as glass inside the section
        world = World(size=size, cell_mpp=mpp, offset=(0.5, 0.5), nuclei=(), **fields)
        outline = _draw_outline(root, size, mpp)
        nuclei = _place_slide_nuclei(root, world, outline, size * mpp, crowding)
        reach = max((float(group.reach().max()) for group in nuclei if len(group.x)), default=0.0)
        return cls(root, size, mpp, dataclasses.replace(world, nuclei=nuclei), outline, _TiledNoise(root),
                   reach + math.hypot(mpp, 2.5 * world.blur) + mpp)

    def cells(self) -> np.ndarray:
        """Every nucleus centre as (N, 3) int64 rows (x, y, class) in level-0 px, sorted by (y, x)."""
        return self.cell_sources()[0]

    def cell_sources(self) -> tuple[np.ndarray, np.ndarray]:
        """`cells` and, for each of its rows, the nucleus it comes from: (N, 2) rows (group, index in group)."""
        return cells_in(self.world.nuclei, 0.0, 0.0, self.mpp, self.size)

    def labels(self, row: int, col: int, ids: list[np.ndarray], cells: np.ndarray) -> np.ndarray:
        """The instance labels of render block (row, col), cut to the slide as `block` is: (h, w) int32, label
        ``ids[g][i]`` for nucleus i of group g, and each of ``cells`` (N, 3) (sorted by y, level-0 px) gives
        its own pixel the label of its row (1-based). Draws no random numbers.
        """
        view = View(col * BLOCK * self.mpp, row * BLOCK * self.mpp, self.mpp, BLOCK, 1)
        near = self._near_indices(view)
        groups = tuple(group.take(index) for group, index in zip(self.world.nuclei, near))
        first, last = np.searchsorted(cells[:, 1], [row * BLOCK, (row + 1) * BLOCK])
        points = np.stack([cells[first:last, 0] - col * BLOCK, cells[first:last, 1] - row * BLOCK,
                           np.arange(first + 1, last + 1)], axis=1)
        labels = instance_labels(groups, [i[index] for i, index in zip(ids, near)], view, self.world.blur, points)
        return labels[:self.size - row * BLOCK, :self.size - col * BLOCK]

    def block(self, row: int, col: int) -> np.ndarray:
        """Render block (row, col): level-0 px ``[col, col + 1) * BLOCK x [row, row + 1) * BLOCK`` cut to
        the slide, (h, w, 3) uint8.
        """
        view = View(col * BLOCK * self.mpp, row * BLOCK * self.mpp, self.mpp, BLOCK, 1)
        stain = self.outline.stain_on(view)
        rng = child(self.root, _Stream.PIXELS, row, col)
        if stain.any():
            world = dataclasses.replace(self.world, nuclei=self._near(view), chromatin=self.chromatin.window(view))
            rgb, _ = render(world, view, rng, stain)
        else:  # all glass: no stain anywhere, so rendering would give just this
            none = np.zeros((BLOCK, BLOCK), np.float32)
            rgb = colour(self.world, none, none, rng)
        return rgb[:self.size - row * BLOCK, :self.size - col * BLOCK]

    def _near(self, view: View) -> tuple[Nuclei, ...]:
        """The nuclei that can put density into ``view``."""
        return tuple(group.take(index) for group, index in zip(self.world.nuclei, self._near_indices(view)))

    def _near_indices(self, view: View) -> list[np.ndarray]:
        """Per group, the indices (ascending) of the nuclei that can put density into ``view``."""
        x0, y0, stop = view.x0 - self.reach, view.y0 - self.reach, view.size * view.mpp + 2 * self.reach
        indices = []
        for group in self.world.nuclei:
            first, last = np.searchsorted(group.y, [y0, y0 + stop])
            x = group.x[first:last]
            indices.append(first + np.flatnonzero((x >= x0) & (x < x0 + stop)))
        return indices


# --- writing -------------------------------------------------------------------------------------------------------


def _write_tiff(path: Path, slide: _Slide, sides: list[int], tile: int, description: str,
                on_progress: Callable[[int, int], None] | None) -> None:
    """Write the pyramid: level 0 from a generator of tiles rendered a row of blocks at a time, the
    lower levels from arrays filled by the same pass (level 0 is never held whole).
    """
    size, blocks = slide.size, math.ceil(slide.size / BLOCK)  # render blocks per side
    lower = [np.zeros((side, side, 3), np.uint8) for side in sides[1:]]

    def tiles() -> Iterator[np.ndarray]:
        for row in range(blocks):
            band = np.zeros((BLOCK, blocks * BLOCK, 3), np.uint8)  # a new one: tiles yielded earlier may be in use
            for col in range(blocks):
                block = slide.block(row, col)
                h, w = block.shape[:2]
                band[:h, col * BLOCK:col * BLOCK + w] = block
                sums = block.astype(np.uint32)
                for k, level in enumerate(lower, 1):
                    f = LEVEL_SCALE ** k  # BLOCK is a multiple of f, so only the last row and column floor
                    sums = _sum4(sums)  # exact sums of f x f level-0 px
                    hk, wk = sums.shape[:2]
                    level[row * BLOCK // f:row * BLOCK // f + hk, col * BLOCK // f:col * BLOCK // f + wk] = \
                        np.rint(sums / (f * f))
            if on_progress is not None:
                on_progress(row + 1, blocks)
            for top in range(0, min(BLOCK, size - row * BLOCK), tile):
                for left in range(0, size, tile):
                    yield np.ascontiguousarray(band[top:top + tile, left:left + tile])

    cm = size * slide.mpp * 1e-4  # the slide's side, cm
    # deflate level 1: on these noisy pixels it packs as tight as level 6 (ratio ~1.4) at twice the speed
    options = {"photometric": "rgb", "compression": "zlib", "compressionargs": {"level": 1},
               "resolutionunit": "CENTIMETER", "metadata": None, "tile": (tile, tile)}
    with tifffile.TiffWriter(path, bigtiff=3 * sum(side * side for side in sides) > 2 ** 31) as tif:
        tif.write(tiles(), shape=(size, size, 3), dtype=np.uint8, resolution=(size / cm, size / cm),
                  description=description, **options)
        for level in lower:
            side = level.shape[0]
            tif.write(level, subfiletype=1, resolution=(side / cm, side / cm), **options)


def _write_instances(path: Path, slide: _Slide, cells: np.ndarray, sources: np.ndarray, tile: int,
                     description: str) -> None:
    """Write the instance labels of level 0 as one tiled uint32 page, a row of render blocks at a time."""
    size, blocks = slide.size, math.ceil(slide.size / BLOCK)
    ids = []
    for number, group in enumerate(slide.world.nuclei):
        mine = np.flatnonzero(sources[:, 0] == number)
        ids.append(np.zeros(len(group.x), np.int64))
        ids[-1][sources[mine, 1]] = mine + 1

    def tiles() -> Iterator[np.ndarray]:
        for row in range(blocks):
            band = np.zeros((BLOCK, blocks * BLOCK), np.uint32)
            for col in range(blocks):
                labels = slide.labels(row, col, ids, cells)
                band[:labels.shape[0], col * BLOCK:col * BLOCK + labels.shape[1]] = labels
            for top in range(0, min(BLOCK, size - row * BLOCK), tile):
                for left in range(0, size, tile):
                    yield np.ascontiguousarray(band[top:top + tile, left:left + tile])

    cm = size * slide.mpp * 1e-4
    with tifffile.TiffWriter(path, bigtiff=4 * size * size > 2 ** 31) as tif:
        tif.write(tiles(), shape=(size, size), dtype=np.uint32, tile=(tile, tile), photometric="minisblack",
                  compression="zlib", compressionargs={"level": 1}, resolution=(size / cm, size / cm),
                  resolutionunit="CENTIMETER", metadata=None,
                  description=f"{description}; nucleus instance labels, k = row k of the cells CSV")


def _sum4(image: np.ndarray) -> np.ndarray:
    """Sums of the whole 4 x 4 blocks of (H, W, C) ``image``: (H // 4, W // 4, C), same dtype (strided
    adds: several times faster than a reshaped sum over two axes).
    """
    h, w = image.shape[0] // 4 * 4, image.shape[1] // 4 * 4
    rows = image[0:h:4] + image[1:h:4] + image[2:h:4] + image[3:h:4]
    return rows[:, 0:w:4] + rows[:, 1:w:4] + rows[:, 2:w:4] + rows[:, 3:w:4]


def _write_cells(path: Path, cells: np.ndarray) -> None:
    with path.open("w") as f:
        f.write("x,y,class\n")
        f.writelines(f"{x},{y},{c}\n" for x, y, c in cells.tolist())
