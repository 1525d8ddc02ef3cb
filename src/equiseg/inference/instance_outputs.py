"""What a prediction of cells as instances writes for one image, and the two-stage model on an image file.

Files (``STEM`` the image's name without its suffix):

- ``STEM_instances.tif``: the instance label image, uint32 (0 background, k the cell of row k of
  the CSV), zlib-compressed and tiled, the image's size.
- ``STEM_cells.csv``: one row per cell: x, y (the pixel of its point), class (1 BC, 2 TC),
  probability, and its nucleus's area_um2, perimeter_um, solidity and eccentricity.
- ``STEM_cells.geojson``: a FeatureCollection of QuPath detections with Polygon geometry (the
  nuclei's outlines, in image px, continuous: a pixel's centre is i + 0.5), classification and
  measurements, which QuPath imports by drag and drop onto the image.

Areas and lengths in µm take the image to be at ``mpp`` µm per px: the resolution the model was
trained at (a model sees an image at its own resolution).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import tifffile
import torch
from torch import nn

from equiseg.detection.instances import NUCLEUS_THRESHOLD, instance_outlines, measure_instances, polygon_features
from equiseg.inference.cell_instances import TileInstances, instances_in_tiles, run_windows
from equiseg.pictures import CELL_COLOURS
from equiseg.runtime import Runtime

# QuPath's names for the two OCELOT cell classes (BC, TC)
CELL_NAMES = {1: "Background cell", 2: "Tumor cell"}
MEASUREMENT_COLUMNS = ("area_um2", "perimeter_um", "solidity", "eccentricity")


@dataclass(frozen=True, eq=False)
class ImageInstances:
    """The cells of one image as instances: ``labels`` (H, W) int32 (k the cell of row k - 1), ``cells``
    (N, 4) rows (x, y, class, probability), each nucleus's measurements and outline (image px).
    """

    labels: np.ndarray
    cells: np.ndarray
    measurements: dict[str, np.ndarray]
    outlines: list[np.ndarray]

    @classmethod
    def of(cls, labels: np.ndarray, cells: np.ndarray, mpp: float) -> ImageInstances:
        """Measure and outline the instances of ``labels``."""
        count = len(cells)
        return cls(labels, np.asarray(cells, np.float64).reshape(-1, 4), measure_instances(labels, count, mpp),
                   instance_outlines(labels, count))


def write_instances(stem: Path | str, found: ImageInstances) -> list[Path]:
    """Write ``STEM_instances.tif``, ``STEM_cells.csv`` and ``STEM_cells.geojson`` (see the module)."""
    stem = str(stem)
    labels_path, csv_path, geojson_path = (Path(f"{stem}_instances.tif"), Path(f"{stem}_cells.csv"),
                                           Path(f"{stem}_cells.geojson"))
    tifffile.imwrite(labels_path, found.labels.astype(np.uint32), tile=(256, 256), compression="zlib")
    header = "x,y,class,probability," + ",".join(MEASUREMENT_COLUMNS)
    lines = [header]
    for k, (x, y, c, q) in enumerate(found.cells.tolist()):
        values = [found.measurements[key][k] for key in MEASUREMENT_COLUMNS]
        lines.append(f"{int(x)},{int(y)},{int(c)},{q:.4f}," + ",".join(measurement_text(v) for v in values))
    csv_path.write_text("\n".join(lines) + "\n")
    features = polygon_features(found.outlines, found.cells[:, 2], found.cells[:, 3], found.measurements,
                                CELL_NAMES, CELL_COLOURS)
    geojson_path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return [labels_path, csv_path, geojson_path]


def measurement_text(value: float) -> str:
    """A measurement as a CSV cell: 4 decimals, empty where it is not a number (a nucleus without pixels)."""
    return f"{value:.4f}" if math.isfinite(value) else ""


class RegionReader(Protocol):
    """An image read a rectangle at a time: an image file (`RgbFile`) or a slide's view (`ScaledView`)."""

    height: int
    width: int

    def region(self, top: int, bottom: int, left: int, right: int) -> np.ndarray: ...


def reader_window(image: RegionReader, x: int, y: int, side: int) -> np.ndarray:
    """The (side, side, 3) uint8 window centred on pixel (x, y) of an image read a rectangle at a time,
    mirrored beyond its edges as training windows are (``np.pad``'s ``reflect``: `equiseg.data.windows`).
    """
    half = side // 2
    top, bottom = max(y - half, 0), min(y + half + 1, image.height)
    left, right = max(x - half, 0), min(x + half + 1, image.width)
    inside = image.region(top, bottom, left, right)
    pad = ((top - (y - half), (y + half + 1) - bottom), (left - (x - half), (x + half + 1) - right), (0, 0))
    return np.pad(inside, pad, mode="reflect") if any(a or b for a, b in pad[:2]) else inside


def stage_two_windows(stage2: nn.Module, image: RegionReader, centres: np.ndarray, side: int,
                      runtime: Runtime | None = None, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2 on the windows of ``image`` centred on ``centres`` (M, 2) rows (x, y) (`run_windows`):
    (M, side, side) float32 nucleus probabilities and (M, 2) class probabilities (BC, TC).
    """
    def source(x: int, y: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(reader_window(image, x, y, side))).permute(2, 0, 1).float() / 255

    return run_windows(stage2, source, centres, side, batch, runtime)


def two_stage_file(stage2: nn.Module, side: int, image: RegionReader, proposals: np.ndarray,
                   runtime: Runtime | None = None, threshold: float = NUCLEUS_THRESHOLD,
                   tile: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2 of the two-stage cell model on every proposal of an image: (labels (H, W) int32, cells
    (N, 4) rows (x, y, class, probability)), as `paste_instances` gives them on the whole image.

    It goes a tile at a time (`two_stage_tiles`), so memory is the label image (4 bytes a px) and one
    tile's windows, whatever the number of cells.
    """
    proposals = np.asarray(proposals, np.float64).reshape(-1, 4)
    labels = np.zeros((image.height, image.width), np.int32)
    cells = proposals.copy()
    for part in two_stage_tiles(stage2, side, image, proposals, runtime, threshold, tile):
        h, w = part.labels.shape
        region, inside = labels[part.top:part.top + h, part.left:part.left + w], part.labels > 0
        region[inside] = part.rows[part.labels[inside] - 1] + 1
        cells[part.rows, 2], cells[part.rows, 3] = part.classes, part.probability
    return labels, cells


def two_stage_tiles(stage2: nn.Module, side: int, image: RegionReader, proposals: np.ndarray,
                    runtime: Runtime | None = None, threshold: float = NUCLEUS_THRESHOLD,
                    tile: int = 2048) -> Iterator[TileInstances]:
    """Stage 2 on every proposal of an image of any size, a tile at a time (`instances_in_tiles`): the
    same instances as `two_stage_file`, in memory bounded by a tile.
    """
    def windows(centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return stage_two_windows(stage2, image, centres, side, runtime)

    return instances_in_tiles(proposals, (image.height, image.width), side, windows, tile, threshold)
