"""pictures.write_png: a plain PNG that Pillow decodes to the same pixels, at every size and band count."""

import zlib

import numpy as np
import pytest
from PIL import Image

from equiseg.pictures import PNG_SIGNATURE, write_png


@pytest.mark.parametrize(("height", "width", "threads"), [(1, 1, 1), (1, 7, 3), (5, 1, 2), (37, 53, 4), (300, 211, 2)])
def test_write_png_round_trips_every_pixel(tmp_path, height, width, threads):
    rng = np.random.default_rng(height * width)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    flat = np.zeros((height, width, 3), np.uint8)
    flat[height // 2:, :, 0] = 255  # runs and wrap-around differences (0 - 255 modulo 256)
    for pixels in (noise, flat):
        write_png(tmp_path / "a.png", pixels, threads=threads)
        with Image.open(tmp_path / "a.png") as image:
            assert image.mode == "RGB" and image.size == (width, height)
            np.testing.assert_array_equal(np.asarray(image), pixels)


def test_the_file_is_one_checked_zlib_stream_in_chunks_with_good_crcs(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 40, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", pixels, threads=3)
    data = (tmp_path / "a.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    at, kinds, stream = len(PNG_SIGNATURE), [], b""
    while at < len(data):
        length = int.from_bytes(data[at:at + 4], "big")
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        assert int.from_bytes(data[at + 8 + length:at + 12 + length], "big") == zlib.crc32(kind + body)
        kinds.append(kind)
        stream += body if kind == b"IDAT" else b""
        at += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    raw = zlib.decompress(stream)  # checks the Adler-32 of the joined bands
    assert len(raw) == 64 * (1 + 40 * 3) and set(raw[::1 + 40 * 3]) == {1}


def test_anything_but_rgb_is_refused(tmp_path):
    with pytest.raises(ValueError, match="RGB"):
        write_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    assert not (tmp_path / "a.png").exists()
