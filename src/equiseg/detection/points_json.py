"""The official OCELOT prediction and ground-truth format, ``cell_classification.json``: points
of 1024 x 1024 patches as ``{"name": "image_i", "point": [x, y, class], "probability": p}``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from equiseg.data.ocelot import CELL_CLASSES, OcelotFolder, read_cells
from equiseg.files import owned_file

IMAGE_SIDE = 1024  # the official format holds 1024 x 1024 patches: x and y in 0..1023


def official_format_refusal(shapes: list[tuple[int, int]], names: list[str]) -> str | None:
    """Why the points of images of these (H, W) ``shapes`` cannot go into the official format, or None.

    The format's coordinates are 0..1023: it holds patches of up to 1024 x 1024 px (OCELOT's
    are exactly that; smaller ones, such as the built-in synthetic world's, fit without loss).
    A larger image's points would have to be moved, so its file is not written at all; the
    line names the first such image (``names[i]``) and says where its cells are instead.
    """
    for i, (height, width) in enumerate(shapes):
        if height > IMAGE_SIDE or width > IMAGE_SIDE:
            return (f"cell_classification.json skipped: the official format holds patches of at most "
                    f"{IMAGE_SIDE}x{IMAGE_SIDE} px; image_{i} ({names[i]}) is {width}x{height}")
    return None


class PointsFormatError(ValueError):
    """A points file that breaks the official format; the message names the file and the entry."""


def write_points_json(path: Path | str, images: list[np.ndarray], ground_truth: bool = False) -> Path:
    """Write points per image in the official format (``image_i`` = i-th image, 0-based).

    Rows are (x, y, class[, probability]); x and y are rounded to ints. The format holds
    1024 x 1024 patches only: a point outside 0..1023 is a ``ValueError`` naming it (points are
    never moved; larger images keep their cells in CSV files). Ground truth gets probability
    1.0 and ``num_images``.
    """
    points = []
    for i, rows in enumerate(images):
        for row in np.asarray(rows, dtype=np.float64).reshape(-1, np.asarray(rows).shape[-1] if len(rows) else 4):
            x, y = (int(np.rint(v)) for v in row[:2])
            if not (0 <= x < IMAGE_SIDE and 0 <= y < IMAGE_SIDE):
                raise ValueError(f"image_{i}: point ({x}, {y}) lies outside the official format's "
                                 f"{IMAGE_SIDE}x{IMAGE_SIDE} patch")
            probability = 1.0 if ground_truth or len(row) < 4 else float(min(max(row[3], 0.0), 1.0))
            points.append({"name": f"image_{i}", "point": [x, y, int(row[2])], "probability": probability})
    data = {"type": "Multiple points", "points": points, "version": {"major": 1, "minor": 0}}
    if ground_truth:
        data["num_images"] = len(images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def read_points_json(path: Path | str, num_images: int | None = None) -> list[np.ndarray]:
    """Points per image from an official-format file: a list of (N, 4) arrays (x, y, class, prob).

    The number of images is ``num_images`` if given, else the file's ``num_images``, else one
    past the largest image index. Every entry is checked as the official scorer checks it.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data.get("points"), list):
        raise PointsFormatError(f"{path}: expected an object with a 'points' list")
    rows: dict[int, list] = {}
    for k, cell in enumerate(data["points"]):
        where = f"{path}: points[{k}]"
        if not isinstance(cell, dict) or sorted(cell) != ["name", "point", "probability"]:
            raise PointsFormatError(f"{where}: needs exactly the keys name, point, probability")
        match = re.fullmatch(r"image_([0-9]+)", str(cell["name"]))
        point = cell["point"]
        if match is None:
            raise PointsFormatError(f"{where}: name {cell['name']!r} is not image_<index>")
        if not (isinstance(point, list) and len(point) == 3 and all(type(v) is int for v in point)):
            raise PointsFormatError(f"{where}: point must be [x, y, class] with ints")
        if not (0 <= point[0] < IMAGE_SIDE and 0 <= point[1] < IMAGE_SIDE):
            raise PointsFormatError(f"{where}: x and y must lie in 0..{IMAGE_SIDE - 1}")
        if point[2] not in CELL_CLASSES:
            raise PointsFormatError(f"{where}: class must be 1 (BC) or 2 (TC)")
        if type(cell["probability"]) is not float or not 0.0 <= cell["probability"] <= 1.0:
            raise PointsFormatError(f"{where}: probability must be a float in [0, 1]")
        rows.setdefault(int(match.group(1)), []).append([*point, cell["probability"]])
    n = num_images if num_images is not None else data.get("num_images", max(rows, default=-1) + 1)
    if rows and max(rows) >= n:
        raise PointsFormatError(f"{path}: image_{max(rows)} but only {n} images")
    return [np.array(rows.get(i, []), dtype=np.float64).reshape(-1, 4) for i in range(n)]


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; a file that cannot be read, is not JSON, nests too deep to
    read or is not an object with a ``points`` list is a `PointsFormatError` naming it.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PointsFormatError(f"{path}: cannot read JSON ({error})") from None
    except RecursionError:
        raise PointsFormatError(f"{path}: cannot read JSON (nested too deep)") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise PointsFormatError(f"{path}: expected an object with a 'points' list")
    return data


def read_num_images(path: Path | str) -> int:
    """``num_images`` of a ground-truth file (required there): a whole number, 0 or more.

    Raises:
        PointsFormatError: the file is not an official points file, or has no such ``num_images``.
    """
    data = _read_json(Path(path))
    if "num_images" not in data:
        raise PointsFormatError(f"{path}: a ground-truth file needs 'num_images'")
    n = data["num_images"]
    if isinstance(n, bool) or not isinstance(n, int | float) or not float(n).is_integer() or n < 0:
        raise PointsFormatError(f"{path}: num_images must be a whole number, 0 or more, got {n!r}")
    return int(n)


def write_ground_truth(root: Path | str, split: str, out: Path | str | None = None) -> tuple[Path, list[np.ndarray]]:
    """A split's cell annotations as an official ground-truth file (with ``num_images``), as
    ``equiseg export-gt`` writes it: ``out`` (default ``cell_gt_SPLIT.json``), never over a file
    equiseg did not write (`equiseg.files.owned_file`). Returns the file and each image's cells.

    Raises:
        DatasetError, ValueError: no such split, or a cell file that is not ``x,y,class``.
        ForeignFileError: ``out`` exists and equiseg did not write it.
    """
    folder = OcelotFolder(root, split)
    cells = [read_cells(folder.paths(sid)["cells"]) for sid in folder.ids]
    dest = Path(out) if out is not None else Path(f"cell_gt_{split}.json")
    with owned_file(dest) as partial:
        write_points_json(partial, cells, ground_truth=True)
    return dest, cells
