"""Synthetic OCELOT pairs: one world (`equiseg.data.synthetic.world`) rendered as a tissue patch
and the 4x-finer cell patch inside it, and whole datasets of them in the Zenodo layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from scipy import ndimage

from equiseg.data.ocelot import (
    TISSUE_BACKGROUND,
    TISSUE_CANCER,
    TISSUE_UNKNOWN,
    Split,
    pair_record,
    write_metadata,
    write_pair,
)
from equiseg.data.synthetic.world import (
    World,
    cell_instances,
    cell_points,
    child,
    colour,
    make_world,
    render,
)
from equiseg.files import written_whole_folder

DEFAULT_COUNTS = MappingProxyType({"train": 8, "val": 4, "test": 4})


@dataclass
class SyntheticPair:
    """One rendered sample, in the same form as `equiseg.data.ocelot.Sample`'s arrays.

    Attributes:
        cell_image: (size, size, 3) uint8, the 4x-finer view of the cell block.
        tissue_image: (size, size, 3) uint8, the whole world.
        cells: (N, 3) int64 rows (x, y, class) in cell-patch px, (x, y) = (column, row),
            class 1 = BC, 2 = TC; every point lies inside the cell patch.
        tissue_mask: (size, size) uint8, 1 background, 2 cancer area, 255 unknown.
        cell_mpp: µm per px of the cell patch (about 0.2).
        tissue_mpp: µm per px of the tissue patch; ``cell_mpp / tissue_mpp == 0.25`` exactly.
        patch_x_offset: centre of the cell patch as a fraction of the tissue patch's width,
            a multiple of 1/16 in [1/8, 7/8], so the cell block lies inside the tissue patch.
        patch_y_offset: the same along the height.
        instances: (size, size) int32 nucleus instance labels of the cell patch: 0 background, k the
            nucleus of the k-th row of ``cells`` (1-based), whose point it always contains
            (`equiseg.data.synthetic.world.cell_instances`).
    """

    cell_image: np.ndarray
    tissue_image: np.ndarray
    cells: np.ndarray
    tissue_mask: np.ndarray
    cell_mpp: float
    tissue_mpp: float
    patch_x_offset: float
    patch_y_offset: float
    instances: np.ndarray


def check_size(size: int) -> None:
    """Refuse patch sides that are not a positive multiple of 32 px (the cell block is size / 4 px)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0 or size % 32:
        raise ValueError(f"size must be a positive multiple of 32 px, got {size!r}")



def _turn(points: np.ndarray, centre: np.ndarray, angle: float) -> np.ndarray:
    """(N, 2) points (x, y) turned by ``angle`` rad about ``centre`` (x towards y: clockwise on screen)."""
    c, s = math.cos(angle), math.sin(angle)
    d = points - centre
    return centre + np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]], axis=1)


