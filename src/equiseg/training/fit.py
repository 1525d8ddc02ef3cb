"""Run a training: data, run folder, loggers, checkpoints and the Lightning Trainer."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import loggers
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.types import STEP_OUTPUT

from equiseg.config import Config, ConfigError
from equiseg.data.context import ContextFn
from equiseg.data.datamodule import SegmentationDataModule
from equiseg.data.ocelot import DatasetError, OcelotFolder, Resolution, Split
from equiseg.data.targets import Task
from equiseg.data.verify import verify_dataset
from equiseg.data.windows import WindowDataModule
from equiseg.datasets import REQUIRE_REAL, data_root, synthetic_notice, synthetic_record
from equiseg.evaluation.tissue_context import run_context
from equiseg.files import OutputError, remove_stale, written_whole
from equiseg.models.window import window_side
from equiseg.runs import Run
from equiseg.training.module import module_for

_RUN_DIR_ENV = "EQUISEG_RUN_DIR"

log = logging.getLogger(__name__)


_VERIFIED: set[tuple] = set()  # fingerprints of datasets this process found clean


def _fingerprint(root: Path) -> tuple:
    """The dataset's files with their sizes and modification times: changes when any file does."""
    return tuple(sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in root.rglob("*") if p.is_file()))


def check_data(root: Path) -> None:
    """Raise `DatasetError` listing the dataset's problems (all of them) if it has any.

    A dataset found clean is not decoded again in this process until one of its files changes
    (a study trains dozens of runs on one dataset).
    """
    key = (str(root.resolve()), _fingerprint(root)) if root.is_dir() else None
    if key is not None and key in _VERIFIED:
        return
    problems = verify_dataset(root)
    if not problems and key is not None:
        _VERIFIED.add(key)
    if len(problems) == 1:
        raise problems[0]
    if problems:  # one line all the same: the first, and where to see them all
        raise DatasetError(root, f"{len(problems)} problems in the dataset, the first: {problems[0]} "
                                 f"(`equiseg verify --data {root}` lists them all)")


