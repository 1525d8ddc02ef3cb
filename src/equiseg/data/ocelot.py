"""Readers and writers for the OCELOT 2023 formats: the Zenodo folder and the Grand Challenge input.

Zenodo layout (also what ``equiseg synth`` writes)::

    ROOT/metadata.json                                  general_info, label_info, field_description, sample_pairs
    ROOT/images/{split}/{cell,tissue}/NNN.jpg           RGB
    ROOT/annotations/{split}/cell/NNN.csv               "x,y,label" per line, no header; may be empty
    ROOT/annotations/{split}/tissue/NNN.png             one channel: 1 background, 2 cancer area, 255 unknown
    ROOT/annotations/{split}/cell_instances/NNN.png     optional (OCELOT has none): the cell patch's nucleus
                                                        instance labels, 0 background, k the cell of the CSV's
                                                        k-th row (1-based); a 16-bit PNG as synth writes it,
                                                        or 8-bit PNG, or NNN.tif / NNN.tiff of 8, 16 or 32 bit

Grand Challenge input::

    ROOT/metadata.json                                  a JSON list; entry i belongs to pair_id i
    ROOT/images/cell_patches/*.tif                      (N, H, W, 3) uint8, pairs stacked on axis 0
    ROOT/images/tissue_patches/*.tif

Points are (x, y) = (column, row) in pixels of the cell patch; classes 1 = BC, 2 = TC.
Every problem with a file raises `DatasetError` naming the file (and line).
"""

from __future__ import annotations

import enum
import json
import math
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image


class Split(enum.Enum):
    """A split of the dataset; its value names its folders and is the ``subset`` in metadata.json."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"

CELL_CLASSES = {1: "BC", 2: "TC"}
TISSUE_BACKGROUND, TISSUE_CANCER, TISSUE_UNKNOWN = 1, 2, 255
TISSUE_VALUES = (TISSUE_BACKGROUND, TISSUE_CANCER, TISSUE_UNKNOWN)


SAMPLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a sample id names files: one plain name


class DatasetError(Exception):
    """A problem with one file of a dataset: ``str(error)`` is ``"path:line: message"``."""

    def __init__(self, path: Path | str, message: str, line: int | None = None) -> None:
        self.path, self.message, self.line = Path(path), message, line
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class PairMeta:
    """Metadata of one cell/tissue pair.

    ``cell_mpp`` and ``tissue_mpp`` are the µm per pixel of the two patches as stored
    (``resized_mpp_x``); ``patch_x_offset`` and ``patch_y_offset`` are the centre of the cell
    patch as a fraction of the tissue patch's width and height.
    """

    sample_id: str
    subset: str
    cell_mpp: float
    tissue_mpp: float
    patch_x_offset: float
    patch_y_offset: float
    organ: str = ""
    slide_name: str = ""
    cell_size: int | None = None
    tissue_size: int | None = None
    record: dict = field(default_factory=dict, compare=False, repr=False)

    def cell_block(self, cell_shape: tuple[int, int] = (1024, 1024),
                   tissue_shape: tuple[int, int] = (1024, 1024)) -> tuple[float, float, float, float]:
        """Where the cell patch lies in the tissue patch: (x0, y0, x1, y1) in tissue pixels.

        ``tissue_px = offset * tissue_side + (cell_px - cell_side / 2) * cell_mpp / tissue_mpp``;
        for the real data the ratio is about 1/4, so the block is about 256 px wide. Shapes are
        (height, width).
        """
        scale = self.cell_mpp / self.tissue_mpp
        cx, cy = self.patch_x_offset * tissue_shape[1], self.patch_y_offset * tissue_shape[0]
        half_w, half_h = cell_shape[1] / 2 * scale, cell_shape[0] / 2 * scale
        return cx - half_w, cy - half_h, cx + half_w, cy + half_h


@dataclass
class Sample:
    """One pair: images (H, W, 3) uint8, cells (N, 3) int64 rows (x, y, class), tissue mask (H, W) uint8.

    ``cells`` and ``tissue_mask`` are None where the source has no labels (Grand Challenge input).
    ``instances``: the cell patch's nucleus instance labels (H, W) int32 (`read_instances`), 0
    background and k the cell of row k of ``cells`` (1-based); None where the dataset has none (OCELOT).
    """

    cell_image: np.ndarray
    tissue_image: np.ndarray
    cells: np.ndarray | None
    tissue_mask: np.ndarray | None
    meta: PairMeta
    instances: np.ndarray | None = None


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) uint8 image as the models take it: (3, H, W) float32 in [0, 1] (value / 255)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


def _patch_size(box: dict, slide_mpp: float) -> int | None:
    """Pixels of a patch implied by its box in level-0 slide pixels and its resized mpp."""
    try:
        return round((box["x_end"] - box["x_start"]) * slide_mpp / box["resized_mpp_x"])
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def parse_pair(sample_id: str, record: dict, path: Path | str = "metadata.json") -> PairMeta:
    """A `PairMeta` from one entry of ``sample_pairs`` (or of the Grand Challenge list)."""
    try:
        cell, tissue = record["cell"], record["tissue"]
        meta = PairMeta(
            sample_id=sample_id,
            subset=str(record.get("subset", "")),
            cell_mpp=float(cell["resized_mpp_x"]),
            tissue_mpp=float(tissue["resized_mpp_x"]),
            patch_x_offset=float(record["patch_x_offset"]),
            patch_y_offset=float(record["patch_y_offset"]),
            organ=str(record.get("organ", "")),
            slide_name=str(record.get("slide_name", "")),
            cell_size=_patch_size(cell, float(record.get("mpp_x", 0.0))),
            tissue_size=_patch_size(tissue, float(record.get("mpp_x", 0.0))),
            record=record,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetError(path, f"sample {sample_id}: bad or missing field {error}") from None
    if not (meta.cell_mpp > 0 and meta.tissue_mpp > 0 and math.isfinite(meta.cell_mpp + meta.tissue_mpp)):
        raise DatasetError(path, f"sample {sample_id}: mpp values must be positive")
    return meta


def _load_json(path: Path) -> object:
    if not path.is_file():
        raise DatasetError(path, "missing")
    try:
        return json.loads(path.read_text(), object_pairs_hook=lambda pairs: _unique_keys(path, pairs))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(path, f"not valid JSON ({error})") from None


def _unique_keys(path: Path, pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose keys are unique: JSON itself lets the last of two equal keys win,
    which would drop a sample of metadata.json without a word.
    """
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise DatasetError(path, f"key {key!r} appears twice in one object (a duplicate sample id?)")
        seen[key] = value
    return seen


