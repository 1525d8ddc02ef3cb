"""The study matrix run here or on Ray: the data, the learning-rate search, the tissue model, every
(variant, training set, seed) trained and evaluated (finished ones reused), then results.json and the report.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from equiseg.config import Config, ConfigError
from equiseg.data.context import ContextFn
from equiseg.data.ocelot import OcelotFolder
from equiseg.data.targets import Task
from equiseg.datasets import REQUIRE_REAL, generate_synthetic, synthetic_notice
from equiseg.evaluation.data_record import DataRecord
from equiseg.evaluation.tune_detect import tune_detection
from equiseg.report.results import (
    LRTrial,
    RunResult,
    StudyResult,
    TissueResult,
    to_json,
)
from equiseg.report.study_report import write_report
from equiseg.runs import Run
from equiseg.runtime import Runtime
from equiseg.scale import Executor, LocalExecutor
from equiseg.study.config import StudyConfig, Variant, matched_widths, real_samples, stage2_config, stage2_dir
from equiseg.study.evaluation import evaluate_study_run, evaluate_tissue
from equiseg.training.fit import train_or_reuse


def run_study(study: StudyConfig, out: Path, say: Callable[[str], None] = print,
              runtime: Runtime | None = None, executor: Executor | None = None) -> Path:
    """Train and evaluate the whole matrix (reusing what is finished), write results.json (with the
    data it ran on, `study_data`) and the report.

    Training follows each run config's ``train.accelerator``; evaluation runs on ``runtime``
    (default: this machine's GPU when there is one, batch 1, float32). ``executor`` runs the
    trainings and their evaluations (`equiseg.scale`: one after another here by default,
    or as Ray tasks, each on the device Ray gives it); the tissue model, the data and the
    report stay in this process.
    """
    base = Config.from_dict(study.base)
    if not base.data.root and base.data.require_real:
        raise ConfigError(f"study {study.name}: {REQUIRE_REAL}")  # before anything is written
    runtime = runtime or Runtime.of("auto")
    executor = executor or LocalExecutor()
    out.mkdir(parents=True, exist_ok=True)
    root, data = study_data(base, out, say)
    widths = matched_widths(study)
    gc_samples = real_samples(study)
    available = len(OcelotFolder(root, "train"))
    fractions = study.training_fractions(available)
    cells = [(v, f, s) for v in study.variants for f in fractions for s in study.seeds]
    say(f"study {study.name}: {len(study.variants)} variants x {len(fractions)} training sets x "
        f"{len(study.seeds)} seeds = {len(cells)} runs; widths {widths}")
    started = time.time()
    tissue = _tissue_model(study, out, root, runtime, say) if study.uses_context else None
    trials = _lr_search(study, out, root, widths, max(fractions), tissue, say, executor)
    rates = {v.label: v.lr for v in study.variants if v.lr is not None} | {t.variant: t.lr for t in trials if t.chosen}
    # the search trained each searched variant's first cell at its chosen rate already
    searched = {t.variant: _search_dir(out, t.variant, t.lr) for t in trials if t.chosen}
    # a local executor shares one context cache between runs (each tissue map computed once);
    # remote jobs make their own
    contexts: dict[str, ContextFn] | None = {} if isinstance(executor, LocalExecutor) else None
    job_runtime = runtime if isinstance(executor, LocalExecutor) else _remote_runtime(runtime, executor)
    jobs = []
    for variant, fraction, seed in cells:
        config = study.run_config(variant, fraction, seed, widths[variant.label], str(root),
                                  tissue and tissue.run_dir, rates.get(variant.label))
        run_dir = out / "runs" / variant.label / f"f{fraction:g}" / f"s{seed}"
        # a variant's first cell: its first seed at the full fraction, where the search ran and
        # whose cases the report's figure shows
        first_cell = fraction == max(fractions) and seed == study.seeds[0]
        if first_cell and variant.label in searched:
            _take_search_run(searched[variant.label], run_dir, config, say)
        jobs.append((config, run_dir, root, study, (variant, fraction, seed), gc_samples, contexts, job_runtime,
                     first_cell))
    results = executor.map(train_and_evaluate, jobs, _announcer(cells, started, say))
    summary = StudyResult(study.name, tuple(results), available,
                          len(OcelotFolder(root, "test")), minutes=(time.time() - started) / 60,
                          reused=sum(r.reused for r in results), tissue=tissue, baseline=study.baseline,
                          lr_trials=trials, bootstrap=study.bootstrap, data=data, plan=study.plan)
    (out / "results.json").write_text(to_json(summary))
    return write_report(summary, out / "report")


def _announcer(cells: list[tuple[Variant, float, int]], started: float,
               say: Callable[[str], None]) -> Callable[[int, RunResult], None]:
    """The callback that says one line as each run of the matrix finishes (in any order)."""
    finished = [0]

    def report(k: int, result: RunResult) -> None:
        finished[0] += 1
        variant, _, seed = cells[k]
        say(f"[{finished[0]}/{len(cells)}] {variant.label} n={result.train_count} s={seed}: "
            f"{'reused' if result.reused else 'trained'} (best epoch {result.best_epoch + 1} of "
            f"{result.epochs_trained}); mF1 {result.scores.get('mf1', math.nan):.3f}, Dice "
            f"{result.scores.get('dice/mean', math.nan):.3f} ({(time.time() - started) / 60:.1f} min so far)")

    return report


def study_data(base: Config, out: Path, say: Callable[[str], None] = print) -> tuple[Path, DataRecord]:
    """The dataset folder of a study on ``base`` and its record: ``data.root``, or the built-in
    synthetic data of ``data.synthetic``, generated into ``out/data`` (and said so).
    """
    if base.data.root:
        return Path(base.data.root), DataRecord.of_folder(base.data.root)
    say(synthetic_notice(base.data.synthetic))
    root = generate_synthetic(out / "data", base.data.synthetic)
    return root, DataRecord.of_synthetic(base.data.synthetic, root)


def train_and_evaluate(config: Config, run_dir: Path, root: Path, study: StudyConfig,
                       cell: tuple[Variant, float, int], gc_samples: list, contexts: dict[str, ContextFn] | None,
                       runtime: Runtime, with_cases: bool) -> RunResult:
    """One job of a study: train ``config`` into ``run_dir`` (or reuse it), with ``study.tune_detect`` choose
    its detection settings on the validation split (`tune_detection`: ``detect.yaml`` in the run, which
    every later load of it applies; once), for a two-stage variant train its stage 2 (`stage2_config`,
    into `stage2_dir`), and evaluate it (`evaluate_study_run`); a plain function of picklable arguments,
    for any executor.
    """
    reused = train_or_reuse(config, run_dir, progress=False)
    if study.tune_detect and config.task is Task.CELLS and not Run(run_dir).detect_file.is_file():
        tune_detection(run_dir, "val", runtime)
    variant, fraction, seed = cell
    if variant.stage2 is not None:  # a two-stage variant: its stage 2 on this run's cells
        second = stage2_config(study, variant, fraction, seed, str(root), run_dir)
        reused = train_or_reuse(second, stage2_dir(run_dir), progress=False) and reused
    result = evaluate_study_run(run_dir, root, study, cell, gc_samples, contexts, runtime, with_cases)
    return replace(result, reused=reused)


def _remote_runtime(runtime: Runtime, executor: Executor) -> Runtime:
    """The runtime of a job on a Ray worker: the GPU Ray gives it, or its CPUs."""
    device = torch.device("cuda") if getattr(executor, "gpus_per_run", 0) > 0 else torch.device("cpu")
    return replace(runtime, device=device)


def _search_dir(out: Path, label: str, lr: float) -> Path:
    """Where the learning-rate search trains ``label`` at ``lr``."""
    return out / "runs" / "_lr" / label / f"lr{lr:g}"


def _take_search_run(source: Path, run_dir: Path, config: Config, say: Callable[[str], None]) -> None:
    """Copy the learning-rate search's run at the chosen rate into the study's cell it equals
    (the largest training set, the first seed), unless that cell holds a finished run already:
    the same config trained twice would give the same run (training is seeded), so once is enough.
    """
    if Run(run_dir).finished(config) or not Run(source).finished(config):
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    shutil.copytree(source, run_dir)
    say(f"{config.name}: the learning-rate search's run at this rate, copied from {source}")


def _train_job(config: Config, run_dir: Path) -> tuple[float, int] | None:
    """Train (or reuse) one run; its lowest validation loss and that epoch."""
    train_or_reuse(config, run_dir, progress=False)
    return Run(run_dir).best_validation()


def _lr_search(study: StudyConfig, out: Path, root: Path, widths: dict[str, int], fraction: float,
               tissue: TissueResult | None, say: Callable[[str], None],
               executor: Executor | None = None) -> tuple[LRTrial, ...]:
    """Each variant without a rate of its own trained once per rate of ``study.lr_search`` (the
    largest training set, the first seed, into ``out/runs/_lr``); the rate with the lowest
    validation loss is chosen (ties: the smaller rate). Nothing without ``lr_search``.
    """
    searched = [v for v in study.variants if v.lr is None] if study.lr_search else []
    grid = [(variant, lr) for variant in searched for lr in sorted(study.lr_search)]
    jobs = [(study.run_config(variant, fraction, study.seeds[0], widths[variant.label], str(root),
                              tissue and tissue.run_dir, lr), _search_dir(out, variant.label, lr))
            for variant, lr in grid]
    found: list[tuple[float, int] | None] = (executor or LocalExecutor()).map(_train_job, jobs)
    trials = []
    for variant in searched:
        rows = [(lr, *(best if best is not None else (math.nan, -1)))
                for (v, lr), best in zip(grid, found) if v is variant]
        chosen = min(rows, key=lambda t: (math.inf if math.isnan(t[1]) else t[1], t[0]))[0]
        trials += [LRTrial(variant.label, lr, loss, epoch, lr == chosen) for lr, loss, epoch in rows]
        say(f"learning rate of {variant.label}: {chosen:g} (validation loss "
            + ", ".join(f"{loss:.4f} at {lr:g}" for lr, loss, _ in rows) + ")")
    return tuple(trials)


def _tissue_model(study: StudyConfig, out: Path, root: Path, runtime: Runtime,
                  say: Callable[[str], None]) -> TissueResult:
    """Train (or reuse) and evaluate the study's tissue model in ``out/runs/_tissue``."""
    tissue_dir = out / "runs" / "_tissue"
    reused = train_or_reuse(study.tissue_config(str(root)), tissue_dir, progress=False)
    tissue = evaluate_tissue(tissue_dir, root, runtime)
    say(f"tissue model ({tissue.family.value}, width {tissue.width}): {'reused' if reused else 'trained'}; "
        f"test Dice {tissue.scores['dice/mean']:.3f}, mIoU {tissue.scores['miou']:.3f}")
    return tissue
