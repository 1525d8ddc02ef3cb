"""Image files read a window at a time where their format allows: the readers behind streamed
prediction (`equiseg.inference.predict`), and the probability maps written block by block.
"""

from __future__ import annotations

import enum
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tifffile
import torch
from numpy.typing import DTypeLike

from equiseg.data.ocelot import (
    DECODE_ERRORS,
    ImageRefused,
    as_rgb,
    check_decoded_size,
    check_tiff_data,
    decode_limit,
    image_to_tensor,
    read_rgb,
    unreadable,
)

SEGMENT_CACHE_BYTES = 64 * 2**20  # decoded TIFF tiles or strips that RgbFile keeps for the next windows
STREAM_ROWS = 256  # rows across an image's width that streaming holds at once (window overlap, detector halo)


class ImageReading(enum.Enum):
    """How `RgbFile` reads an image."""

    CONTIGUOUS = "contiguous"  # uncompressed TIFF: each region's row segments read straight from the file
    SEGMENTS = "segments"      # tiled or stripped TIFF: only the tiles or strips a region touches decoded
    DECODED = "decoded"        # JPEG, PNG, other TIFF layouts: decoded whole, held as (H, W, 3) uint8


class RgbFile:
    """An RGB image file (JPEG, PNG, TIFF) read a rectangle at a time, as uint8.

    A TIFF whose first page is the image, pixel-interleaved with 1, 3 or 4 samples of 8 or 16
    bits, is read lazily: uncompressed data (what ``tifffile.memmap`` maps) by plain reads of
    the row segments asked for, which unlike a memory map do not stay resident; tiled or
    stripped data by decoding only the tiles or strips the rectangle touches, the most recent
    ones (up to `SEGMENT_CACHE_BYTES` decoded) kept for the next rectangles (``zarr``,
    which ``tifffile.imread(aszarr=True)`` needs, is not a dependency). A strip spans the whole
    width, so a wide stripped TIFF decodes each strip once per block column that needs it.
    Anything else is decoded whole into (H, W, 3) uint8, never float. Conversion as
    `read_rgb`. `close` it after use.

    Size limits, from the header before anything is decoded, one rule with every reader
    (`equiseg.data.ocelot.decode_limit`, about 179 Mpx): nothing over the limit is decoded at
    once, so an image decoded whole may hold that many pixels, and a TIFF read lazily may be of
    any height but each of its tiles or strips within the limit; and since streaming holds
    strips of about `STREAM_ROWS` rows across the width (the windows' overlap, the detector's
    halo), a band of that many rows across the width must be within it too (at most 699,050 px
    wide by default). A TIFF whose header places pixel data beyond the end of the file is
    refused as truncated. Every refusal is an `ImageRefused` naming the file (and the declared
    size).

    Attributes:
        path: the file.
        height, width: its size, px.
        reading: how it is read.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._tiff: tifffile.TiffFile | None = None
        self._segments: OrderedDict[int, np.ndarray] = OrderedDict()  # decoded, least recently used first
        self._lock = threading.Lock()  # windows may be read ahead by a worker thread (tiling._batched)
        page = self._lazy_page()
        if page is None:
            self._image = read_rgb(self.path)
            self.height, self.width = self._image.shape[:2]
            self.reading = ImageReading.DECODED
            return
        self._page = page
        self.height, self.width = page.shape[:2]
        self.reading = ImageReading.CONTIGUOUS if page.is_memmappable else ImageReading.SEGMENTS
        try:
            self._check_sizes()
            if self.reading is ImageReading.SEGMENTS:
                self.region(0, 1, 0, 1)  # a codec that is not installed shows up here, not halfway through
        except ImageRefused:
            self.close()
            raise
        except ValueError as error:
            self.close()
            raise ValueError(f"{self.path}: {error}") from None

    def _check_sizes(self) -> None:
        """Refuse a TIFF read lazily whose header declares a tile or strip, or a band of `STREAM_ROWS`
        rows across the width, over `decode_limit`, or pixel data beyond the end of the file.
        """
        tiff, page = self._open_tiff(), self._page
        check_tiff_data(self.path, page, tiff.filehandle.size)
        if self.reading is ImageReading.SEGMENTS:
            tiled = page.is_tiled
            check_decoded_size(self.path, page.tilelength if tiled else page.rowsperstrip,
                               page.tilewidth if tiled else self.width, "tiles" if tiled else "strips")
        band, limit = min(self.height, STREAM_ROWS) * self.width, decode_limit()
        if limit is not None and band > limit:
            raise ImageRefused(self.path, f"refused, its header declares a width of {self.width:,} px: streaming "
                                          f"holds {min(self.height, STREAM_ROWS)} rows across it ({band:,} px), over "
                                          f"the decompression-bomb limit of {limit:,} px")

    def _lazy_page(self) -> tifffile.TiffPage | None:
        """The TIFF page to read lazily, or None (not a TIFF, or a layout read whole)."""
        if self.path.suffix.lower() not in (".tif", ".tiff"):
            return None
        try:
            tiff = tifffile.TiffFile(self.path)
        except FileNotFoundError:
            raise
        except DECODE_ERRORS as error:
            raise unreadable(self.path, error) from None
        try:
            page = tiff.pages[0]
            lazy = (isinstance(page, tifffile.TiffPage)  # the first page always is one (later ones may be frames)
                    and tiff.series and tiff.series[0].shape == page.shape and page.dtype in (np.uint8, np.uint16)
                    and (page.axes == "YX" or (page.axes == "YXS" and page.shape[-1] in (1, 3, 4))))
        except DECODE_ERRORS as error:
            tiff.close()
            raise unreadable(self.path, error) from None
        if lazy:
            assert isinstance(page, tifffile.TiffPage)
            self._tiff = tiff
            return page
        tiff.close()
        return None

    def region(self, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        """Rows top .. bottom - 1 and columns left .. right - 1: (bottom - top, right - left, 3) uint8."""
        with self._lock:  # one read at a time: the cache and the file's position are shared
            return self._region(top, bottom, left, right)

    def _region(self, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        if not (0 <= top < bottom <= self.height and 0 <= left < right <= self.width):
            raise ValueError(f"rows {top}..{bottom - 1}, columns {left}..{right - 1} of a "
                             f"{self.height}x{self.width} image")
        if self.reading is ImageReading.DECODED:
            return self._image[top:bottom, left:right]
        tiff, page = self._open_tiff(), self._page
        handle = tiff.filehandle
        samples = page.shape[2] if page.axes == "YXS" else 1
        assert page.dtype is not None  # uint8 or uint16, as `_lazy_page` checked
        dtype = np.dtype(tiff.byteorder + page.dtype.char)
        if self.reading is ImageReading.CONTIGUOUS:
            pixel_bytes = samples * dtype.itemsize
            start = page.dataoffsets[0] + (top * self.width + left) * pixel_bytes
            if left == 0 and right == self.width:  # whole rows: one read
                handle.seek(start)
                raw = np.frombuffer(handle.read((bottom - top) * self.width * pixel_bytes), dtype)
            else:  # one read per row, of just these columns
                raw = np.empty((bottom - top) * (right - left) * samples, dtype)
                length = (right - left) * pixel_bytes
                for i in range(bottom - top):
                    handle.seek(start + i * self.width * pixel_bytes)
                    raw[i * (right - left) * samples:(i + 1) * (right - left) * samples] = np.frombuffer(
                        handle.read(length), dtype)
            return as_rgb(raw.reshape(bottom - top, right - left, samples))
        seg_height, seg_width = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, self.width)
        across = -(-self.width // seg_width)
        raw = np.zeros((bottom - top, right - left, samples), dtype)  # empty segments are zeros, as in tifffile
        for seg_row in range(top // seg_height, (bottom - 1) // seg_height + 1):
            for seg_col in range(left // seg_width, (right - 1) // seg_width + 1):
                segment = self._segment(seg_row * across + seg_col)
                if segment is None:
                    continue
                y, x = seg_row * seg_height, seg_col * seg_width
                a, b = max(y, top), min(y + segment.shape[0], bottom)
                c, d = max(x, left), min(x + segment.shape[1], right)
                raw[a - top:b - top, c - left:d - left] = segment[a - y:b - y, c - x:d - x]
        return as_rgb(raw)

    def _segment(self, index: int) -> np.ndarray | None:
        """Tile or strip ``index`` decoded, (h, w, samples) cropped to the image, or None when empty."""
        if index in self._segments:
            self._segments.move_to_end(index)
            return self._segments[index]
        page, handle = self._page, self._open_tiff().filehandle
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:
            return None
        handle.seek(offset)
        try:
            segment, (_, _, y, x, _), _ = page.decode(handle.read(count), index, jpegtables=page.jpegtables,
                                                      jpegheader=page.jpegheader)
        except DECODE_ERRORS as error:  # a cut or damaged segment (the file's length was checked)
            raise unreadable(self.path, error, f"{'tile' if page.is_tiled else 'strip'} {index}") from None
        assert segment is not None  # None only for a segment with no bytes, skipped above
        # (depth 1, h, w, samples) -> (h, w, samples); tiles at the right and bottom edges are
        # stored whole: crop them to the image
        segment = segment[0, :self.height - y, :self.width - x]
        self._segments[index] = segment
        while sum(kept.nbytes for kept in self._segments.values()) > SEGMENT_CACHE_BYTES and len(self._segments) > 1:
            self._segments.popitem(last=False)
        return segment

    def _open_tiff(self) -> tifffile.TiffFile:
        """The TIFF read lazily, while it is open."""
        if self._tiff is None:
            raise ValueError(f"{self.path}: the file is closed")
        return self._tiff

    def window(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """(3, h, w) float32 in [0, 1] of one window (`image_to_tensor`)."""
        return image_to_tensor(self.region(top, top + height, left, left + width))

    def close(self) -> None:
        """Close the file (a TIFF read lazily holds it open)."""
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None
        self._segments.clear()


class NpyBlocks:
    """A (C, H, W) ``.npy`` file (the format ``np.save`` writes; float16 unless ``dtype`` says
    otherwise) filled a block at a time. Plain writes rather than ``np.lib.format.open_memmap``:
    pages written through a memory map stay resident, and count in the process's memory, until
    the map is closed.
    """

    def __init__(self, path: Path | str, shape: tuple[int, int, int], dtype: DTypeLike = np.float16) -> None:
        self.path, self.shape, self.dtype = Path(path), shape, np.dtype(dtype)
        with open(self.path, "wb") as file:
            np.lib.format.write_array_header_1_0(file, {
                "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})
            self._offset = file.tell()
            file.truncate(self._offset + self.dtype.itemsize * int(np.prod(shape)))

    def write(self, top: int, left: int, block: torch.Tensor) -> None:
        """Rows top .. top + h - 1 and columns left .. left + w - 1 of every channel, from
        (C, h, w) probabilities: one write per channel and row (per channel where the block
        spans whole rows).
        """
        channels, height, width = self.shape
        _, rows, columns = block.shape
        values = block.numpy().astype(self.dtype)
        size = self.dtype.itemsize
        with open(self.path, "r+b") as file:
            for c in range(channels):
                if columns == width:
                    file.seek(self._offset + size * (c * height + top) * width)
                    file.write(np.ascontiguousarray(values[c]).data)
                    continue
                for i in range(rows):
                    file.seek(self._offset + size * ((c * height + top + i) * width + left))
                    file.write(np.ascontiguousarray(values[c, i]).data)
