"""The synthetic world: determinism, the OCELOT layout, agreement of the two views, context and appearance."""

import json

import numpy as np
import pytest

from equiseg.data.ocelot import TISSUE_CANCER, TISSUE_UNKNOWN, TISSUE_VALUES, OcelotFolder, PairMeta
from equiseg.data.synthetic import generate_dataset, render_pair

SIZE = 256  # px; the cell patch then covers ~51 µm, a handful of cells
SEED = 7


def all_files(root):
    """Relative path -> bytes of every file under root."""
    return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def grey(image):
    return image.astype(np.float64).mean(axis=-1)


def block(pair, size=SIZE):
    """The cell block in tissue px, as integers (exact for sizes that are multiples of 32)."""
    meta = PairMeta("000", "train", pair.cell_mpp, pair.tissue_mpp, pair.patch_x_offset, pair.patch_y_offset)
    corners = meta.cell_block((size, size), (size, size))
    assert all(float(c).is_integer() for c in corners)
    return tuple(int(c) for c in corners)


def tissue_px(pair, cells):
    """Cell points (N, 3) -> the tissue pixels (column, row) that hold them, via the cell block."""
    x0, y0, _, _ = block(pair)
    scale = pair.cell_mpp / pair.tissue_mpp
    return (np.floor(x0 + (cells[:, 0] + 0.5) * scale).astype(int),
            np.floor(y0 + (cells[:, 1] + 0.5) * scale).astype(int))


@pytest.fixture(scope="module")
def pairs():
    return [render_pair(np.random.SeedSequence([SEED, k]), SIZE) for k in range(16)]


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    counts = {"train": 2, "val": 1, "test": 1}
    first = all_files(generate_dataset(tmp_path / "a", counts, size=128, seed=3))
    second = all_files(generate_dataset(tmp_path / "b", counts, size=128, seed=3))
    assert len(first) == 4 * 5 + 1  # images, CSV, tissue mask, instance labels
    assert first == second
    other = all_files(generate_dataset(tmp_path / "c", counts, size=128, seed=4))
    images = [path for path in first if path.suffix == ".jpg"]
    assert all(first[path] != other[path] for path in images)


