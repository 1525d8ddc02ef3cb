import json
import re

import numpy as np
import pytest
import tifffile
from PIL import Image

from equiseg.data.ocelot import (
    DatasetError,
    GrandChallengeInput,
    OcelotFolder,
    instances_stem,
    pair_paths,
    pair_record,
    read_cells,
    read_instances,
    read_metadata,
    write_grand_challenge,
    write_instances,
)


def test_zenodo_reader_round_trip(tiny_dataset):
    train = OcelotFolder(tiny_dataset, "train")
    assert train.ids == ["001", "002"] and len(OcelotFolder(tiny_dataset, "test")) == 1
    sample = train[0]
    assert sample.cell_image.shape == (64, 64, 3) and sample.cell_image.dtype == np.uint8
    assert sample.tissue_mask.shape == (64, 64) and set(np.unique(sample.tissue_mask)) == {1, 2, 255}
    assert sample.cells.shape == (3, 3) and set(sample.cells[:, 2]) <= {1, 2}
    assert train[1].cells.shape == (0, 3)  # the empty CSV: no cells
    assert sample.meta.cell_size == 64 and sample.meta.subset == "train"


def test_unlabelled_reading_skips_annotations(tiny_dataset):
    (tiny_dataset / "annotations/train/cell/001.csv").unlink()
    sample = OcelotFolder(tiny_dataset, "train", labels=False)[0]
    assert sample.cells is None and sample.tissue_mask is None


def test_cell_block_from_offsets_and_mpp():
    meta_record = pair_record("train", 0.2, 0.8, 0.625, 0.125)
    from equiseg.data.ocelot import parse_pair

    meta = parse_pair("001", meta_record)
    # centre (640, 128), half side 512 * 0.25 = 128
    assert meta.cell_block() == pytest.approx((512.0, 0.0, 768.0, 256.0))
    assert meta.cell_size == 1024 and meta.tissue_size == 1024
    assert meta.cell_block((512, 512), (1024, 1024)) == pytest.approx((576.0, 64.0, 704.0, 192.0))


def test_csv_errors_name_file_and_line(tmp_path):
    path = tmp_path / "001.csv"
    path.write_text("1,2,1\n3,4\n")
    with pytest.raises(DatasetError, match=r"001.csv:2: expected 'x,y,class'") as error:
        read_cells(path)
    assert error.value.line == 2 and error.value.path == path
    path.write_text("1,2,3\n")
    with pytest.raises(DatasetError, match=r":1: unknown class 3"):
        read_cells(path)
    path.write_text("10,70,1\n")
    with pytest.raises(DatasetError, match=r"outside the 64x64 image"):
        read_cells(path, (64, 64))
    path.write_text("\n  \n")
    assert read_cells(path).shape == (0, 3)


