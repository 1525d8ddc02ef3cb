import csv
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from equiseg.data.datamodule import SegmentationDataModule
from equiseg.data.synthetic import generate_dataset
from equiseg.data.targets import Task
from equiseg.evaluation.evaluate import evaluate_model
from equiseg.runs import Run, load_model
from equiseg.training.fit import fit
from equiseg.training.module import SegmentationModule
from tests_support import Crash, resumed_equals_uninterrupted, tiny_config


def test_a_few_steps_lower_the_loss(synthetic_small):
    config = tiny_config(synthetic_small, model={"family": "isotropic", "width": 4})
    module = SegmentationModule(config.to_dict())
    data = SegmentationDataModule(synthetic_small, crop_size=None, batch_size=4)
    batch = next(iter(data.train_dataloader()))
    optimiser = torch.optim.Adam(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimiser.zero_grad()
        loss = module.loss(module(batch["image"]), batch["target"])
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_fit_writes_a_complete_run_folder(synthetic_small, tmp_path, caplog):
    run = fit(tiny_config(synthetic_small, train={"epochs": 2}), runs=tmp_path, progress=False)
    assert not any("GPU available" in r.getMessage() for r in caplog.records)  # progress=False: notices stay quiet
    for name in ("config.yaml", "metrics.csv", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=True)  # no code runs from a checkpoint
    assert state["epoch"] == 1 and state["hyper_parameters"]["config"]["model"]["family"] == "plain"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert any(r.get("val/loss") for r in rows) and any(r.get("train/loss_epoch") for r in rows)
    model, config = load_model(run)
    result = evaluate_model(model, config, synthetic_small, "test", tile=None)
    assert {"loss", "dice/mean", "miou", "mf1", "f1/BC", "f1/TC"} <= set(result.scores)
    assert len(result.points) == 2


def test_resume_continues_from_the_saved_step(synthetic_small, tmp_path):
    config = tiny_config(synthetic_small, train={"epochs": 3})
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(config, run_dir=tmp_path / "run", progress=False, callbacks=[Crash()])
    saved = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert saved["epoch"] == 0
    steps_per_epoch = saved["global_step"]

    seen = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            seen.append((trainer.current_epoch, trainer.global_step))

    fit(None, resume=tmp_path / "run", progress=False, callbacks=[Record()])
    assert seen[0] == (1, steps_per_epoch)  # picks up after epoch 0, not from scratch
    final = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert final["epoch"] == 2 and final["global_step"] == 3 * steps_per_epoch


def test_failed_checkpoint_write_leaves_the_previous_one_intact(synthetic_small, tmp_path, monkeypatch):
    run = fit(tiny_config(synthetic_small), run_dir=tmp_path / "run", progress=False)
    before = (run / "checkpoints/last.ckpt").read_bytes()
    from fsspec.implementations import local

    def broken_write(self, data):
        raise OSError("disk full")

    monkeypatch.setattr(local.LocalFileOpener, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        fit(None, resume=run, progress=False, callbacks=[])
    monkeypatch.undo()
    assert (run / "checkpoints/last.ckpt").read_bytes() == before
    torch.load(run / "checkpoints/last.ckpt", weights_only=True)


def test_bad_data_stops_before_any_output(synthetic_small, tmp_path):
    import shutil

    from equiseg.data.ocelot import DatasetError

    broken = tmp_path / "broken"
    shutil.copytree(synthetic_small, broken)
    (broken / "annotations/train/cell/001.csv").write_text("1,2,9\n")
    with pytest.raises(DatasetError, match=r"001.csv:1: unknown class 9"):
        fit(tiny_config(broken), runs=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_clean_dataset_is_decoded_once_until_a_file_changes(synthetic_small, tmp_path, monkeypatch):
    import shutil

    from equiseg.data.ocelot import DatasetError
    from equiseg.training import fit as fit_module

    data = tmp_path / "data"
    shutil.copytree(synthetic_small, data)
    calls = []
    verify = fit_module.verify_dataset
    monkeypatch.setattr(fit_module, "verify_dataset", lambda root: calls.append(root) or verify(root))
    fit_module.check_data(data)
    fit_module.check_data(data)
    assert len(calls) == 1
    (data / "annotations/train/cell/001.csv").write_text("1,2,9\n")
    with pytest.raises(DatasetError, match="unknown class 9"):
        fit_module.check_data(data)
    assert len(calls) == 2


@pytest.mark.slow
def test_two_process_ddp_on_cpu(synthetic_small, tmp_path):
    command = [sys.executable, "-m", "equiseg.cli", "train", "--out", str(tmp_path / "run"), "--processes", "2",
               "--strategy", "ddp", f"data.root={synthetic_small}", "model.family=p4", "model.width=2",
               "model.depth=2", "data.crop_size=32", "data.batch_size=1", "train.epochs=1",
               "train.accelerator=cpu", "train.loggers=[csv]"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1
    state = torch.load(runs[0] / "checkpoints/last.ckpt", weights_only=True)
    # 4 training samples split over 2 processes with batch 1: 2 steps each
    assert state["global_step"] == 2


def test_resumed_run_keeps_the_metrics_of_its_first_attempt(synthetic_small, tmp_path):
    config = tiny_config(synthetic_small, train={"epochs": 3})
    with pytest.raises(RuntimeError):
        fit(config, run_dir=tmp_path / "run", progress=False, callbacks=[Crash()])
    fit(None, resume=tmp_path / "run", progress=False)
    rows = list(csv.DictReader((tmp_path / "run/metrics.csv").open()))
    epochs = sorted({int(r["epoch"]) for r in rows if r.get("val/loss")})
    assert epochs == [0, 1, 2]
    assert not list((tmp_path / "run").glob("metrics-part*.csv"))


def test_last_checkpoint_is_the_last_epoch_even_when_validation_got_worse(synthetic_small, tmp_path):
    # a learning rate this large makes validation worse after the first epoch, so best != last
    run = fit(tiny_config(synthetic_small, train={"epochs": 3, "lr": 5.0}), run_dir=tmp_path / "run",
              progress=False)
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["epoch"] == 2


def test_tissue_task_trains_and_evaluates(synthetic_small, tmp_path):
    config = tiny_config(synthetic_small, model={"family": "isotropic"})
    config = type(config).from_dict({**config.to_dict(), "task": "tissue"})
    run = fit(config, run_dir=tmp_path / "run", progress=False)
    model, loaded = load_model(run)
    assert loaded.task is Task.TISSUE and model.head.out_channels == 2
    result = evaluate_model(model, loaded, synthetic_small, "test", tile=None)
    assert {"dice/background", "dice/cancer", "miou", "loss"} <= set(result.scores)
    assert "mf1" not in result.scores and result.points == []


def _synthetic_config(**data):
    """A tiny config without data.root: the built-in synthetic data, shrunk to 64 px."""
    from equiseg.config import Config

    return Config.from_dict({"model": {"family": "plain", "width": 2, "depth": 2},
                             "data": {"synthetic": {"train": 2, "val": 1, "test": 1, "size": 64, "seed": 5},
                                      "crop_size": 32, "batch_size": 2, **data},
                             "train": {"epochs": 1, "loggers": ["csv"], "accelerator": "cpu"}})


def test_training_on_the_built_in_synthetic_data_says_so_and_records_it(tmp_path, monkeypatch, caplog):

    monkeypatch.setenv("EQUISEG_CACHE", str(tmp_path / "cache"))
    with caplog.at_level("WARNING", logger="equiseg"):
        run = fit(_synthetic_config(), run_dir=tmp_path / "run", progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "SYNTHETIC" in r.getMessage()]
    assert warned == [("no data.root: training on the built-in SYNTHETIC dataset (2 train images of 64 px, seed 5, sparse), "
                       "not OCELOT; pass --data DIR for real data")]
    assert Run(run).synthetic_file.read_text().splitlines() == ["synthetic: train=2 val=1 test=1 size=64 seed=5 crowding=0", warned[0]]
    assert Run(run).synthetic() == "train=2 val=1 test=1 size=64 seed=5 crowding=0"


def test_a_run_on_a_dataset_folder_has_no_synthetic_marker(synthetic_small, tmp_path, caplog):

    with caplog.at_level("WARNING", logger="equiseg"):
        run = fit(tiny_config(synthetic_small), run_dir=tmp_path / "run", progress=False)
    assert Run(run).synthetic() is None
    assert not any("SYNTHETIC" in r.getMessage() for r in caplog.records)


def test_require_real_refuses_the_synthetic_data_before_any_output(tmp_path, monkeypatch):
    from equiseg.config import ConfigError

    monkeypatch.setenv("EQUISEG_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"meant for real OCELOT data \(data.require_real=true\): pass --data DIR"):
        fit(_synthetic_config(require_real=True), runs=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # no data generated either


def test_a_resumed_run_ends_bitwise_where_the_uninterrupted_one_does(synthetic_small, tmp_path):
    """Crop, shuffle and augmentation randomness continue from the checkpoint, not from the seed."""
    config = tiny_config(synthetic_small, train={"epochs": 3}, data={"augment": "heavy"})
    assert resumed_equals_uninterrupted(config, tmp_path)


_KILLED_RUN = """
import json, os, signal, sys
import lightning as L
import torch
from equiseg.config import Config
from equiseg.training.fit import fit

torch.set_num_threads(int(sys.argv[4]))  # float sums depend on the thread count: the parent's

class KillNine(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)

fit(Config.from_dict(json.loads(sys.argv[1])), run_dir=sys.argv[2], progress=False, callbacks=[KillNine()])
"""


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_bitwise_from_its_step_checkpoint(synthetic_small, tmp_path):
    """Kill -9 in a subprocess after step 3 of 6 (the first batch of epoch 1 of 3, two batches
    an epoch), checkpoints every step: the resumed run skips the batch it had trained and ends
    with the uninterrupted run's weights, bit for bit.
    """
    import json

    config = tiny_config(synthetic_small, train={"epochs": 3, "checkpoint_every_n_steps": 1},
                         data={"augment": "heavy"})
    whole = fit(config, run_dir=tmp_path / "whole", progress=False)
    cut = tmp_path / "cut"
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(config.to_dict()), str(cut), "3",
                             str(torch.get_num_threads())],
                            check=False, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    saved = torch.load(cut / "checkpoints/last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (1, 3)  # mid-epoch
    assert not Run(cut).finished(config)
    fit(None, resume=cut, progress=False)
    a = torch.load(whole / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(cut / "checkpoints/last.ckpt", weights_only=True)
    assert b["global_step"] == a["global_step"] == 6
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert Run(cut).finished(config)
    assert not list(cut.rglob(".*partial*"))


def test_partial_checkpoints_of_killed_writers_are_removed_when_a_run_starts(tmp_path):
    from equiseg.training.fit import AtomicCheckpointIO, remove_stale_partials

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True,
                          text=True)
    stale = folder / f".last.ckpt.partial-{dead.stdout.strip()}"
    stale.write_bytes(b"half a checkpoint")
    live = folder / f".best.ckpt.partial-{os.getpid()}"  # a writer still at work is left alone
    live.write_bytes(b"being written")
    assert remove_stale_partials(folder) == [stale] and live.exists()
    AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(2)}, folder / "last.ckpt")
    assert torch.equal(torch.load(folder / "last.ckpt", weights_only=True)["weights"], torch.ones(2))
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, "last.ckpt"])


@pytest.mark.slow
def test_compiled_training_matches_eager_and_writes_the_same_checkpoint(synthetic_small, tmp_path):
    """``train.compile``: the compiled U-Net (inductor, the group batch norm's formula path inside
    the graph) takes the eager step to float rounding, and the run's checkpoint has the eager keys
    and loads without compiling.
    """
    config = tiny_config(synthetic_small, model={"family": "p4m", "width": 1, "depth": 1},
                         train={"compile": "default"})
    eager, compiled = (SegmentationModule(tiny_config(synthetic_small, model=config.to_dict()["model"]).to_dict()),
                       SegmentationModule(config.to_dict()))
    compiled.load_state_dict(eager.state_dict())
    assert compiled.model._compiled_call_impl is not None and eager.model._compiled_call_impl is None
    batch = next(iter(SegmentationDataModule(synthetic_small, crop_size=32, batch_size=2).train_dataloader()))
    losses = []
    for module in (eager, compiled):
        loss = module.loss(module(batch["image"]), batch["target"])
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    # float rounding, relative to the parameter's gradient and to the largest one (a batch norm
    # weight's gradient is a sum that nearly cancels: its own scale alone is too small a yardstick)
    largest = max(p.grad.abs().max() for p in eager.parameters())
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert (q.grad - p.grad).abs().max() <= 1e-4 * p.grad.abs().max() + 1e-5 * largest, name
    for (name, b), c in zip(eager.named_buffers(), compiled.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=name)

    run = fit(config, runs=tmp_path, progress=False)
    saved = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["config"]["train"]["compile"] == "default"
    assert list(saved["state_dict"]) == list(eager.state_dict())
    model, _ = load_model(run)  # an eager U-Net, as any run's
    assert getattr(model, "_compiled_call_impl", None) is None
    torch.testing.assert_close(model.state_dict(), {k.removeprefix("model."): v for k, v in saved["state_dict"].items()})


_KILLED_AT_VALIDATION = """
import json, os, signal, sys
import lightning as L
import torch
from equiseg.config import Config
from equiseg.training.fit import fit

torch.set_num_threads(int(sys.argv[4]))

class KillAtValidation(L.Callback):  # runs before the checkpoint callbacks: best.ckpt not yet written
    def on_validation_end(self, trainer, module):
        if trainer.current_epoch == int(sys.argv[3]) and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)

fit(Config.from_dict(json.loads(sys.argv[1])), run_dir=sys.argv[2], progress=False, callbacks=[KillAtValidation()])
"""


@pytest.mark.slow
def test_a_run_killed_at_its_best_validation_resumes_to_the_same_best_checkpoint(tmp_path):
    """Kill -9 as the epoch whose validation loss is the run's lowest ends its validation, with
    checkpoints every step: the resumed run runs that validation again and keeps the same
    best.ckpt. A step checkpoint after an epoch's last batch made Lightning skip that validation
    on resume, and best.ckpt held a later epoch's weights.
    """
    import json

    root = generate_dataset(tmp_path / "data", {"train": 4, "val": 2, "test": 1}, size=64, seed=0)
    config = tiny_config(root, train={"epochs": 4, "checkpoint_every_n_steps": 1, "lr": 3e-2},
                         data={"augment": "heavy", "batch_size": 2, "crop_size": 32})
    whole = fit(config, run_dir=tmp_path / "whole", progress=False)
    best = torch.load(whole / "checkpoints/best.ckpt", weights_only=True)
    assert 0 < best["epoch"] < config.train.epochs - 1  # a later epoch could take its place: the case tested
    cut = tmp_path / "cut"
    killed = subprocess.run([sys.executable, "-c", _KILLED_AT_VALIDATION, json.dumps(config.to_dict()), str(cut),
                             str(best["epoch"]), str(torch.get_num_threads())],
                            check=False, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    fit(None, resume=cut, progress=False)
    for name in ("best", "last"):
        a = torch.load(whole / f"checkpoints/{name}.ckpt", weights_only=True)
        b = torch.load(cut / f"checkpoints/{name}.ckpt", weights_only=True)
        assert a["global_step"] == b["global_step"], name
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), name
