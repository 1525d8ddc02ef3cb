"""What a slide analysis writes, in level-0 pixels of the slide: the cells as QuPath GeoJSON
(Point detections with ``classification {name, color}`` and a probability measurement) and CSV, the
tissue classes as polygons, a thumbnail, and the summary.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import contourpy
import numpy as np
from PIL import Image, ImageDraw

from equiseg.data.wsi import ScaledView, Slide, TissueMask
from equiseg.detection.instances import polygon_features
from equiseg.files import owned_file
from equiseg.inference.instance_outputs import CELL_NAMES, MEASUREMENT_COLUMNS, measurement_text
from equiseg.pictures import CELL_COLOURS, TISSUE_COLOURS, dot_radius, draw_points
from equiseg.slide.passes import TissueMap

TISSUE_NAMES = {1: "Cancer area"}
THUMBNAIL_SIDE = 2048  # px: the thumbnail's longer side at most
_UUID_NAMESPACE = uuid.UUID("4f1c3a52-8e0b-4b7e-9a51-3d2f6c0e7b19")  # equiseg's: cell ids repeat across runs


class _Output:
    """One file of a slide's outputs, ``FOLDER/STEM.SUFFIX``, read as an attribute of `SlideOutputs`."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def __get__(self, outputs: SlideOutputs | None, owner: type) -> Path:
        return Path(f"STEM.{self.suffix}") if outputs is None else outputs.folder / f"{outputs.stem}.{self.suffix}"


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

    # the files, one line a path: FOLDER/STEM.SUFFIX
    cells_geojson = _Output("cells.geojson")
    cells_csv = _Output("cells.csv")
    tissue_geojson = _Output("tissue.geojson")
    thumbnail = _Output("thumbnail.png")
    summary = _Output("summary.json")

    @property
    def work(self) -> Path:
        """Working files (tissue probabilities, resume state), removed when the slide is done."""
        return self.folder / f".{self.stem}.work"