def build_loggers(config: Config, run_dir: Path) -> list:
    """CSV and TensorBoard always available; Comet (offline without a key) and MLflow when installed."""
    result = []
    for name in config.train.loggers:
        match name:
            case "csv":
                result.append(loggers.CSVLogger(run_dir, name="", version=""))
            case "tensorboard":
                result.append(loggers.TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False))
            case "comet":
                try:
                    import comet_ml  # noqa: F401  # pyright: ignore[reportMissingImports]  # an optional extra
                except ImportError:
                    warnings.warn("comet logger asked for but comet_ml is not installed: skipped", stacklevel=2)
                    continue
                online = bool(os.environ.get("COMET_API_KEY"))
                result.append(loggers.CometLogger(project="equiseg", name=run_dir.name, online=online,
                                                  offline_directory=str(run_dir / "comet")))
            case "mlflow":
                try:
                    import mlflow  # noqa: F401  # pyright: ignore[reportMissingImports]  # an optional extra
                except ImportError:
                    warnings.warn("mlflow logger asked for but mlflow is not installed: skipped", stacklevel=2)
                    continue
                result.append(loggers.MLFlowLogger(experiment_name="equiseg", run_name=run_dir.name,
                                                   tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}"))
            case _:
                raise ValueError(f"unknown logger {name!r}: choose from csv, tensorboard, comet, mlflow")
    return result


def fit(config: Config | None, runs: Path | str = "runs", resume: Path | str | None = None,
        run_dir: Path | str | None = None, progress: bool = True, callbacks: list | None = None) -> Path:
    """Train one model; returns its run folder.

    The folder (`equiseg.runs.Run`) holds the resolved config, the best and last
    checkpoints, the metrics, TensorBoard events and the dataset's path. The dataset is checked
    completely before anything is written.

    Without ``data.root`` it trains on the built-in synthetic data, and says so: a warning
    (logged, shown on stderr) and ``synthetic.txt`` in the run folder (`Run.synthetic`).
    A config with ``data.require_real`` refuses that with a `ConfigError` before any
    output.

    Args:
        config: the run config (`equiseg.load_config` reads one); None when resuming.
        runs: the folder in which a new run folder ``NAME-DATE`` is made (when ``run_dir`` is None).
        resume: a run folder to continue from its last checkpoint, with the config stored there.
        run_dir: the run folder to create (it must not exist or be empty).
        progress: show Lightning's progress bar.
        callbacks: extra Lightning callbacks.

    Returns:
        The run folder.
    """
    ckpt_path = None
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0  # DDP's other processes join rank 0's folder
    if resume is None and run_dir is not None and first and Path(run_dir).exists() and (
            not Path(run_dir).is_dir() or any(Path(run_dir).iterdir())):
        raise FileExistsError(f"{run_dir} exists: give a new run folder, or resume the run in it")
    if resume is not None:
        run_dir = Path(resume)
        ckpt_path = Run(run_dir).last
        # a hostile or foreign file, or a checkpoint of another model than config.yaml's, is refused
        # here, naming it, before anything in the run folder changes
        config = Run(run_dir).resumable()
    if config is None:
        raise ValueError("fit needs a config, or a run folder to resume")
    root, context = checked_inputs(config)
    config = resolved_window(config, root)
    with _quiet(progress):
        with _started(config, root, runs, run_dir, resuming=resume is not None) as run_dir:  # undone if it fails
            L.seed_everything(config.train.seed, workers=True, verbose=False)
            data = datamodule_for(config, root, context)
            module = module_for(config)
            trainer = _trainer(config, run_dir, progress, callbacks or [])
        try:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        finally:
            if trainer.is_global_zero:
                merge_metrics(run_dir)
    return run_dir


def resolved_window(config: Config, root: Path) -> Config:
    """``config`` with ``window.side_px`` set for ``task: nuclei`` when it is empty: the side nearest
    ``window.side_um`` at the training split's resolution (`window_side`); other configs unchanged.
    """
    if config.task is not Task.NUCLEI or config.window.side_px is not None:
        return config
    train = OcelotFolder(root, Split.TRAIN, labels=False)
    mpp = Resolution.of(train.metadata[sid] for sid in train.ids).cell_mpp
    side = window_side(config.window.side_um, mpp, config.model.depth)
    return Config.from_dict({**config.to_dict(), "window": {**config.to_dict()["window"], "side_px": side}})


def datamodule_for(config: Config, root: Path, context: ContextFn | None) -> L.LightningDataModule:
    """The data of a run: cell or tissue images with their targets, or for ``task: nuclei`` the windows
    centred on each labelled cell (``window.side_px`` must be set: `resolved_window`).
    """
    data = config.data
    if config.task is Task.NUCLEI:
        side = config.window.side_px
        if side is None:
            raise ValueError("window.side_px is not set: resolve it first (resolved_window)")
        return WindowDataModule(root, side, config.window.jitter, data.train_fraction, data.batch_size,
                                data.num_workers, config.train.seed, context=context, stratify=data.stratify)
    return SegmentationDataModule(root, config.task, data.cell_target, data.crop_size, data.train_fraction,
                                  data.batch_size, data.num_workers, config.train.seed, context=context,
                                  nuclei=data.nuclei, stratify=data.stratify)


def checked_inputs(config: Config) -> tuple[Path, ContextFn | None]:
    """The dataset folder (checked whole) and the tissue context of a run, before any output.

    Refuses built-in synthetic data for ``data.require_real`` and otherwise says loudly that
    it is used; a missing or wrong tissue model, or Lightning settings that Lightning refuses
    (`check_trainer`), are a `ConfigError`.
    """
    synthetic = None if config.data.root else config.data.synthetic
    if synthetic is not None and config.data.require_real:
        raise ConfigError(REQUIRE_REAL)  # before generating data or any output of the run
    if synthetic is not None and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        log.warning(synthetic_notice(synthetic))
    if config.train.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.accelerator={config.train.accelerator}: PyTorch sees no GPU here (use auto or cpu)")
    check_trainer(config)
    root = data_root(config)
    check_data(root)
    _check_fits(config, root)
    try:
        context = run_context(config.data)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"data.tissue_model: {error}") from None
    return root, context