def read_metadata(path: Path | str) -> dict[str, PairMeta]:
    """Parse a Zenodo ``metadata.json``: sample id ("001") -> `PairMeta`, all splits."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("sample_pairs"), dict):
        raise DatasetError(path, "expected an object with 'sample_pairs' (the Zenodo metadata.json)")
    for sid in data["sample_pairs"]:
        if not SAMPLE_ID.fullmatch(sid):
            raise DatasetError(path, f"sample id {sid!r} is not a plain name (letters, digits and . _ -, not "
                                     "starting with a dot): it names the files of its pair")
    return {sid: parse_pair(sid, record, path) for sid, record in data["sample_pairs"].items()}


@dataclass(frozen=True)
class Resolution:
    """The resolution of a dataset's patches: µm per pixel of the cell and the tissue patches.

    A model runs at the resolution it was trained at: ``equiseg slide`` resamples a slide to
    ``cell_mpp`` for the cell model and to ``tissue_mpp`` for the tissue model.
    """

    cell_mpp: float
    tissue_mpp: float

    @classmethod
    def of(cls, metas: Iterable[PairMeta]) -> Resolution:
        """The median over a dataset's pairs (OCELOT's vary by a few percent around 0.2 and 0.8 µm/px)."""
        metas = list(metas)
        if not metas:
            raise ValueError("no pairs, so no resolution")
        return cls(float(np.median([m.cell_mpp for m in metas])), float(np.median([m.tissue_mpp for m in metas])))

    def to_dict(self) -> dict[str, float]:
        return {"cell_mpp": self.cell_mpp, "tissue_mpp": self.tissue_mpp}


class ImageRefused(ValueError):
    """An image file that equiseg does not decode: its header declares more pixels to decode at
    once than `decode_limit`, its pixel data is cut short, or it cannot be decoded.
    ``str(error)`` is ``"path: message"``.
    """

    def __init__(self, path: Path | str, message: str) -> None:
        self.path, self.message = Path(path), message
        super().__init__(f"{self.path}: {message}")


def decode_limit() -> int | None:
    """The most pixels equiseg decodes at once from one image file, whatever its format: Pillow's
    decompression-bomb limit, 2 x ``PIL.Image.MAX_IMAGE_PIXELS`` (178,956,970 px unless that is
    changed; no limit when it is None). One rule for every reader: `read_rgb` (so the dataset
    readers and ``equiseg predict`` of a JPEG or PNG), each tile or strip that
    `equiseg.inference.readers.RgbFile` decodes, each pair of the Grand Challenge input.
    """
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


def check_decoded_size(path: Path | str, height: int, width: int, what: str = "an image") -> None:
    """Refuse to decode ``what`` of ``height`` x ``width`` px at once when that is more than
    `decode_limit`: called with the size the file's header declares, before anything is decoded
    (a few KB on disk can declare gigabytes).

    Raises:
        ImageRefused: naming the file and the declared size.
    """
    limit = decode_limit()
    if limit is not None and height * width > limit:
        raise ImageRefused(path, f"refused, its header declares {what} of {width}x{height} px ({height * width:,} px) "
                                 f"to decode at once, over the decompression-bomb limit of {limit:,} px")


def unreadable(path: Path | str, error: BaseException, what: str = "image") -> ImageRefused:
    """The one-line refusal of a ``what`` that fails to decode: ``error``'s first line, shortened."""
    cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
    cause = cause if len(cause) <= 120 else cause[:117] + "..."
    return ImageRefused(path, f"unreadable or truncated {what} ({cause})")