def tissue_polygons(tissue_map: TissueMap | None, tissue: TissueMask, box: tuple[int, int, int, int]) -> dict:
    """A FeatureCollection of annotations: the tissue found, and the tissue model's cancer areas
    inside it, on the tissue mask's grid (level-0 coordinates).
    """
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
    of (x, y) in pixel-centre coordinates (contourpy's filled contours at 0.5).
    """
    if not mask.any():
        return []
    padded = np.pad(mask.astype(np.float64), 1)  # so that regions at the border close
    generator = contourpy.contour_generator(z=padded, fill_type=contourpy.FillType.OuterOffset)
    # with FillType.OuterOffset: (points, offsets), one array of each per outline
    points, offsets = cast(tuple[list[np.ndarray], list[np.ndarray]], generator.filled(0.5, 2.0))
    polygons = []
    for outline, cuts in zip(points, offsets):
        rings = [[(float(px) - 1, float(py) - 1) for px, py in outline[a:b]] for a, b in itertools.pairwise(cuts)]
        polygons.append([ring if ring[0] == ring[-1] else [*ring, ring[0]] for ring in rings])
    return polygons


def _feature(slide_id: str, x: float, y: float, cls: int, probability: float) -> dict:
    return {"type": "Feature", "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{slide_id}/{x:.2f}/{y:.2f}/{cls}")),
            "geometry": {"type": "Point", "coordinates": [round(x, 2), round(y, 2)]},
            "properties": {"objectType": "detection", "isLocked": False,
                           "classification": {"name": CELL_NAMES.get(cls, str(cls)),
                                              "color": list(CELL_COLOURS.get(cls, (0, 0, 0)))},
                           "measurements": {"Probability": round(probability, 4)}}}


def write_cells(outputs: SlideOutputs, slide: Slide, points: np.ndarray) -> None:
    slide_id = slide.quickhash or slide.path.name
    with owned_file(outputs.cells_geojson) as partial, open(partial, "w") as file:
        # one feature a line: the file streams out, and a reader sees where each cell starts
        file.write('{"type": "FeatureCollection", "features": [\n')
        file.writelines(("" if k == 0 else ",\n") + json.dumps(_feature(slide_id, x, y, int(cls), float(p)))
                        for k, (x, y, cls, p) in enumerate(points))
        file.write("\n]}\n")
    with owned_file(outputs.cells_csv) as partial, open(partial, "w") as file:
        file.write("x,y,x_um,y_um,class,name,probability\n")
        file.writelines(f"{int(x)},{int(y)},{x * slide.mpp:.2f},{y * slide.mpp:.2f},{int(cls)},"
                       f"{CELL_NAMES.get(int(cls), int(cls))},{p:.4f}\n" for x, y, cls, p in points)


def write_thumbnail(outputs: SlideOutputs, slide: Slide, box: tuple[int, int, int, int], points: np.ndarray) -> None:
    x, y, w, h = box
    view = ScaledView(slide, slide.mpp * max(1.0, max(w, h) / THUMBNAIL_SIDE), box)
    picture = view.region(0, view.height, 0, view.width)
    scaled = np.array(points, dtype=np.float64).reshape(-1, 4)
    scaled[:, 0] = (scaled[:, 0] - x) / view.scale
    scaled[:, 1] = (scaled[:, 1] - y) / view.scale
    radius = max(1, min(dot_radius(view.height), round(6 / view.scale)))
    with owned_file(outputs.thumbnail) as partial:
        Image.fromarray(draw_points(picture, scaled, radius=radius)).save(partial, format="PNG")


@dataclass(frozen=True, eq=False)
class SlideInstances:
    """Cells of a slide as instances, in level-0 px: ``points`` (N, 4) rows (x, y, class, probability),
    x and y the centre of the cell's pixel; ``rings`` their nuclei's outlines; ``measurements`` (N,)
    arrays by `equiseg.detection.instances.measure_instances` key (µm at the model's view).
    """

    points: np.ndarray
    rings: list[np.ndarray]
    measurements: dict[str, np.ndarray]


class InstanceWriter:
    """Writes a slide's cells as instances while they come, a tile at a time (`add`), into
    ``STEM.cells.geojson`` (QuPath Polygon detections, one a line, with measurements), ``STEM.cells.csv``
    (the points' columns, then area_um2, perimeter_um, solidity, eccentricity) and, when the ``with``
    block ends, the thumbnail with the outlines; each file whole or not at all (`owned_file`): an error
    inside the block leaves none of them.
    """

    def __init__(self, outputs: SlideOutputs, slide: Slide, box: tuple[int, int, int, int]) -> None:
        self.slide, self.box, self.count = slide, box, 0
        self._files = contextlib.ExitStack()
        self._geojson = open(self._files.enter_context(owned_file(outputs.cells_geojson)), "w")  # noqa: SIM115
        self._csv = open(self._files.enter_context(owned_file(outputs.cells_csv)), "w")  # noqa: SIM115
        self._files.callback(self._csv.close)
        self._files.callback(self._geojson.close)
        self._geojson.write('{"type": "FeatureCollection", "features": [\n')
        self._csv.write("x,y,x_um,y_um,class,name,probability," + ",".join(MEASUREMENT_COLUMNS) + "\n")
        x, y, w, h = box
        self._view = ScaledView(slide, slide.mpp * max(1.0, max(w, h) / THUMBNAIL_SIDE), box)
        self._picture = Image.fromarray(self._view.region(0, self._view.height, 0, self._view.width))
        self.outputs = outputs

    def add(self, part: SlideInstances) -> None:
        """Append a tile's cells to the files and draw their outlines on the thumbnail."""
        slide_id = self.slide.quickhash or self.slide.path.name
        ids = [str(uuid.uuid5(_UUID_NAMESPACE, f"{slide_id}/{x:.2f}/{y:.2f}/{int(c)}")) for x, y, c, _ in part.points]
        features = polygon_features(part.rings, part.points[:, 2], part.points[:, 3], part.measurements, CELL_NAMES,
                                    CELL_COLOURS, ids)
        self._geojson.writelines(("" if self.count + k == 0 else ",\n") + json.dumps(feature)
                                 for k, feature in enumerate(features))
        mpp = self.slide.mpp
        for k, (x, y, cls, p) in enumerate(part.points.tolist()):
            values = ",".join(measurement_text(part.measurements[key][k]) for key in MEASUREMENT_COLUMNS)
            self._csv.write(f"{int(x)},{int(y)},{x * mpp:.2f},{y * mpp:.2f},{int(cls)},"
                            f"{CELL_NAMES.get(int(cls), int(cls))},{p:.4f},{values}\n")
        draw = ImageDraw.Draw(self._picture)
        x0, y0 = self.box[0], self.box[1]
        for ring, cls in zip(part.rings, part.points[:, 2].tolist()):
            scaled = [((px - x0) / self._view.scale, (py - y0) / self._view.scale) for px, py in ring]
            draw.line(scaled, fill=CELL_COLOURS.get(int(cls), (0, 0, 0)), width=1)
        self.count += len(features)

    def __enter__(self) -> InstanceWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> None:
        """Finish the files (each moved into place whole) and write the thumbnail; after an error, remove them."""
        if kind is not None:
            self._files.__exit__(kind, error, trace)  # type: ignore[arg-type]
            return
        self._geojson.write("\n]}\n")
        self._files.close()
        with owned_file(self.outputs.thumbnail) as partial:
            self._picture.save(partial, format="PNG")


def read_points(outputs: SlideOutputs, slide: Slide) -> np.ndarray:
    """The cells of a finished slide, from its CSV (x, y as the pixel centres in level-0 px)."""
    rows = np.loadtxt(outputs.cells_csv, delimiter=",", skiprows=1, usecols=(2, 3, 4, 6), ndmin=2)
    rows[:, :2] /= slide.mpp
    return rows
