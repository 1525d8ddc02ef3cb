"""The synthetic world: tissue and nuclei in continuous µm, and its rendering into any view.

A procedural H&E-like world, rendered at two resolutions into an OCELOT-format folder.

Each sample is one *world*: a description in continuous µm coordinates of a square of tissue
(stroma with collagen fibres, blob-shaped cancer areas, sometimes lumens and an unknown region)
and of every nucleus in it (tumour cells, lymphocytes, fibroblasts). The world is rendered
analytically twice, never by resampling one image into the other:

* the tissue patch: ``size`` px at ``tissue_mpp`` (about 0.8 µm/px), covering the world (which extends a
  few µm beyond it so that nuclei at its edges are drawn whole);
* the cell patch: ``size`` px at ``cell_mpp = tissue_mpp / 4`` (about 0.2 µm/px), covering the
  block of the tissue patch centred at ``(patch_x_offset, patch_y_offset) * tissue side``.

So ``tissue_px = offset * size + (cell_px - size / 2) / 4`` (the OCELOT convention, see
`equiseg.data.ocelot.PairMeta.cell_block`), and the cell patch mean-pooled 4x looks like
the tissue patch cropped to that block.

Colour follows Beer-Lambert: ``RGB = I0 * exp(-(H * h + E * e + od0))`` with per-sample jittered
stain vectors ``h`` (hematoxylin) and ``e`` (eosin) and densities ``H``, ``E`` built from smooth
noise fields (cubic B-splines over random coefficients, so both views sample the same function)
and from each nucleus, drawn only inside its own bounding box.

Conventions: world coordinates are µm with the origin at the tissue patch's top-left corner, x to
the right, y down; pixel ``j`` of a view covers ``[j, j + 1)`` px, so its centre is ``j + 0.5``.
Cell points are ``(x, y, class)`` with ``(x, y) = (column, row)`` the integer pixel of the cell
patch that holds the nucleus centre; class 1 = BC (lymphocytes, fibroblasts), 2 = TC (tumour).
Tissue mask values: 1 background, 2 cancer area, 255 unknown.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree  # pyright: ignore[reportAttributeAccessIssue]  # from a compiled module
from scipy.special import ndtri

CELL_MPP = 0.2  # µm per cell-patch pixel, before per-sample jitter
SCALE = 4  # tissue_mpp / cell_mpp, exactly
SPLINE_STD = 0.48  # std of a cubic B-spline surface over unit-variance coefficients
MARGIN = 12.0  # µm of world kept beyond the tissue patch, so nuclei at its edges are drawn whole


class NucleusKind(IntEnum):
    """The kinds of nuclei in the world; `cell_class` is their OCELOT label."""

    TUMOUR = 0
    LYMPHOCYTE = 1
    FIBROBLAST = 2

    @property
    def cell_class(self) -> int:
        return 2 if self is NucleusKind.TUMOUR else 1


# --- smooth fields -------------------------------------------------------------------------------------------------


def _bspline_matrix(u: np.ndarray, n: int) -> np.ndarray:
    """Weights (len(u), n) with ``value(u) = sum_i coef[i] * beta3(u - i)``, beta3 the cubic B-spline.

    ``u`` is in grid units and must lie in [1, n - 3) so that all four taps exist.
    """
    i0 = np.floor(u).astype(np.int64)
    t = (u - i0).astype(np.float32)
    t2, t3 = t * t, t * t * t
    taps = ((1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6)
    matrix = np.zeros((len(u), n), np.float32)
    rows = np.arange(len(u))
    for k, weight in enumerate(taps):
        matrix[rows, i0 - 1 + k] = weight
    return matrix


@dataclass(frozen=True)
class View:
    """A square pixel grid over the world: pixel (row i, column j) covers µm
    ``[x0 + j * mpp, x0 + (j + 1) * mpp) x [y0 + i * mpp, y0 + (i + 1) * mpp)``.

    Smooth fields are averaged over ``supersample``² points per pixel, so a coarse view is the
    area average of a fine one rather than a point sample of it.
    """

    x0: float
    y0: float
    mpp: float
    size: int
    supersample: int

    def centres(self, start: float) -> np.ndarray:
        """µm of the pixel centres along one axis starting at ``start``: (size,) float32."""
        return (start + (np.arange(self.size) + 0.5) * self.mpp).astype(np.float32)


@dataclass(frozen=True)
class Noise:
    """A smooth random field: a cubic B-spline with unit-variance-ish values, correlation ~``spacing`` µm.

    Coefficient ``coef[i, j]`` sits at µm ``(x0 + j * spacing, y0 + i * spacing)``, ``(x0, y0) = origin``.
    """

    coef: np.ndarray
    origin: tuple[float, float]
    spacing: float

    @classmethod
    def random(cls, rng: np.random.Generator, start: float, stop: float, spacing: float,
               start_y: float | None = None) -> Noise:
        """A field defined over µm [start, stop] in x and [start_y, start_y + stop - start] in y (default: square)."""
        start_y = start if start_y is None else start_y
        n = math.ceil((stop - start) / spacing) + 5
        coef = (rng.standard_normal((n, n)) / SPLINE_STD).astype(np.float32)
        return cls(coef, (start - 2 * spacing, start_y - 2 * spacing), spacing)

    def at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Values at µm points (x, y): same shape as x, float32."""
        coords = np.stack([(np.asarray(y, np.float64) - self.origin[1]) / self.spacing,
                           (np.asarray(x, np.float64) - self.origin[0]) / self.spacing])
        return ndimage.map_coordinates(self.coef, coords.reshape(2, -1), order=3, prefilter=False,
                                       mode="nearest").reshape(np.shape(x)).astype(np.float32)

    def _axis(self, view: View, start: float, origin: float) -> tuple[np.ndarray, slice]:
        """Weights (size, m) over the m coefficients that the view's axis touches, and which they are."""
        ss = view.supersample
        u = (start + (np.arange(view.size * ss) + 0.5) / ss * view.mpp - origin) / self.spacing
        first, last = int(np.floor(u[0])) - 1, int(np.floor(u[-1])) + 2
        weights = _bspline_matrix(u - first, last - first + 1)
        return weights.reshape(view.size, ss, -1).mean(axis=1), slice(first, last + 1)

    def on(self, view: View) -> np.ndarray:
        """The field averaged over each pixel of ``view``: (size, size) float32, rows = y."""
        wy, rows = self._axis(view, view.y0, self.origin[1])
        wx, cols = self._axis(view, view.x0, self.origin[0])
        return wy @ self.coef[rows, cols] @ wx.T


