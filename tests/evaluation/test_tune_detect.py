"""equiseg tune-detect: a grid of detection settings scored on stored maps, the best written into the run."""

import csv

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from equiseg.cli import app
from equiseg.data.targets import CellTarget, TargetKind
from equiseg.detection import detect_cells, detection_scores
from equiseg.evaluation.tune_detect import GRID, image_candidates, score_settings
from equiseg.runs import Run, load_model
from equiseg.training.fit import fit
from tests_support import tiny_config

runner = CliRunner()


def _centre_maps(seed):
    """Probability maps a perfect centre model would give, for a crowd of touching cells."""
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.arange(12, 100, 22), np.arange(12, 100, 22), indexing="ij")
    cells = np.stack([xs.ravel(), ys.ravel(), rng.integers(1, 3, xs.size)], 1)
    target = CellTarget(TargetKind.CENTRES, sigma=4.0)
    probs = target.soft(torch.as_tensor(target.encode(cells, (110, 110)))[None], 3)[0] * 0.9
    probs[0] = 1 - probs[1:].sum(0)
    return probs, cells


def test_each_grid_row_is_what_detection_with_those_settings_scores():
    maps, truths = zip(*(_centre_maps(seed) for seed in (0, 1)))
    grid = {"peaks": ("foreground", "per-class"), "sigma": (0.0, 2.0), "min_distance": (6, 15),
            "threshold": (0.2, 0.5, 0.95)}
    rows = score_settings(list(maps), list(truths), grid)
    assert len(rows) == 2 * 2 * 2 * 3
    for row in rows:
        points = [detect_cells(m, row["sigma"], row["min_distance"], row["threshold"], row["peaks"] == "per-class")
                  for m in maps]
        assert row["mf1"] == detection_scores(points, list(truths))["mf1"], row
    best = max(rows, key=lambda row: row["mf1"])
    assert best["mf1"] == 1.0 and best["threshold"] < 0.9  # every cell found, nothing else
    assert min(row["mf1"] for row in rows if row["threshold"] == 0.95) == 0.0  # above every peak: nothing found
    # what tune-detect keeps of an image: its candidates above the grid's lowest threshold, not its map
    found = image_candidates(maps[0], grid)
    assert len(found) == 8 and all((c[:, 2] > 0.2).all() for c in found)
    assert sum(c.nbytes for c in found) < maps[0].numel() * maps[0].element_size() / 10


@pytest.fixture(scope="module")
def centre_run(synthetic_small, tmp_path_factory):
    config = tiny_config(synthetic_small, data={"target": "centres", "sigma": 2.0}, train={"epochs": 2})
    return fit(config, runs=tmp_path_factory.mktemp("runs"), progress=False)


def test_tune_detect_writes_the_best_setting_into_the_run_and_loading_uses_it(centre_run):
    result = runner.invoke(app, ["tune-detect", "--model", str(centre_run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    run = Run(centre_run)
    rows = list(csv.DictReader(run.tuning_file.open()))
    assert len(rows) == np.prod([len(v) for v in GRID.values()])
    best = max(rows, key=lambda row: float(row["mf1"]))  # the first of equals, as tune-detect chooses
    chosen = yaml.safe_load(run.detect_file.read_text())
    assert chosen == {"sigma": float(best["sigma"]), "min_distance": int(best["min_distance"]),
                      "threshold": float(best["threshold"]), "peaks": best["peaks"]}
    _, config = load_model(centre_run)
    assert (config.detect.sigma, config.detect.min_distance, config.detect.threshold, config.detect.peaks) == (
        chosen["sigma"], chosen["min_distance"], chosen["threshold"], chosen["peaks"])
    assert f"chosen: detect.peaks={chosen['peaks']}" in result.stdout


def test_tune_detect_refuses_the_test_split_and_a_tissue_model(centre_run, synthetic_small, tmp_path):
    result = runner.invoke(app, ["tune-detect", "--model", str(centre_run), "--split", "test"])
    assert result.exit_code == 2 and "tuned-on-test" in result.output
    config = tiny_config(synthetic_small)
    tissue = fit(type(config).from_dict({**config.to_dict(), "task": "tissue"}), runs=tmp_path, progress=False)
    result = runner.invoke(app, ["tune-detect", "--model", str(tissue), "--device", "cpu"])
    assert result.exit_code == 2 and "no cells to detect" in result.output
    assert not Run(tissue).detect_file.exists()