def _check_fits(config: Config, root: Path) -> None:
    """The dataset can train this config: training and validation splits not empty, instance labels
    for ``task: nuclei`` and ``data.nuclei`` (`_check_instance_labels`), and random crops no larger
    than the smallest training image (from the metadata's patch sizes).
    """
    for split in (Split.TRAIN, Split.VAL):
        if not len(OcelotFolder(root, split, labels=False)):
            raise ConfigError(f"{root}: the {split.value} split is empty; training needs it")
    crop = config.data.crop_size
    train = OcelotFolder(root, Split.TRAIN, labels=False)
    if config.task is Task.NUCLEI:
        _check_instance_labels(root, "task nuclei")
        return
    if config.data.nuclei:
        _check_instance_labels(root, "data.nuclei")
    sizes = [meta.tissue_size if config.task is Task.TISSUE else meta.cell_size
             for meta in (train.metadata[sid] for sid in train.ids)]
    smallest = min((s for s in sizes if s is not None), default=None)
    if crop is not None and smallest is not None and crop > smallest:
        raise ConfigError(f"data.crop_size={crop} is larger than the smallest training image of {root} "
                          f"({smallest} px): use data.crop_size={smallest} or less, or null for whole images")


def _check_instance_labels(root: Path, what: str) -> None:
    """Every training and validation sample has nucleus instance labels, which ``what`` (a task or a
    key) trains on; else a one-line `ConfigError` naming the first sample without them.
    """
    for split in (Split.TRAIN, Split.VAL):
        folder = OcelotFolder(root, split, labels=False)
        bare = [sid for sid in folder.ids if "cell_instances" not in folder.paths(sid)]
        if bare:
            raise ConfigError(f"{root}: {what} trains on nucleus instance labels, and {len(bare)} "
                              f"{split.value} sample(s) have none (the first: annotations/{split.value}/"
                              f"cell_instances/{bare[0]}.png); OCELOT has only points")