def test_reader_raises_a_named_error_on_bad_data(tiny_dataset):
    (tiny_dataset / "annotations/val/tissue/003.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"003.png: unreadable"):
        OcelotFolder(tiny_dataset, "val")[0]


def test_bad_metadata_is_a_dataset_error(tmp_path):
    (tmp_path / "metadata.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="sample_pairs"):
        read_metadata(tmp_path / "metadata.json")
    (tmp_path / "metadata.json").write_text("{oops")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_metadata(tmp_path / "metadata.json")


def test_real_metadata_parses_and_every_block_lies_inside(real_metadata):
    pairs = read_metadata(real_metadata)
    assert len(pairs) == 663
    counts = {s: sum(m.subset == s for m in pairs.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 400, "val": 137, "test": 126}
    assert not {"586", "589", "609", "615"} & set(pairs)
    for meta in pairs.values():
        assert meta.cell_size == 1024 and meta.tissue_size == 1024
        x0, y0, x1, y1 = meta.cell_block()
        assert -0.5 <= x0 and x1 <= 1024.5 and -0.5 <= y0 and y1 <= 1024.5, meta.sample_id
        assert 250 < x1 - x0 < 262  # the ratio of mpp values is about 1/4


def test_real_metadata_block_matches_the_slide_boxes(real_metadata):
    """The offsets and the level-0 boxes tell the same story (checked on every pair)."""
    data = json.loads(real_metadata.read_text())["sample_pairs"]
    pairs = read_metadata(real_metadata)
    for sid, record in data.items():
        to_tissue = record["mpp_x"] / record["tissue"]["resized_mpp_x"]
        x0 = (record["cell"]["x_start"] - record["tissue"]["x_start"]) * to_tissue
        y0 = (record["cell"]["y_start"] - record["tissue"]["y_start"]) * to_tissue
        block = pairs[sid].cell_block()
        assert abs(block[0] - x0) < 2 and abs(block[1] - y0) < 2, sid


def test_grand_challenge_input_reads_the_real_pair(gc_input):
    data = GrandChallengeInput(gc_input)
    assert len(data) == 1
    sample = data[0]
    assert sample.cell_image.shape == (1024, 1024, 3) and sample.tissue_image.dtype == np.uint8
    assert sample.cells is None and sample.tissue_mask is None
    assert sample.meta.organ == "kidney"
    x0, y0, x1, y1 = sample.meta.cell_block()
    assert 0 <= x0 < x1 <= 1024 and -0.5 < y0 < y1 <= 1024


def test_grand_challenge_round_trip(tiny_dataset, tmp_path):
    samples = list(OcelotFolder(tiny_dataset, "train"))
    back = GrandChallengeInput(write_grand_challenge(tmp_path / "gc", samples))
    assert len(back) == 2
    for original, read in zip(samples, back):
        assert np.array_equal(original.cell_image, read.cell_image)
        assert np.array_equal(original.tissue_image, read.tissue_image)
        assert read.meta.cell_block() == original.meta.cell_block()


def test_grand_challenge_count_mismatch(tiny_dataset, tmp_path):
    root = write_grand_challenge(tmp_path / "gc", list(OcelotFolder(tiny_dataset, "train")))
    (root / "metadata.json").write_text(json.dumps(json.loads((root / "metadata.json").read_text())[:1]))
    with pytest.raises(DatasetError, match="2 patches but 1 metadata entries"):
        GrandChallengeInput(root)


def test_cells_are_read_without_decoding_the_images(tmp_path, monkeypatch):
    from equiseg.data import ocelot
    from tests_support import tiny_dataset_with_cells

    folder = ocelot.OcelotFolder(tiny_dataset_with_cells(tmp_path), "test")
    expected = [folder[i].cells for i in range(len(folder))]
    monkeypatch.setattr(ocelot, "read_image", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
    for i, cells in enumerate(expected):
        np.testing.assert_array_equal(folder.cells(i), cells)


# --- instance label images (issue 28) -------------------------------------------------------------------------------


def labels_of(dtype, top):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, top, (40, 48)).astype(dtype)
    labels[0, 0] = top  # the largest label survives the round trip
    return labels


@pytest.mark.parametrize(("suffix", "dtype", "top"), [
    (".png", np.uint8, 255), (".png", np.uint16, 65535),
    (".tif", np.uint8, 255), (".tif", np.uint16, 65535), (".tif", np.uint32, 2 ** 31 - 1), (".tiff", np.int32, 70000),
])
def test_instance_label_images_round_trip_as_png_and_tiff_of_16_and_32_bit(tmp_path, suffix, dtype, top):
    labels = labels_of(dtype, top)
    path = tmp_path / f"001{suffix}"
    if suffix == ".png":
        Image.fromarray(labels).save(path)
    else:
        tifffile.imwrite(path, labels, compression="zlib")
    read = read_instances(path, (40, 48))
    assert read.dtype == np.int32
    np.testing.assert_array_equal(read, labels.astype(np.int64))


def test_write_instances_picks_a_16_bit_png_or_a_32_bit_tiff(tmp_path):
    small, large = labels_of(np.int32, 65535), labels_of(np.int32, 65536)
    assert write_instances(tmp_path / "a", small).name == "a.png"
    assert write_instances(tmp_path / "b.c", large).name == "b.c.tif"  # a dotted sample id keeps its name
    np.testing.assert_array_equal(read_instances(tmp_path / "a.png"), small)
    np.testing.assert_array_equal(read_instances(tmp_path / "b.c.tif"), large)


def test_bad_instance_label_images_are_named_errors(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((8, 8), np.float32))
    tifffile.imwrite(tmp_path / "negative.tif", np.full((8, 8), -1, np.int32))
    Image.fromarray(np.zeros((8, 9), np.uint16)).save(tmp_path / "small.png")
    for name, fragment in (("rgb.png", "one-channel"), ("float.tif", "one-channel"), ("negative.tif", "[0, 2**31)"),
                           ("small.png", "size 9x8, expected 8x8"), ("none.png", "missing")):
        with pytest.raises(DatasetError, match=re.escape(fragment)) as error:
            read_instances(tmp_path / name, (8, 8))
        assert name in str(error.value)


def test_samples_carry_instances_where_the_dataset_has_them_and_none_for_ocelot(tiny_dataset):
    assert "cell_instances" not in pair_paths(tiny_dataset, "train", "001")
    assert all(sample.instances is None for sample in OcelotFolder(tiny_dataset, "train"))
    labels = np.zeros((64, 64), np.int32)
    labels[10:20, 10:20] = 1
    stem = instances_stem(tiny_dataset, "train", "001")
    stem.parent.mkdir(parents=True)
    tifffile.imwrite(stem.parent / "001.tiff", labels.astype(np.uint32))
    assert pair_paths(tiny_dataset, "train", "001")["cell_instances"].name == "001.tiff"
    train = OcelotFolder(tiny_dataset, "train")
    np.testing.assert_array_equal(train[0].instances, labels)
    assert train[1].instances is None  # per sample: one without a file has None
    assert OcelotFolder(tiny_dataset, "train", labels=False)[0].instances is None
