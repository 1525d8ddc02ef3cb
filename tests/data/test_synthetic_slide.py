"""The synthetic whole-slide image: OpenSlide reads it, its pixels are the world's, its cells lie on tissue."""

import dataclasses

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from equiseg.data.synthetic.slide import BLOCK, SyntheticSlide, _Slide, _TiledNoise, write_synthetic_slide
from equiseg.data.synthetic.world import View, colour, instance_labels, render

openslide = pytest.importorskip("openslide")

SIZE = 2048  # px: 2 x 2 render blocks, a pyramid of two levels
SEED = 3


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> SyntheticSlide:
    return write_synthetic_slide(tmp_path_factory.mktemp("slide") / "slide.tif", size=SIZE, seed=SEED)


@pytest.fixture(scope="module")
def level0(slide) -> np.ndarray:
    with openslide.OpenSlide(slide.path) as reader:
        return np.asarray(reader.read_region((0, 0), 0, (SIZE, SIZE)))[..., :3]


def grey(image):
    return image.astype(np.float64).mean(axis=-1)


def test_opens_as_a_generic_tiff_pyramid_with_the_resolution(slide):
    with openslide.OpenSlide(slide.path) as reader:
        assert reader.properties["openslide.vendor"] == "generic-tiff"
        assert float(reader.properties["openslide.mpp-x"]) == pytest.approx(0.2, rel=1e-9)
        assert float(reader.properties["openslide.mpp-y"]) == pytest.approx(0.2, rel=1e-9)
        assert reader.level_count == 2
        assert reader.level_dimensions == ((2048, 2048), (512, 512)) == slide.levels
        assert reader.properties["openslide.level[0].tile-width"] == "256"
        assert f"seed {SEED}" in reader.properties["tiff.ImageDescription"]
    assert slide.cells_path == slide.path.with_name("slide.cells.csv")
    assert (slide.width, slide.height, slide.mpp) == (SIZE, SIZE, 0.2)


def test_level_zero_is_a_fresh_render_of_the_world(slide):
    x, y, w, h = BLOCK - 150, BLOCK - 100, 300, 200  # across the corner of four render blocks
    with openslide.OpenSlide(slide.path) as reader:
        read = np.asarray(reader.read_region((x, y), 0, (w, h)))
    assert (read[..., 3] == 255).all()
    np.testing.assert_array_equal(read[..., :3], slide.render_region(x, y, w, h))


