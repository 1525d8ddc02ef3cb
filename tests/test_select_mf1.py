"""train.select=mf1: the checkpoint kept is the epoch of the highest validation mF1 (cells found on each whole
validation image, scored by the OCELOT rule), and the run says so (issue 31).
"""

import csv

import pytest
import torch

from equiseg.config import Config
from equiseg.data.ocelot import OcelotFolder
from equiseg.detection.peaks import find_cells
from equiseg.detection.score import detection_scores
from equiseg.models import probabilities
from equiseg.runs import Run, load_model
from equiseg.training.fit import fit
from tests_support import tiny_config


@pytest.mark.slow
def test_the_kept_checkpoint_is_the_epoch_of_the_highest_validation_mf1(synthetic_small, tmp_path):
    config = tiny_config(synthetic_small, train={"epochs": 4, "select": "mf1"}, detect={"threshold": 0.2})
    run = Run(fit(config, run_dir=tmp_path / "run", progress=False))
    with run.metrics.open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/mf1")]
    assert len(rows) == 4 and all(r.get("val/loss") for r in rows)
    best = max(rows, key=lambda r: float(r["val/mf1"]))
    assert run.best_epoch() == (int(best["epoch"]), 4)
    assert torch.load(run.best, weights_only=True)["epoch"] == int(best["epoch"])
    # the logged value is the OCELOT score of the kept model's cells on the validation split (unrounded)
    model, config = load_model(run.path)
    folder = OcelotFolder(synthetic_small, "val")
    found = []
    with torch.no_grad():
        for i in range(len(folder)):
            image = torch.from_numpy(folder[i].cell_image.copy()).permute(2, 0, 1).float()[None] / 255
            found.append(find_cells(probabilities(model(image), config.class_channels)[0], config.detect))
    scores = detection_scores(found, [folder.cells(i) for i in range(len(folder))])
    assert scores["unrounded/mf1"] == pytest.approx(float(best["val/mf1"]), abs=1e-4)


def test_select_mf1_is_for_cell_models():
    with pytest.raises(ValueError, match="train.select=mf1 scores cells"):
        Config.from_dict({"task": "tissue", "train": {"select": "mf1"}})