def pillow_refusal(path: Path | str, error: Image.DecompressionBombError) -> ImageRefused:
    """Pillow's decompression-bomb refusal (the limit `decode_limit` names) as one line naming the file."""
    return ImageRefused(path, f"refused, its header declares more pixels than the decompression-bomb limit of "
                              f"{decode_limit() or 0:,} px to decode at once ({error})")


# what decoding a damaged image raises (Pillow: OSError, SyntaxError, EOFError; tifffile: TiffFileError,
# a ValueError, and zlib.error from a cut deflate stream; struct.error from a cut header)
DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, zlib.error, struct.error)


def read_rgb(path: Path | str) -> np.ndarray:
    """An image file (JPEG, PNG, TIFF) as (H, W, 3) uint8, decoded whole: the one decoder of RGB
    images (dataset readers and ``equiseg predict`` alike). Grey is repeated into three
    channels, alpha is dropped, 16-bit images (TIFF or PNG) are scaled by round(v / 257), the
    same everywhere; TIFF through tifffile, everything else through Pillow.

    Raises:
        ImageRefused: the header declares more than `decode_limit` pixels (checked before
            decoding; Pillow's decompression-bomb check, the same limit, for its formats), the
            file is truncated, or it does not decode; the message names the file.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return _read_tiff(path)
        with Image.open(path) as image:
            if image.mode.startswith("I"):  # 16-bit grey ("I;16", or "I" as Pillow opens 16-bit PNG)
                return as_rgb(np.asarray(image).astype(np.uint16))
            return np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError as error:  # a few KB on disk that would decode to gigabytes
        raise pillow_refusal(path, error) from None
    except (ImageRefused, FileNotFoundError):
        raise
    except DECODE_ERRORS as error:
        raise unreadable(path, error) from None


def _read_tiff(path: Path) -> np.ndarray:
    """`read_rgb` of a TIFF: the first series, its size and layout checked from the header first."""
    with tifffile.TiffFile(path) as tiff:
        if not tiff.series:
            raise ImageRefused(path, "unreadable or truncated image (no image in the TIFF)")
        series = tiff.series[0]
        height, width = tiff_rgb_size(path, series.shape, series.dtype)
        check_decoded_size(path, height, width)
        for page in series.pages:
            if page is not None:
                check_tiff_data(path, page, tiff.filehandle.size)
        return tiff_rgb(path, series.asarray())


def tiff_rgb_size(path: Path | str, shape: Sequence[int], dtype: np.dtype | None) -> tuple[int, int]:
    """(H, W) of a TIFF image whose header declares ``shape`` and ``dtype``, if the RGB rule reads
    it: (H, W), (H, W, 3|4) or (3|4, H, W), optionally (1, ...), of uint8 or uint16.

    Raises:
        ImageRefused: any other shape or type.
    """
    dims = tuple(shape)[1:] if len(shape) == 4 and shape[0] == 1 else tuple(shape)
    if len(dims) == 3 and dims[0] in (3, 4) and dims[-1] not in (3, 4):
        dims = (*dims[1:], dims[0])  # channels first -> last
    if dtype not in (np.uint8, np.uint16) or not (len(dims) == 2 or (len(dims) == 3 and dims[-1] in (3, 4))):
        raise ImageRefused(path, f"expected an RGB image, got shape {tuple(shape)} {dtype}")
    return dims[0], dims[1]


def tiff_rgb(path: Path | str, array: np.ndarray) -> np.ndarray:
    """A decoded TIFF image (a shape `tiff_rgb_size` accepts) as (H, W, 3) uint8 by `as_rgb`."""
    tiff_rgb_size(path, array.shape, array.dtype)
    if array.ndim == 4:
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # channels first -> last
    return as_rgb(array)


def check_tiff_data(path: Path | str, page: tifffile.TiffPage | tifffile.TiffFrame, file_size: int) -> None:
    """Refuse a TIFF page whose header places pixel data beyond the end of the file: a truncated
    file, named as such before any decoding (tifffile would pad or fail later, in other words).

    Raises:
        ImageRefused: naming the file, where its data should end and its size.
    """
    end = max((offset + count for offset, count in zip(page.dataoffsets, page.databytecounts) if count), default=0)
    if page.is_contiguous and page.dataoffsets:  # uncompressed, read from the first offset whatever the counts say
        end = max(end, page.dataoffsets[0] + page.nbytes)
    if end > file_size:
        raise ImageRefused(path, f"truncated: its header places pixel data up to byte {end:,}, "
                                 f"but the file has {file_size:,} bytes")


def rgb_conversion(path: Path | str) -> str | None:
    """What `read_rgb` does to this file to make it 8-bit RGB, in words, from the file's
    header alone (no decoding); None for a file that is 8-bit RGB already.
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            shape, dtype = page.shape, page.dtype
        channels = 1 if len(shape) == 2 else min(shape[0], shape[-1]) if 3 in shape or 4 in shape else shape[-1]
        mode = {1: "grey", 3: "RGB", 4: "RGBA"}.get(channels, f"{channels} channels")
        depth = "16-bit " if dtype == np.uint16 else ""
    else:
        with Image.open(path) as image:
            pillow = image.mode
        depth = "16-bit " if pillow.startswith("I") else ""
        mode = {"L": "grey", "I;16": "grey", "I": "grey", "LA": "grey + alpha", "RGB": "RGB", "RGBA": "RGBA",
                "P": "palette"}.get(pillow, f"mode {pillow}")
    steps = []
    if depth:
        steps.append("16-bit scaled to 8 by round(v / 257)")
    if "alpha" in mode or mode == "RGBA":
        steps.append("alpha dropped (not blended)")
    if mode.startswith("grey"):
        steps.append("grey repeated into R, G and B")
    if mode == "palette" or mode.startswith("mode "):
        steps.append("converted to RGB by Pillow")
    return f"{depth}{mode}: {', '.join(steps)}" if steps else None