def _level(rng: np.random.Generator, low: float, high: float) -> float:
    """Threshold on a unit field that leaves a fraction uniform in [low, high] above it."""
    return float(ndtri(1.0 - rng.uniform(low, high)))


# --- nuclei --------------------------------------------------------------------------------------------------------


@dataclass
class Nuclei:
    """Nuclei of one kind as arrays (N,): centres and semi-axes in µm, angle in rad (x towards y).

    The outline in the nucleus frame is ``rho = 1 + sum_k harm * (cos, sin)(k theta)``, k = 2, 3,
    with ``rho`` the elliptic radius over semi-axes (a, b). Densities are hematoxylin optical
    densities: ``dens`` uniform, ``tex`` multiplied by the chromatin texture, ``rim`` a dark
    membrane band; up to two nucleoli at µm offsets ``nucleoli[:, k, :2]`` with radius
    ``nucleoli[:, k, 2]`` and strength ``nucleoli[:, k, 3]`` (0: none).
    """

    kind: NucleusKind
    x: np.ndarray
    y: np.ndarray
    a: np.ndarray
    b: np.ndarray
    angle: np.ndarray
    harm: np.ndarray  # (N, 4): cos 2θ, sin 2θ, cos 3θ, sin 3θ
    dens: np.ndarray
    tex: np.ndarray
    rim: np.ndarray
    nucleoli: np.ndarray  # (N, 2, 4)

    def take(self, keep: np.ndarray | slice) -> Nuclei:
        return Nuclei(self.kind, *(getattr(self, f)[keep] for f in
                                    ("x", "y", "a", "b", "angle", "harm", "dens", "tex", "rim", "nucleoli")))

    def reach(self) -> np.ndarray:
        """µm from the centre beyond which the nucleus has no density."""
        return self.a * (1 + np.abs(self.harm).sum(axis=1))


def make_nuclei(rng: np.random.Generator, kind: NucleusKind, x: np.ndarray, y: np.ndarray,
                 style: dict[str, float], angle: np.ndarray | None = None) -> Nuclei:
    """Draw the shape and stain of each nucleus of ``kind`` at µm centres (x, y)."""
    n = len(x)
    nucleoli = np.zeros((n, 2, 4), np.float32)
    harm = np.zeros((n, 4), np.float32)
    if angle is None:
        angle = rng.uniform(0, np.pi, n)
    if kind is NucleusKind.TUMOUR:
        radius = np.clip(style["tumour_radius"] * rng.lognormal(0, 0.12, n), 4.0, 8.0)
        aspect = rng.uniform(0.65, 1.0, n)
        a, b = radius / np.sqrt(aspect), radius * np.sqrt(aspect)
        harm = rng.normal(0, 1, (n, 4)) * style["irregularity"] * np.array([1, 1, 0.6, 0.6])
        harm = np.clip(harm, -0.15, 0.15)
        dens = style["tumour_h"] * rng.lognormal(0, 0.2, n)  # hyperchromatic to vesicular
        tex, rim = dens * rng.uniform(0.6, 1.0, n), rng.uniform(0.3, 0.8, n)
        count = rng.choice(3, n, p=[0.25, 0.5, 0.25])
        radial, turn = radius[:, None] * 0.45 * np.sqrt(rng.uniform(0, 1, (n, 2))), rng.uniform(0, 2 * np.pi, (n, 2))
        nucleoli[..., 0], nucleoli[..., 1] = radial * np.cos(turn), radial * np.sin(turn)
        nucleoli[..., 2] = rng.uniform(0.6, 1.1, (n, 2))
        nucleoli[..., 3] = rng.uniform(1.0, 2.0, (n, 2)) * (np.arange(2) < count[:, None])
    elif kind is NucleusKind.LYMPHOCYTE:
        radius = rng.uniform(2.8, 3.8, n)
        aspect = rng.uniform(0.85, 1.0, n)
        a, b = radius / np.sqrt(aspect), radius * np.sqrt(aspect)
        dens = style["lymph_h"] * rng.uniform(0.9, 1.1, n)
        tex, rim = dens * 0.1, np.zeros(n)
    else:
        a, b = rng.uniform(4.0, 6.5, n), rng.uniform(1.0, 1.6, n)
        harm[:, 0] = rng.normal(0, 0.03, n)
        dens = style["fibro_h"] * rng.uniform(0.85, 1.15, n)
        tex, rim = dens * 0.25, np.zeros(n)
    arrays = (np.asarray(v, np.float32) for v in (x, y, a, b, angle, harm, dens, tex, rim))
    return Nuclei(kind, *arrays, nucleoli=nucleoli)


