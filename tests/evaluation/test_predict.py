import contextlib
import itertools
import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from equiseg import build_model
from equiseg.cli import app
from equiseg.data.ocelot import ImageRefused, as_rgb, image_to_tensor, read_rgb
from equiseg.detection import BlockDetector, detect_cells, find_cells, peak_candidates, read_points_json
from equiseg.inference import predict, readers
from equiseg.inference import tiling as inference
from equiseg.inference.predict import predict_file, predict_files
from equiseg.inference.readers import ImageReading, RgbFile
from equiseg.inference.tiling import (
    predict_probabilities,
    stream_blocks,
    tile_grid,
    tile_layout,
    tile_weight,
    window_blocks,
    window_probabilities,
)
from equiseg.pictures import prediction_overlay, probability_picture
from equiseg.runs import save_model
from equiseg.runtime import Runtime
from tests_support import tiny_config


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("plain", width=4, depth=2).eval()


class RedIsCell(nn.Module):
    """Logits from the red channel: bright is a BC cell, dark is background (cells where we draw them)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, :1] - 0.5
        return torch.cat([-red, red, torch.full_like(red, -1.0)], 1) * self.gain


def disks(height: int, width: int, centres: list[tuple[int, int]], radius: int = 8) -> np.ndarray:
    """(H, W, 3) uint8: white disks at (x, y) centres on black."""
    ys, xs = np.mgrid[:height, :width]
    inside = np.zeros((height, width), bool)
    for x, y in centres:
        inside |= (xs - x) ** 2 + (ys - y) ** 2 <= radius**2
    return np.repeat((inside * 255).astype(np.uint8)[..., None], 3, axis=-1)


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def row_major_blend(model: nn.Module, image: torch.Tensor, tile: int, overlap: int, runtime: Runtime,
                    block_side: int) -> torch.Tensor:
    """The tiled blend spelled out: every window's weighted probabilities summed into the whole
    map in row-major window order, then normalised; windows batched in block order.
    """
    _, height, width = image.shape
    def read(top, left, h, w):
        return image[:, top:top + h, left:left + w]
    order = [w for block in window_blocks(height, width, tile, overlap, block_side) for w in block.windows]
    probs = dict(window_probabilities(model, read, order, runtime))
    out, total = torch.zeros(3, height, width), torch.zeros(height, width)
    for top, left, h, w in tile_grid(height, width, tile, overlap):
        weight = tile_weight(h, overlap, w)
        out[:, top:top + h, left:left + w] += probs[top, left, h, w] * weight
        total[top:top + h, left:left + w] += weight
    return out / total


@pytest.mark.parametrize(("height", "width", "tile", "overlap"), [
    (45, 37, 64, 16),    # smaller than the tile: one window, unweighted
    (40, 40, 16, 4),
    (37, 53, 16, 4),
    (200, 90, 16, 4),
    (150, 97, 64, 16),
    (129, 200, 48, 8),   # odd sizes
    (40, 300, 64, 20),   # one row of windows, shorter than the tile
    (61, 77, 16, 9),     # overlap over half the tile: windows reach two blocks on
])
@pytest.mark.parametrize("batch", [1, 3])
def test_streamed_blocks_equal_the_whole_image_bit_for_bit(height, width, tile, overlap, batch):
    model, image = tiny_model(), image_to_tensor(random_image(height, width))
    runtime = Runtime(batch=batch)
    def read(top, left, h, w):
        return image[:, top:top + h, left:left + w]
    whole = predict_probabilities(model, image, tile, overlap, runtime)
    for block_side in (1, 2 * tile - overlap, 2048):  # one window per block, a few, one block
        streamed = torch.full_like(whole, torch.nan)
        for top, left, probs in stream_blocks(model, read, height, width, tile, overlap, runtime, block_side):
            region = streamed[:, top:top + probs.shape[1], left:left + probs.shape[2]]
            assert region.isnan().all()  # the blocks tile the image
            region.copy_(probs)
        assert torch.equal(streamed, whole)
        if max(height, width) > tile:
            assert torch.equal(streamed, row_major_blend(model, image, tile, overlap, runtime, block_side))


@pytest.mark.parametrize(("height", "width", "tile", "overlap"), [(70, 200, 16, 4), (61, 177, 16, 9), (50, 30, 64, 8)])
def test_stripes_of_columns_equal_the_whole_image_bit_for_bit(height, width, tile, overlap):
    """Each stripe runs the windows that reach into it, so its probabilities are the whole
    image's there; memory then follows the stripe's width (the pieces kept never reach past it).
    """
    model, image = tiny_model(), image_to_tensor(random_image(height, width))
    runtime = Runtime()
    def read(top, left, h, w):
        return image[:, top:top + h, left:left + w]
    whole = predict_probabilities(model, image, tile, overlap, runtime)
    for cuts in ([0, 5, 6, width // 2, width // 2 + 1, width], [0, width // 3, width], [0, width]):  # 1 px too
        streamed = torch.full_like(whole, torch.nan)
        for m0, m1 in itertools.pairwise(cuts):
            state = inference.StreamState()
            yielded = 0
            for top, left, probs in stream_blocks(model, read, height, width, tile, overlap, runtime, 2 * tile,
                                                  state=state, columns=(m0, m1)):
                yielded += 1
                assert m0 <= left and left + probs.shape[2] <= m1
                region = streamed[:, top:top + probs.shape[1], left:left + probs.shape[2]]
                assert region.isnan().all()
                region.copy_(probs)
                assert all(piece.left + piece.terms.shape[2] <= m1 for piece in state.pieces)
            assert yielded == inference.block_count(height, width, tile, overlap, 2 * tile, (m0, m1))
        assert torch.equal(streamed, whole)
    with pytest.raises(ValueError, match="not within"):
        window_blocks(height, width, tile, overlap, columns=(5, width + 1))


def test_the_tile_layout_by_hand_and_its_rules():
    """4096 px in 1024 px windows overlapping by 128: 5 windows of 928 px (the least multiple of 16 at
    which 5 cover it), not 5 of 1024 with the last pushed back over its neighbour. For every case: the
    fewest windows of at most the tile, from the first px to the last, each overlapping the next by at least
    the overlap.
    """
    assert tile_layout(4096, 1024, 128) == (928, [0, 792, 1584, 2376, 3168])
    assert tile_layout(1000, 1024, 128) == (1000, [0])
    for length, tile, overlap in itertools.product([17, 100, 1025, 2048, 4096, 5000, 12001], [16, 100, 512, 1024],
                                                    [0, 8, 15, 64, 128]):
        if overlap >= tile:
            continue
        side, starts = tile_layout(length, tile, overlap)
        n = len(starts)
        assert side <= min(tile, length) and starts[0] == 0 and starts[-1] + side == length
        assert all(a + side - b >= overlap for a, b in itertools.pairwise(starts))
        assert n == 1 or (n - 1) * tile - (n - 2) * overlap < length  # one window fewer could not cover it


def test_blocks_group_the_tile_grid_row_major():
    blocks = window_blocks(200, 90, 16, 4, block_side=30)  # step 12: 2 x 2 windows a block
    assert [w for block in blocks for w in block.windows] != tile_grid(200, 90, 16, 4)
    assert sorted(w for block in blocks for w in block.windows) == sorted(tile_grid(200, 90, 16, 4))
    # 90 px in 16 px windows overlapping by 4: 8 windows, spread evenly (starts 0, 10, 21, .., 74); 200 px: 17
    # (0, 11, 23, .., 184); the last block row and column end at the image's edge
    assert (blocks[0].top, blocks[0].bottom, blocks[0].left, blocks[0].right) == (0, 23, 0, 21)
    assert blocks[0].windows == ((0, 0, 16, 16), (0, 10, 16, 16), (11, 0, 16, 16), (11, 10, 16, 16))
    assert (blocks[-1].top, blocks[-1].bottom, blocks[-1].left, blocks[-1].right) == (184, 200, 63, 90)
    assert blocks[-1].windows == ((184, 63, 16, 16), (184, 74, 16, 16))
    assert len(blocks) == 9 * 4


@pytest.mark.parametrize(("batch", "block_side", "threaded"), [(1, 2048, False), (3, 2048, False), (3, 24, False),
                                                              (3, 24, True)])
def test_predict_file_writes_the_whole_image_result(tmp_path, monkeypatch, batch, block_side, threaded):
    monkeypatch.setattr(inference, "BLOCK_SIDE", block_side)  # 24: one window per block
    monkeypatch.setattr(predict, "THREADED_SINK", threaded)  # blocks finished on a worker thread, as on a GPU
    image = random_image(70, 53, seed=1)
    Image.fromarray(image).save(tmp_path / "a.png")
    model, config = tiny_model(), tiny_config(tmp_path, detect={"threshold": 0.0})
    runtime = Runtime(batch=batch)
    result = predict_file(model, config, tmp_path / "a.png", tmp_path, tile=32, overlap=8, runtime=runtime)
    probs = predict_probabilities(model, image_to_tensor(image), 32, 8, runtime)
    points = find_cells(probs, config.detect)
    assert len(points) and result.reading is ImageReading.DECODED and result.picture_step == 1
    np.testing.assert_array_equal(result.points, points)
    saved = np.load(tmp_path / "a_probs.npy")
    assert saved.dtype == np.float16
    np.testing.assert_array_equal(saved, probs.numpy().astype(np.float16))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a_probs.png")), probability_picture(probs.numpy()))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a_overlay.png")),
                                  prediction_overlay(image, probs.numpy(), points))


@pytest.mark.parametrize("block_side", [2048, 24])
def test_pictures_of_large_images_keep_every_kth_pixel(tmp_path, monkeypatch, block_side):
    monkeypatch.setattr(predict, "PICTURE_SIDE", 32)
    monkeypatch.setattr(inference, "BLOCK_SIDE", block_side)  # 24: blocks at offsets not divisible by 3
    image = random_image(70, 53, seed=2)
    Image.fromarray(image).save(tmp_path / "big.png")
    model, config = tiny_model(), tiny_config(tmp_path)
    result = predict_files(model, config, [tmp_path / "big.png"], tmp_path / "out", tile=32, overlap=8)
    assert result.images[0].picture_step == 3
    probs = predict_probabilities(model, image_to_tensor(image), 32, 8).numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "big_probs.png")),
                                  probability_picture(probs[:, ::3, ::3]))
    assert np.asarray(Image.open(tmp_path / "out" / "big_overlay.png")).shape == (24, 18, 3)
    assert "big.png (53x70): pictures at 1/3 scale, 18x24 (one px in 3 along each side)" in result.notes()


def plateau_map(height: int, width: int, seed: int, peak_rows: list[int]) -> torch.Tensor:
    """(3, H, W) probabilities with flat plateaus (quantised values) and peaks on the given rows."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:height, :width]
    foreground = 0.2 * rng.random((height, width))
    centres = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(height * width // 300)]
    centres += [(int(rng.integers(0, width)), row) for row in peak_rows]
    for x, y in centres:
        foreground = np.maximum(foreground, 1 - np.hypot(xs - x, ys - y) / rng.uniform(3, 8))
    foreground = np.round(foreground.clip(0, 1) * 6) / 6  # quantised: plateaus and ties
    share = np.round(rng.random((height, width)) * 4) / 4
    return torch.from_numpy(np.stack([1 - foreground, foreground * share, foreground * (1 - share)])).float()


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize(("height", "width", "sigma", "min_distance"), [
    (37, 53, 2.0, 4), (64, 64, 0.0, 3), (101, 77, 1.5, 5), (90, 31, 2.0, 4), (5, 60, 1.0, 2),
])
def test_block_detection_equals_detect_cells_bit_for_bit(height, width, sigma, min_distance, per_class):
    rng = np.random.default_rng(height)
    rows = sorted({int(c) for c in rng.integers(1, height, 6)} | {height // 2})
    columns = sorted({int(c) for c in rng.integers(1, width, 6)} | {width // 2})
    probs = plateau_map(height, width, seed=width, peak_rows=rows)
    expected = detect_cells(probs, sigma, min_distance, threshold=0.3, per_class=per_class)
    assert len(expected)
    for row_cuts, column_cuts in [([], []), (rows, columns), (rows, []), ([], columns),
                                  (list(range(1, height)), list(range(3, width, 7)))]:  # tiny blocks
        for chunk in (1024, 9) if len(row_cuts) < 20 else (1024,):  # 9: cores searched in parts
            detector = BlockDetector(height, width, sigma, min_distance, threshold=0.3, chunk=chunk,
                                     per_class=per_class)
            for top, bottom in zip([0] + row_cuts, row_cuts + [height]):
                for left, right in zip([0] + column_cuts, column_cuts + [width]):
                    detector.add(top, left, probs[:, top:bottom, left:right])
            np.testing.assert_array_equal(detector.points(), expected)


def test_block_detector_refuses_blocks_out_of_order():
    probs = plateau_map(40, 40, seed=0, peak_rows=[])
    detector = BlockDetector(40, 40, sigma=2.0, min_distance=4)
    detector.add(0, 0, probs[:, :20, :25])
    with pytest.raises(ValueError, match="not the next block"):
        detector.add(0, 20, probs[:, :20, 20:])  # overlaps the first
    with pytest.raises(ValueError, match="not the next block"):
        detector.add(0, 25, probs[:, :10, 25:])  # not the block row's height
    detector.add(0, 25, probs[:, :20, 25:])
    with pytest.raises(ValueError, match="were added"):
        detector.points()


def test_peak_candidates_refuses_a_core_without_its_halo():
    probs = plateau_map(40, 40, seed=0, peak_rows=[])
    with pytest.raises(ValueError, match="needs 10 px"):  # blur radius 6 + min_distance 4
        peak_candidates(probs[:, 5:], (5, 0), (40, 40), (10, 40, 0, 40), sigma=2.0, min_distance=4)


def test_json_is_skipped_for_other_sizes_and_cells_keep_their_coordinates(tmp_path):
    Image.fromarray(disks(60, 1100, [(200, 30), (1050, 30)])).save(tmp_path / "wide.png")
    out = tmp_path / "out"
    Image.fromarray(disks(40, 40, [(20, 20)])).save(tmp_path / "small.png")  # an earlier prediction, replaced
    predict_files(RedIsCell(), tiny_config(tmp_path), [tmp_path / "small.png"], out, tile=32, overlap=8)
    assert (out / "cell_classification.json").is_file()
    result = predict_files(RedIsCell(), tiny_config(tmp_path), [tmp_path / "wide.png"], out, tile=256, overlap=32)
    assert result.json_path is None and not (out / "cell_classification.json").exists()
    assert result.json_skipped == ("cell_classification.json skipped: the official format holds patches of at most "
                                   "1024x1024 px; image_0 (wide.png) is 1100x60; the cells are in the *_cells.csv "
                                   "files")
    assert result.json_skipped in result.notes() and result.cell_counts == (2,)
    rows = (out / "wide_cells.csv").read_text().splitlines()
    assert rows[0] == "x,y,class,probability"
    assert sorted(r.rsplit(",", 1)[0] for r in rows[1:]) == ["1050,30,1", "200,30,1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "small.png", "wide.png"]  # no partial folder left
    assert not list(out.glob("small*")) and not list(out.glob(".equiseg-staging-*"))


def test_an_output_folder_of_other_files_is_refused_and_kept(tmp_path):
    Image.fromarray(disks(40, 40, [(20, 20)])).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files equiseg did not write"):
        predict_files(RedIsCell(), tiny_config(tmp_path), [tmp_path / "a.png"], tmp_path, tile=32, overlap=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "notes.txt"]


def test_a_failed_prediction_leaves_the_earlier_one_whole(tmp_path):
    Image.fromarray(disks(40, 40, [(20, 20)])).save(tmp_path / "a.png")
    out = tmp_path / "out"
    first = predict_files(RedIsCell(), tiny_config(tmp_path), [tmp_path / "a.png"], out, tile=32, overlap=8)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageRefused, match="broken.png: unreadable"):
        predict_files(RedIsCell(), tiny_config(tmp_path), [tmp_path / "a.png", tmp_path / "broken.png"], out,
                      tile=32, overlap=8)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and first.json_path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "broken.png", "out"]


def test_json_is_written_for_1024_images(tmp_path):
    centres = [(20, 1000), (512, 512), (1003, 17)]
    Image.fromarray(disks(1024, 1024, centres)).save(tmp_path / "patch.png")
    result = predict_files(RedIsCell(), tiny_config(tmp_path), [tmp_path / "patch.png"], tmp_path / "out", tile=512,
                           overlap=64, probs=False)
    assert result.json_skipped is None and result.json_path == tmp_path / "out" / "cell_classification.json"
    (points,) = read_points_json(result.json_path)
    assert sorted(map(tuple, points[:, :3].astype(int))) == sorted((x, y, 1) for x, y in centres)


def test_cli_no_probs_writes_no_probability_maps_and_says_why_no_json(tmp_path):
    model, config = tiny_model(), tiny_config(tmp_path)
    checkpoint = tmp_path / "tiny.ckpt"
    save_model(model, config, checkpoint)
    Image.fromarray(random_image(20, 1030)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", "--model", str(checkpoint), str(tmp_path / "a.png"), "--out", str(out),
                                      "--tile", "64", "--overlap", "8", "--no-probs"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["a_cells.csv", "a_overlay.png",
                                                                                   "images.txt"]
    assert "cell_classification.json skipped: the official format holds patches of at most 1024x1024 px; " \
           "image_0 (a.png) is 1030x20" in result.output
    # an image that fits the format gets the official file too
    Image.fromarray(random_image(50, 40)).save(tmp_path / "b.png")
    result = CliRunner().invoke(app, ["predict", "--model", str(checkpoint), str(tmp_path / "b.png"), "--out", str(out),
                                      "--tile", "32", "--overlap", "8"])
    assert result.exit_code == 0 and (out / "cell_classification.json").is_file() and "skipped" not in result.output


def test_uint16_scaling_matches_round_of_v_over_257():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    np.testing.assert_array_equal(as_rgb(values)[..., 0], (values / 257).round().astype(np.uint8))


@pytest.mark.parametrize(("options", "reading"), [
    ({}, ImageReading.CONTIGUOUS),
    ({"tile": (16, 16), "compression": "zlib"}, ImageReading.SEGMENTS),
    ({"rowsperstrip": 7, "compression": "zlib"}, ImageReading.SEGMENTS),
    ({"rowsperstrip": 7}, ImageReading.CONTIGUOUS),
])
@pytest.mark.parametrize("kind", ["rgb", "grey16"])
def test_tiff_is_read_lazily_region_by_region(tmp_path, monkeypatch, options, reading, kind):
    monkeypatch.setattr(readers, "SEGMENT_CACHE_BYTES", 2000)  # a few segments: some are decoded again
    rng = np.random.default_rng(3)
    data = (rng.integers(0, 256, (45, 37, 3), dtype=np.uint8) if kind == "rgb"
            else rng.integers(0, 65536, (45, 37), dtype=np.uint16))
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, data, **options)
    if reading is ImageReading.CONTIGUOUS:
        np.testing.assert_array_equal(tifffile.memmap(path), data)  # what a lazy reader may map
    whole = read_rgb(path)
    with contextlib.closing(RgbFile(path)) as image:
        assert image.reading is reading and (image.height, image.width) == (45, 37)
        for top, bottom in [(0, 45), (0, 1), (5, 23), (15, 17), (44, 45)]:
            np.testing.assert_array_equal(image.region(top, bottom, 0, image.width), whole[top:bottom])
        for top, bottom, left, right in [(0, 45, 0, 37), (5, 23, 3, 33), (44, 45, 36, 37), (15, 40, 17, 18)]:
            np.testing.assert_array_equal(image.region(top, bottom, left, right), whole[top:bottom, left:right])
        np.testing.assert_array_equal(image.window(5, 3, 20, 30), image_to_tensor(whole[5:25, 3:33]))
        with pytest.raises(ValueError, match="columns 30..37"):
            image.region(0, 5, 30, 38)


def test_a_tiff_predicts_as_its_png(tmp_path):
    image = random_image(70, 53, seed=4)
    tifffile.imwrite(tmp_path / "a.tif", image, tile=(16, 16), compression="zlib")
    Image.fromarray(image).save(tmp_path / "b.png")
    model, config = tiny_model(), tiny_config(tmp_path)
    a = predict_file(model, config, tmp_path / "a.tif", tmp_path, tile=32, overlap=8)
    b = predict_file(model, config, tmp_path / "b.png", tmp_path, tile=32, overlap=8)
    assert a.reading is ImageReading.SEGMENTS and b.reading is ImageReading.DECODED
    np.testing.assert_array_equal(np.load(tmp_path / "a_probs.npy"), np.load(tmp_path / "b_probs.npy"))
    np.testing.assert_array_equal(a.points, b.points)


def test_evaluation_of_larger_images_keeps_true_coordinates_in_a_csv(tmp_path):
    from equiseg.evaluation.evaluate import Evaluation, write_evaluation

    points = [np.array([[1030.0, 5.0, 2.0, 0.75]]), np.zeros((0, 4))]
    evaluation = Evaluation({"loss": 1.0, "dice/TC": float("nan")}, ["001", "002"], points, [{}, {}],
                            shapes=[(40, 1100), (40, 40)])
    paths = write_evaluation(evaluation, tmp_path, "test")
    saved = json.loads(paths["scores"].read_text())  # strict JSON: NaN is null, the context by name
    assert saved["scores"] == {"loss": 1.0, "dice/TC": None} and saved["context"] == "none"
    assert "points" not in paths and not (tmp_path / "cell_classification.json").exists()
    assert evaluation.json_refusal().endswith("image_0 (001) is 1100x40")
    assert paths["cells"].read_text().splitlines() == ["image,id,x,y,class,probability", "0,001,1030,5,2,0.7500"]
    small = Evaluation({"loss": 1.0}, ["001"], points[:1], [{}], shapes=[(512, 512)])
    small.points[0][0, 0] = 500
    assert "points" in write_evaluation(small, tmp_path / "small", "test")


def test_a_block_sink_keeps_the_order_raises_the_consumers_error_and_drops_the_rest():
    from equiseg.inference.tiling import BlockSink

    for threaded in (False, True):
        seen = []
        with BlockSink(lambda top, left, probs, seen=seen: seen.append((top, left)), threaded) as sink:
            for k in range(7):
                sink.put(k, -k, torch.zeros(1))
        assert seen == [(k, -k) for k in range(7)]

        def fail_on_two(top, left, probs, seen=seen):
            if top == 2:
                raise OSError("disk full")
            seen.append(top)
        seen.clear()
        with pytest.raises(OSError, match="disk full"), BlockSink(fail_on_two, threaded) as sink:
            for k in range(6):
                sink.put(k, 0, torch.zeros(1))
        assert seen == [0, 1]


def test_the_class_overlay_blends_in_float32_as_written():
    """pictures.class_overlay's lookup tables against the blend it describes, for every value of every channel."""
    from equiseg.pictures import CELL_COLOURS, class_overlay

    rng = np.random.default_rng(3)
    image = np.stack(np.meshgrid(np.arange(256), np.arange(3)), -1)[..., 0].astype(np.uint8)  # (3, 256): all values
    image = np.repeat(image[..., None], 3, -1)
    labels = rng.integers(0, 3, image.shape[:2])
    expected = image.astype(np.float32)
    for cls, colour in CELL_COLOURS.items():
        expected[labels == cls] = 0.65 * expected[labels == cls] + 0.35 * np.array(colour, np.float32)
    np.testing.assert_array_equal(class_overlay(image, labels), expected.clip(0, 255).astype(np.uint8))
