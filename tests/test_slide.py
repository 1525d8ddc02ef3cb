"""equiseg slide: reading slides at a model's resolution, glass, cells in level-0 px, QuPath files, resume."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import shapely.geometry
import tifffile
import torch
import yaml
from typer.testing import CliRunner

from equiseg import build_model
from equiseg.cli import app
from equiseg.config import Config
from equiseg.data.ocelot import PairMeta, image_to_tensor
from equiseg.data.synthetic import render_pair
from equiseg.data.wsi import ScaledView, Slide, find_tissue, otsu_threshold
from equiseg.detection import find_cells
from equiseg.evaluation.tissue_context import model_context
from equiseg.files import owned
from equiseg.inference.predict import predict_file
from equiseg.inference.tiling import predict_probabilities
from equiseg.runs import Run, save_model
from equiseg.slide import SlideModel, analyse_slide
from equiseg.slide import passes as slide_module
from equiseg.slide.qupath import _polygons
from tests_support import tissue_on_glass, write_pyramid

pytest.importorskip("openslide")  # the optional extra equiseg[slide] (in dev)

TILE, OVERLAP = 128, 16
DETECT = {"sigma": 2.0, "min_distance": 6, "threshold": 0.3}


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    """A 1536 x 1280 px slide at 0.2 µm/px: glass with four crowded synthetic patches."""
    patches = {(0, 768): render_pair(1, 512, 1.0).cell_image, (512, 768): render_pair(2, 512, 1.0).cell_image,
               (512, 256): render_pair(3, 512, 1.0).cell_image, (1024, 256): render_pair(4, 256, 1.0).cell_image}
    image = tissue_on_glass(1280, 1536, patches)
    return write_pyramid(tmp_path_factory.mktemp("slide") / "slide.tif", image, 0.2)


def make_run(path, config: Config, seed: int = 0, resolution=(0.2, 0.8)):
    """A run folder with an untrained model (weights from ``seed``) and a recorded resolution."""
    torch.manual_seed(seed)
    run = Run(path)
    run.checkpoints.mkdir(parents=True)
    save_model(config.build_model().eval(), config, run.best)
    config.to_yaml(run.config_file)
    run.resolution_file.write_text(yaml.safe_dump({"cell_mpp": resolution[0], "tissue_mpp": resolution[1]}))
    return run.path


def cell_config(**data) -> Config:
    return Config.from_dict({"model": {"family": "plain", "width": 4, "depth": 2}, "detect": DETECT, "data": data})


@pytest.fixture(scope="module")
def cell_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "cells", cell_config())


# --- reading -----------------------------------------------------------------------------------------------------


def test_view_at_the_slides_resolution_copies_pixels_and_a_coarser_one_averages(slide_path):
    whole = tifffile.imread(slide_path)
    with Slide(slide_path) as slide:
        assert (slide.vendor, slide.mpp, slide.levels) == ("generic-tiff", pytest.approx(0.2), ((1536, 1280), (384, 320)))
        view = ScaledView(slide, 0.2, (100, 60, 700, 500))
        assert (view.level, view.scale, view.height, view.width) == (0, 1.0, 500, 700)
        np.testing.assert_array_equal(view.region(3, 480, 17, 650), whole[63:540, 117:750])
        # 0.203 µm/px is within 2 % of level 0's: read there, unresampled (OCELOT's mpp vary by a few %)
        assert ScaledView(slide, 0.203).scale == 1.0
        # 1.6 µm/px: level 1 (0.8) resampled by 2, about the 8 x 8 area mean of level 0
        coarse = ScaledView(slide, 1.6)
        assert (coarse.level, coarse.scale, coarse.height, coarse.width) == (1, 8.0, 160, 192)
        means = whole[:1280, :1536].reshape(160, 8, 192, 8, 3).mean(axis=(1, 3))
        error = np.abs(coarse.region(0, 160, 0, 192).astype(float) - means)
        assert error.mean() < 3 and np.percentile(error, 99) < 25
        # a rectangle's pixels do not depend on how it is asked for (squares are read with margins)
        np.testing.assert_array_equal(coarse.region(50, 90, 70, 130), coarse.region(0, 160, 0, 192)[50:90, 70:130])


def test_missing_resolution_is_an_error_unless_given(tmp_path):
    path = tmp_path / "nompp.tif"
    tifffile.imwrite(path, np.full((256, 256, 3), 200, np.uint8), tile=(128, 128), photometric="rgb",
                     resolutionunit="NONE")
    with pytest.raises(ValueError, match="does not say its microns per pixel.*--mpp"):
        Slide(path)
    with Slide(path, mpp=0.25) as slide:
        assert slide.mpp == 0.25
    (tmp_path / "junk.svs").write_bytes(b"not a slide")
    with pytest.raises(ValueError, match="OpenSlide cannot read it"):
        Slide(tmp_path / "junk.svs")


def test_otsu_splits_two_clusters_between_them():
    values = np.concatenate([np.full(300, 0.1), np.full(100, 0.6)])
    assert 0.1 < otsu_threshold(values) <= 0.6


def test_tissue_mask_of_a_real_ocelot_patch_finds_its_glass(tmp_path):
    """The real tissue patch (kidney, 0.778 µm/px) is about 40 % glass: the mask agrees with the
    full-resolution saturation within a few percent.
    """
    image = tifffile.imread("../shared/ocelot/gc_input/images/tissue_patches/000.tif")
    path = write_pyramid(tmp_path / "real.tif", image, 0.778)
    with Slide(path) as slide:
        mask = find_tissue(slide)
    high, low = image.max(-1).astype(float), image.min(-1).astype(float)
    glass = ((high - low) / np.maximum(high, 1) < 0.04).mean()
    assert 0.3 < glass < 0.5
    assert abs((1 - mask.mask.mean()) - glass) < 0.08
    # all glass: no tissue at all
    path = write_pyramid(tmp_path / "glass.tif", tissue_on_glass(512, 512, {}), 0.5)
    with Slide(path) as slide:
        assert not find_tissue(slide).mask.any()


def test_polygons_outline_regions_with_holes():
    mask = np.zeros((12, 14), bool)
    mask[2:10, 2:10] = True
    mask[5:7, 5:7] = False
    mask[0:3, 12:14] = True  # a second region, on the border
    found = sorted(_polygons(mask), key=len, reverse=True)
    assert len(found) == 2
    outer, hole = found[0]
    shape = shapely.geometry.Polygon(outer, [hole])
    assert shape.is_valid
    # contours at 0.5 between pixel centres: an 8 px square is about 7.x px a side, less its 2 px hole
    assert 7 ** 2 - 2 ** 2 <= shape.area <= 8 ** 2 - 1 and 1 <= shapely.geometry.Polygon(hole).area <= 2 ** 2
    assert shape.bounds[0] >= 1.5 and shape.bounds[2] <= 9.5
    (border,) = found[1]
    assert shapely.geometry.Polygon(border).is_valid and max(x for x, _ in border) <= 13.5


# --- cells -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stripe", [16384, 150])  # the region in one stripe, or cut into three
def test_cells_in_a_region_equal_predict_on_the_region_cut_out(slide_path, cell_run, tmp_path, monkeypatch, stripe):
    monkeypatch.setattr(slide_module, "STRIPE_SIDE", stripe)
    region = (800, 40, 448, 920)  # inside the two right-hand patches: tissue under every window
    result = analyse_slide(slide_path, SlideModel.load(cell_run), tmp_path / "out", region=region, tile=TILE,
                           overlap=OVERLAP)
    with Slide(slide_path) as slide:
        cut = ScaledView(slide, 0.2, region)
        tifffile.imwrite(tmp_path / "cut.tif", cut.region(0, cut.height, 0, cut.width))
    model, config = SlideModel.load(cell_run).model, SlideModel.load(cell_run).config
    predicted = predict_file(model, config, tmp_path / "cut.tif", tmp_path, tile=TILE, overlap=OVERLAP, probs=False)
    assert len(predicted.points) > 20
    expected = predicted.points.copy()
    expected[:, 0] += region[0] + 0.5  # level-0 px, a pixel's centre
    expected[:, 1] += region[1] + 0.5
    np.testing.assert_array_equal(result.points, expected)
    # the CSV holds the level-0 pixel and µm
    rows = np.loadtxt(result.outputs.cells_csv, delimiter=",", skiprows=1, usecols=(0, 1, 2, 3, 4, 6), ndmin=2)
    np.testing.assert_array_equal(rows[:, :2], np.floor(expected[:, :2]))
    np.testing.assert_allclose(rows[:, 2:4], expected[:, :2] * 0.2, atol=0.006)
    np.testing.assert_allclose(rows[:, 5], expected[:, 3], atol=5e-5)


@pytest.mark.slow
def test_whole_slide_cells_are_on_tissue_once_each_and_files_are_qupath_geojson(slide_path, cell_run, tmp_path):
    result = analyse_slide(slide_path, SlideModel.load(cell_run), tmp_path / "out", tile=TILE, overlap=OVERLAP)
    points = result.points
    with Slide(slide_path) as slide:
        mask = find_tissue(slide)
        width, height = slide.width, slide.height
    assert len(points) > 50
    assert mask.at(points[:, 0], points[:, 1]).all()
    assert ((points[:, 0] >= 0) & (points[:, 0] < width) & (points[:, 1] >= 0) & (points[:, 1] < height)).all()
    # once each: no two cells closer than detection's min_distance, across tile seams too
    distances = np.hypot(*(points[:, None, :2] - points[None, :, :2]).transpose(2, 0, 1))
    assert distances[np.triu_indices(len(points), 1)].min() >= DETECT["min_distance"]
    # glass is not run: no cell in the top-left glass
    assert not ((points[:, 0] < 700) & (points[:, 1] < 480)).any()

    collection = json.loads(result.outputs.cells_geojson.read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(points)
    geometries = [shapely.geometry.shape(f["geometry"]) for f in collection["features"]]  # RFC 7946 geometries
    assert all(g.geom_type == "Point" and g.is_valid for g in geometries)
    for feature, (x, y, cls, p) in zip(collection["features"], points):
        assert feature["type"] == "Feature" and feature["geometry"] == {"type": "Point",
                                                                        "coordinates": [round(x, 2), round(y, 2)]}
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == {1: "Background cell", 2: "Tumor cell"}[int(cls)]
        assert len(props["classification"]["color"]) == 3  # QuPath refuses a classification without a colour
        assert props["measurements"] == {"Probability": round(p, 4)}
    assert len({f["id"] for f in collection["features"]}) == len(points)
    summary = json.loads(result.outputs.summary.read_text())
    assert summary["cells"]["BC"] + summary["cells"]["TC"] == len(points)
    assert summary["slide"]["width"] == 1536 and 0 < summary["tissue_mm2"] < 1536 * 1280 * 0.04 / 1e6
    assert result.outputs.thumbnail.is_file() and not result.outputs.work.exists()


@pytest.mark.slow
def test_a_crashed_slide_resumes_to_the_same_cells(slide_path, cell_run, tmp_path, monkeypatch):
    model = SlideModel.load(cell_run)
    whole = analyse_slide(slide_path, model, tmp_path / "whole", tile=TILE, overlap=OVERLAP)
    monkeypatch.setattr(slide_module, "SAVE_EVERY_S", 0.0)  # save the state after every block row
    monkeypatch.setattr(slide_module, "STRIPE_SIDE", 600)  # three stripes: the crash is in the second
    seen = []

    def crash(stage, done, total):
        seen.append(done)
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        analyse_slide(slide_path, model, tmp_path / "out", tile=TILE, overlap=OVERLAP, progress=crash)
    assert not (tmp_path / "out" / "slide.summary.json").exists()
    seen.clear()
    resumed = analyse_slide(slide_path, model, tmp_path / "out", tile=TILE, overlap=OVERLAP, resume=True,
                            progress=lambda stage, done, total: seen.append(done))
    assert seen[0] == 4  # it went on from a saved block row of the second stripe, not from the start
    np.testing.assert_array_equal(resumed.points, whole.points)
    # finished: a second --resume does nothing; without it, the outputs are not overwritten
    seen.clear()
    again = analyse_slide(slide_path, model, tmp_path / "out", tile=TILE, overlap=OVERLAP, resume=True,
                          progress=lambda stage, done, total: seen.append(done))
    assert not seen and np.allclose(again.points, whole.points, atol=1e-2)
    with pytest.raises(ValueError, match="exists: use --resume"):
        analyse_slide(slide_path, model, tmp_path / "out", tile=TILE, overlap=OVERLAP)


KILL_AT_BLOCK = """
import os, signal, sys
import torch
from equiseg.slide import SlideModel, analyse_slide, passes

