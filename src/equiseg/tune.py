"""``equiseg tune``: a hyper-parameter search over any config key, with Optuna, here or on Ray.

A search space (YAML) maps config keys to ranges or choices::

    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}    # a float range (log: sampled on a log scale)
    model.width: {low: 4, high: 16, int: true}          # an int range
    data.augment: [none, heavy]                         # choices
    detect.threshold: {low: 0.2, high: 0.6}

Each trial trains the base config with its values (``equiseg train``'s run folder, under
``OUT/trials``). Proposals come from Optuna's TPE sampler (seeded); bad trials stop early:

- ``--executor local``: Optuna alone, one trial after another, pruned by the median rule on
  the validation loss reported after every validation (a Lightning callback). The Optuna study
  lives in ``OUT/optuna.db`` (SQLite): a killed search resumes with the trials it finished.
- ``--executor ray``: Ray Tune runs trials as tasks on the cluster's CPUs and GPUs, with
  Optuna's sampler (``OptunaSearch``) and ASHA stopping; it resumes from ``OUT/ray``.

The metric is ``val/loss`` (lowest validation loss, minimised) or ``val/mF1`` (OCELOT mF1 of
the trial's best checkpoint on the validation split, maximised; pruning still follows the
validation loss). Outputs: ``OUT/best.yaml`` (the best trial's config, ready for
``equiseg train -c``), ``OUT/trials.csv`` (every trial: number, state, values, metric),
``OUT/history.png`` (the metric per trial and the best so far) and ``OUT/importance.png``
(each parameter's importance, Optuna's PED-ANOVA, with enough finished trials).
"""

from __future__ import annotations

import csv
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from equiseg.config import Config, ConfigError, apply_overrides, read_yaml
from equiseg.datasets import data_root
from equiseg.evaluation.evaluate import evaluate_model
from equiseg.runs import Run, load_model
from equiseg.scale import Executor, LocalExecutor, RayExecutor, require
from equiseg.training.fit import checked_inputs, fit

if TYPE_CHECKING:  # an optional dependency, imported where a search runs on it
    from ray.tune import ResultGrid

STUDY_NAME = "equiseg-tune"


class Metric(enum.Enum):
    """What a search optimises (``--metric``)."""

    VAL_LOSS = "val/loss"
    VAL_MF1 = "val/mF1"

    @property
    def direction(self) -> str:
        return "minimize" if self is Metric.VAL_LOSS else "maximize"


@dataclass(frozen=True)
class Param:
    """One searched config key: a float or int range (``log``: on a log scale) or choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple | None = None

    @property
    def int_range(self) -> tuple[int, int]:
        """(low, high) of a range, as whole numbers."""
        if self.low is None or self.high is None:
            raise ValueError(f"{self.key}: a list of choices, not a range")
        return int(self.low), int(self.high)

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial proposes."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, *self.int_range, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def ray_domain(self, tune: Any) -> Any:
        """The same range as a Ray Tune search domain."""
        if self.choices is not None:
            return tune.choice(list(self.choices))
        if self.integer:
            low, high = self.int_range
            return tune.lograndint(low, high + 1) if self.log else tune.randint(low, high + 1)
        return tune.loguniform(self.low, self.high) if self.log else tune.uniform(self.low, self.high)


def read_space(path: Path | str) -> tuple[Param, ...]:
    """A search space file (see the module docstring).

    Raises:
        ConfigError: a key with neither a list of choices nor {low, high}, an empty range, a
            log range that is not positive.
    """
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: a search space maps config keys to ranges or choices")
    params = []
    for key, spec in data.items():
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{path}: {key} has no choices")
            params.append(Param(str(key), choices=tuple(spec)))
            continue
        if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - {"low", "high", "log", "int"}:
            raise ConfigError(f"{path}: {key} must be a list of choices or {{low, high[, log][, int]}}")
        low, high, log = _bound(path, key, spec, "low"), _bound(path, key, spec, "high"), bool(spec.get("log", False))
        if not low < high or (log and low <= 0):
            raise ConfigError(f"{path}: {key} needs low < high" + (" and low > 0 on a log scale" if log else ""))
        params.append(Param(str(key), low, high, log, bool(spec.get("int", False))))
    return tuple(params)


def _bound(path: Path | str, key: str, spec: dict, end: str) -> float:
    """``spec[end]`` (``low`` or ``high``) of the range of ``key`` as a finite number; a number that
    YAML left a string (``1e-4``, which YAML 1.1 reads so) counts, other text is a ConfigError.
    """
    value = spec[end]
    try:
        number = float(value) if isinstance(value, int | float | str) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ConfigError(f"{path}: {key}.{end} must be a finite number, got {value!r}")
    return number


def trial_config(base: Config, values: dict[str, Any]) -> Config:
    """``base`` with a trial's values (config keys -> values)."""
    overrides = [f"{key}={value}" for key, value in values.items()]
    return Config.from_dict(apply_overrides(base.to_dict(), overrides))