def _draw_nuclei(nuc: Nuclei, view: View, blur: float, uniform: np.ndarray, textured: np.ndarray,
                 cover: np.ndarray) -> None:
    """Add the nuclei's densities into the flat (size * size,) float64 accumulators of ``view``.

    Each nucleus is evaluated only on a K x K stamp around its centre (nuclei of similar size
    share K), and only where the stamp can be inside its outline. Edges are linear ramps
    ``sqrt(mpp² + (2.5 blur)²)`` µm wide, the width of a Gaussian blur of ``blur`` µm plus a pixel,
    so both views stay area averages of the same world.
    """
    size, mpp = view.size, view.mpp
    cx, cy = (nuc.x - view.x0) / mpp, (nuc.y - view.y0) / mpp  # continuous px
    edge = math.hypot(mpp, 2.5 * blur)
    reach = (nuc.reach() + edge) / mpp
    near = (cx + reach > 0) & (cx - reach < size) & (cy + reach > 0) & (cy - reach < size)
    order = np.flatnonzero(near)[np.argsort(reach[near], kind="stable")]
    for chunk in np.array_split(order, math.ceil(len(order) / 48)) if len(order) else ():
        _draw_stamps(nuc.take(chunk), cx[chunk], cy[chunk], math.ceil(2 * float(reach[chunk].max())) + 2,
                     view, blur, edge, (uniform, textured, cover))


def _stamp_outline(nuc: Nuclei, cx: np.ndarray, cy: np.ndarray, k: int, mpp: float, edge: float
                   ) -> tuple[np.ndarray, ...]:
    """The stamp pixels of nuclei with centres (cx, cy) in continuous px that can be inside their outline
    (or its ramp of ``edge`` µm): nucleus index n, stamp row r and column c, the pixel centre's µm offset
    (x, y) from the nucleus centre, ``inside_um`` (radial µm to the outline, + inside), and the stamps'
    first row and column (N,) in view px.
    """
    steps = np.arange(k)
    col0, row0 = np.floor(cx - k / 2).astype(np.int64), np.floor(cy - k / 2).astype(np.int64)
    cols, rows = col0[:, None] + steps, row0[:, None] + steps  # (N, K)
    dx = ((cols + 0.5 - cx[:, None]) * mpp).astype(np.float32)  # (N, K) µm along x
    dy = ((rows + 0.5 - cy[:, None]) * mpp).astype(np.float32)  # (N, K) µm along y
    cos, sin = np.cos(nuc.angle)[:, None, None], np.sin(nuc.angle)[:, None, None]
    u = (dx[:, None, :] * cos + dy[:, :, None] * sin) / nuc.a[:, None, None]  # (N, K, K) nucleus frame / semi-axes
    v = (dy[:, :, None] * cos - dx[:, None, :] * sin) / nuc.b[:, None, None]
    rho2 = u * u + v * v
    # the outline is at rho <= 1 + sum|harm|; the ramp reaches edge / 2 µm beyond it, at most edge / (2b) in rho
    limit = 1 + np.abs(nuc.harm).sum(axis=1) + edge / (2 * nuc.b)
    n, r, c = np.nonzero(rho2 < (limit ** 2)[:, None, None])  # only these stamp pixels can get density
    u, v, x, y = u[n, r, c], v[n, r, c], dx[n, c], dy[n, r]
    rho = np.sqrt(u * u + v * v) + np.float32(1e-6)
    boundary = np.float32(1.0)
    if np.any(nuc.harm):
        c1, s1 = u / rho, v / rho
        c2, s2 = c1 * c1 - s1 * s1, 2 * c1 * s1
        c3, s3 = c2 * c1 - s2 * s1, s2 * c1 + c2 * s1
        h = nuc.harm[n]
        boundary = 1 + h[:, 0] * c2 + h[:, 1] * s2 + h[:, 2] * c3 + h[:, 3] * s3
    inside_um = (boundary - rho) * np.sqrt(x * x + y * y) / rho  # radial distance to the outline, + inside
    return n, r, c, x, y, inside_um, row0, col0


