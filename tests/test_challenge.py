"""The challenge interface: Model(metadata) and equiseg challenge."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from equiseg.challenge import Model, run_challenge
from equiseg.cli import app
from equiseg.config import Config
from equiseg.data.context import ContextKind
from equiseg.data.ocelot import OcelotFolder, write_grand_challenge
from equiseg.detection import detection_scores, read_points_json
from equiseg.evaluation.evaluate import evaluate_model
from equiseg.runs import load_model, save_model
from equiseg.runtime import Runtime
from equiseg.training.fit import fit
from tests_support import tiny_config

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(synthetic_small, tmp_path_factory):
    config = tiny_config(synthetic_small, train={"epochs": 3}, detect={"threshold": 0.3})
    return fit(config, run_dir=tmp_path_factory.mktemp("challenge") / "run", progress=False)


@pytest.fixture(scope="module")
def tissue_run(synthetic_small, tmp_path_factory):
    config = tiny_config(synthetic_small, model={"family": "p4m", "width": 2}, train={"epochs": 2})
    config = type(config).from_dict({**config.to_dict(), "task": "tissue"})
    return fit(config, run_dir=tmp_path_factory.mktemp("challenge") / "tissue", progress=False)


@pytest.fixture(scope="module")
def context_run(synthetic_small, tissue_run, tmp_path_factory):
    """A cell model trained on the ground-truth tissue context (with heavy augmentation), tissue model named."""
    config = tiny_config(synthetic_small, train={"epochs": 2}, detect={"threshold": 0.3},
                         data={"context": "truth", "tissue_model": str(tissue_run), "augment": "heavy"})
    return fit(config, run_dir=tmp_path_factory.mktemp("challenge") / "context", progress=False)


def assert_official(points_file, n):
    data = json.loads(points_file.read_text())
    assert data["type"] == "Multiple points" and data["version"] == {"major": 1, "minor": 0}
    for cell in data["points"]:
        x, y, cls = cell["point"]
        assert type(x) is int and type(y) is int and 0 <= x <= 1023 and 0 <= y <= 1023
        assert cls in (1, 2) and type(cell["probability"]) is float and 0.0 <= cell["probability"] <= 1.0
        assert 0 <= int(cell["name"].removeprefix("image_")) < n


def test_model_interface_returns_official_tuples(trained, synthetic_small):
    sample = OcelotFolder(synthetic_small, "test")[0]
    model = Model([sample.meta.record], cell_model=trained, runtime=Runtime())
    cells = model(sample.cell_image, sample.tissue_image, 0)
    for x, y, cls, prob in cells:
        assert type(x) is int and type(y) is int and cls in (1, 2) and 0.0 <= prob <= 1.0
    with pytest.raises(ValueError, match="uint8"):
        model(sample.cell_image.astype(np.float32), sample.tissue_image, 0)


def test_challenge_scores_equal_evaluate_on_the_same_images(trained, synthetic_small, tmp_path):
    samples = list(OcelotFolder(synthetic_small, "test"))
    gc = write_grand_challenge(tmp_path / "gc", samples)
    result = runner.invoke(app, ["challenge", str(gc), "--out", str(tmp_path / "out"), "--model", str(trained)])
    assert result.exit_code == 0, result.output
    points_file = tmp_path / "out" / "cell_classification.json"
    assert_official(points_file, len(samples))
    predicted = read_points_json(points_file, len(samples))
    model, config = load_model(trained)
    evaluation = evaluate_model(model, config, synthetic_small, "test")
    challenge_scores = detection_scores(predicted, [s.cells for s in samples])
    for key in ("precision/BC", "recall/BC", "f1/BC", "precision/TC", "recall/TC", "f1/TC", "mf1"):
        assert challenge_scores[key] == evaluation.scores[key], key


@pytest.mark.slow
def test_challenge_on_the_real_grand_challenge_input(trained, tmp_path):
    from pathlib import Path

    gc = Path(__file__).resolve().parents[2] / "shared" / "ocelot" / "gc_input"
    if not gc.is_dir():
        pytest.skip("the real Grand Challenge input is not in ../shared/ocelot")
    path = run_challenge(gc, tmp_path / "out", trained)
    assert_official(path, 1)


def test_a_context_model_needs_a_tissue_model_and_a_plain_one_refuses_it(context_run, tissue_run, trained,
                                                                         synthetic_small, tmp_path, monkeypatch):
    import shutil

    sample = OcelotFolder(synthetic_small, "test")[0]
    model = Model([sample.meta.record], cell_model=context_run, runtime=Runtime())  # the config names the tissue model
    assert model.tissue_model is not None
    assert model.model(torch.zeros(1, 5, 16, 16)).shape == (1, 3, 16, 16)
    # a copy of the run whose config names no tissue model
    bare = tmp_path / "bare"
    shutil.copytree(context_run, bare)
    state = torch.load(bare / "checkpoints/best.ckpt", weights_only=True)
    config = Config.from_dict(state["hyper_parameters"]["config"]).to_dict()
    config["data"]["tissue_model"] = None
    state["hyper_parameters"]["config"] = config
    torch.save(state, bare / "checkpoints/best.ckpt")
    monkeypatch.delenv("EQUISEG_TISSUE_MODEL", raising=False)
    with pytest.raises(ValueError, match="tissue context"):
        Model([sample.meta.record], cell_model=bare, runtime=Runtime())
    monkeypatch.setenv("EQUISEG_TISSUE_MODEL", str(tissue_run))
    assert Model([sample.meta.record], cell_model=bare, runtime=Runtime()).tissue_model is not None
    with pytest.raises(ValueError, match="without tissue context"):
        Model([sample.meta.record], cell_model=trained, tissue_model=tissue_run, runtime=Runtime())
    with pytest.raises(ValueError, match="not a tissue model"):
        Model([sample.meta.record], cell_model=bare, tissue_model=trained, runtime=Runtime())
    from PIL import Image

    Image.fromarray(sample.cell_image).save(tmp_path / "cell.png")
    result = runner.invoke(app, ["predict", "--model", str(context_run), str(tmp_path / "cell.png")])
    assert result.exit_code == 2 and "tissue context" in result.output


def test_challenge_with_tissue_context_scores_equal_evaluate(context_run, tissue_run, synthetic_small, tmp_path):
    samples = list(OcelotFolder(synthetic_small, "test"))
    gc = write_grand_challenge(tmp_path / "gc", samples)
    result = runner.invoke(app, ["challenge", str(gc), "--out", str(tmp_path / "out"), "--model", str(context_run),
                                 "--tissue-model", str(tissue_run)])
    assert result.exit_code == 0, result.output
    points_file = tmp_path / "out" / "cell_classification.json"
    assert_official(points_file, len(samples))
    model, config = load_model(context_run)
    assert config.data.context is ContextKind.TRUTH and config.in_channels == 5
    evaluation = evaluate_model(model, config, synthetic_small, "test")  # uses the named tissue model
    challenge_scores = detection_scores(read_points_json(points_file, len(samples)), [s.cells for s in samples])
    for key in ("precision/BC", "recall/BC", "f1/BC", "precision/TC", "recall/TC", "f1/TC", "mf1"):
        assert challenge_scores[key] == evaluation.scores[key], key
    # the oracle (ground-truth context) is another input, so it gives other probabilities
    oracle = evaluate_model(model, config, synthetic_small, "test", oracle=True)
    assert oracle.scores["loss"] != evaluation.scores["loss"]


def test_challenge_with_tissue_context_on_the_real_grand_challenge_input(context_run, tissue_run, tmp_path):
    from pathlib import Path

    gc = Path(__file__).resolve().parents[2] / "shared" / "ocelot" / "gc_input"
    if not gc.is_dir():
        pytest.skip("the real Grand Challenge input is not in ../shared/ocelot")
    assert_official(run_challenge(gc, tmp_path / "out", context_run, tissue_run), 1)


def test_evaluate_command_takes_the_tissue_model_or_the_oracle(context_run, tissue_run, trained, tmp_path):
    scores = {}
    for name, extra in (("model", ["--tissue-model", str(tissue_run)]), ("oracle", ["--oracle-context"])):
        result = runner.invoke(app, ["evaluate", "--model", str(context_run), "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        scores[name] = json.loads((tmp_path / name / "scores-test.json").read_text())["scores"]
    model, config = load_model(context_run)
    oracle = evaluate_model(model, config, config.data.root, "test", oracle=True)
    assert scores["oracle"]["loss"] == pytest.approx(oracle.scores["loss"], rel=1e-12)
    assert scores["model"]["loss"] != scores["oracle"]["loss"]
    saved = {name: json.loads((tmp_path / name / "scores-test.json").read_text())["context"] for name in scores}
    assert saved == {"model": "tissue model", "oracle": "oracle"}
    result = runner.invoke(app, ["evaluate", "--model", str(trained), "--oracle-context", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "without tissue context" in result.output


def test_training_on_the_tissue_models_context(synthetic_small, tissue_run, tmp_path):
    from equiseg.data.datamodule import SegmentationDataModule
    from equiseg.evaluation.tissue_context import context_fn

    config = tiny_config(synthetic_small, data={"context": "model", "tissue_model": str(tissue_run)})
    run = fit(config, run_dir=tmp_path / "run", progress=False)
    model, loaded = load_model(run)
    assert loaded.data.context is ContextKind.MODEL and np.isfinite(evaluate_model(model, loaded, synthetic_small).scores["loss"])
    # what the cell model trained on: the tissue model's probabilities, which sum to 1 inside the tissue patch
    data = SegmentationDataModule(synthetic_small, crop_size=None, context=context_fn(ContextKind.MODEL, tissue_run))
    context = data.dataset("train")[0]["image"][3:].float()
    assert context.shape[0] == 2 and torch.allclose(context.sum(0), torch.ones(64, 64), atol=2e-3)


def test_train_with_a_wrong_tissue_model_stops_before_any_output(synthetic_small, trained, tmp_path):
    for wrong, message in ((tmp_path / "nowhere", "no checkpoint"), (trained, "not a tissue model")):
        result = runner.invoke(app, ["train", "--data", str(synthetic_small), "--out", str(tmp_path / "runs" / "run"),
                                     "data.context=model", f"data.tissue_model={wrong}", "train.epochs=1",
                                     "data.crop_size=32"])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "runs").exists()


def write_checkpoint(path, config, model):
    """A checkpoint of an untrained model, in a run folder's checkpoints/."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_model(model, config, path)


