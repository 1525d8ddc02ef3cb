"""Pictures of predictions: class overlays with cell points, and probability maps."""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# background, BC, TC (cells) -- background, cancer (tissue); colour-blind-safe pairs
CELL_COLOURS = {1: (0, 158, 115), 2: (213, 94, 0)}
TISSUE_COLOURS = {1: (204, 121, 167)}


def class_overlay(image: np.ndarray, labels: np.ndarray, colours: dict[int, tuple[int, int, int]] = CELL_COLOURS,
                  alpha: float = 0.35) -> np.ndarray:
    """Blend class colours over an RGB image where ``labels`` (H, W) is a coloured class: each such pixel
    becomes (1 - alpha) x its value + alpha x the colour in float32, clipped and truncated to uint8, read
    from a table of the 256 values per channel (the same numbers, without a float copy of the image).
    """
    out = np.array(image, dtype=np.uint8, copy=True)
    levels = np.arange(256, dtype=np.float32)[:, None]
    for cls, colour in colours.items():
        where = labels == cls
        table = ((1 - alpha) * levels + alpha * np.array(colour, np.float32)).clip(0, 255).astype(np.uint8)
        out[where] = table[out[where], np.arange(3)]
    return out


def draw_points(image: np.ndarray, points: np.ndarray, radius: int = 6, filled: bool = True,
                colours: dict[int, tuple[int, int, int]] = CELL_COLOURS) -> np.ndarray:
    """Cell points (rows x, y, class, ...) drawn as dots (predictions) or rings (ground truth)."""
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    for x, y, cls, *_ in np.asarray(points).reshape(-1, np.asarray(points).shape[-1] if len(points) else 3):
        box = (x - radius, y - radius, x + radius, y + radius)
        colour = colours.get(int(cls), (0, 0, 0))
        if filled:
            draw.ellipse(box, fill=colour, outline=(255, 255, 255))
        else:
            draw.ellipse(box, outline=colour, width=max(2, radius // 3))
    return np.asarray(picture)


def dot_radius(height: int) -> int:
    """The radius, px, of the dots that mark cells on a picture ``height`` px tall."""
    return max(4, height // 150)


CLASS_CHANNELS = 3  # a map's channels that are classes: a cell map's three (a fourth is p(nucleus)), a tissue map's two


def predicted_classes(probs: np.ndarray, classes: int = CLASS_CHANNELS) -> np.ndarray:
    """(H, W) the most probable class of each pixel of a (C, H, W) map, among its first ``classes``
    channels: a channel after them (a cell model's p(nucleus), `equiseg.models.unet.probabilities`)
    is no class.
    """
    return probs[:classes].argmax(0)


def prediction_overlay(image: np.ndarray, probs: np.ndarray, points: np.ndarray | None = None,
                       gt_points: np.ndarray | None = None, classes: int = CLASS_CHANNELS) -> np.ndarray:
    """The image with the predicted classes tinted (`predicted_classes`), predicted cells as dots,
    ground truth as rings.
    """
    out = class_overlay(image, predicted_classes(probs, classes))
    size = dot_radius(image.shape[0])
    if gt_points is not None:
        out = draw_points(out, gt_points, radius=size + 4, filled=False)
    if points is not None:
        out = draw_points(out, points, radius=size, filled=True)
    return out


def probability_picture(probs: np.ndarray) -> np.ndarray:
    """(C, H, W) probabilities of a 3-class cell model as RGB: red = TC, green = BC, black = background
    (a fourth channel, p(nucleus), is not drawn).
    """
    rgb = np.zeros((*probs.shape[1:], 3), np.float32)
    rgb[..., 1] = probs[1]
    if probs.shape[0] > 2:
        rgb[..., 0] = probs[2]
    return (rgb * 255).clip(0, 255).astype(np.uint8)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_png(path: Path | str, pixels: np.ndarray, level: int = 1, threads: int | None = None) -> None:
    """(H, W, 3) uint8 RGB as an 8-bit PNG at ``path``, several times faster than Pillow's writer for the
    large pictures of ``predict``: each row filtered by "Sub" (the byte minus the one a pixel to its left,
    PNG filter type 1), deflated with zlib's run-length strategy at ``level``, in ``threads`` bands of rows
    compressed at once (default: the CPUs, at most 4) and joined into one zlib stream (each band but the
    last ends on a sync flush, so the bands concatenate into one valid deflate stream, as pigz does).
    The file is a plain PNG (signature, IHDR, one IDAT, IEND; PNG specification, third edition, W3C 2025);
    any reader decodes the same pixels (tested with Pillow).
    """
    rgb = np.ascontiguousarray(pixels, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"expected (H, W, 3) uint8 RGB pixels, got shape {rgb.shape}")
    height, width = rgb.shape[:2]
    rows = rgb.reshape(height, width * 3)
    raw = np.empty((height, 1 + width * 3), np.uint8)
    raw[:, 0] = 1  # filter type Sub
    raw[:, 1:4] = rows[:, :3]
    np.subtract(rows[:, 3:], rows[:, :-3], out=raw[:, 4:])  # modulo 256, as the filter is defined
    bands = max(1, min(threads or min(os.cpu_count() or 1, 4), height))
    cuts = np.linspace(0, height, bands + 1).astype(int)

    def deflate(k: int) -> bytes:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_RLE)  # raw deflate: one header below
        last = k == bands - 1
        band = raw[cuts[k]:cuts[k + 1]].data  # whole rows of a C-ordered array: one contiguous buffer
        return compressor.compress(band) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    with ThreadPoolExecutor(bands) as pool:  # zlib lets go of the GIL while it compresses
        body = b"".join(pool.map(deflate, range(bands)))
    stream = b"\x78\x01" + body + struct.pack(">I", zlib.adler32(raw.data))  # zlib header: deflate, 32 KiB window
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    with open(path, "wb") as file:
        file.write(PNG_SIGNATURE)
        for kind, data in ((b"IHDR", header), (b"IDAT", stream), (b"IEND", b"")):
            file.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))