def as_rgb(array: np.ndarray) -> np.ndarray:
    """Pixels as RGB uint8: (h, w), (h, w, 1), (h, w, 3) or (h, w, 4) uint8 or uint16 -> (h, w, 3) uint8."""
    if array.dtype == np.uint16:
        # round(v / 257) in integers: v / 257 never ends in .5 (257 is odd), and no float copy
        array = ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def read_image(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """An RGB image of a dataset (`read_rgb`); ``shape`` (H, W) is checked when given."""
    if not path.is_file():
        raise DatasetError(path, "missing")
    try:
        array = read_rgb(path)
    except ImageRefused as error:
        raise DatasetError(path, error.message) from None
    if shape is not None and array.shape[:2] != tuple(shape):
        raise DatasetError(path, f"size {array.shape[1]}x{array.shape[0]}, expected {shape[1]}x{shape[0]}")
    return array


def read_tissue_mask(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A tissue mask as (H, W) uint8 with values in {1, 2, 255}; ``shape`` is checked when given."""
    if not path.is_file():
        raise DatasetError(path, "missing")
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(path, f"expected a one-channel mask, got mode {image.mode}")
            array = np.asarray(image)
    except Image.DecompressionBombError as error:  # the limit of every image reader (`decode_limit`)
        raise DatasetError(path, pillow_refusal(path, error).message) from None
    except DECODE_ERRORS as error:
        raise DatasetError(path, unreadable(path, error, "mask").message) from None
    if shape is not None and array.shape != tuple(shape):
        raise DatasetError(path, f"size {array.shape[1]}x{array.shape[0]}, expected {shape[1]}x{shape[0]}")
    bad = np.setdiff1d(np.unique(array), TISSUE_VALUES)
    if bad.size:
        raise DatasetError(path, f"mask values {bad.tolist()} outside {{1, 2, 255}}")
    return array.astype(np.uint8)


INSTANCE_SUFFIXES = (".png", ".tif", ".tiff")  # instance label images, looked for in this order
_INSTANCE_DTYPES = (np.uint8, np.uint16, np.uint32, np.int32)


def read_instances(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Nucleus instance labels as (H, W) int32: a one-channel PNG (8 or 16 bit) or TIFF (8, 16 or 32 bit
    unsigned, or 32-bit signed without negative values), 0 background; ``shape`` is checked when given.
    """
    if not path.is_file():
        raise DatasetError(path, "missing")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            array = _read_label_tiff(path)
        else:
            with Image.open(path) as image:
                if image.mode not in ("L", "I", "I;16", "I;16B", "I;16L"):
                    raise DatasetError(path, f"expected a one-channel label image, got mode {image.mode}")
                array = np.asarray(image)
    except Image.DecompressionBombError as error:
        raise DatasetError(path, pillow_refusal(path, error).message) from None
    except ImageRefused as error:
        raise DatasetError(path, error.message) from None
    except DECODE_ERRORS as error:
        raise DatasetError(path, unreadable(path, error, "label image").message) from None
    if shape is not None and array.shape != tuple(shape):
        raise DatasetError(path, f"size {array.shape[1]}x{array.shape[0]}, expected {shape[1]}x{shape[0]}")
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
        raise DatasetError(path, f"labels must lie in [0, 2**31), got {array.min()} to {array.max()}")
    return array.astype(np.int32)


def _read_label_tiff(path: Path) -> np.ndarray:
    """The first series of a TIFF label image, its shape, type and data checked from the header first."""
    with tifffile.TiffFile(path) as tiff:
        if not tiff.series:
            raise ImageRefused(path, "unreadable or truncated label image (no image in the TIFF)")
        series = tiff.series[0]
        shape = tuple(series.shape)[1:] if len(series.shape) == 3 and series.shape[0] == 1 else tuple(series.shape)
        if len(shape) != 2 or series.dtype not in _INSTANCE_DTYPES:
            raise ImageRefused(path, f"expected a one-channel label image of 8, 16 or 32 bit integers, "
                                     f"got shape {tuple(series.shape)} {series.dtype}")
        check_decoded_size(path, shape[0], shape[1], "a label image")
        for page in series.pages:
            if page is not None:
                check_tiff_data(path, page, tiff.filehandle.size)
        return series.asarray().reshape(shape)


def write_instances(path_stem: Path, instances: np.ndarray) -> Path:
    """Write instance labels (H, W) beside their CSV: ``path_stem.png`` (16-bit) when every label fits in 16
    bit, else ``path_stem.tif`` (32-bit, deflate); returns the path written.
    """
    labels = np.asarray(instances)
    if labels.size and labels.max() > np.iinfo(np.uint16).max:
        path = path_stem.parent / f"{path_stem.name}.tif"
        tifffile.imwrite(path, np.ascontiguousarray(labels, dtype=np.uint32), compression="zlib")
    else:
        path = path_stem.parent / f"{path_stem.name}.png"
        Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint16)).save(path)
    return path