def _turned_image(image: np.ndarray, centre: tuple[float, float], angle: float, order: int,
                  fill: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (H, W[, C]) turned by ``angle`` about the px point ``centre`` (x, y), in its own frame:
    output pixel p shows the source at ``centre + R(-angle) (p - centre)`` (spline ``order``); where that
    point lies outside the source, ``fill`` (same shape as ``image``) shows instead, blended over one px
    of anti-aliased edge. Returns the image (same dtype) and the covered fraction (H, W) float32.
    """
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    source = _turn(np.stack([xs.ravel(), ys.ravel()], axis=1), np.array(centre), -angle)
    sx, sy = source[:, 0].reshape(h, w), source[:, 1].reshape(h, w)
    cover = np.clip(np.minimum.reduce([sx, w - sx, sy, h - sy]) + 0.5, 0, 1).astype(np.float32)
    coords = np.stack([sy - 0.5, sx - 0.5])
    channels = image[..., None] if image.ndim == 2 else image
    out = np.empty(channels.shape, np.float32)
    for k in range(channels.shape[2]):
        out[..., k] = ndimage.map_coordinates(channels[..., k].astype(np.float32), coords, order=order,
                                              mode="nearest", prefilter=order > 1)
    out = out.reshape(image.shape)
    weight = cover if image.ndim == 2 else cover[..., None]
    if order == 0:  # labels: no blending, the source where more than half a pixel is covered
        out = np.where(weight > 0.5, out, fill)
    else:
        out = weight * out + (1 - weight) * fill.astype(np.float32)
    info = np.iinfo(image.dtype)
    return np.clip(np.rint(out), info.min, info.max).astype(image.dtype), cover


def _crop_angle(offset: tuple[float, float], rng: np.random.Generator) -> tuple[float, tuple[float, float]]:
    """An angle (rad) uniform over those that keep the cell block inside the tissue patch once both turn
    about the tissue patch's centre, and the cell patch's centre offset after the turn.
    """
    for _ in range(1000):  # at least a quarter of all angles qualify for any offset in [1/8, 7/8]²
        angle = float(rng.uniform(0, 2 * np.pi))
        moved = _turn(np.array([offset]), np.array([0.5, 0.5]), angle)[0]
        if np.all((moved >= 0.125 - 1e-9) & (moved <= 0.875 + 1e-9)):
            return angle, (float(moved[0]), float(moved[1]))
    return 0.0, offset


def _rotated_crop(pair: SyntheticPair, world: World, rng: np.random.Generator) -> SyntheticPair:
    """``pair`` seen through crops turned by a random angle: the cell patch turned about its centre and shown
    in an axis-aligned frame whose corners outside the crop are bare glass; the tissue patch turned by the same
    angle about its own centre (glass in its corners too), its cell block offset moved with the turn so the
    cell block relation of `cell_block` still holds exactly.

    Cells are cut by the crop's border at the angle of the turn; points move with the exact turn of their
    pixel centres and those that leave the frame are dropped; outside the tissue crop the mask is background.
    The tissue patch keeps the tissue around the cell crop (context reaches beyond a crop).
    """
    size = pair.cell_image.shape[0]
    angle, offset = _crop_angle((pair.patch_x_offset, pair.patch_y_offset), rng)
    glass = np.zeros((size, size), np.float32)
    centre = (size / 2, size / 2)
    cell_image, _ = _turned_image(pair.cell_image, centre, angle, 1, colour(world, glass, glass, rng))
    tissue_image, _ = _turned_image(pair.tissue_image, centre, angle, 1, colour(world, glass, glass, rng))
    mask, _ = _turned_image(pair.tissue_mask, centre, angle, 0,
                            np.full(pair.tissue_mask.shape, TISSUE_BACKGROUND, np.uint8))
    moved = np.floor(_turn(pair.cells[:, :2] + 0.5, np.array(centre), angle)).astype(np.int64)
    inside = np.all((moved >= 0) & (moved < size), axis=1)
    cells = np.concatenate([moved[inside], pair.cells[inside, 2:]], axis=1).reshape(-1, 3)
    order = np.lexsort((cells[:, 0], cells[:, 1]))
    cells = cells[order]
    return dataclasses.replace(pair, cell_image=cell_image, tissue_image=tissue_image, cells=cells,
                               tissue_mask=mask, patch_x_offset=offset[0], patch_y_offset=offset[1],
                               instances=_turned_instances(pair.instances, cells, np.flatnonzero(inside)[order],
                                                           angle))


def _turned_instances(instances: np.ndarray, cells: np.ndarray, source: np.ndarray, angle: float) -> np.ndarray:
    """Instance labels turned as `_rotated_crop` turns the cell patch (nearest pixel, background outside
    the crop) and renumbered to the turned ``cells``, whose row k came from the old row ``source[k]``:
    nuclei whose point left the frame become background, and each point's pixel is its own label.
    Draws no random numbers.
    """
    size = instances.shape[0]
    turned, _ = _turned_image(instances, (size / 2, size / 2), angle, 0, np.zeros_like(instances))
    renumber = np.zeros(max(int(instances.max(initial=0)), len(source) and int(source.max()) + 1) + 1, np.int32)
    renumber[source + 1] = np.arange(1, len(source) + 1)
    turned = renumber[turned]
    turned[cells[:, 1], cells[:, 0]] = np.arange(1, len(cells) + 1)
    return turned


def render_pair(seed: int | np.random.SeedSequence, size: int = 1024, crowding: float = 0.0,
                rotated: bool = False) -> SyntheticPair:
    """Draw one world from ``seed`` and render its cell and tissue patches, ``size`` x ``size`` px each.

    The same seed gives identical arrays. The tissue patch covers ``size * tissue_mpp`` µm; the
    cell patch is the block ``PairMeta.cell_block`` of it at 4x the resolution, rendered from the
    world (nuclear detail included), not upsampled. ``size`` must be a positive multiple of 32.
    ``crowding`` in [0, 1]: 0 the sparse world, 1 crowded tissue (see `place_nuclei`).
    ``rotated``: the pair is seen through crops turned by a random angle (its own stream, so the
    world is the same as unrotated): cells cut by the crop's border at every orientation, glass in
    the corners, the offsets moved with the turn (see `_rotated_crop`); pixels are resampled
    bilinearly once.
    """
    check_size(size)
    if not 0 <= crowding <= 1:
        raise ValueError(f"crowding must lie in [0, 1], got {crowding}")
    seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    world = make_world(seq, size, crowding)
    cell_image, _ = render(world, world.cell_view, child(seq, 1))
    tissue_image, cancer = render(world, world.tissue_view, child(seq, 2))
    mask = np.where(cancer > 0, TISSUE_CANCER, TISSUE_BACKGROUND).astype(np.uint8)
    if world.unknown is not None:
        mask[world.unknown.on(world.tissue_view) > world.unknown_level] = TISSUE_UNKNOWN
    pair = SyntheticPair(cell_image, tissue_image, cell_points(world), mask, world.cell_mpp, world.tissue_mpp,
                         world.offset[0], world.offset[1], cell_instances(world))
    if rotated:
        pair = _rotated_crop(pair, world, child(seq, 4))
    return pair


def generate_dataset(out_dir: Path | str, counts: Mapping[str, int] = DEFAULT_COUNTS, size: int = 1024,
                     seed: int = 0, on_sample: Callable[[int, int], None] | None = None,
                     crowding: float = 0.0, rotated: bool = False) -> Path:
    """Write a synthetic dataset in the OCELOT Zenodo layout; returns ``out_dir``.

    Sample ids are "001", "002", ... consecutive across the splits in the order train, val, test
    (as in the real data). Sample ``k`` (0-based over all splits) is ``render_pair(SeedSequence([seed, k]))``,
    so asking for more samples leaves the earlier ones byte-identical. ``on_sample(done, total)``
    is called after each pair is written. ``crowding`` and ``rotated``: see `render_pair`.

    The dataset is written into a staging folder beside ``out_dir`` and renamed into place when
    complete (`equiseg.files.written_whole_folder`): ``out_dir`` only ever holds a whole dataset,
    a failure leaves nothing, and the staging folder of a killed run is removed by the next, which
    starts over.

    Raises:
        ValueError: ``size`` not a positive multiple of 32, an unknown split or a negative count.
        FileExistsError: ``out_dir`` exists and is not an empty folder.
    """
    check_size(size)
    unknown = set(counts) - {split.value for split in Split}
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected some of {[split.value for split in Split]}")
    if any(int(n) < 0 for n in counts.values()):
        raise ValueError(f"sample counts must be >= 0, got {dict(counts)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; refusing to mix datasets")
    splits = [split.value for split in Split for _ in range(int(counts.get(split.value, 0)))]
    width = max(3, len(str(len(splits))))
    records = {}
    with written_whole_folder(out) as staging:
        for k, split in enumerate(splits):
            pair = render_pair(np.random.SeedSequence([seed, k]), size, crowding, rotated)
            sample_id = f"{k + 1:0{width}d}"
            write_pair(staging, split, sample_id, pair.cell_image, pair.tissue_image, pair.cells, pair.tissue_mask,
                       instances=pair.instances)
            # level 0 of each synthetic slide is at cell resolution, so the slide boxes are whole pixels
            records[sample_id] = pair_record(split, pair.cell_mpp, pair.tissue_mpp, pair.patch_x_offset,
                                             pair.patch_y_offset, cell_size=size, tissue_size=size,
                                             slide_mpp=pair.cell_mpp, slide_name=f"synthetic-{seed}-{k}",
                                             organ="synthetic")
            if on_sample is not None:
                on_sample(k + 1, len(splits))
        crowded = f", crowding {crowding:g}" if crowding else ""
        turned = ", crops at random angles" if rotated else ""
        write_metadata(staging, records, description=f"Synthetic H&E-like pairs from equiseg (seed {seed}, "
                                                     f"{size} px{crowded}{turned}).")
    return out