class ReportValidation(L.Callback):
    """After each validation, hand the validation loss to ``report(epoch, value)`` (which may
    stop the trial by raising).
    """

    def __init__(self, report: Callable[[int, float], None]) -> None:
        self.report = report

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        self.report(trainer.current_epoch, float(trainer.callback_metrics["val/loss"]))


def _score(run_dir: Path, metric: Metric) -> float:
    """A finished trial's metric: its lowest validation loss, or its best checkpoint's val mF1."""
    if metric is Metric.VAL_LOSS:
        best = Run(run_dir).best_validation()
        return math.nan if best is None else best[0]
    model, config = load_model(run_dir)
    return float(evaluate_model(model, config, data_root(config), "val").scores.get("mf1", math.nan))


@dataclass(frozen=True)
class TuneResult:
    """A finished search: the best trial's values and metric, its config file, every trial."""

    best_values: dict[str, Any]
    best_value: float
    best_config: Path
    trials: tuple[dict[str, Any], ...]


def tune(base: Config, space: tuple[Param, ...], trials: int, out: Path, metric: Metric = Metric.VAL_LOSS,
         executor: Executor | None = None, say: Callable[[str], None] = print) -> TuneResult:
    """Search ``space`` around ``base`` with ``trials`` trials into ``out`` (see the module docstring);
    a search already in ``out`` continues up to ``trials`` finished trials.
    """
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    for param in space:  # every key must be one the config has, with a value of its type
        trial_config(base, {param.key: param.choices[0] if param.choices else param.low})
    checked_inputs(base)  # the dataset (and the rest a training checks) before anything is written in out
    out.mkdir(parents=True, exist_ok=True)
    executor = executor or LocalExecutor()
    if isinstance(executor, RayExecutor):
        rows = _tune_ray(base, space, trials, out, metric, executor, say)
    else:
        rows = _tune_optuna(base, space, trials, out, metric, say)
    done = [r for r in rows if r["state"] == "COMPLETE" and not math.isnan(r["value"])]
    if not done:
        raise RuntimeError("no trial finished")
    best = (min if metric is Metric.VAL_LOSS else max)(done, key=lambda r: r["value"])
    values = {p.key: best[p.key] for p in space}
    best_config = out / "best.yaml"
    config = trial_config(base, values)
    config = Config.from_dict({**config.to_dict(), "name": f"{base.name}-tuned"})
    config.to_yaml(best_config)
    _write_trials(out / "trials.csv", rows, space, metric)
    _history_figure(out / "history.png", rows, metric)
    _importance_figure(out / "importance.png", out, space, metric, rows, say)
    say(f"best of {len(done)} finished trials: {metric.value} {best['value']:.4f} with "
        + ", ".join(f"{k}={v}" for k, v in values.items()))
    return TuneResult(values, best["value"], best_config, tuple(rows))


