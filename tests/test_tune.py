"""Scale-out: equiseg tune with Optuna (here and on Ray), and a study on a local Ray cluster."""

import csv
import json
import math
from types import SimpleNamespace

import pytest
import yaml

from equiseg.config import Config, ConfigError
from equiseg.report.results import StudyResult, from_json
from equiseg.scale import LocalExecutor, RayExecutor, executor
from equiseg.study import StudyConfig, run_study
from equiseg.tune import Metric, Param, _ray_rows, read_space, tune
from tests_support import tiny_config

optuna = pytest.importorskip("optuna")  # the optional extra equiseg[scale] (in dev)
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of 2 CPUs for this module's tests (started once: a few seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def write_space(tmp_path, spec):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_search_space_reads_ranges_and_choices_and_refuses_nonsense(tmp_path):
    space = read_space(write_space(tmp_path, {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                              "model.width": {"low": 2, "high": 6, "int": True},
                                              "data.augment": ["none", "heavy"]}))
    assert [(p.key, p.log, p.integer, p.choices) for p in space] == [
        ("train.lr", True, False, None), ("model.width", False, True, None), ("data.augment", False, False,
                                                                              ("none", "heavy"))]
    for bad, message in [({"train.lr": {"low": 1, "high": 1}}, "low < high"),
                         ({"train.lr": {"low": 0, "high": 1, "log": True}}, "low > 0 on a log scale"),
                         ({"train.lr": 0.1}, "list of choices or"), ({"train.lr": []}, "no choices")]:
        with pytest.raises(ConfigError, match=message):
            read_space(write_space(tmp_path, bad))
    with pytest.raises(ValueError, match="use local or ray"):
        executor("slurm")


def test_ray_rows_keep_a_trial_that_failed_before_it_reported():
    # Ray gives such a trial no metrics, so no config: its row has no values, and the others still come
    done = SimpleNamespace(error=None, metrics={"done_training": 1, "final": 0.5, "config": {"train.lr": 0.1}})
    done.config = done.metrics["config"]
    failed = SimpleNamespace(error=RuntimeError("no data"), metrics=None, config=None)
    lines = []
    rows = _ray_rows([done, failed], (Param("train.lr", 0.01, 1.0),), Metric.VAL_LOSS, say=lines.append)
    assert [(r["state"], r["train.lr"], r["value"]) for r in rows[:1]] == [("COMPLETE", 0.1, 0.5)]
    assert rows[1]["state"] == "FAIL" and rows[1]["train.lr"] is None and math.isnan(rows[1]["value"])
    assert lines == ["trial 0: complete, val/loss 0.5000", "trial 1: fail"]


def test_optuna_search_writes_the_best_config_and_resumes(synthetic_small, tmp_path):
    base = tiny_config(synthetic_small, train={"epochs": 2, "loggers": ["csv"]})
    space = read_space(write_space(tmp_path, {"train.lr": {"low": 1e-4, "high": 3e-2, "log": True},
                                              "data.augment": ["none", "heavy"]}))
    lines = []
    result = tune(base, space, 3, tmp_path / "out", Metric.VAL_LOSS, LocalExecutor(), say=lines.append)
    rows = list(csv.DictReader((tmp_path / "out/trials.csv").open()))
    assert len(rows) == 3 and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    best = Config.from_yaml(result.best_config)
    assert best.train.lr == pytest.approx(result.best_values["train.lr"])
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert result.best_value == min(float(r["val/loss"]) for r in complete)
    assert (tmp_path / "out/history.png").is_file()
    # the importance plot needs three finished trials; a pruned one does not count
    assert (tmp_path / "out/importance.png").is_file() == (len(complete) >= 3)
    assert len(complete) >= 3 or any("no importance plot" in line for line in lines)
    # interrupted: a trial left running, then the same search asked for 4 finishes only one more
    study = optuna.load_study(study_name="equiseg-tune", storage=f"sqlite:///{tmp_path / 'out/optuna.db'}")
    study.ask()  # as a killed search leaves its trial: RUNNING
    again = tune(base, space, 4, tmp_path / "out", Metric.VAL_LOSS, LocalExecutor(), say=lines.append)
    states = [t.state.name for t in optuna.load_study(study_name="equiseg-tune",
                                                      storage=f"sqlite:///{tmp_path / 'out/optuna.db'}").trials]
    assert states.count("FAIL") == 1 and len(states) == 5 and len(again.trials) == 5
    assert len(list((tmp_path / "out/trials").iterdir())) == 4  # one run folder per trial trained


TINY = {"model": {"family": "plain", "width": 4, "depth": 2},
        "data": {"synthetic": {"train": 4, "val": 1, "test": 2, "size": 64, "seed": 1}, "crop_size": 32,
                 "batch_size": 2},
        "train": {"epochs": 1, "accelerator": "cpu", "loggers": ["csv"]},
        "detect": {"sigma": 2.0, "min_distance": 4}}


@pytest.mark.slow
def test_a_study_on_ray_gives_the_local_numbers_and_a_ray_search_runs(tmp_path, local_ray):
    spec = {"name": "tiny-ray", "base": TINY, "reference_width": 4, "seeds": [0, 1], "fractions": [1.0],
            "angles": [45], "variants": {"plain": {"family": "plain"}, "p4m": {"family": "p4m"}},
            "robustness": False}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    study = StudyConfig.from_yaml(tmp_path / "study.yaml")
    run_study(study, tmp_path / "local", say=lambda _: None)
    lines = []
    # two CPUs per run: one run at a time, with the local run's torch thread count
    run_study(study, tmp_path / "ray", say=lines.append, executor=RayExecutor(cpus_per_run=2))
    local, remote = (from_json(StudyResult, (tmp_path / f"{k}/results.json").read_text()) for k in ("local", "ray"))
    assert [(r.variant, r.seed) for r in remote.results] == [(r.variant, r.seed) for r in local.results]
    for a, b in zip(local.results, remote.results):
        assert json.dumps(a.scores) == json.dumps(b.scores) and a.per_image == b.per_image
    # resumed on Ray: nothing trained again
    lines.clear()
    run_study(study, tmp_path / "ray", say=lines.append, executor=RayExecutor(cpus_per_run=1))
    assert sum("reused" in line for line in lines) == 4
    # a search on Ray Tune (Optuna's sampler, ASHA)
    base = Config.from_dict({**TINY, "train": {**TINY["train"], "epochs": 2}})
    space = read_space(write_space(tmp_path, {"train.lr": {"low": 1e-3, "high": 3e-2, "log": True}}))
    result = tune(base, space, 2, tmp_path / "search", Metric.VAL_LOSS, RayExecutor(cpus_per_run=1),
                  say=lines.append)
    assert len(result.trials) == 2 and Config.from_yaml(result.best_config).train.lr == result.best_values["train.lr"]
