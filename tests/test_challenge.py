"""The challenge interface: Model(metadata) and equiseg challenge."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from equiseg.challenge import Model, run_challenge
from equiseg.cli import app
from equiseg.data.ocelot import OcelotFolder, write_grand_challenge
from equiseg.evaluation.detection import detection_scores, read_points_json
from equiseg.evaluation.evaluate import evaluate_model
from equiseg.training.fit import fit, load_model
from tests_support import tiny_config

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(synthetic_small, tmp_path_factory):
    config = tiny_config(synthetic_small, train={"epochs": 3}, detect={"threshold": 0.3})
    return fit(config, run_dir=tmp_path_factory.mktemp("challenge") / "run", progress=False)


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
    model = Model([sample.meta.record], cell_model=trained, device="cpu")
    cells = model(sample.cell_image, sample.tissue_image, 0)
    for x, y, cls, prob in cells:
        assert type(x) is int and type(y) is int and cls in (1, 2) and 0.0 <= prob <= 1.0
    with pytest.raises(ValueError, match="uint8"):
        model(sample.cell_image.astype(np.float32), sample.tissue_image, 0)


def test_challenge_scores_equal_evaluate_on_the_same_images(trained, synthetic_small, tmp_path):
    samples = list(OcelotFolder(synthetic_small, "test"))
    gc = write_grand_challenge(tmp_path / "gc", samples)
    result = runner.invoke(app, ["challenge", str(gc), str(tmp_path / "out"), "--cell-model", str(trained)])
    assert result.exit_code == 0, result.output
    points_file = tmp_path / "out" / "cell_classification.json"
    assert_official(points_file, len(samples))
    predicted = read_points_json(points_file, len(samples))
    model, config = load_model(trained)
    evaluation = evaluate_model(model, config, synthetic_small, "test")
    challenge_scores = detection_scores(predicted, [s.cells for s in samples])
    for key in ("precision/BC", "recall/BC", "f1/BC", "precision/TC", "recall/TC", "f1/TC", "mf1"):
        assert challenge_scores[key] == evaluation.scores[key], key


def test_challenge_on_the_real_grand_challenge_input(trained, tmp_path):
    from pathlib import Path

    gc = Path(__file__).resolve().parents[2] / "shared" / "ocelot" / "gc_input"
    if not gc.is_dir():
        pytest.skip("the real Grand Challenge input is not in ../shared/ocelot")
    path = run_challenge(gc, tmp_path / "out", trained)
    assert_official(path, 1)