def check_trainer(config: Config) -> None:
    """Refuse, before any output, a ``train.strategy`` or ``train.precision`` that Lightning refuses
    with the config's accelerator and devices (a ConfigError naming the key), as a Trainer of
    them would at the start of training.
    """
    settings: dict[str, Any] = {"accelerator": config.train.accelerator, "devices": config.train.devices}
    for key, value in (("strategy", config.train.strategy), ("precision", config.train.precision)):
        probe: dict[str, Any] = {**settings, key: value}
        try:
            with _lightning_notices(False), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a precision Lightning replaces says so again when training
                L.Trainer(**probe, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
        except (ValueError, TypeError, MisconfigurationException) as error:
            option = " (--strategy)" if key == "strategy" else ""
            raise ConfigError(f"train.{key}={value!r}{option}: Lightning refuses it: {' '.join(str(error).split())}"
                              ) from None
        settings[key] = value


def _synthetic_record(config: Config) -> tuple[str, str] | None:
    """What ``synthetic.txt`` records for a run on the built-in synthetic data (None otherwise)."""
    synthetic = None if config.data.root else config.data.synthetic
    return synthetic and (synthetic_record(synthetic), synthetic_notice(synthetic))


@contextlib.contextmanager
def _started(config: Config, root: Path, runs: Path | str, run_dir: Path | str | None,
             resuming: bool) -> Iterator[Path]:
    """The run folder, made and started (config, dataset, synthetic origin) by rank 0, for a block
    that prepares the training in it; DDP's other processes, which re-launch this command, join
    rank 0's folder. If the start or the block fails, what this call made is removed again: the
    folder (and the folders above it that it made), or, in a given folder that was empty,
    everything in it; a resumed run's folder is left as the failure left it.
    """
    launched = os.environ.get(_RUN_DIR_ENV) if int(os.environ.get("LOCAL_RANK", "0")) > 0 else None
    if launched:
        yield Path(launched)
        return
    target = Path(run_dir) if run_dir is not None else Path(runs)
    made = next((p for p in reversed([target, *target.parents]) if not p.exists()), None)
    try:
        if run_dir is None:
            folder = Run.create(runs, config.name).path
            made = made or folder
        else:
            folder = Path(run_dir)
            folder.mkdir(parents=True, exist_ok=True)  # empty: fit checked it before any output
    except OSError as error:
        raise OutputError(f"{target}: cannot make the run folder ({error.strerror or error})") from error
    try:
        Run(folder).record_start(config, root, _synthetic_record(config))
        if resuming:
            _set_aside_metrics(folder)
        yield folder
    except BaseException:
        if not resuming:
            _remove_made(folder, made)
        raise
    os.environ[_RUN_DIR_ENV] = str(folder.resolve())


def _remove_made(run_dir: Path, made: Path | None) -> None:
    """Remove ``made`` (the highest folder a failed start made), or the contents of ``run_dir``."""
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
        return
    for entry in run_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


class EpochSeed(L.Callback):
    """Seeds every random generator from (seed, epoch) as each training epoch starts.

    The training draws themselves (order, crops, augmentation) are keyed by (seed, epoch,
    position) in `EpochShuffle`; this keeps anything else that
    draws from the global generators (a user's callback, a model with dropout) a function of the
    epoch too, not of what ran before it in this process (a resumed run ran its own sanity check
    and validation in between).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        L.seed_everything(self.seed * 100_003 + trainer.current_epoch, workers=True, verbose=False)


class StepCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every N training steps, except after an epoch's last batch.

    Resumed from a checkpoint taken there, Lightning counts the epoch as done and skips its
    validation, so the best checkpoint (and a plateau schedule, early stopping) would go another
    way than in the uninterrupted run; the epoch-end checkpoint, written after the validation,
    stands for that step instead (tests/training/test_fit.py kills a run at every save).
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: STEP_OUTPUT, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx + 1 < trainer.num_training_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all, with the partial file in the checkpoint's own folder.

    The bytes go to ``.NAME.partial-PID`` beside the destination, are flushed to disk and then
    renamed over it (one atomic step on a local file system). Lightning's own writer keeps its
    partial file in the system temp folder, where a kill leaves it behind unseen.
    `remove_stale_partials` clears those of killed processes when a run starts or resumes.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with written_whole(path) as partial, partial.open("wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the partial checkpoint files that killed processes left in ``folder``; returns them."""
    return remove_stale(folder, ".*.partial-*")


def _trainer(config: Config, run_dir: Path, progress: bool, callbacks: list) -> L.Trainer:
    """Lightning's Trainer for a run: its config's devices and precision, the run's loggers, and
    two checkpoints (best by val/loss or val/mf1, ``train.select``, and the last epoch, also every
    ``train.checkpoint_every_n_steps`` steps), written atomically by `AtomicCheckpointIO`.
    """
    folder = Run(run_dir).checkpoints
    remove_stale_partials(folder)
    select = config.train.select  # val/loss (lowest) or val/mf1 (highest)
    best = ModelCheckpoint(dirpath=folder, filename="best", monitor=select.metric, mode=select.mode,
                           save_top_k=1, enable_version_counter=False)
    # Lightning's save_last only writes when a best checkpoint is written; these write every epoch
    # (and every N steps)
    # at the end of every training epoch, also where it is not validated (train.val_every > 1)
    lasts = [ModelCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1,
                             enable_version_counter=False, save_on_train_epoch_end=True)]
    if config.train.checkpoint_every_n_steps:
        lasts.append(StepCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1,
                                    enable_version_counter=False,
                                    every_n_train_steps=config.train.checkpoint_every_n_steps))
    # early stopping follows the loss whatever selects the checkpoint: a validation mF1 can sit at a low plateau
    # for many epochs early in training while the loss still falls (a run stopped there never learns)
    stopping = ([EarlyStopping(monitor="val/loss", mode="min", patience=config.train.early_stopping)]
                if config.train.early_stopping else [])
    # the config's precision is any string Lightning takes (it checks it); Lightning's Literal of them is private
    return L.Trainer(default_root_dir=run_dir, max_epochs=config.train.epochs, accelerator=config.train.accelerator,
                     devices=config.train.devices, strategy=config.train.strategy,
                     precision=config.train.precision,  # pyright: ignore[reportArgumentType]
                     logger=build_loggers(config, run_dir),
                     callbacks=[EpochSeed(config.train.seed), *stopping,
                                *([LearningRateMonitor("epoch")] if config.train.loggers else []), best, *lasts,
                                *callbacks],
                     plugins=[AtomicCheckpointIO()], use_distributed_sampler=False,
                     log_every_n_steps=1, check_val_every_n_epoch=config.train.val_every,
                     enable_progress_bar=progress, enable_model_summary=progress,
                     limit_train_batches=config.train.limit_train_batches, deterministic=False)


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """Training's warnings filters, and Lightning's notices (devices, tips) held back without
    progress output (studies, tests).
    """
    with _lightning_notices(progress), warnings.catch_warnings():
        # Lightning's own deprecations and a notice about our GPU-side augmentation hook
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # resuming writes into it
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
        yield