def test_the_lower_level_is_the_area_mean_of_level_zero(slide, level0):
    with openslide.OpenSlide(slide.path) as reader:
        level1 = np.asarray(reader.read_region((0, 0), 1, (SIZE // 4, SIZE // 4)))[..., :3]
    mean = level0.reshape(SIZE // 4, 4, SIZE // 4, 4, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_array_equal(level1, np.rint(mean))


def test_cells_lie_on_tissue_and_there_is_glass(slide, level0):
    cells = slide.cells
    assert cells.dtype == np.int64 and cells.shape[1] == 3 and len(cells) > 100
    assert set(np.unique(cells[:, 2])) <= {1, 2}
    assert (cells[:, :2] >= 0).all() and (cells[:, :2] < SIZE).all()
    np.testing.assert_array_equal(cells, cells[np.lexsort((cells[:, 0], cells[:, 1]))])
    tissue = slide.tissue_mask()
    assert 0.3 < tissue.mean() < 0.7
    assert tissue[cells[:, 1], cells[:, 0]].all()
    # glass: pale and nearly grey everywhere beyond the outline's fade (4 µm = 20 px; 40 px kept clear)
    glass = level0[ndimage.distance_transform_edt(~tissue) > 40].astype(np.int64)
    assert len(glass) > 0.2 * SIZE ** 2
    assert (glass.min(axis=1) > 200).all() and (np.ptp(glass, axis=1) < 40).all()
    assert not tissue[:8].any() and not tissue[:, :8].any() and not tissue[-8:].any() and not tissue[:, -8:].any()
    # each nucleus centre is stained: darker than glass
    pale = np.median(grey(glass[:, None, :]))
    assert (grey(level0)[cells[:, 1], cells[:, 0]] < pale - 40).all()


def test_the_tissue_mask_at_a_downsample_samples_the_same_outline(slide):
    full, coarse = slide.tissue_mask(), slide.tissue_mask(16)
    assert coarse.shape == (SIZE // 16, SIZE // 16)
    centres = full[8::16, 8::16]  # the level-0 px whose corner is at each coarse pixel's centre
    assert (centres == coarse).mean() > 0.99


def test_cell_density_is_that_of_the_synthetic_dataset(slide):
    """render_pair's crowded cell patches hold 900-8500 cells per mm² (12 seeds); sparse ones 570-2950."""
    tissue_mm2 = slide.tissue_mask().sum() * (slide.mpp / 1000) ** 2
    assert 900 < len(slide.cells) / tissue_mm2 < 8500


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    one = write_synthetic_slide(tmp_path / "a.tif", size=1024, seed=5, crowding=0.5)
    two = write_synthetic_slide(tmp_path / "b.tif", size=1024, seed=5, crowding=0.5)
    other = write_synthetic_slide(tmp_path / "c.tif", size=1024, seed=6, crowding=0.5)
    assert one.path.read_bytes() == two.path.read_bytes()
    assert one.cells_path.read_bytes() == two.cells_path.read_bytes()
    assert one.instances_path.read_bytes() == two.instances_path.read_bytes()
    np.testing.assert_array_equal(one.cells, np.loadtxt(one.cells_path, np.int64, delimiter=",", skiprows=1,
                                                        ndmin=2))
    assert one.cells_path.read_text().startswith("x,y,class\n")
    with openslide.OpenSlide(one.path) as a, openslide.OpenSlide(other.path) as c:
        assert a.level_count == 1
        pixels = [np.asarray(r.read_region((0, 0), 0, (1024, 1024))) for r in (a, c)]
    assert (pixels[0] != pixels[1]).mean() > 0.5
    assert not np.array_equal(one.cells, other.cells)


def test_chromatin_windows_are_pieces_of_one_field():
    """Two render blocks' windows of the unbounded field agree where they overlap: no seams."""
    field = _TiledNoise(np.random.SeedSequence(1))
    a, b = View(0.0, 0.0, 0.2, 1024, 1), View(150.0, 170.0, 0.2, 1024, 1)
    common = View(160.0, 180.0, 0.2, 128, 1)
    values = field.window(a).on(common)
    np.testing.assert_allclose(values, field.window(b).on(common), atol=1e-4)
    np.testing.assert_allclose(values, field.window(common).on(common), atol=1e-4)
    assert 0.5 < values.std() < 2  # a unit-variance-ish field that changes within the window


def test_a_glass_block_is_filled_as_rendering_would_fill_it():
    """All-glass blocks skip render: with no stain anywhere it gives exactly the bare colour."""
    slide = _Slide.make(SEED, 1024, 0.2, 1.0)
    view = View(0.0, 0.0, 0.2, BLOCK, 1)
    world = dataclasses.replace(slide.world, nuclei=slide._near(view), chromatin=slide.chromatin.window(view))
    assert sum(len(group.x) for group in world.nuclei) > 10
    none = np.zeros((BLOCK, BLOCK), np.float32)
    rendered, _ = render(world, view, np.random.default_rng(0), none)
    np.testing.assert_array_equal(rendered, colour(world, none, none, np.random.default_rng(0)))


def test_progress_is_reported_per_row_of_render_blocks(tmp_path):
    calls = []
    write_synthetic_slide(tmp_path / "s.tif", size=1040, crowding=0.0, on_progress=lambda *a: calls.append(a))
    assert calls == [(1, 2), (2, 2)]


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 1000}, "multiple of 16"),
    ({"size": 512}, "1024"),
    ({"size": 2048.0}, "size"),
    ({"seed": -1}, "seed"),
    ({"crowding": 1.5}, "crowding"),
    ({"crowding": float("nan")}, "crowding"),
    ({"mpp": 0.0}, "mpp"),
    ({"mpp": float("inf")}, "mpp"),
    ({"tile": 100}, "power of two"),
    ({"tile": 2048}, "tile"),
])
def test_arguments_out_of_range_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_synthetic_slide(tmp_path / "s.tif", **kwargs)
    assert not any(tmp_path.iterdir())


def test_a_folder_as_destination_is_refused(tmp_path):
    with pytest.raises(ValueError, match="folder"):
        write_synthetic_slide(tmp_path, size=1024)


def test_nothing_is_left_behind_by_a_failure(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        write_synthetic_slide(tmp_path / "file" / "s.tif", size=1024)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]

    earlier = write_synthetic_slide(tmp_path / "s.tif", size=1024, crowding=0.0).path
    before = earlier.read_bytes()

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_synthetic_slide(earlier, size=2048, crowding=0.0, on_progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["file", "s.cells.csv",
                                                                                        "s.instances.tif", "s.tif"]
    assert earlier.read_bytes() == before


def test_a_file_equiseg_did_not_write_is_never_overwritten(tmp_path):
    mine = tmp_path / "s.tif"
    mine.write_bytes(b"my own slide")
    with pytest.raises(ValueError, match="equiseg did not write"):
        write_synthetic_slide(mine, size=1024)
    assert mine.read_bytes() == b"my own slide" and sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]


def test_instance_labels_hold_every_point_and_agree_across_block_seams(slide, level0):
    """NAME.instances.tif: label k is the k-th cell of NAME.cells.csv, its point always inside; the labels are
    the dark nuclei of level 0, and a view across the corner of four render blocks gives the file's labels.
    """
    assert slide.instances_path == slide.path.with_name("slide.instances.tif")
    with tifffile.TiffFile(slide.instances_path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.dtype == np.uint32
        labels = page.asarray()
    cells = slide.cells
    assert labels.shape == (SIZE, SIZE) and len(cells) > 50
    np.testing.assert_array_equal(labels[cells[:, 1], cells[:, 0]], np.arange(1, len(cells) + 1))
    np.testing.assert_array_equal(np.unique(labels[labels > 0]), np.arange(1, len(cells) + 1))
    assert grey(level0)[labels > 0].mean() < grey(level0)[(labels == 0) & slide.tissue_mask()].mean() - 20
    made = _Slide.make(SEED, SIZE, 0.2, 1.0)
    _, sources = made.cell_sources()
    ids = [np.zeros(len(group.x), np.int64) for group in made.world.nuclei]
    for k, (group, index) in enumerate(sources, start=1):
        ids[group][index] = k
    half = BLOCK // 2  # a view whose centre is the corner of four render blocks
    view = View(half * 0.2, half * 0.2, 0.2, BLOCK, 1)
    near = made._near_indices(view)
    points = np.stack([cells[:, 0] - half, cells[:, 1] - half, np.arange(1, len(cells) + 1)], axis=1)
    across = instance_labels(tuple(g.take(i) for g, i in zip(made.world.nuclei, near)),
                             [i[n] for i, n in zip(ids, near)], view, made.world.blur, points)
    np.testing.assert_array_equal(across, labels[half:half + BLOCK, half:half + BLOCK])