def _tune_optuna(base: Config, space: tuple[Param, ...], trials: int, out: Path, metric: Metric,
                 say: Callable[[str], None]) -> list[dict[str, Any]]:
    optuna = require("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'optuna.db'}",
                                direction=metric.direction, load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    # a trial left running by a killed search will not finish: it failed (one search per folder)
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    left = trials - len(study.get_trials(deepcopy=False, states=finished))

    def objective(trial: Any) -> float:
        values = {p.key: p.suggest(trial) for p in space}
        config = trial_config(base, values)
        run_dir = out / "trials" / f"trial-{trial.number:03d}"

        def report(epoch: int, loss: float) -> None:
            trial.report(loss, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val/loss {loss:.4f} at epoch {epoch}")

        fit(config, run_dir=run_dir, progress=False, callbacks=[ReportValidation(report)])
        value = _score(run_dir, metric)
        say(f"trial {trial.number}: {metric.value} {value:.4f} with "
            + ", ".join(f"{k}={v}" for k, v in values.items()))
        return value

    if left > 0:
        study.optimize(objective, n_trials=left, catch=())
    return [{"number": t.number, "state": t.state.name, **{p.key: t.params.get(p.key) for p in space},
             "value": math.nan if t.value is None else float(t.value)} for t in study.get_trials(deepcopy=False)]


def _ray_trainable(values: dict[str, Any], base: Config, out: Path, metric: Metric) -> dict[str, float]:
    """One Ray Tune trial: train, reporting the validation loss after each validation."""
    from ray import tune as ray_tune

    run_dir = out / "trials" / f"trial-{ray_tune.get_context().get_trial_id()}"
    fit(trial_config(base, values), run_dir=run_dir, progress=False,
        callbacks=[ReportValidation(lambda epoch, loss: ray_tune.report({"val_loss": loss, "epoch": epoch}))])
    best = Run(run_dir).best_validation()
    if best is None:
        raise RuntimeError(f"{run_dir}: the trial finished without a validation")
    ray_tune.report({"val_loss": best[0], "final": _score(run_dir, metric),
                     "done_training": 1})
    return {}


def _tune_ray(base: Config, space: tuple[Param, ...], trials: int, out: Path, metric: Metric,
              executor: RayExecutor, say: Callable[[str], None]) -> list[dict[str, Any]]:
    require("ray")
    require("optuna")
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    with executor.cluster():
        trainable = ray_tune.with_resources(
            ray_tune.with_parameters(_ray_trainable, base=base, out=out.resolve(), metric=metric),
            {"cpu": executor.cpus_per_run, "gpu": executor.gpus_per_run})
        storage = out.resolve()
        if (storage / "ray").is_dir() and ray_tune.Tuner.can_restore(storage / "ray"):
            tuner = ray_tune.Tuner.restore(str(storage / "ray"), trainable, resume_errored=True)
        else:
            # ASHA stops on the validation loss; the search is told the final metric of each trial
            tuner = ray_tune.Tuner(
                trainable, param_space={p.key: p.ray_domain(ray_tune) for p in space},
                tune_config=ray_tune.TuneConfig(
                    search_alg=OptunaSearch(metric="val_loss", mode="min", seed=0), num_samples=trials,
                    scheduler=ASHAScheduler(metric="val_loss", mode="min", time_attr="epoch", grace_period=1)),
                run_config=ray_tune.RunConfig(name="ray", storage_path=str(storage), verbose=0))
        grid = tuner.fit()
    return _ray_rows(grid, space, metric, say)


def _ray_rows(grid: ResultGrid, space: tuple[Param, ...], metric: Metric,
              say: Callable[[str], None]) -> list[dict[str, Any]]:
    """A row per Ray trial, as the Optuna search gives them. A trial that failed before it
    reported has no metrics, and so no config: its values are None.
    """
    rows = []
    for k in range(len(grid)):  # a ResultGrid is indexed (it has no __iter__)
        result = grid[k]
        metrics, values = result.metrics or {}, result.config or {}
        finished = result.error is None and metrics.get("done_training") == 1
        value = metrics.get("final", math.nan) if finished else math.nan
        rows.append({"number": k, "state": "COMPLETE" if finished else "PRUNED" if result.error is None else "FAIL",
                     **{p.key: values.get(p.key) for p in space}, "value": float(value)})
        say(f"trial {k}: {rows[-1]['state'].lower()}" + (f", {metric.value} {value:.4f}" if finished else ""))
    return rows


def _write_trials(path: Path, rows: list[dict[str, Any]], space: tuple[Param, ...], metric: Metric) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "state", *(p.key for p in space), metric.value])
        writer.writerows([r["number"], r["state"], *(r[p.key] for p in space), r["value"]] for r in rows)


def _history_figure(path: Path, rows: list[dict[str, Any]], metric: Metric) -> None:
    done = [r for r in rows if r["state"] == "COMPLETE" and not math.isnan(r["value"])]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot([r["number"] for r in done], [r["value"] for r in done], "o", color="C0", label="finished trial")
    best, line = None, []
    for r in done:
        better = best is None or (r["value"] < best if metric is Metric.VAL_LOSS else r["value"] > best)
        best = r["value"] if better else best
        line.append(best)
    ax.step([r["number"] for r in done], line, where="post", color="C1", label="best so far")
    pruned = [r["number"] for r in rows if r["state"] == "PRUNED"]
    if pruned:
        ax.plot(pruned, [line[0]] * len(pruned), "x", color="C3", label="stopped early (no value)")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric.value)
    ax.set_title("Optimisation history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _importance_figure(path: Path, out: Path, space: tuple[Param, ...], metric: Metric,
                       rows: list[dict[str, Any]], say: Callable[[str], None]) -> None:
    """Each parameter's importance for the metric (Optuna's PED-ANOVA over the finished trials)."""
    optuna = require("optuna")
    done = [r for r in rows if r["state"] == "COMPLETE" and not math.isnan(r["value"])]
    if len(space) < 2 or len(done) < 3:
        say(f"no importance plot: it needs two or more parameters and three finished trials ({len(done)})")
        return
    distributions = {}
    for p in space:
        if p.choices is not None:
            distributions[p.key] = optuna.distributions.CategoricalDistribution(list(p.choices))
        elif p.integer:
            distributions[p.key] = optuna.distributions.IntDistribution(*p.int_range, log=p.log)
        else:
            distributions[p.key] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
    study = optuna.create_study(direction=metric.direction)
    for r in done:
        study.add_trial(optuna.trial.create_trial(params={p.key: r[p.key] for p in space},
                                                  distributions=distributions, value=r["value"]))
    try:
        importance = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError, ImportError) as error:
        say(f"no importance plot: {error}")
        return
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.5 * len(importance)))
    keys = list(importance)[::-1]
    ax.barh(keys, [importance[k] for k in keys], color="C0", label="importance")
    ax.set_xlabel("importance (PED-ANOVA, share of the whole)")
    ax.set_title(f"Which parameters moved {metric.value}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
