"""Stage 2 of the two-stage cell model trains with the existing trainer into a run folder whose checkpoint
loads back as the window net, with the window's side chosen from the data's resolution; data with only
points is refused before anything is written.
"""

import shutil

import pytest
import torch

from equiseg.config import Config, ConfigError
from equiseg.data.synthetic import generate_dataset
from equiseg.evaluation.tune_detect import tune_detection
from equiseg.models.window import CellWindowNet
from equiseg.runs import Run, load_model
from equiseg.training.fit import fit
from tests_support import resumed_equals_uninterrupted, tiny_config


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    root = tmp_path_factory.mktemp("crowded") / "ds"
    return generate_dataset(root, {"train": 2, "val": 1, "test": 1}, size=128, seed=5, crowding=1.0)


def nuclei_config(root, **window):
    plain = tiny_config(root, model={"family": "p4", "width": 1}, data={"batch_size": 4},
                        window={"side_um": 3.4, **window}).to_dict()
    return Config.from_dict({**plain, "task": "nuclei"})


def test_stage_two_trains_into_a_run_folder_that_loads_back(crowded, tmp_path):
    run_dir = fit(nuclei_config(crowded), run_dir=tmp_path / "run", progress=False)
    model, config = load_model(run_dir)
    assert isinstance(model, CellWindowNet)
    # 3.4 µm at the synthetic 0.2 µm/px is 17 px, and (17 - 1) is a multiple of 2**2
    assert config.window.side_px == 17 and Run(run_dir).config().window.side_px == 17
    metrics = (run_dir / "metrics.csv").read_text()
    assert "val/nucleus_dice" in metrics and "val/class_f1_TC" in metrics
    with torch.no_grad():
        mask, classes = model(torch.rand(1, 3, 17, 17))
    assert mask.shape == (1, 1, 17, 17) and classes.shape == (1, 2)
    with pytest.raises(ValueError, match="stage-1 cells run: tune that"):
        tune_detection(run_dir)


def test_points_only_data_is_refused_before_any_output(crowded, tmp_path):
    copy = tmp_path / "points-only"
    shutil.copytree(crowded, copy)
    shutil.rmtree(copy / "annotations" / "val" / "cell_instances")
    with pytest.raises(ConfigError, match=r"task nuclei trains on nucleus instance labels, and 1 val sample"):
        fit(nuclei_config(copy), run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_window_side_the_depth_cannot_take_is_refused():
    with pytest.raises(ValueError, match=r"window.side_px=19: a window model of depth 2 needs"):
        nuclei_config("x", side_px=19)


def test_a_resumed_stage_two_ends_bitwise_where_the_uninterrupted_one_does(crowded, tmp_path):
    """The windows' order, jitter and augmentation continue from the checkpoint, as for the U-Net."""
    plain = nuclei_config(crowded, jitter=2).to_dict()
    config = Config.from_dict({**plain, "train": {**plain["train"], "epochs": 2},
                               "data": {**plain["data"], "augment": "heavy"}})
    assert resumed_equals_uninterrupted(config, tmp_path)


def test_stage_two_takes_tissue_context_channels_in_its_windows(crowded, tmp_path):
    plain = nuclei_config(crowded).to_dict()
    config = Config.from_dict({**plain, "data": {**plain["data"], "context": "truth"}})
    run_dir = fit(config, run_dir=tmp_path / "run", progress=False)
    model, loaded = load_model(run_dir)
    assert loaded.in_channels == 5 and model.encoder[0][0].in_channels == 5
    with torch.no_grad():
        mask, _ = model(torch.rand(1, 5, 17, 17))
    assert mask.shape == (1, 1, 17, 17)