def test_challenge_model_with_context_is_exact_for_the_pair_turned_together(tmp_path):
    """The deployed path (tissue model on the tissue patch, block from the metadata, cell model) under D4."""
    from equiseg import build_model
    from equiseg.data.ocelot import pair_record
    from equiseg.evaluation.tissue_context import transform_block
    from equiseg.groups import D4

    torch.manual_seed(0)
    tissue_config = Config.from_dict({"task": "tissue", "model": {"family": "p4m", "width": 2, "depth": 2}})
    tissue = write_checkpoint(tmp_path / "tissue.ckpt", tissue_config, build_model("p4m", 2, 2, num_classes=2))
    cell_config = Config.from_dict({"model": {"family": "isotropic", "width": 4, "depth": 2},
                                    "data": {"context": "model", "tissue_model": str(tissue)}})
    cell = write_checkpoint(tmp_path / "cell.ckpt", cell_config, build_model("isotropic", 4, 2, in_channels=5))
    size = 64  # cell and tissue patches; mpp 0.2 and 0.8, so the block is 16 px, here [16, 32) x [32, 48)
    block = (16.0, 32.0, 32.0, 48.0)
    records = []
    for g in D4.elements:
        x0, y0, x1, y1 = transform_block(block, g, size, size)
        records.append(pair_record("test", 0.2, 0.8, (x0 + x1) / 2 / size, (y0 + y1) / 2 / size,
                                   cell_size=size, tissue_size=size))
    model = Model(records, cell_model=cell, runtime=Runtime())
    rng = np.random.default_rng(0)
    cell_patch, tissue_patch = (rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2))

    def turn(g, patch):
        return np.ascontiguousarray(D4.act_on_image(g, torch.from_numpy(patch).permute(2, 0, 1)).permute(1, 2, 0).numpy())

    reference = model.probabilities(cell_patch, tissue_patch, 0)
    for k, g in enumerate(D4.elements):
        turned = model.probabilities(turn(g, cell_patch), turn(g, tissue_patch), k)
        assert (turned - D4.act_on_image(g, reference)).abs().max() < 1e-5, str(g)
    # the context matters: another block gives other probabilities
    assert (model.probabilities(cell_patch, tissue_patch, 1) - reference).abs().max() > 1e-4


def test_a_truth_context_model_without_tissue_model_is_never_scored_as_oracle_unawares(context_run, tmp_path):
    """data.context=truth and no tissue model: evaluate refuses, unless --oracle-context, which it labels."""
    state = torch.load(context_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    state["hyper_parameters"]["config"]["data"]["tissue_model"] = None
    bare = tmp_path / "bare.ckpt"
    torch.save(state, bare)
    out = tmp_path / "refused"
    result = runner.invoke(app, ["evaluate", "--model", str(bare), "--out", str(out)])
    assert result.exit_code == 2 and "names no tissue model" in result.output and "--oracle-context" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    model, config = load_model(bare)
    with pytest.raises(ValueError, match="names no tissue model"):
        evaluate_model(model, config, config.data.root, "test")
    result = runner.invoke(app, ["evaluate", "--model", str(bare), "--oracle-context", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ORACLE" in result.output
    assert json.loads((out / "scores-test.json").read_text())["context"] == "oracle"