def _draw_stamps(nuc: Nuclei, cx: np.ndarray, cy: np.ndarray, k: int, view: View, blur: float, edge: float,
                 accumulators: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """`_draw_nuclei` for nuclei with centres (cx, cy) in continuous px, all within K/2 px of their centre."""
    size, mpp = view.size, view.mpp
    n, r, c, x, y, inside_um, row0, col0 = _stamp_outline(nuc, cx, cy, k, mpp, edge)
    inside = np.clip(np.float32(0.5) + inside_um / np.float32(edge), 0, 1)
    dens = nuc.dens[n] * inside
    if np.any(nuc.rim):
        rim_width = math.sqrt(0.7 ** 2 + (2 * blur) ** 2 + mpp ** 2)
        band = np.clip(1 - inside_um / np.float32(rim_width), 0, 1) * inside
        dens += (nuc.rim * np.float32(0.7 / rim_width))[n] * band
    for i in range(nuc.nucleoli.shape[1]):
        spot = nuc.nucleoli[:, i]
        if not np.any(spot[:, 3]):
            continue
        radius = np.sqrt(spot[:, 2] ** 2 + (2 * blur) ** 2 + mpp ** 2)
        strength = spot[:, 3] * (spot[:, 2] / radius) ** 2  # keeps the integral under blur
        q = ((x - spot[n, 0]) ** 2 + (y - spot[n, 1]) ** 2) / (radius ** 2)[n]
        dens += strength[n] * np.clip(1 - q, 0, 1) ** 2 * inside
    pr, pc = row0[n] + r, col0[n] + c
    valid = (pr >= 0) & (pr < size) & (pc >= 0) & (pc < size)
    index = np.where(valid, pr * size + pc, size * size)
    for accumulator, weights in zip(accumulators, (dens, nuc.tex[n] * inside, inside)):
        accumulator += np.bincount(index, weights, minlength=size * size + 1)[:-1]


# --- the world -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """Everything random about one sample; rendering it is deterministic."""

    size: int
    cell_mpp: float
    offset: tuple[float, float]
    cancer: tuple[Noise, Noise]
    cancer_level: float
    stroma: Noise
    warp: Noise
    segments: Noise
    chromatin: Noise | None  # None in a slide's world, whose renderer supplies a window of an unbounded field
    holes: Noise | None
    hole_level: float
    unknown: Noise | None
    unknown_level: float
    unknown_fade: float
    nuclei: tuple[Nuclei, ...]
    fibre_angle: tuple[float, float]  # rad, direction of the phase gradient of each stripe family
    fibre_period: tuple[float, float]  # µm
    warp_amp: float
    stain_h: np.ndarray  # (3,) OD per unit hematoxylin
    stain_e: np.ndarray
    od0: np.ndarray
    illumination: np.ndarray
    style: dict[str, float]
    blur: float  # µm, Gaussian sigma of the optics
    noise: float  # grey levels, pixel noise sigma

    @property
    def tissue_mpp(self) -> float:
        return self.cell_mpp * SCALE

    @property
    def cell_view(self) -> View:
        side = self.size * self.tissue_mpp
        return View(self.offset[0] * side - self.size * self.cell_mpp / 2,
                     self.offset[1] * side - self.size * self.cell_mpp / 2, self.cell_mpp, self.size, 1)

    @property
    def tissue_view(self) -> View:
        return View(0.0, 0.0, self.tissue_mpp, self.size, SCALE)

    def cancer_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.cancer[0].at(x, y) + 0.35 * self.cancer[1].at(x, y)

    def fibre_direction(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Angle (rad) of the collagen fibres at µm points: perpendicular to the phase gradient of the stripe
        family that dominates there (the first where the stroma field is positive).
        """
        h = 0.25
        wx = (self.warp.at(x + h, y) - self.warp.at(x - h, y)) / (2 * h)
        wy = (self.warp.at(x, y + h) - self.warp.at(x, y - h)) / (2 * h)
        angle = np.where(self.stroma.at(x, y) > 0, *self.fibre_angle)
        gx, gy = np.cos(angle) + self.warp_amp * wx, np.sin(angle) + self.warp_amp * wy
        return np.arctan2(gy, gx) + np.pi / 2


def child(seq: np.random.SeedSequence, *key: int) -> np.random.Generator:
    """Generator for the independent stream of ``seq`` named by the non-negative integers ``key``
    (``seq``'s spawn key extended by them), without mutating ``seq``.
    """
    return np.random.default_rng(np.random.SeedSequence(seq.entropy, spawn_key=(*seq.spawn_key, *key),
                                                        pool_size=seq.pool_size))


def make_world(seq: np.random.SeedSequence, size: int, crowding: float = 0.0) -> World:
    rng = child(seq, 0)
    cell_mpp = round(CELL_MPP * rng.uniform(0.97, 1.03), 6)
    side = size * cell_mpp * SCALE  # µm of the tissue patch
    offset_x, offset_y = (float(v) for v in rng.integers(2, 15, 2) / 16)  # centre on a 1/16 grid in [1/8, 7/8]
    offset = (offset_x, offset_y)
    lo, hi = -MARGIN, side + MARGIN
    cell_view_x0 = offset[0] * side - size * cell_mpp / 2
    cell_view_y0 = offset[1] * side - size * cell_mpp / 2
    # the fine chromatin field is only seen in the cell view: it covers that and 4 µm around it
    chromatin = (cell_view_x0 - 4, cell_view_x0 + size * cell_mpp + 4, cell_view_y0 - 4)
    world = World(size=size, cell_mpp=cell_mpp, offset=offset, nuclei=(),
                   **world_fields(rng, lo, hi, crowding, chromatin))
    # nuclei are placed by context, so they are drawn against the world's fields
    # crowding draws from its own stream, so that crowding 0 leaves the sparse world as it was
    nuclei = place_nuclei(rng, world, lo, hi, crowding, child(seq, 3))
    return dataclasses.replace(world, nuclei=nuclei)


def world_fields(rng: np.random.Generator, lo: float, hi: float, crowding: float,
                  chromatin: tuple[float, float, float] | None) -> dict:
    """Everything random about a world but its extent and its nuclei, as `World`'s keyword arguments:
    the smooth fields over µm [lo, hi]² and their levels, the style, the stains, the optics.

    ``chromatin`` = µm (x_start, x_stop, y_start) of the square that the 0.8 µm chromatin field
    covers; None draws none (a slide's renderer supplies windows of an unbounded field).
    """
    cancer_spacing = rng.uniform(60, 110)
    cancer = (Noise.random(rng, lo, hi, cancer_spacing), Noise.random(rng, lo, hi, cancer_spacing / 2.5))
    # a few samples have (almost) no cancer; the field is a sum with std ~ sqrt(1 + 0.35²)
    cancer_level = 1.06 * (_level(rng, 0.0, 0.04) if rng.uniform() < 0.15 else _level(rng, 0.2, 0.7))
    holes = Noise.random(rng, lo, hi, rng.uniform(15, 30)) if rng.uniform() < 0.4 else None
    unknown = Noise.random(rng, lo, hi, rng.uniform(100, 180)) if rng.uniform() < 0.25 else None
    style = {
        "tumour_radius": rng.uniform(5.0, 6.5),
        "irregularity": rng.uniform(0.04, 0.1),
        "tumour_h": rng.uniform(0.6, 0.9),
        "lymph_h": rng.uniform(1.8, 2.3),
        "fibro_h": rng.uniform(1.2, 1.6),
        "stroma_e": rng.uniform(0.2, 0.35),
        "fibre_e": rng.uniform(0.3, 0.6),
        "cancer_e": rng.uniform(0.3, 0.5),
        "cancer_h": rng.uniform(0.06, 0.18),
        "stroma_h": rng.uniform(0.02, 0.08),
        "texture": rng.uniform(0.6, 1.0),
    }
    style["tumour_radius"] *= 1 - 0.15 * crowding  # nests pack smaller nuclei
    fibre_angle = rng.uniform(0, np.pi)
    h_scale, e_scale = rng.uniform(0.75, 1.25), rng.uniform(0.7, 1.3)
    stain_h = np.array([0.60, 0.75, 0.30]) + rng.normal(0, 0.04, 3)
    stain_e = np.array([0.15, 0.88, 0.45]) + rng.normal(0, 0.04, 3)
    return {
        "cancer": cancer, "cancer_level": cancer_level,
        "stroma": Noise.random(rng, lo, hi, 30.0),
        "warp": Noise.random(rng, lo, hi, rng.uniform(40, 80)),
        "segments": Noise.random(rng, lo, hi, rng.uniform(10, 20)),
        "chromatin": None if chromatin is None else Noise.random(rng, chromatin[0], chromatin[1], 0.8, chromatin[2]),
        "holes": holes, "hole_level": _level(rng, 0.01, 0.05),
        "unknown": unknown, "unknown_level": _level(rng, 0.05, 0.3), "unknown_fade": float(rng.choice([0.03, 0.3])),
        "fibre_angle": (fibre_angle, fibre_angle + rng.choice([-1, 1]) * rng.uniform(0.3, 1.2)),
        "fibre_period": (rng.uniform(3.5, 6.0), rng.uniform(3.0, 5.0)), "warp_amp": rng.uniform(6, 15),
        "stain_h": (h_scale * stain_h / np.linalg.norm(stain_h)).astype(np.float32),
        "stain_e": (e_scale * stain_e / np.linalg.norm(stain_e)).astype(np.float32),
        "od0": rng.uniform(0.01, 0.05, 3).astype(np.float32),
        "illumination": (255 - rng.uniform(0, 12, 3)).astype(np.float32),
        "style": style, "blur": rng.uniform(0.05, 0.5), "noise": rng.uniform(1.0, 4.0),
    }


def place_nuclei(rng: np.random.Generator, world: World, lo: float, hi: float, crowding: float = 0.0,
                 crowd: np.random.Generator | None = None) -> tuple[Nuclei, ...]:
    """Tumour cells on a jittered hexagonal lattice in cancer areas, lymphocytes and fibroblasts in stroma.

    ``crowding`` in [0, 1] moves the sparse world (tumour lattice 16-22 µm, 55-90 % of its
    sites kept) towards crowded tissue: tumour nests on a 10.5-13 µm lattice with 97 % of the
    sites kept (nuclei 50-65 px apart at 0.2 µm/px, so they touch), lymphocytes six times as
    dense, in tighter aggregates, down to 6.5 µm apart (touching); ``crowd`` draws the crowded
    world's own numbers.
    """
    crowd = crowd if crowd is not None else np.random.default_rng(0)
    area = (hi - lo) ** 2 / 1e6  # mm²
    tumour = _tumour_lattice(rng, world, lo, hi, crowding, crowd)
    # lymphocytes: inhomogeneous Poisson (aggregates), rare inside cancer areas
    gain, density = rng.uniform(0.5, 1.5), math.exp(rng.uniform(math.log(300), math.log(3000)))
    gain, density = gain + 0.5 * crowding, density * (1 + 5 * crowding)
    cap = math.exp(2.5 * gain - gain ** 2 / 2)
    aggregates = Noise.random(rng, lo, hi, 50.0)
    lymph = rng.uniform(lo, hi, (rng.poisson(density * cap * area), 2))
    intensity = lymphocyte_intensity(world, aggregates, gain, cap, lymph)
    lymph = clear_of(lymph[rng.uniform(0, cap, len(lymph)) < intensity], tumour, np.empty((0, 2)), 8.5 - 2 * crowding)
    # fibroblasts: in stroma, along the local collagen fibres
    fibro = rng.uniform(lo, hi, (rng.poisson(rng.uniform(300, 900) * area), 2))
    fibro = fibro[world.cancer_at(fibro[:, 0], fibro[:, 1]) < world.cancer_level - 0.1]
    fibro = clear_of(fibro, np.concatenate([tumour, lymph]), np.empty((0, 2)), 7.5)
    groups = []
    for kind, points in ((NucleusKind.TUMOUR, tumour), (NucleusKind.LYMPHOCYTE, lymph),
                         (NucleusKind.FIBROBLAST, fibro)):
        x, y = points[:, 0], points[:, 1]
        alive = np.ones(len(x), bool)  # no nuclei in lumens, glass or the unknown region
        if world.holes is not None:
            alive &= world.holes.at(x, y) < world.hole_level - 0.3
        if world.unknown is not None:
            alive &= world.unknown.at(x, y) < world.unknown_level - 0.1
        groups.append(make_nuclei(rng, kind, x[alive], y[alive], world.style, fibre_angles(world, kind, x[alive],
                                                                                           y[alive], rng)))
    return tuple(groups)


def _tumour_lattice(rng: np.random.Generator, world: World, lo: float, hi: float, crowding: float,
                    crowd: np.random.Generator) -> np.ndarray:
    """(N, 2) tumour centres: a rotated, jittered hex lattice, thinned by context (kept in cancer
    areas, a few isolated tumour cells in stroma).
    """
    spacing, turn = rng.uniform(16, 22), rng.uniform(0, np.pi / 3)
    spacing += crowding * (crowd.uniform(10.5, 13.0) - spacing)
    reach = int((hi - lo) / spacing) + 2
    i, j = np.meshgrid(np.arange(-reach, reach + 1), np.arange(-reach, reach + 1), indexing="ij")
    px, py = (j + 0.5 * (i % 2)) * spacing, i * spacing * math.sqrt(3) / 2
    mid = (lo + hi) / 2
    x = mid + px * math.cos(turn) - py * math.sin(turn)
    y = mid + px * math.sin(turn) + py * math.cos(turn)
    inside = (x > lo) & (x < hi) & (y > lo) & (y < hi)
    x, y = x[inside] + rng.normal(0, 0.12 * spacing, inside.sum()), y[inside] + rng.normal(0, 0.12 * spacing,
                                                                                             inside.sum())
    in_cancer = world.cancer_at(x, y) > world.cancer_level
    draw = rng.uniform(0, 1, len(x))
    kept = rng.uniform(0.55, 0.9)
    kept += crowding * (0.97 - kept)
    keep = draw < np.where(in_cancer, kept, 0.012)
    return np.stack([x[keep], y[keep]], axis=1)


def lymphocyte_intensity(world: World, aggregates: Noise, gain: float, cap: float, points: np.ndarray) -> np.ndarray:
    """The lymphocytes' Poisson intensity at ``points`` (N, 2) µm, at most ``cap``: log-normal in the
    aggregate field, an eighth of it inside cancer areas. A point is kept when a uniform draw on
    [0, cap) falls below it.
    """
    intensity = np.minimum(np.exp(gain * aggregates.at(points[:, 0], points[:, 1]) - gain ** 2 / 2), cap)
    return intensity * np.where(world.cancer_at(points[:, 0], points[:, 1]) > world.cancer_level, 0.12, 1.0)


def clear_of(points: np.ndarray, others: np.ndarray, earlier: np.ndarray, distance: float) -> np.ndarray:
    """The ``points`` (N, 2) farther than ``distance`` µm from all ``others`` and from every earlier
    candidate: those of ``earlier`` (on a slide, the band before, kept or not) and those before it
    in ``points``.
    """
    keep = np.ones(len(points), bool)
    if len(others) and len(points):
        keep &= cKDTree(others).query(points, k=1)[0] > distance
    both = np.concatenate([earlier, points])
    if len(both) > 1:
        later = cKDTree(both).query_pairs(distance, output_type="ndarray")[:, 1] - len(earlier)  # pairs i < j
        keep[later[later >= 0]] = False
    return points[keep]


def fibre_angles(world: World, kind: NucleusKind, x: np.ndarray, y: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray | None:
    """A fibroblast lies along the local collagen (± 0.25 rad); other kinds draw their own angle (None)."""
    if kind is not NucleusKind.FIBROBLAST:
        return None
    return world.fibre_direction(x, y) + rng.normal(0, 0.25, len(x))


def render(world: World, view: View, rng: np.random.Generator,
            stain: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """RGB (size, size, 3) uint8 of ``view`` and the cancer field minus its level (size, size) float32.

    ``stain``: (size, size) float32 in [0, 1], the fraction of all stain kept per pixel (0 = bare
    glass, used by slides around the tissue section); None keeps all of it.
    """
    style, size, blur = world.style, view.size, world.blur
    cancer = world.cancer[0].on(view) + 0.35 * world.cancer[1].on(view) - world.cancer_level
    in_cancer = np.clip(cancer / 0.08 + 0.5, 0, 1)
    stroma = world.stroma.on(view)
    segments = world.segments.on(view)
    # collagen: two families of warped stripes ((1 + cos) / 2)³, whose mean is 5/16, each dominating its own
    # patches (crossing families look like fabric), cut into segments; the Gaussian blur of the optics and of the
    # pixel (variance mpp²/12) damps a period p by exp(-2 pi² s² / p²)
    xs, ys = view.centres(view.x0), view.centres(view.y0)
    warp = world.warp_amp * world.warp.on(view)
    fibres = np.zeros((size, size), np.float32)
    first = np.clip(0.5 + 1.5 * stroma, 0, 1)
    for angle, period, weight in zip(world.fibre_angle, world.fibre_period, (first, 1 - first)):
        phase = (xs[None, :] * math.cos(angle) + ys[:, None] * math.sin(angle) + warp) * np.float32(2 * np.pi / period)
        stripes = np.float32(0.5) + np.float32(0.5) * np.cos(phase)
        damp = math.exp(-2 * np.pi ** 2 * (blur ** 2 + view.mpp ** 2 / 12) / period ** 2)
        fibres += weight * (np.float32(5 / 16) + np.float32(damp) * (stripes ** 3 - np.float32(5 / 16)))
    fibres *= np.clip(0.4 + 0.8 * segments, 0, 1)
    stroma_e = style["stroma_e"] * (1 + 0.2 * stroma) + style["fibre_e"] * (1 + 0.3 * stroma) * fibres
    eosin = stroma_e + in_cancer * (style["cancer_e"] * (1 + 0.1 * stroma + 0.1 * segments) - stroma_e)
    hema = style["stroma_h"] + in_cancer * np.float32(style["cancer_h"] - style["stroma_h"])

    uniform, textured, cover = (np.zeros(size * size) for _ in range(3))
    for group in world.nuclei:
        _draw_nuclei(group, view, blur, uniform, textured, cover)
    shape = (size, size)
    uniform, textured, cover = (a.reshape(shape).astype(np.float32) for a in (uniform, textured, cover))
    if view.supersample == 1:  # chromatin granules are resolved only in the fine view; elsewhere their mean (1)
        grain = style["texture"] * math.exp(-((blur / 0.4) ** 2))
        assert world.chromatin is not None  # a patch's world has it; a slide's renderer puts in its window
        textured *= np.exp(np.float32(grain) * world.chromatin.on(view) - np.float32(grain ** 2 / 2))
    hema = hema + uniform + textured
    eosin = eosin * (1 - 0.65 * np.minimum(cover, 1)) + 0.08 * cover

    # fraction of stain left: lumens and the unknown region are pale, glass has none
    tissue = np.ones(shape, np.float32) if stain is None else np.array(stain, np.float32)
    if world.holes is not None:
        tissue *= 1 - 0.92 * np.clip((world.holes.on(view) - world.hole_level) / 0.15 + 0.5, 0, 1)
    if world.unknown is not None:
        unknown = np.clip((world.unknown.on(view) - world.unknown_level) / 0.05 + 0.5, 0, 1)
        tissue *= 1 - (1 - world.unknown_fade) * unknown
    return colour(world, hema * tissue, eosin * tissue, rng), cancer


def colour(world: World, hema: np.ndarray, eosin: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Beer-Lambert RGB (H, W, 3) uint8 of hematoxylin and eosin densities (H, W) float32, with uniform
    pixel noise of std ``world.noise`` grey levels drawn from ``rng`` (H * W values per channel).
    """
    rgb = np.empty((*hema.shape, 3), np.uint8)
    half_width = np.float32(world.noise * math.sqrt(3))  # uniform pixel noise with std ``noise``
    for channel in range(3):
        od = hema * world.stain_h[channel] + eosin * world.stain_e[channel] + world.od0[channel]
        grey = world.illumination[channel] * np.exp(-od)
        grey += (rng.random(hema.shape, dtype=np.float32) * 2 - 1) * half_width
        rgb[..., channel] = np.clip(np.rint(grey), 0, 255)
    return rgb


def cell_points(world: World) -> np.ndarray:
    """Nucleus centres inside the cell patch as (N, 3) int64 rows (x, y, class), sorted by (y, x)."""
    return _cell_sources(world)[0]


def _cell_sources(world: World) -> tuple[np.ndarray, np.ndarray]:
    """`cell_points` and, for each of its rows, the nucleus it comes from: (N, 2) rows (group, index in group)."""
    view = world.cell_view
    return cells_in(world.nuclei, view.x0, view.y0, view.mpp, view.size)


def cells_in(nuclei: tuple[Nuclei, ...], x0: float, y0: float, mpp: float,
             size: int) -> tuple[np.ndarray, np.ndarray]:
    """The cells whose centre lies in the ``size`` px square view at (x0, y0) µm, ``mpp`` µm/px:
    (N, 3) int64 rows (x, y, class) in view px, sorted by (y, x), and for each row the nucleus it
    comes from, (N, 2) rows (group, index in group).
    """
    rows, sources = [], []
    for number, group in enumerate(nuclei):
        col, row = np.floor((group.x - x0) / mpp), np.floor((group.y - y0) / mpp)
        inside = (col >= 0) & (col < size) & (row >= 0) & (row < size)
        rows.append(np.stack([col[inside], row[inside], np.full(inside.sum(), group.kind.cell_class)], axis=1))
        sources.append(np.stack([np.full(inside.sum(), number), np.flatnonzero(inside)], axis=1))
    cells = np.concatenate(rows).astype(np.int64).reshape(-1, 3)
    order = np.lexsort((cells[:, 0], cells[:, 1]))
    return cells[order], np.concatenate(sources).astype(np.int64).reshape(-1, 2)[order]


def cell_instances(world: World) -> np.ndarray:
    """The cell patch's nucleus instance labels: (size, size) int32, 0 background, k for the k-th row of
    `cell_points` (1-based), drawn from the same nuclei as `render` by `instance_labels`, without random
    numbers. Nuclei whose centre lies outside the patch have no row, so the pixels they dominate are
    background; a nucleus cut by the patch border keeps its inside part.
    """
    view = world.cell_view
    cells, sources = _cell_sources(world)
    ids = []
    for number, group in enumerate(world.nuclei):
        mine = np.flatnonzero(sources[:, 0] == number)
        ids.append(np.zeros(len(group.x), np.int64))
        ids[-1][sources[mine, 1]] = mine + 1
    points = np.stack([cells[:, 0], cells[:, 1], np.arange(1, len(cells) + 1)], axis=1)
    return instance_labels(world.nuclei, ids, view, world.blur, points)


def instance_labels(nuclei: Sequence[Nuclei], ids: Sequence[np.ndarray], view: View, blur: float,
                    points: np.ndarray) -> np.ndarray:
    """Nucleus instance labels over ``view``: (size, size) int32, 0 background; ``ids[g][i]`` is the label
    of nucleus i of ``nuclei[g]`` (0: none, its pixels are background).

    A pixel belongs to the nucleus whose outline its centre lies deepest inside (radial µm to the outline,
    the measure `render` ramps its edges by, blurred by ``blur`` µm); ties go to the nucleus drawn first.
    Each pixel depends only on the nuclei that reach it, so adjacent views agree at their seams. Then each
    of ``points`` (M, 3) rows (x, y, label) in view px that lie in the view gives its pixel its label: a
    nucleus's own centre is always its own.
    """
    size = view.size
    edge = math.hypot(view.mpp, 2.5 * blur)
    pixels, depths, labels = [], [], []
    for group, group_ids in zip(nuclei, ids):
        for pixel, depth, n in _outline_pixels(group, view, edge):
            pixels.append(pixel)
            depths.append(depth)
            labels.append(group_ids[n])
    out = np.zeros(size * size, np.int32)
    if pixels:
        pixel, depth, label = np.concatenate(pixels), np.concatenate(depths), np.concatenate(labels)
        order = np.lexsort((-depth, pixel))  # per pixel, the deepest first (stable: ties keep drawing order)
        pixel, label = pixel[order], label[order]
        first = np.ones(len(pixel), bool)
        first[1:] = pixel[1:] != pixel[:-1]
        out[pixel[first]] = label[first]
    x, y = points[:, 0], points[:, 1]
    inside = (x >= 0) & (x < size) & (y >= 0) & (y < size)
    out[(y * size + x)[inside]] = points[inside, 2]
    return out.reshape(size, size)


def _outline_pixels(nuc: Nuclei, view: View, edge: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For chunks of the nuclei: the flat indices of the view's pixels whose centre lies inside a nucleus's
    outline, how deep (µm), and which nucleus (index into ``nuc``); stamps as in `_draw_nuclei`.
    """
    size, mpp = view.size, view.mpp
    cx, cy = (nuc.x - view.x0) / mpp, (nuc.y - view.y0) / mpp
    reach = (nuc.reach() + edge) / mpp
    near = (cx + reach > 0) & (cx - reach < size) & (cy + reach > 0) & (cy - reach < size)
    order = np.flatnonzero(near)[np.argsort(reach[near], kind="stable")]
    for chunk in np.array_split(order, math.ceil(len(order) / 48)) if len(order) else ():
        k = math.ceil(2 * float(reach[chunk].max())) + 2
        n, r, c, _, _, inside_um, row0, col0 = _stamp_outline(nuc.take(chunk), cx[chunk], cy[chunk], k, mpp, edge)
        pr, pc = row0[n] + r, col0[n] + c
        keep = (inside_um > 0) & (pr >= 0) & (pr < size) & (pc >= 0) & (pc < size)
        yield (pr * size + pc)[keep], inside_um[keep], chunk[n[keep]]