def parse_cells(path: Path, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, list[DatasetError]]:
    """Cell points from a CSV of ``x,y,label`` lines, and every problem found (not just the first).

    Each non-blank line must be three integers; classes must be 1 (BC) or 2 (TC); with
    ``shape`` (H, W), points must lie inside the image (0 <= x < W, 0 <= y < H). Bad lines are
    left out of the points. Returns (N, 3) int64 rows (x, y, class) and the problems.
    """
    if not path.is_file():
        return np.zeros((0, 3), np.int64), [DatasetError(path, "missing")]
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        return np.zeros((0, 3), np.int64), [DatasetError(path, "not a text file")]
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            if len(parts) != 3:
                raise ValueError
            x, y, label = (int(p) for p in parts)
        except ValueError:
            problems.append(DatasetError(path, f"expected 'x,y,class' with integers, got {line.strip()!r}", number))
            continue
        if label not in CELL_CLASSES:
            problems.append(DatasetError(path, f"unknown class {label} (1 = BC, 2 = TC)", number))
        elif shape is not None and not (0 <= x < shape[1] and 0 <= y < shape[0]):
            problems.append(DatasetError(path, f"point ({x}, {y}) outside the {shape[1]}x{shape[0]} image", number))
        else:
            rows.append((x, y, label))
    return np.array(rows, dtype=np.int64).reshape(-1, 3), problems


