"""equiseg package: a folder that the BioImage Model Zoo's own tools validate and test, whose cells.pt gives
predict's cells where only torch is installed, refused in one line for models it cannot package yet.
"""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from equiseg.cli import app
from equiseg.config import Config
from equiseg.runs import Run, save_model

runner = CliRunner()


def write_run(path, family="p4m", task="cells", tissue_model=None, **sections):
    """A run folder: a small model with warmed batch norm, its config and resolution, no dataset left; with
    ``tissue_model``, a cell model with tissue context from that run; ``sections`` more of its config (a
    stage 2's ``window``: its p(nucleus) then about 0.5 at the median, so that its nuclei have shapes).
    """
    torch.manual_seed(0)
    context = {"context": "model", "tissue_model": str(tissue_model)} if tissue_model else {}
    config = Config.from_dict({"task": task, "model": {"family": family, "width": 2, "depth": 3},
                               "data": {"root": str(path / "gone"), **context},
                               "detect": {"sigma": 2.0, "min_distance": 4, "threshold": 0.3}, **sections})
    model = config.build_model().train()
    side = config.window.side_px if task == "nuclei" else 32
    with torch.no_grad():
        model(torch.rand(2, config.in_channels, side, side) * 2)
        if task == "nuclei":
            mask, _ = model.eval()(torch.rand(8, 3, side, side))
            model.mask_head.bias -= mask.median()
    run = Run(path)
    run.checkpoints.mkdir(parents=True)
    save_model(model.eval(), config, run.best)
    config.to_yaml(run.config_file)
    run.resolution_file.write_text(yaml.safe_dump({"cell_mpp": 0.2, "tissue_mpp": 0.8}))
    return path


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("package")
    run = write_run(root / "run")
    result = runner.invoke(app, ["package", "--model", str(run), "--out", str(root / "pkg"), "--zip", "--hub-folder"])
    assert result.exit_code == 0, result.output
    return root / "pkg"


@pytest.mark.slow
def test_the_bioimage_model_zoo_validates_the_package_and_its_test_passes(package):
    spec = pytest.importorskip("bioimageio.spec")
    core = pytest.importorskip("bioimageio.core")
    description = spec.load_description(package / "rdf.yaml", perform_io_checks=True)
    assert description.validation_summary.status in ("valid-format", "passed"), description.validation_summary.format()
    summary = core.test_model(package / "rdf.yaml")
    assert summary.status == "passed", summary.format()