def test_render_pair_is_deterministic_and_leaves_the_seed_sequence_alone():
    seq = np.random.SeedSequence([SEED, 0])
    one, two = render_pair(seq, 128), render_pair(seq, 128)
    for name in ("cell_image", "tissue_image", "cells", "tissue_mask", "instances"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
    assert render_pair(np.random.SeedSequence([SEED, 1]), 128).cell_image.tobytes() != one.cell_image.tobytes()


def test_more_samples_leave_the_earlier_ones_unchanged(tmp_path):
    few = generate_dataset(tmp_path / "few", {"train": 2}, size=128, seed=5)
    more = generate_dataset(tmp_path / "more", {"train": 3, "val": 1}, size=128, seed=5)
    few_files, more_files = all_files(few), all_files(more)
    samples = [path for path in few_files if path.name != "metadata.json"]
    assert len(samples) == 2 * 5
    assert all(few_files[path] == more_files[path] for path in samples)
    few_meta = json.loads((few / "metadata.json").read_text())["sample_pairs"]
    more_meta = json.loads((more / "metadata.json").read_text())["sample_pairs"]
    assert sorted(few_meta) == ["001", "002"] and sorted(more_meta) == ["001", "002", "003", "004"]
    assert all(few_meta[sid] == more_meta[sid] for sid in few_meta)


def test_dataset_reads_back_through_ocelot_folder(tmp_path):
    counts, seed, calls = {"train": 3, "val": 2, "test": 1}, 11, []
    root = generate_dataset(tmp_path / "synth", counts, size=SIZE, seed=seed,
                            on_sample=lambda done, total: calls.append((done, total)))
    assert calls == [(k, 6) for k in range(1, 7)]
    expected_ids = {"train": ["001", "002", "003"], "val": ["004", "005"], "test": ["006"]}
    total_cells = 0
    for split, ids in expected_ids.items():
        folder = OcelotFolder(root, split)
        assert folder.ids == ids
        for sample_id, sample in zip(ids, folder):
            k = int(sample_id) - 1
            meta = sample.meta
            assert sample.cell_image.shape == sample.tissue_image.shape == (SIZE, SIZE, 3)
            assert sample.tissue_mask.shape == (SIZE, SIZE)
            assert set(np.unique(sample.tissue_mask)) <= set(TISSUE_VALUES)
            assert set(sample.cells[:, 2]) <= {1, 2}
            assert ((sample.cells[:, :2] >= 0) & (sample.cells[:, :2] < SIZE)).all()
            assert meta.cell_mpp / meta.tissue_mpp == 0.25
            assert 0.18 < meta.cell_mpp < 0.22
            assert meta.cell_size == meta.tissue_size == SIZE
            assert meta.organ == "synthetic" and meta.slide_name == f"synthetic-{seed}-{k}"
            for offset in (meta.patch_x_offset, meta.patch_y_offset):
                assert (offset * 16).is_integer() and 1 / 8 <= offset <= 7 / 8
            x0, y0, x1, y1 = meta.cell_block((SIZE, SIZE), (SIZE, SIZE))
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            # the files hold sample k of the seed: points are exact, the mask is lossless
            pair = render_pair(np.random.SeedSequence([seed, k]), SIZE)
            np.testing.assert_array_equal(sample.cells, pair.cells)
            np.testing.assert_array_equal(sample.tissue_mask, pair.tissue_mask)
            np.testing.assert_array_equal(sample.instances, pair.instances)
            total_cells += len(sample.cells)
    assert total_cells > 0


def test_cell_patch_is_the_fine_view_of_its_tissue_block(pairs):
    for pair in pairs:
        x0, y0, x1, y1 = block(pair)
        side = SIZE // 4
        pooled = grey(pair.cell_image).reshape(side, 4, side, 4).mean(axis=(1, 3))  # 4x mean-pool
        tissue = grey(pair.tissue_image)
        matched = np.corrcoef(pooled.ravel(), tissue[y0:y1, x0:x1].ravel())[0, 1]
        # a block at least one block width away along x and y (the offsets live in [1/8, 7/8])
        ox, oy = (x0 + SIZE // 2) % (SIZE - side), (y0 + SIZE // 2) % (SIZE - side)
        elsewhere = np.corrcoef(pooled.ravel(), tissue[oy:oy + side, ox:ox + side].ravel())[0, 1]
        assert matched > 0.8, matched
        assert matched > elsewhere + 0.3, (matched, elsewhere)


def test_tumour_cells_sit_in_cancer_areas_and_background_cells_mostly_outside(pairs):
    in_cancer = {1: [], 2: []}
    for pair in pairs:
        cols, rows = tissue_px(pair, pair.cells)
        labels = pair.tissue_mask[rows, cols]
        assert not (labels == TISSUE_UNKNOWN).any()  # no cells are drawn in the unknown region
        for cls in (1, 2):
            in_cancer[cls].extend(labels[pair.cells[:, 2] == cls] == TISSUE_CANCER)
    assert len(in_cancer[1]) >= 10 and len(in_cancer[2]) >= 10
    assert np.mean(in_cancer[2]) >= 0.8
    assert np.mean(in_cancer[1]) <= 0.4


def test_nuclei_are_dark_and_tumour_nuclei_are_bigger(pairs):
    reach = 45  # px, 9 µm at 0.2 µm/px: beyond the largest nucleus
    yy, xx = np.mgrid[-reach:reach + 1, -reach:reach + 1]
    disk, centre = yy ** 2 + xx ** 2 <= reach ** 2, yy ** 2 + xx ** 2 <= 7 ** 2
    contrast, dark_area = [], {1: [], 2: []}
    for pair in pairs:
        image = grey(pair.cell_image)
        median = np.median(image)
        padded = np.pad(image, reach, constant_values=255)
        for x, y, cls in pair.cells:
            window = padded[y:y + 2 * reach + 1, x:x + 2 * reach + 1]
            contrast.append(window[centre].mean() - median)
            dark_area[cls].append(((window < median - 60) & disk).sum())
    assert len(dark_area[1]) >= 10 and len(dark_area[2]) >= 10
    assert np.mean(np.array(contrast) < 0) >= 0.95 and np.median(contrast) < -30
    assert np.median(dark_area[2]) > 1.5 * np.median(dark_area[1])


def test_unknown_regions_occur_and_are_pale(pairs):
    with_unknown = [pair for pair in pairs if (pair.tissue_mask == TISSUE_UNKNOWN).any()]
    assert 0 < len(with_unknown) < len(pairs)
    for pair in with_unknown:
        image, unknown = grey(pair.tissue_image), pair.tissue_mask == TISSUE_UNKNOWN
        assert image[unknown].mean() > image[~unknown].mean() + 20


def test_every_sample_has_both_tissue_classes_somewhere(pairs):
    masks = np.stack([pair.tissue_mask for pair in pairs])
    assert (masks == 1).any() and (masks == TISSUE_CANCER).any()
    assert sum(len(pair.cells) for pair in pairs) > 20


@pytest.mark.parametrize("size", [0, -32, 48, 100, 1000])
def test_sizes_that_are_not_a_positive_multiple_of_32_are_refused(tmp_path, size):
    with pytest.raises(ValueError, match="multiple of 32"):
        render_pair(0, size)
    with pytest.raises(ValueError, match="multiple of 32"):
        generate_dataset(tmp_path / "out", {"train": 1}, size=size)
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("another dataset")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        generate_dataset(out, {"train": 1}, size=64)
    assert [path.name for path in out.iterdir()] == ["old.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        generate_dataset(tmp_path / "file", {"train": 1}, size=64)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_dataset(empty, {"train": 1}, size=64) / "metadata.json").is_file()


def test_unknown_splits_and_negative_counts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown splits"):
        generate_dataset(tmp_path / "a", {"training": 1}, size=64)
    with pytest.raises(ValueError, match=">= 0"):
        generate_dataset(tmp_path / "b", {"train": -1}, size=64)


def test_the_crowded_world_packs_touching_nuclei_and_crowding_0_is_the_sparse_world():
    """Same seeds at 512 px: crowding 0 is byte for byte the default (sparse) world; crowding 1
    has several times its cells, with most nearest neighbours closer than 60 px, so that
    disks of radius 30 overlap (about 50-400 cells per 1024 px patch, i.e. a quarter per 512).
    """
    from scipy.spatial import cKDTree

    sparse, crowded, close = [], [], []
    for k in range(3):
        seq = np.random.SeedSequence([0, k])
        default, zero = render_pair(seq, 256), render_pair(seq, 256, crowding=0.0)
        assert np.array_equal(default.cell_image, zero.cell_image) and np.array_equal(default.cells, zero.cells)
        sparse.append(len(render_pair(seq, 512).cells))
        cells = render_pair(seq, 512, crowding=1.0).cells
        crowded.append(len(cells))
        distances, _ = cKDTree(cells[:, :2]).query(cells[:, :2], k=2)
        close.append(np.mean(distances[:, 1] < 60))
    assert sum(crowded) > 3 * sum(sparse), (crowded, sparse)
    assert all(10 <= n <= 120 for n in crowded), crowded
    assert np.mean(close) > 0.6, close
    with pytest.raises(ValueError, match="crowding"):
        render_pair(0, 64, crowding=1.5)


def test_a_quarter_turn_of_an_image_is_rot90_exactly():
    """The crop turner at 90°: the whole frame stays covered and equals ``np.rot90`` (clockwise on screen, x
    towards y) for RGB and labels alike; the fill is never used.
    """
    from equiseg.data.synthetic.patches import _turned_image

    rng = np.random.default_rng(0)
    image, labels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), rng.integers(0, 3, (32, 32), dtype=np.uint8)
    turned, cover = _turned_image(image, (16, 16), np.pi / 2, 1, np.zeros_like(image))
    np.testing.assert_array_equal(turned, np.rot90(image, k=-1))
    assert np.all(cover == 1)
    turned, _ = _turned_image(labels, (16, 16), np.pi / 2, 0, np.full_like(labels, 9))
    np.testing.assert_array_equal(turned, np.rot90(labels, k=-1))


@pytest.mark.slow
def test_rotated_crops_turn_the_same_world_keep_the_cell_block_and_show_glass_in_the_corners():
    """``rotated=True``: the same world as unrotated, seen through crops at random angles. The angle is read
    back from how the cell block's offset moved about the tissue patch's centre; the cells are the unrotated
    cells turned by it (to 1 px, the floor of a turned pixel centre), the cell patch is still the fine view
    of its (moved) tissue block, off-axis crops have glass corners, and the angles cover all quadrants.
    """
    angles, size = [], SIZE
    for k in range(12):
        seq = np.random.SeedSequence([SEED, k])
        flat, turned = render_pair(seq, size, 1.0), render_pair(seq, size, 1.0, rotated=True)
        assert turned.cell_image.shape == flat.cell_image.shape and turned.cell_image.dtype == np.uint8
        before = np.array([flat.patch_x_offset, flat.patch_y_offset]) - 0.5
        after = np.array([turned.patch_x_offset, turned.patch_y_offset]) - 0.5
        assert np.all(np.abs(after) <= 0.375 + 1e-9)  # the cell block stays inside the tissue patch
        assert np.linalg.norm(after) == pytest.approx(np.linalg.norm(before), abs=1e-9)
        if np.linalg.norm(before) < 0.1:
            continue  # the offset barely moves: the angle cannot be read back
        angle = np.arctan2(after[1], after[0]) - np.arctan2(before[1], before[0])
        angles.append(angle % (2 * np.pi))
        # cells: the unrotated ones turned about the patch centre, those still in the frame
        c, s = np.cos(angle), np.sin(angle)
        d = flat.cells[:, :2] + 0.5 - size / 2
        moved = size / 2 + np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]], axis=1)
        kept = np.all((moved >= 1) & (moved < size - 1), axis=1)  # clear of the frame by a px of rounding
        assert len(turned.cells) <= len(flat.cells)
        for (x, y), cls in zip(moved[kept], flat.cells[kept, 2]):
            near = np.abs(turned.cells[:, 0] + 0.5 - x) + np.abs(turned.cells[:, 1] + 0.5 - y) <= 2
            assert np.any(near & (turned.cells[:, 2] == cls)), (k, x, y, cls)
        # the cell patch is still the 4x view of its block: compare inside the disk every crop covers
        side = size // 4
        pooled = grey(turned.cell_image).reshape(side, 4, side, 4).mean(axis=(1, 3))
        x0, y0 = ((after + 0.5) * size - side / 2).round().astype(int)
        rows, cols = np.mgrid[0:side, 0:side] + 0.5 - side / 2
        disk = rows ** 2 + cols ** 2 < (side / 2 - 2) ** 2
        tissue = grey(turned.tissue_image)[y0:y0 + side, x0:x0 + side]
        assert np.corrcoef(pooled[disk], tissue[disk])[0, 1] > 0.7, k
        # glass in the corners when the crop is off the axes by more than 10°
        off_axis = min(angle % (np.pi / 2), np.pi / 2 - angle % (np.pi / 2)) > np.radians(10)
        corners = [turned.cell_image[:3, :3], turned.cell_image[:3, -3:], turned.cell_image[-3:, :3],
                   turned.cell_image[-3:, -3:]]
        if off_axis:
            for corner in corners:
                assert corner.min() > 200 and np.ptp(corner.astype(int).mean(axis=(0, 1))) < 25, k
    quadrants = {int(a // (np.pi / 2)) for a in angles}
    assert len(angles) >= 6 and len(quadrants) >= 3, angles


# --- instance labels (issue 28) ---------------------------------------------------------------------------------------


def assert_points_and_labels_agree(instances, cells):
    """Label k is the k-th cell: its point's pixel is k, every label 1..N occurs and no other."""
    np.testing.assert_array_equal(instances[cells[:, 1], cells[:, 0]], np.arange(1, len(cells) + 1))
    np.testing.assert_array_equal(np.unique(instances[instances > 0]), np.arange(1, len(cells) + 1))


@pytest.mark.parametrize(("size", "crowding", "rotated"), [(512, 0.0, False), (1024, 1.0, False),
                                                           (512, 0.0, True), (512, 1.0, True)])
def test_every_point_lies_in_its_own_label_and_every_label_holds_its_point(size, crowding, rotated):
    """Sparse, crowded (hundreds of touching cells) and rotated worlds: label k is the k-th CSV row's nucleus,
    the labels cover the dark nuclei, and the instance drawing changes no other array of the pair.
    """
    touching = 0
    for k in range(2):
        pair = render_pair(np.random.SeedSequence([SEED, k]), size, crowding, rotated)
        instances, cells = pair.instances, pair.cells
        assert instances.shape == (size, size) and instances.dtype == np.int32
        assert_points_and_labels_agree(instances, cells)
        sizes = np.bincount(instances.ravel())[1:]
        assert np.median(sizes) > 100  # nuclei of several µm, not single pixels
        nucleus, rest = grey(pair.cell_image)[instances > 0], grey(pair.cell_image)[instances == 0]
        assert nucleus.mean() < rest.mean() - 20  # the labels are where the image draws nuclei
        right = (instances[:, 1:] != instances[:, :-1]) & (instances[:, 1:] > 0) & (instances[:, :-1] > 0)
        touching += int(right.sum())
        if crowding and not rotated:
            assert len(cells) >= 100  # a crowded 1024 px patch: over a hundred nuclei, many touching
    if crowding:
        assert touching > 0


def test_labels_turn_with_the_image_under_quarter_turns_and_flips():
    """A generated pair turned by rot90 or flipped: its labels turn with it and keep their points; the crop
    turner at an exact quarter turn gives ``np.rot90`` of the labels, renumbered to the turned points.
    """
    from equiseg.data.synthetic.patches import _turned_instances

    pair = render_pair(np.random.SeedSequence([SEED, 0]), SIZE, 1.0)
    instances, cells, side = pair.instances, pair.cells, SIZE - 1
    moves = {  # image transform -> where the point (x, y) goes
        "rot90": (lambda a: np.rot90(a, k=-1), lambda x, y: (side - y, x)),
        "flip x": (lambda a: a[:, ::-1], lambda x, y: (side - x, y)),
        "flip y": (lambda a: a[::-1], lambda x, y: (x, side - y)),
        "transpose": (lambda a: np.swapaxes(a, 0, 1), lambda x, y: (y, x)),
    }
    for turn, move in moves.values():
        turned = turn(instances)
        x, y = move(cells[:, 0], cells[:, 1])
        np.testing.assert_array_equal(turned[y, x], np.arange(1, len(cells) + 1))
        image = grey(turn(pair.cell_image))
        means = np.bincount(turned.ravel(), image.ravel()) / np.bincount(turned.ravel())
        original = np.bincount(instances.ravel(), grey(pair.cell_image).ravel()) / np.bincount(instances.ravel())
        np.testing.assert_allclose(means, original)  # each label covers the same pixels of the turned image
    x, y = moves["rot90"][1](cells[:, 0], cells[:, 1])
    moved = np.stack([x, y, cells[:, 2]], axis=1)
    order = np.lexsort((moved[:, 0], moved[:, 1]))
    crop = _turned_instances(instances, moved[order], order, np.pi / 2)
    renumber = np.zeros(len(cells) + 1, np.int32)
    renumber[order + 1] = np.arange(1, len(cells) + 1)
    np.testing.assert_array_equal(crop, renumber[np.rot90(instances, k=-1)])
