"""Convergence: learning-rate schedules, early stopping, and a run that stopped early counts as finished."""

import csv
import itertools
import math

import pytest
import torch

from equiseg.config import Config, Schedule, TrainConfig
from equiseg.runs import Run
from equiseg.training.fit import fit, train_or_reuse
from equiseg.training.module import lr_schedule
from tests_support import tiny_config


def rates(train: TrainConfig, losses=None) -> list[float]:
    """The learning rate of each epoch under ``train``'s schedule (stepped as Lightning steps it)."""
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=train.lr)
    entry = lr_schedule(optimizer, train)
    out = []
    for epoch in range(train.epochs):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if "monitor" in entry:
            entry["scheduler"].step(losses[epoch])
        else:
            entry["scheduler"].step()
    return out


def test_cosine_with_warmup_rises_then_falls_to_a_hundredth():
    lr = rates(TrainConfig(lr=1.0, epochs=12, schedule=Schedule.COSINE, warmup_epochs=2))
    assert lr[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(lr[2:]))  # non-increasing after the warm-up
    t = 5 / 10
    assert lr[7] == pytest.approx(0.01 + 0.99 * (1 + math.cos(math.pi * t)) / 2)
    assert rates(TrainConfig(lr=1.0, epochs=4)) == [1.0] * 4  # constant


def test_plateau_halves_after_patience_epochs_without_improvement():
    losses = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.8]  # three epochs without improvement after the second
    lr = rates(TrainConfig(lr=1.0, epochs=7, schedule=Schedule.PLATEAU, plateau_patience=2), losses)
    assert lr == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="warmup_epochs is for the constant and cosine"):
        TrainConfig(schedule=Schedule.PLATEAU, warmup_epochs=1)


def test_early_stopping_stops_and_the_run_counts_as_finished(synthetic_small, tmp_path):
    # a learning rate this large makes validation worse after the first epochs: patience 1 stops it
    config = tiny_config(synthetic_small, train={"epochs": 30, "lr": 5.0, "early_stopping": 1,
                                                 "schedule": "cosine", "warmup_epochs": 1})
    run = fit(config, run_dir=tmp_path / "run", progress=False)
    best, trained = Run(run).best_epoch()
    assert trained < 30 and best < trained - 1  # stopped, the best epoch behind it
    assert Run(run).finished(config)
    assert train_or_reuse(config, run, progress=False)  # reused, not trained again
    lrs = [float(r["lr-Adam"]) for r in csv.DictReader(Run(run).metrics.open()) if r.get("lr-Adam")]
    assert lrs[0] == pytest.approx(2.5)  # the warm-up's first epoch: half the rate
    assert not Run(run).finished(Config.from_dict({**config.to_dict(), "train": {**config.to_dict()["train"],
                                                                                  "early_stopping": 2}}))
