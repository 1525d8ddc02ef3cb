"""The run folder's owner: layout, creation, what a run records, loading."""

import shutil
import threading

import pytest
import torch

from equiseg import build_model
from equiseg.report.plots import read_epoch_metrics
from equiseg.runs import Run, dataset_digest, load_model, save_model
from equiseg.training.fit import fit
from tests_support import tiny_config


def test_the_layout_is_named_in_one_place(tmp_path):
    run = Run(tmp_path / "r")
    assert run.best == tmp_path / "r/checkpoints/best.ckpt" and run.last == tmp_path / "r/checkpoints/last.ckpt"
    assert run.config_file.name == "config.yaml" and run.metrics.name == "metrics.csv"
    assert run.eval_dir("val") == tmp_path / "r/eval-val" and run.study_cache.name == "study.json"
    assert Run.of(run.best) == run == Run.of(run.path)


def test_epoch_metrics_are_read_from_a_run_folder_given_as_a_string(tmp_path):
    Run(tmp_path).metrics.write_text("epoch,step,train/loss_epoch,val/loss\n0,3,0.9,\n0,3,,0.8\n1,7,0.5,0.6\n")
    assert read_epoch_metrics(str(tmp_path)) == {"train/loss": {0: 0.9, 1: 0.5}, "val/loss": {0: 0.8, 1: 0.6}}


def test_create_gives_every_caller_its_own_folder_even_in_the_same_second(tmp_path):
    made: list[Run] = []
    threads = [threading.Thread(target=lambda: made.append(Run.create(tmp_path / "runs", "x"))) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({run.path for run in made}) == 12 and all(run.path.is_dir() for run in made)


def test_a_run_records_its_config_data_and_synthetic_origin(tmp_path):
    config = tiny_config(tmp_path / "data")
    run = Run.create(tmp_path, "r")
    run.record_start(config, tmp_path / "data", ("train=2 val=1 test=1 size=64 seed=0", "a warning"))
    assert run.config() == config and run.data_root() == (tmp_path / "data").resolve()
    assert run.synthetic() == "train=2 val=1 test=1 size=64 seed=0"
    other = Run.create(tmp_path, "s")
    other.record_start(config, tmp_path / "data")
    assert other.synthetic() is None and Run(tmp_path / "nothing").data_root() is None


def test_save_and_load_round_trip_from_a_file_or_a_run_folder(tmp_path):
    config = tiny_config(tmp_path)
    model = build_model("plain", width=4, depth=2, in_channels=config.in_channels).eval()
    run = Run(tmp_path / "r")
    run.checkpoints.mkdir(parents=True)
    save_model(model, config, run.best)
    x = torch.rand(1, 3, 16, 16)
    for source in (run.best, run.path):
        loaded, loaded_config = load_model(source)
        assert loaded_config == config and not loaded.training
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        load_model(tmp_path / "empty")


def test_the_dataset_digest_survives_a_copy_and_sees_labels_and_files_change(synthetic_small, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_small, copy, copy_function=shutil.copy)  # new times, same contents
    digest = dataset_digest(synthetic_small)
    assert dataset_digest(copy) == digest and len(digest) == 64
    label = next(p for p in sorted(copy.rglob("*.csv")) if p.read_text().strip())
    text = label.read_text()
    label.write_text(text[:-2] + {"1": "2", "2": "1"}[text[-2]] + "\n")  # the last cell's class: same size
    assert dataset_digest(copy) != digest
    label.write_text(text)
    assert dataset_digest(copy) == digest
    (copy / "extra.txt").write_text("x")
    assert dataset_digest(copy) != digest


def test_a_run_is_still_finished_when_its_dataset_moved_but_not_when_it_changed(synthetic_small, tmp_path):
    shutil.copytree(synthetic_small, tmp_path / "here")
    run = Run(fit(tiny_config(tmp_path / "here"), run_dir=tmp_path / "run", progress=False))
    (tmp_path / "here").rename(tmp_path / "there")
    moved = tiny_config(tmp_path / "there")
    assert run.finished(moved)
    assert not run.finished(tiny_config(tmp_path / "there", train={"lr": 1e-3}))  # another config
    assert not run.finished(tiny_config(tmp_path / "nowhere"))  # no dataset there
    label = next((tmp_path / "there").rglob("*.csv"))  # a labels file, with cells or without
    original = label.read_text()
    label.write_text(original + "1,1,1\n")
    assert not run.finished(moved)  # a different dataset at the new place
    label.write_text(original)
    assert run.finished(moved)
    run.data_digest_file.unlink()  # a run recorded before digests: only its own path counts
    assert not run.finished(moved)