@contextlib.contextmanager
def _lightning_notices(shown: bool):
    """Lightning's rank-zero notices at INFO shown or (``shown=False``) held back for the block."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    if not shown:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _set_aside_metrics(run_dir: Path) -> None:
    """Lightning's CSV logger starts metrics.csv afresh; keep the rows of earlier attempts."""
    current = Run(run_dir).metrics
    if current.is_file():
        k = len(list(run_dir.glob("metrics-part*.csv")))
        current.rename(run_dir / f"metrics-part{k}.csv")


def merge_metrics(run_dir: Path) -> None:
    """Fold the metrics of earlier attempts (metrics-part*.csv) into metrics.csv, in step order.

    Rows of an attempt that reach past the step where the next attempt resumed are dropped:
    the resumed run redoes them.
    """
    import csv

    parts = sorted(run_dir.glob("metrics-part*.csv"), key=lambda p: int(p.stem.removeprefix("metrics-part")))
    if not parts:
        return
    metrics = Run(run_dir).metrics
    attempts = [list(csv.DictReader(p.open())) for p in [*parts, metrics] if p.is_file()]
    rows: list[dict] = []
    for k, attempt in enumerate(attempts):
        if k + 1 < len(attempts) and attempts[k + 1]:
            resumed_at = min(int(r["step"]) for r in attempts[k + 1])
            attempt = [r for r in attempt if int(r["step"]) < resumed_at]
        rows.extend(attempt)
    fields = list(dict.fromkeys(key for attempt in attempts for row in attempt for key in row))
    with written_whole(metrics) as partial, partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    for part in parts:
        part.unlink()


def train_or_reuse(config: Config, run_dir: Path, progress: bool = True) -> bool:
    """Train ``config`` into ``run_dir`` unless a finished run of it is there; True if reused.

    A folder holding anything else (another config, an unfinished run) is replaced.
    """
    if Run(run_dir).finished(config):
        return True
    if run_dir.exists():
        shutil.rmtree(run_dir)
    fit(config, run_dir=run_dir, progress=progress)
    return False