def read_cells(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Cell points as (N, 3) int64 rows (x, y, class); an empty file is no cells.

    Raises `DatasetError` on the first problem `parse_cells` finds.
    """
    cells, problems = parse_cells(path, shape)
    if problems:
        raise problems[0]
    return cells


class OcelotFolder(Sequence[Sample]):
    """The samples of one split of a Zenodo-layout folder, read lazily, sorted by id.

    ``OcelotFolder(root, "train")[i]`` reads images, cells and tissue mask of the i-th id and
    checks them (sizes against the metadata, CSV lines, mask values), raising
    `DatasetError` on the first problem. ``labels=False`` skips the annotations.
    """

    def __init__(self, root: Path | str, split: Split | str, labels: bool = True) -> None:
        try:
            split = Split(split)
        except ValueError:
            raise ValueError(f"split must be one of {', '.join(s.value for s in Split)}, got {split!r}") from None
        self.root, self.split, self.labels = Path(root), split, labels
        if not self.root.is_dir():
            raise DatasetError(self.root, "no such dataset folder")
        self.metadata = read_metadata(self.root / "metadata.json")
        self.ids = sorted(sid for sid, meta in self.metadata.items() if meta.subset == split.value)

    def paths(self, sample_id: str) -> dict[str, Path]:
        """The files of a sample: cell_image, tissue_image, cells, tissue_mask, and cell_instances where it has one.

        Raises:
            DatasetError: one of them is a link to a file outside the dataset folder (a dataset is
                never a way to read other files).
        """
        return checked_pair_paths(self.root, self.split, sample_id)

    def cells(self, index: int) -> np.ndarray:
        """The cell points of the ``index``-th sample (checked as in ``self[index]``), its images not decoded."""
        meta = self.metadata[self.ids[index]]
        shape = None if meta.cell_size is None else (meta.cell_size, meta.cell_size)
        return read_cells(self.paths(self.ids[index])["cells"], shape)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        sample_id = self.ids[index]
        meta, paths = self.metadata[sample_id], self.paths(sample_id)
        cell_shape = None if meta.cell_size is None else (meta.cell_size, meta.cell_size)
        tissue_shape = None if meta.tissue_size is None else (meta.tissue_size, meta.tissue_size)
        cell_image = read_image(paths["cell_image"], cell_shape)
        tissue_image = read_image(paths["tissue_image"], tissue_shape)
        cells = mask = instances = None
        if self.labels:
            cells = read_cells(paths["cells"], cell_image.shape[:2])
            mask = read_tissue_mask(paths["tissue_mask"], tissue_image.shape[:2])
            if "cell_instances" in paths:
                instances = read_instances(paths["cell_instances"], cell_image.shape[:2])
        return Sample(cell_image, tissue_image, cells, mask, meta, instances)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))


def checked_pair_paths(root: Path, split: Split | str, sample_id: str) -> dict[str, Path]:
    """`pair_paths` for reading: each file must lie inside ``root`` once links are followed.

    Raises:
        DatasetError: a file (or a folder on its way) is a link out of the dataset folder: a
            dataset is never a way to read other files.
    """
    paths = pair_paths(root, split, sample_id)
    inside = Path(root).resolve()
    for path in paths.values():
        if not path.resolve().is_relative_to(inside):
            raise DatasetError(path, "leads outside the dataset folder (a link); copy the file in instead")
    return paths


def pair_paths(root: Path, split: Split | str, sample_id: str) -> dict[str, Path]:
    """Where the Zenodo layout keeps the files of one sample; ``cell_instances`` only where the sample has
    an instance label image (the first of `INSTANCE_SUFFIXES` that exists), absent otherwise (OCELOT).
    """
    split = Split(split).value
    paths = {
        "cell_image": root / "images" / split / "cell" / f"{sample_id}.jpg",
        "tissue_image": root / "images" / split / "tissue" / f"{sample_id}.jpg",
        "cells": root / "annotations" / split / "cell" / f"{sample_id}.csv",
        "tissue_mask": root / "annotations" / split / "tissue" / f"{sample_id}.png",
    }
    stem = instances_stem(root, split, sample_id)
    for suffix in INSTANCE_SUFFIXES:
        if (path := stem.parent / f"{stem.name}{suffix}").is_file():
            paths["cell_instances"] = path
            break
    return paths


def instances_stem(root: Path, split: Split | str, sample_id: str) -> Path:
    """The instance label image of a sample without its suffix: ``annotations/SPLIT/cell_instances/ID``."""
    return Path(root) / "annotations" / Split(split).value / "cell_instances" / sample_id


class GrandChallengeInput(Sequence[Sample]):
    """The Grand Challenge container's input: stacked TIFFs and a metadata list; no labels.

    Sample ``i`` (the ``pair_id``) is page ``i`` of each stack (a stack of one page may be a
    single (H, W, 3) image). The stacks' headers are checked when the folder is opened (one page
    per metadata entry, a layout the RGB rule reads, at most `decode_limit` pixels a page); a
    pair is decoded when asked for, so a long phase is never loaded whole, and converted by the
    rule of `read_rgb` (grey repeated, alpha dropped, 16-bit scaled by round(v / 257)), as
    ``equiseg predict`` reads the same file.

    Raises:
        DatasetError: naming the file: metadata.json missing, not a list or empty, a stack
            missing, unreadable, truncated, of another count or layout, or over the size limit.
    """

    KINDS = ("cell_patches", "tissue_patches")

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        listing = self.root / "metadata.json"
        data = _load_json(listing)
        if not isinstance(data, list):
            raise DatasetError(listing, "expected a JSON list indexed by pair_id")
        if not data:
            raise DatasetError(listing, "an empty list: no pairs to predict (entry i describes pair_id i)")
        self.metadata = [parse_pair(f"{i:03d}", record, listing) for i, record in enumerate(data)]
        self._stacks = {kind: self._stack(kind) for kind in self.KINDS}

    def _stack(self, kind: str) -> Path:
        """The TIFF of one kind of patch, its header checked."""
        files = sorted((self.root / "images" / kind).glob("*.tif*"))
        if not files:
            raise DatasetError(self.root / "images" / kind, "no TIFF found")
        try:
            with tifffile.TiffFile(files[0]) as tiff:
                if not tiff.series:
                    raise ImageRefused(files[0], "unreadable or truncated image (no image in the TIFF)")
                series = tiff.series[0]
                count, page = len(series.pages), series.keyframe
                height, width = tiff_rgb_size(files[0], page.shape, page.dtype)
                check_decoded_size(files[0], height, width, "patches")
                for each in series.pages:  # a truncated stack is refused before any pair runs
                    assert each is not None  # every page of a series is there
                    check_tiff_data(files[0], each, tiff.filehandle.size)
        except ImageRefused as error:
            raise DatasetError(files[0], error.message) from None
        except DECODE_ERRORS as error:
            raise DatasetError(files[0], unreadable(files[0], error, "TIFF").message) from None
        if count != len(self.metadata):
            raise DatasetError(files[0], f"{count} patches but {len(self.metadata)} metadata entries")
        return files[0]

    def patch(self, kind: str, pair_id: int) -> np.ndarray:
        """Page ``pair_id`` of the stack of ``kind`` (one of `KINDS`) as (H, W, 3) uint8."""
        path = self._stacks[kind]
        try:
            with tifffile.TiffFile(path) as tiff:
                page = tiff.series[0].pages[pair_id]
                assert page is not None  # every page of a series is there
                check_tiff_data(path, page, tiff.filehandle.size)
                return tiff_rgb(path, page.asarray())
        except ImageRefused as error:
            raise DatasetError(path, error.message) from None
        except DECODE_ERRORS as error:
            raise DatasetError(path, unreadable(path, error, f"patch {pair_id}").message) from None

    def __len__(self) -> int:
        return len(self.metadata)

    def __getitem__(self, pair_id: int) -> Sample:  # type: ignore[override]
        return Sample(self.patch("cell_patches", pair_id), self.patch("tissue_patches", pair_id), None, None,
                      self.metadata[pair_id])

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))


def pair_record(subset: str, cell_mpp: float, tissue_mpp: float, patch_x_offset: float, patch_y_offset: float,
                cell_size: int = 1024, tissue_size: int = 1024, slide_mpp: float = 0.25,
                slide_name: str = "", organ: str = "", origin: tuple[int, int] = (0, 0)) -> dict:
    """A ``sample_pairs`` entry in the real format, with slide boxes consistent with the offsets."""
    def box(x0: float, y0: float, size: int, mpp: float) -> dict:
        side = round(size * mpp / slide_mpp)
        return {"x_start": round(x0), "y_start": round(y0), "x_end": round(x0) + side, "y_end": round(y0) + side,
                "resized_mpp_x": mpp, "resized_mpp_y": mpp}

    tissue_x0, tissue_y0 = origin
    tissue_side = tissue_size * tissue_mpp / slide_mpp  # level-0 pixels
    cell_side = cell_size * cell_mpp / slide_mpp
    cell_x0 = tissue_x0 + patch_x_offset * tissue_side - cell_side / 2
    cell_y0 = tissue_y0 + patch_y_offset * tissue_side - cell_side / 2
    return {
        "slide_name": slide_name,
        "cell": box(cell_x0, cell_y0, cell_size, cell_mpp),
        "tissue": box(tissue_x0, tissue_y0, tissue_size, tissue_mpp),
        "patch_x_offset": patch_x_offset,
        "patch_y_offset": patch_y_offset,
        "mpp_x": slide_mpp,
        "mpp_y": slide_mpp,
        "organ": organ,
        "subset": subset,
    }


def write_metadata(root: Path | str, sample_pairs: dict[str, dict], description: str = "") -> Path:
    """Write ``ROOT/metadata.json`` in the Zenodo structure (keys sorted, so output is stable)."""
    path = Path(root) / "metadata.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "general_info": {"description": description or "A dataset in the OCELOT 2023 format.", "version": "1.0.1"},
        "label_info": {"cell": {"1": "BC (Background Cell)", "2": "TC (Tumor Cell)"},
                       "tissue": {"1": "BG (Background)", "2": "CA (Cancer Area)", "255": "UNK (Unknown)"}},
        "field_description": {},
        "sample_pairs": dict(sorted(sample_pairs.items())),
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def write_pair(root: Path | str, split: str, sample_id: str, cell_image: np.ndarray, tissue_image: np.ndarray,
               cells: np.ndarray, tissue_mask: np.ndarray, jpeg_quality: int = 95,
               instances: np.ndarray | None = None) -> dict[str, Path]:
    """Write one sample's four files in the Zenodo layout, and its instance labels (`write_instances`)
    when given; returns their paths.
    """
    paths = pair_paths(Path(root), split, sample_id)
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(cell_image, dtype=np.uint8)).save(paths["cell_image"], quality=jpeg_quality)
    Image.fromarray(np.ascontiguousarray(tissue_image, dtype=np.uint8)).save(paths["tissue_image"],
                                                                             quality=jpeg_quality)
    Image.fromarray(np.ascontiguousarray(tissue_mask, dtype=np.uint8), mode="L").save(paths["tissue_mask"])
    lines = [f"{int(x)},{int(y)},{int(c)}" for x, y, c in np.asarray(cells).reshape(-1, 3)]
    paths["cells"].write_text("".join(line + "\n" for line in lines))
    if instances is not None:
        stem = instances_stem(Path(root), split, sample_id)
        stem.parent.mkdir(parents=True, exist_ok=True)
        paths["cell_instances"] = write_instances(stem, instances)
    return paths


def write_grand_challenge(root: Path | str, samples: Sequence[Sample]) -> Path:
    """Write samples as a Grand Challenge input folder (stacked TIFFs, list metadata)."""
    root = Path(root)
    for kind, attr in (("cell_patches", "cell_image"), ("tissue_patches", "tissue_image")):
        (root / "images" / kind).mkdir(parents=True, exist_ok=True)
        stack = np.stack([getattr(s, attr) for s in samples]).astype(np.uint8)
        tifffile.imwrite(root / "images" / kind / "000.tif", stack, photometric="rgb")
    (root / "metadata.json").write_text(json.dumps([s.meta.record for s in samples], indent=1) + "\n")
    return root