torch.set_num_threads(int(sys.argv[6]))  # the test's: another count can change a conv's last bits

passes.SAVE_EVERY_S, passes.STRIPE_SIDE = 0.0, 600  # save after every block row; the kill is in the second stripe

def kill(stage, done, total):
    if done == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no finally: as the power going

analyse_slide(sys.argv[1], SlideModel.load(sys.argv[2]), sys.argv[3], tile=int(sys.argv[4]),
              overlap=int(sys.argv[5]), progress=kill)
"""


@pytest.mark.slow
def test_a_slide_killed_hard_resumes_to_the_same_cells(slide_path, cell_run, tmp_path, monkeypatch):
    """SIGKILL in the middle of the second stripe: nothing is cleaned up, and a resume still
    continues from the last saved block row to the uninterrupted run's cells.
    """
    whole = analyse_slide(slide_path, SlideModel.load(cell_run), tmp_path / "whole", tile=TILE, overlap=OVERLAP)
    killed = subprocess.run([sys.executable, "-c", KILL_AT_BLOCK, str(slide_path), str(cell_run),
                             str(tmp_path / "out"), str(TILE), str(OVERLAP), str(torch.get_num_threads())],
                            check=False, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "out" / "slide.summary.json").exists()
    monkeypatch.setattr(slide_module, "STRIPE_SIDE", 600)
    seen = []
    resumed = analyse_slide(slide_path, SlideModel.load(cell_run), tmp_path / "out", tile=TILE, overlap=OVERLAP,
                            resume=True, progress=lambda stage, done, total: seen.append(done))
    assert seen[0] == 4  # from the saved block row, not from the start
    np.testing.assert_array_equal(resumed.points, whole.points)


def test_context_model_on_a_slide_agrees_with_the_pair_chain_evaluate_uses(slide_path, tmp_path, monkeypatch):
    """A region whose tissue box fits one tissue tile: the slide's context is the tissue model
    on the tissue box, cut to the region, as ``model_context`` does for an OCELOT pair. Bit for
    bit with the tissue map kept in float32; in float16 (the default) the context is within
    float16's rounding (an untrained model's flat maps move a peak by a pixel for less).
    """
    monkeypatch.setattr(slide_module, "TISSUE_CONTEXT_UM", 40.0)
    monkeypatch.setattr(slide_module, "TISSUE_MAP_DTYPE", np.float32)
    tile = 256
    tissue_cfg = Config.from_dict({"task": "tissue", "model": {"family": "plain", "width": 4, "depth": 2}})
    tissue_run = make_run(tmp_path / "tissue", tissue_cfg, seed=1)
    context_cfg = cell_config(context="model", tissue_model=str(tissue_run))
    cell_run = make_run(tmp_path / "cells", context_cfg, seed=2)
    region = (896, 96, 256, 256)
    cells, tissue = SlideModel.load(cell_run), SlideModel.load(tissue_run)
    result = analyse_slide(slide_path, cells, tmp_path / "out", tissue, region=region, tile=tile, overlap=OVERLAP)
    # the pair: the cell patch is the region at 0.2 µm/px, the tissue patch the tissue box at 0.8
    margin = round(slide_module.TISSUE_CONTEXT_UM / 0.2)
    with Slide(slide_path) as slide:
        x0, y0 = max(0, region[0] - margin), max(0, region[1] - margin)
        tissue_box = (x0, y0, min(1536, region[0] + 256 + margin) - x0, min(1280, region[1] + 256 + margin) - y0)
        tissue_view = ScaledView(slide, 0.8, tissue_box)
        tissue_image = tissue_view.region(0, tissue_view.height, 0, tissue_view.width)
        cell_view = ScaledView(slide, 0.2, region)
        cell_image = cell_view.region(0, 256, 0, 256)
    assert max(tissue_image.shape[:2]) <= tile
    centre_x = (region[0] + 128 - tissue_box[0]) / 4 / tissue_image.shape[1]
    centre_y = (region[1] + 128 - tissue_box[1]) / 4 / tissue_image.shape[0]
    meta = PairMeta("x", "test", 0.2, 0.8, centre_x, centre_y)
    context = model_context(tissue.model, image_to_tensor(tissue_image), meta, (256, 256))
    probs = predict_probabilities(cells.model, torch.cat([image_to_tensor(cell_image), context]), tile=tile,
                                  overlap=OVERLAP)
    expected = find_cells(probs, cells.config.detect)
    assert len(expected) > 3
    np.testing.assert_array_equal(result.points[:, :3], expected[:, :3] + [region[0] + 0.5, region[1] + 0.5, 0])
    np.testing.assert_allclose(result.points[:, 3], expected[:, 3], atol=1e-5)
    # the tissue file: the tissue found and the model's cancer areas, closed polygons in level-0 px
    tissue_json = json.loads(result.outputs.tissue_geojson.read_text())
    names = {f["properties"]["classification"]["name"] for f in tissue_json["features"]}
    assert "Tissue" in names
    for feature in tissue_json["features"]:
        assert feature["properties"]["objectType"] == "annotation"
        polygon = shapely.geometry.shape(feature["geometry"])
        assert polygon.geom_type == "Polygon" and polygon.is_valid and polygon.area > 0
        for ring in feature["geometry"]["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) >= 4
            assert all(0 <= x <= 1536 and 0 <= y <= 1280 for x, y in ring)


def test_cli_writes_a_slide_and_refuses_bad_input_in_one_line(slide_path, cell_run, tmp_path):
    out = tmp_path / "out"
    args = ["slide", str(slide_path), "--model", str(cell_run), "--out", str(out), "--tile", "128",
            "--overlap", "16", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--region", "768,0,512,512"])
    assert result.exit_code == 0, result.output
    assert "slide.tif:" in result.output and "cell(s)" in result.output
    assert sorted(p.name for p in out.iterdir() if p.name != ".equiseg-outputs.json") == [
        "slide.cells.csv", "slide.cells.geojson", "slide.summary.json", "slide.thumbnail.png"]
    for extra, message in [(["--region", "0,0,5000,10", "--out", str(tmp_path / "new")],
                             "is not inside the 1536x1280 slide"),
                           (["--region", "1,2,3"], "--region must be x,y,w,h"),
                           ([], "exists: use --resume"),
                           (["--cell-mpp", "-1", "--out", str(tmp_path / "new")], "--cell-mpp must be positive")]:
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, result.output
    result = CliRunner().invoke(app, ["slide", str(tmp_path / "none.svs"), "--model", str(cell_run)])
    assert result.exit_code == 2 and "no such file" in result.output
    assert not (tmp_path / "new").exists()
    # the nucleus labels synth-slide writes beside a slide, picked up by a *.tif glob: left out with a note
    labels = tmp_path / "slide.instances.tif"
    tifffile.imwrite(labels, np.zeros((64, 64), np.uint32))
    result = CliRunner().invoke(app, ["slide", str(labels), "--model", str(cell_run), "--out", str(tmp_path / "new")])
    assert result.exit_code == 2 and "note: left out slide.instances.tif" in result.output
    assert "no slides left" in result.output and not (tmp_path / "new").exists()
    from equiseg.slide import check_slides
    with pytest.raises(ValueError, match="slide.instances.tif: the nucleus instance labels"):
        check_slides([slide_path, labels], tmp_path / "new")


def test_a_run_records_its_datas_resolution(tmp_path):
    from equiseg.data.ocelot import pair_record, write_metadata

    root = tmp_path / "data"
    write_metadata(root, {f"{k:03d}": pair_record("train", 0.2 + 0.01 * k, 0.8, 0.5, 0.5) for k in range(3)})
    run = Run(tmp_path / "run")
    run.path.mkdir()
    run.record_start(cell_config(), root)
    assert run.resolution().cell_mpp == pytest.approx(0.21) and run.resolution().tissue_mpp == 0.8
    assert math.isclose(yaml.safe_load(run.resolution_file.read_text())["cell_mpp"], 0.21)
    # a checkpoint with no recorded resolution: a clear error
    torch.manual_seed(0)
    save_model(build_model("plain", 4, 2), cell_config(), tmp_path / "lone.ckpt")
    with pytest.raises(ValueError, match="does not record the resolution"):
        SlideModel.load(tmp_path / "lone.ckpt")


def test_synth_slide_cli_and_the_tissue_rule_against_the_true_section(tmp_path, cell_run):
    from equiseg.data.synthetic.slide import SyntheticSlide

    path = tmp_path / "synthetic.tif"
    result = CliRunner().invoke(app, ["synth-slide", "--out", str(path), "--size", "2048", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and (tmp_path / "synthetic.cells.csv").is_file()
    truth_cells = np.loadtxt(tmp_path / "synthetic.cells.csv", delimiter=",", skiprows=1, ndmin=2)
    with Slide(path) as slide:
        mask = find_tissue(slide)
        assert slide.mpp == pytest.approx(0.2)
    # the rule against the section drawn: most of it found, little glass taken for tissue
    step = mask.scale
    truth = SyntheticSlide(path, path, 2048, 2048, 0.2, (), np.zeros((0, 3)), 3, 1.0).tissue_mask(int(step))
    found = mask.mask[:truth.shape[0], :truth.shape[1]]
    assert (found & truth).sum() / (found | truth).sum() > 0.75
    assert mask.at(truth_cells[:, 0], truth_cells[:, 1]).mean() > 0.95  # the true cells are on the mask
    result = CliRunner().invoke(app, ["synth-slide", "--out", str(tmp_path / "bad.tif"), "--size", "1000"])
    assert result.exit_code == 2 and result.output.startswith("error: size must be a multiple of 16")
    assert not (tmp_path / "bad.tif").exists()


@pytest.mark.slow
def test_slides_spread_over_two_processes_give_the_same_files(tmp_path, cell_run):
    """Lightning's DDP (two CPU processes over gloo): each slide once, the same cells as one process."""
    from equiseg.data.synthetic.slide import write_synthetic_slide
    from equiseg.slide import analyse_slides

    paths = [write_synthetic_slide(tmp_path / f"s{k}.tif", size=1024, seed=k).path for k in range(3)]
    analyse_slides(paths, SlideModel.load(cell_run), tmp_path / "one", tile=256, overlap=32)
    command = [sys.executable, "-m", "equiseg.cli", "slide", *map(str, paths), "--model", str(cell_run),
               "--out", str(tmp_path / "two"), "--tile", "256", "--overlap", "32", "--device", "cpu", "--processes", "2"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "wrote 3 slide(s)" in result.stdout and result.stdout.count("wrote 3 slide(s)") == 1  # rank 0 only
    for path in paths:
        assert (tmp_path / "two" / f"{path.stem}.cells.csv").read_text() == \
            (tmp_path / "one" / f"{path.stem}.cells.csv").read_text()
    # no work folders or partial files left; every file listed once in the manifest, whichever process wrote it
    assert [p.name for p in (tmp_path / "two").glob(".*")] == [".equiseg-outputs.json"]
    assert owned(tmp_path / "two") == {p.name for p in (tmp_path / "two").iterdir()} - {".equiseg-outputs.json"}


@pytest.mark.slow
def test_a_two_stage_model_s_nuclei_on_a_slide_equal_predict_on_the_region_cut_out(slide_path, tmp_path, monkeypatch):
    from equiseg.inference.predict import InstanceOutput
    from equiseg.slide import analyse
    from equiseg.slide.models import load_slide_models

    stage1 = make_run(tmp_path / "stage1", Config.from_dict({"model": {"family": "p4m", "width": 1, "depth": 2},
                                                             "detect": {**DETECT, "peaks": "per-class",
                                                                        "min_distance": 12}}))
    stage2 = make_run(tmp_path / "stage2", Config.from_dict({"task": "nuclei", "window": {"side_px": 17},
                                                             "model": {"family": "p4m", "width": 1, "depth": 2}}))
    monkeypatch.setattr(analyse, "INSTANCE_TILE", 96)  # many tile seams through the nuclei
    region = (800, 40, 448, 920)
    cells, _ = load_slide_models(stage2, proposals=stage1)
    assert cells.stage2 is not None and cells.config.task.value == "cells"
    result = analyse_slide(slide_path, cells, tmp_path / "out", region=region, tile=TILE, overlap=OVERLAP)
    with Slide(slide_path) as slide:
        cut = ScaledView(slide, 0.2, region)
        tifffile.imwrite(tmp_path / "cut.tif", cut.region(0, cut.height, 0, cut.width))
    predicted = predict_file(cells.model, cells.config, tmp_path / "cut.tif", tmp_path, tile=TILE, overlap=OVERLAP,
                             probs=False, instances=InstanceOutput(0.2, cells.stage2.model, 17))
    assert len(predicted.points) > 20
    expected = predicted.points.copy()
    expected[:, :2] += np.array(region[:2]) + 0.5

    def by_position(rows):  # the slide reports cells a tile at a time, predict in the order found
        return rows[np.lexsort((rows[:, 0], rows[:, 1]))]

    np.testing.assert_array_equal(by_position(result.points), by_position(expected))
    slide_rows = np.loadtxt(result.outputs.cells_csv, delimiter=",", skiprows=1, usecols=(0, 1, 4, 7, 8, 9, 10))
    cut_rows = np.loadtxt(tmp_path / "cut_cells.csv", delimiter=",", skiprows=1, usecols=(0, 1, 2, 4, 5, 6, 7))
    cut_rows[:, :2] += region[:2]
    # the same nuclei, measured alike, across the tiles' seams
    np.testing.assert_allclose(by_position(slide_rows), by_position(cut_rows), atol=1e-4)
    features = json.loads(result.outputs.cells_geojson.read_text())["features"]
    assert len(features) == len(expected) and len({f["id"] for f in features}) == len(features)
    for feature, (x, y, _, _) in zip(features, result.points):
        polygon = shapely.geometry.shape(feature["geometry"])
        assert polygon.geom_type == "Polygon" and polygon.is_valid and polygon.contains(shapely.geometry.Point(x, y))
    assert json.loads(result.outputs.summary.read_text())["models"]["cell"]["stage2"]["task"] == "nuclei"