@pytest.mark.slow
def test_the_package_holds_its_files_and_says_what_it_is(package):
    names = {p.name for p in package.iterdir()}
    assert {"weights.safetensors", "config.yaml", "probabilities.pt", "cells.pt", "cells.onnx", "rdf.yaml", "README.md",
            "equiseg.json", "test_input.npy", "test_output.npy", "sample.png"} <= names
    described = json.loads((package / "equiseg.json").read_text())
    assert described["exact_for"] == "D4" and described["tile"]["halo"] == 29 and described["cell_mpp"] == 0.2
    assert described["certificate"]["group"] < 1e-4  # exact for D4 on the sample, to float rounding
    card = (package / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\n") and "Trained on the data" in card
    assert "- Input at 0.2 µm per px;" in card
    rdf = yaml.safe_load((package / "rdf.yaml").read_text())
    assert rdf["outputs"][0]["axes"][2]["halo"] == 29 and rdf["inputs"][0]["axes"][2]["size"] == {"min": 64, "step": 8}
    assert "*.safetensors filter=lfs diff=lfs merge=lfs -text" in (package / ".gitattributes").read_text()
    assert json.loads((package / "config.json").read_text())["library_name"] == "equiseg"
    with zipfile.ZipFile(package.with_suffix(".zip")) as archive:
        assert "rdf.yaml" in archive.namelist() and "cells.pt" in archive.namelist()


def predicted_tile(package, folder):
    """Predict's cells on a crowded synthetic 1024² tile (run whole) of the package's run, and the tile saved as
    (1, 3, H, W) uint8.
    """
    from equiseg.data.synthetic import render_pair
    from equiseg.inference.predict import predict_file
    from equiseg.runs import load_model
    from equiseg.runtime import Runtime

    model, config = load_model(package.parent / "run")
    Image.fromarray(render_pair(2, 1024, 1.0).cell_image).save(folder / "tile.png")  # crowded, run whole by predict
    result = predict_file(model, config, folder / "tile.png", folder, probs=False, runtime=Runtime())
    tile = np.asarray(Image.open(folder / "tile.png")).transpose(2, 0, 1)[None]
    assert tile.shape == (1, 3, 1024, 1024) and len(result.points)
    np.save(folder / "tile.npy", tile)
    return result.points


def run_alone(script: str) -> str:
    """Run ``script`` in a Python of its own; its standard error."""
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.slow
def test_cells_pt_gives_predicts_cells_on_a_1024_tile_where_only_torch_is_installed(package, tmp_path):
    points = predicted_tile(package, tmp_path)
    run_alone("import sys; sys.modules['equiseg'] = None\n"
              "import numpy as np, torch\n"
              f"model = torch.jit.load({str(package / 'cells.pt')!r})\n"
              f"_, cells = model(torch.from_numpy(np.load({str(tmp_path / 'tile.npy')!r})))\n"
              f"np.save({str(tmp_path / 'cells.npy')!r}, cells.numpy())\n")
    cells = np.load(tmp_path / "cells.npy")  # positions and classes exact, probabilities to float32 rounding
    np.testing.assert_array_equal(cells[:, :3], points[:, :3])  # (another thread count: another last bit)
    np.testing.assert_allclose(cells[:, 3], points[:, 3], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_cells_onnx_gives_predicts_cells_on_a_1024_tile_in_onnxruntime_without_torch(package, tmp_path):
    """Onnxruntime's convolutions round otherwise than torch's: the same cells (positions and classes
    exact), probabilities to float tolerance, so cells of nearly equal probability may swap places in
    the list, which is sorted by probability: compared in order of position.
    """
    points = predicted_tile(package, tmp_path)
    said = run_alone("import sys; sys.modules['equiseg'] = None; sys.modules['torch'] = None\n"
                     "import numpy as np, onnxruntime\n"
                     f"session = onnxruntime.InferenceSession({str(package / 'cells.onnx')!r})\n"
                     f"probs, cells = session.run(None, {{'image': np.load({str(tmp_path / 'tile.npy')!r})}})\n"
                     f"np.save({str(tmp_path / 'cells.npy')!r}, cells)\n")
    assert "W:onnxruntime" not in said, said  # the file loads without the exporter's leftovers
    cells = np.load(tmp_path / "cells.npy")
    by_position = np.lexsort((cells[:, 1], cells[:, 0]))
    expected = points[np.lexsort((points[:, 1], points[:, 0]))]
    np.testing.assert_array_equal(cells[by_position, :3], expected[:, :3])
    np.testing.assert_allclose(cells[by_position, 3], expected[:, 3], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_two_stage_model_is_packaged_whole_its_files_give_predicts_cells_and_nuclei(synthetic_small, tmp_path):
    """The package holds both stages: cells.pt (only torch) and cells.onnx (onnxruntime, no torch) give the cells
    and the instance label image that predict gives with the run folders on a crowded 1024² tile, and
    `two_stage_instances`' on a tile smaller than the windows; predict and slide with the package (or its zip)
    write the run folders' files bit for bit; the BioImage Model Zoo validates and tests it (stage 1's maps).
    """
    pytest.importorskip("openslide")
    import tifffile

    from equiseg.data.synthetic import render_pair
    from equiseg.detection.instances import instance_outlines
    from equiseg.inference.cell_instances import two_stage_instances
    from equiseg.runs import load_model
    from tests_support import tissue_on_glass, write_pyramid

    stage1 = write_run(tmp_path / "stage1")
    stage2 = write_run(tmp_path / "stage2", task="nuclei", window={"side_px": 17, "proposals": str(stage1)})
    result = runner.invoke(app, ["package", "--model", str(stage2), "--out", str(tmp_path / "pkg"), "--zip"])
    assert result.exit_code == 0, result.output
    package = tmp_path / "pkg"
    assert {"proposals.safetensors", "proposals.yaml"} <= {p.name for p in package.iterdir()}
    described = json.loads((package / "equiseg.json").read_text())
    assert described["two_stage"]["window_side_px"] == 17 and "paste_instances" in described["instances"]["rule"]
    card = (package / "README.md").read_text()
    assert "# equiseg p4m U-Net and p4m window net: cells" in card and "## Two stages" in card

    tile = render_pair(2, 1024, 1.0).cell_image
    Image.fromarray(tile).save(tmp_path / "tile.png")
    small = np.ascontiguousarray(tile[:8, :16])
    for name, array in (("tile", tile), ("small", small)):
        np.save(tmp_path / f"{name}.npy", array.transpose(2, 0, 1)[None].copy())
    slide = write_pyramid(tmp_path / "slide.tif", tissue_on_glass(512, 512, {(0, 128): tile[:256, :256]}), 0.2)
    written = {}
    for name, model in [("run", stage2), ("package", package), ("zip", package.with_suffix(".zip"))]:
        for command, target in (("predict", tmp_path / "tile.png"), ("slide", slide))[:1 if name == "zip" else 2]:
            out = tmp_path / f"{command}-{name}"
            result = runner.invoke(app, [command, str(target), "--model", str(model), "--out", str(out)])
            assert result.exit_code == 0, result.output
            written[command, name] = {k: v for k, v in _outputs(out).items() if not k.endswith("summary.json")}
    assert written["predict", "run"] == written["predict", "package"] == written["predict", "zip"]
    assert written["slide", "run"] == written["slide", "package"]
    labels = tifffile.imread(tmp_path / "predict-run" / "tile_instances.tif")
    rows = np.loadtxt(tmp_path / "predict-run" / "tile_cells.csv", delimiter=",", skiprows=1, usecols=(0, 1, 2, 3))
    assert len(rows) > 100 and (labels > 0).sum() > 10 * len(rows)  # crowded, nuclei with shapes
    model2, config2 = load_model(stage2)
    model1, config1 = load_model(stage1)
    expected_small = two_stage_instances(model1, config1, model2, config2, torch.from_numpy(small).permute(2, 0, 1) / 255)
    assert len(expected_small.cells)

    for runtime, load, call in [
            ("torch", f"import torch\nmodel = torch.jit.load({str(package / 'cells.pt')!r})\n",
             "[o.numpy() for o in model(torch.from_numpy(np.load(path)))]"),
            ("onnx", "import onnxruntime\nsys.modules['torch'] = None\n"
                     f"session = onnxruntime.InferenceSession({str(package / 'cells.onnx')!r})\n",
             "session.run(None, {'image': np.load(path)})")]:
        said = run_alone("import sys; sys.modules['equiseg'] = None\nimport numpy as np\n" + load
                  + "".join(f"out = {call.replace('path', repr(str(tmp_path / f'{name}.npy')))}\n"
                            f"np.save({str(tmp_path / f'{runtime}-cells-{name}.npy')!r}, out[1])\n"
                            f"np.save({str(tmp_path / f'{runtime}-labels-{name}.npy')!r}, out[2])\n"
                            f"np.save({str(tmp_path / f'{runtime}-outlines-{name}.npy')!r}, out[3])\n"
                            for name in ("tile", "small")))
        assert "W:onnxruntime" not in said, said  # the file loads without the exporter's leftovers
        for name, want_labels, want_cells in (("tile", labels, rows), ("small", expected_small.labels,
                                                                       expected_small.cells)):
            cells, found = np.load(tmp_path / f"{runtime}-cells-{name}.npy"), np.load(tmp_path / f"{runtime}-labels-{name}.npy")
            outlines = np.load(tmp_path / f"{runtime}-outlines-{name}.npy")
            rings = instance_outlines(found, len(cells))  # checked against the labels: found equal below
            assert all(np.array_equal(outlines[outlines[:, 0] == k, 1:], ring) for k, ring in enumerate(rings))
            if runtime == "onnx":  # cells of nearly equal probability may swap places: renumbered by position
                cells, found = _by_position(cells, found, want_cells)
            np.testing.assert_array_equal(found, want_labels)
            np.testing.assert_array_equal(cells[:, :3], want_cells[:, :3])
            np.testing.assert_allclose(cells[:, 3], want_cells[:, 3], rtol=0, atol=1e-4)  # the csv: 4 decimals

    spec = pytest.importorskip("bioimageio.spec")
    core = pytest.importorskip("bioimageio.core")
    description = spec.load_description(package / "rdf.yaml", perform_io_checks=True)
    assert description.validation_summary.status in ("valid-format", "passed"), description.validation_summary.format()
    assert core.test_model(package / "rdf.yaml").status == "passed"

    (package / "proposals.safetensors").write_bytes((package / "proposals.safetensors").read_bytes()[:-1] + b"x")
    result = runner.invoke(app, ["predict", str(tmp_path / "tile.png"), "--model", str(package), "--out",
                                 str(tmp_path / "damaged")])  # stage 1 is checked as stage 2 is
    assert result.exit_code == 2 and "proposals.safetensors" in result.output and not (tmp_path / "damaged").exists()


def _by_position(cells, labels, expected):
    """``cells`` in the order of the ``expected`` cells at the same positions, ``labels`` renumbered alike."""
    mine, theirs = np.lexsort((cells[:, 0], cells[:, 1])), np.lexsort((expected[:, 0], expected[:, 1]))
    np.testing.assert_array_equal(cells[mine, :2], expected[theirs, :2])
    order = np.empty(len(cells), np.int64)
    order[theirs] = mine  # expected row -> this cell's row
    relabel = np.zeros(len(cells) + 1, np.int64)
    relabel[order + 1] = np.arange(1, len(cells) + 1)
    return cells[order], relabel[labels]


def test_a_two_stage_model_with_tissue_context_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    tissue = write_run(tmp_path / "tissue", family="plain", task="tissue")
    stage1 = write_run(tmp_path / "stage1", family="plain", tissue_model=tissue)
    stage2 = write_run(tmp_path / "stage2", family="plain", task="nuclei", window={"side_px": 17})
    result = runner.invoke(app, ["package", "--model", str(stage2), "--proposals", str(stage1), "--out",
                                 str(tmp_path / "pkg")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "tissue context is not packaged" in result.output and not (tmp_path / "pkg").exists()


def test_a_tissue_model_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    run = write_run(tmp_path / "tissue", family="plain", task="tissue")
    result = runner.invoke(app, ["package", "--model", str(run), "--out", str(tmp_path / "pkg")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "takes a cells model" in result.output and not (tmp_path / "pkg").exists()


def _outputs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


@pytest.mark.slow
def test_predict_slide_and_challenge_take_a_package_or_its_zip_and_give_the_runs_results_bit_for_bit(
        package, synthetic_small, tmp_path):
    pytest.importorskip("openslide")
    from equiseg.data.ocelot import OcelotFolder, write_grand_challenge
    from equiseg.data.synthetic import render_pair
    from tests_support import tissue_on_glass, write_pyramid

    image = np.random.default_rng(1).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    slide = write_pyramid(tmp_path / "slide.tif",
                          tissue_on_glass(512, 768, {(0, 256): render_pair(1, 256, 1.0).cell_image}), 0.2)
    gc = write_grand_challenge(tmp_path / "gc", list(OcelotFolder(synthetic_small, "test"))[:2])
    run = package.parent / "run"
    for command, target, options in [("predict", tmp_path / "a.png", ["--tile", "64", "--overlap", "16"]),
                                      ("slide", slide, ["--tile", "128", "--overlap", "16"]),
                                      ("challenge", gc, [])]:
        written = {}
        for name, model in [("run", run), ("package", package), ("zip", package.with_suffix(".zip"))]:
            out = tmp_path / f"{command}-{name}"
            result = runner.invoke(app, [command, str(target), "--model", str(model), "--out", str(out), *options])
            assert result.exit_code == 0, result.output
            written[name] = _outputs(out)
        for name in written["run"]:
            if not name.endswith("summary.json"):  # a slide's summary names its model
                assert written["run"][name] == written["package"][name] == written["zip"][name], (command, name)


def test_a_zip_that_is_not_a_flat_package_is_refused_and_nothing_is_unpacked(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        for name in ("rdf.yaml", "equiseg.json", "../outside.txt"):
            archive.writestr(name, "x")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    result = runner.invoke(app, ["predict", str(tmp_path / "a.png"), "--model", str(tmp_path / "evil.zip"),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert "'../outside.txt'" in result.output
    assert not list((tmp_path / "temp").iterdir()) and not (tmp_path / "outside.txt").exists()
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_zipped_package_is_unpacked_for_the_command_only(package, tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "temp").mkdir()
    done = subprocess.run([sys.executable, "-m", "equiseg.cli", "predict", str(tmp_path / "a.png"), "--model",
                           str(package.with_suffix(".zip")), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp_path / "temp")})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "o" / "a_cells.csv").is_file() and not list((tmp_path / "temp").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["sha256", "missing", "format"])
def test_a_damaged_package_is_refused_in_one_line_naming_the_file(package, tmp_path, damage):
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(package, copy)
    named = {"sha256": "probabilities.pt", "missing": "weights.safetensors", "format": "rdf.yaml"}[damage]
    if damage == "sha256":
        data = bytearray((copy / named).read_bytes())
        data[-1] ^= 1
        (copy / named).write_bytes(bytes(data))
    elif damage == "missing":
        (copy / named).unlink()
    else:
        (copy / named).write_text((copy / named).read_text().replace("format_version: 0.5.4", "format_version: 0.4.10"))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    result = runner.invoke(app, ["predict", str(tmp_path / "a.png"), "--model", str(copy), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert named in result.output and not (tmp_path / "o").exists()


def test_the_card_reports_the_scores_the_run_reached_and_on_which_split(tmp_path):
    from equiseg.package import run_scores

    run = write_run(tmp_path / "run", family="plain")
    assert run_scores(run) == []
    Run(run).tuning_file.write_text("peaks,sigma,min_distance,threshold,mf1\nforeground,1.0,6,0.3,0.71\n"
                                    "foreground,2.0,6,0.3,0.83\n")
    assert [(s["split"], s["mf1"]) for s in run_scores(run)] == [("val", 0.83)]
    evaluated = Run(run).eval_dir("test")
    evaluated.mkdir()
    (evaluated / "scores-test.json").write_text(json.dumps({"scores": {"mf1": 0.79}}))
    assert [(s["split"], s["mf1"], s["source"]) for s in run_scores(run)] == [("test", 0.79, "equiseg evaluate")]


@pytest.mark.slow
@pytest.mark.parametrize("command", [["tune-detect"], ["evaluate"]])
def test_commands_that_would_write_into_a_package_are_refused_in_one_line(package, command):
    before = {p.name: p.stat().st_mtime_ns for p in package.iterdir()}
    result = runner.invoke(app, [*command, "--model", str(package)])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0, result.output
    assert "never writes into" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in package.iterdir()} == before


@pytest.mark.slow
def test_tune_detect_tunes_a_package_into_out_as_it_tunes_its_run(package, synthetic_small, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in package.iterdir()}
    written = {}
    for name, model in [("run", package.parent / "run"), ("package", package.with_suffix(".zip"))]:
        result = runner.invoke(app, ["tune-detect", "--model", str(model), "--data", str(synthetic_small),
                                     "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        written[name] = {f: (tmp_path / name / f).read_text() for f in ("detect.yaml", "detect-tuning.csv")}
    assert written["run"] == written["package"]
    assert {p.name: p.stat().st_mtime_ns for p in package.iterdir()} == before
    assert not Run(package.parent / "run").detect_file.exists()  # --out: not into the run either


@pytest.mark.slow
def test_a_model_with_tissue_context_is_packaged_with_a_context_input_and_says_which_tissue_model(
        synthetic_small, tmp_path):
    """Its networks take (image, context); the BioImage Model Zoo test passes with both inputs; cells.pt and
    cells.onnx find the cells equiseg finds on the same input; challenge on the package (and its tissue
    model) writes the run's file bit for bit.
    """
    from equiseg.data.ocelot import OcelotFolder, write_grand_challenge
    from equiseg.detection.peaks import find_cells
    from equiseg.models import probabilities
    from equiseg.runs import file_sha256, load_model

    tissue = write_run(tmp_path / "tissue", family="plain", task="tissue")
    run = write_run(tmp_path / "run", family="p4", tissue_model=tissue)
    result = runner.invoke(app, ["package", "--model", str(run), "--out", str(tmp_path / "pkg"), "--zip"])
    assert result.exit_code == 0, result.output
    package = tmp_path / "pkg"
    described = json.loads((package / "equiseg.json").read_text())["tissue_context"]
    assert described["tissue_model"] == {"path": str(tissue), "sha256": file_sha256(Run(tissue).best)}
    assert "## Tissue context" in (package / "README.md").read_text()
    rdf = yaml.safe_load((package / "rdf.yaml").read_text())
    assert [tensor["id"] for tensor in rdf["inputs"]] == ["image", "context"]
    core = pytest.importorskip("bioimageio.core")
    summary = core.test_model(package / "rdf.yaml")
    assert summary.status == "passed", summary.format()

    generator = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (1, 3, 128, 96), dtype=torch.uint8, generator=generator)
    context = torch.softmax(torch.randn(1, 2, 128, 96, generator=generator), 1)
    model, config = load_model(run)
    with torch.no_grad():
        probs = probabilities(model(torch.cat([image.float() / 255, context], 1)), config.class_channels)[0]
    expected = find_cells(probs, config.detect)
    assert len(expected)
    _, cells = torch.jit.load(str(package / "cells.pt"))(image, context)
    np.testing.assert_array_equal(cells.numpy()[:, :3], expected[:, :3])
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(package / "cells.onnx"))
    _, cells = session.run(None, {"image": image.numpy(), "context": context.numpy()})
    by_position = np.lexsort((cells[:, 1], cells[:, 0]))
    np.testing.assert_array_equal(cells[by_position, :3], expected[np.lexsort((expected[:, 1], expected[:, 0])), :3])

    gc = write_grand_challenge(tmp_path / "gc", list(OcelotFolder(synthetic_small, "test"))[:2])
    written = {}
    for name, model_path in [("run", run), ("zip", package.with_suffix(".zip"))]:
        result = runner.invoke(app, ["challenge", str(gc), "--model", str(model_path), "--tissue-model", str(tissue),
                                     "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        written[name] = (tmp_path / name / "cell_classification.json").read_bytes()
    assert written["run"] == written["zip"]
