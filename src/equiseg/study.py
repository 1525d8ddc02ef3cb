"""``equiseg study``: does equivariance beat augmentation when data is scarce?

A study trains every (variant, training fraction, seed) of its config, evaluates each model on
the test split (scores, rotation robustness, equivariance certificate, and test-time
augmentation for the plain variants), caches each result beside its run, and writes one
report. Finished runs and evaluations are reused, so an interrupted study resumes.

Study config (YAML)::

    name: study-small
    base: plain-small                       # data, train and detect settings shared by all runs
    overrides: [data.synthetic.size=256]    # applied to the base
    reference_width: 8                      # plain width whose parameter count the others match
    variants:                               # label -> family (+ augmentation preset, + width)
      plain: {family: plain, augment: none}
      plain+heavy: {family: plain, augment: heavy}
      isotropic: {family: isotropic}
      isotropic+ctx: {family: isotropic, context: model}   # + tissue context (see below)
      c8+blur: {family: c8, pool: blur}       # anti-aliased downsampling (model.pool)
    tissue: [model.family=p4m, model.width=4]  # overrides of the base for the tissue model
    fractions: [0.25, 1.0]
    train_images: [2, 8, 32]                # instead of fractions: that many training images
    seeds: [0, 1, 2]
    equal_steps: true                       # epochs / fraction, so every fraction gets the same steps
    lr_search: [3.0e-4, 1.0e-3, 3.0e-3]     # each variant's learning rate, chosen on the validation split
                                            # (or a variant's own ``lr: 0.01``, a rate fixed by a stated rule)
    baseline: plain+heavy                   # every other variant against it, paired, with bootstrap intervals
    robustness: true                        # rotation robustness and TTA (false: scores and certificate only)
    angles: [15, 30, 45]
    gc_input: /data/ocelot/gc_input         # optional: a real Grand Challenge input folder

``base`` is a preset name (``equiseg presets``), a YAML file beside the study config, or any
path to one; the study config itself (``equiseg study -c``) is a preset name or a path too.

The equivariance certificate is also measured on a real OCELOT patch when a Grand Challenge
input folder (``images/{cell,tissue}_patches``, ``metadata.json``) is given: by the study
config's ``gc_input`` key, else by the environment variable ``EQUISEG_GC_INPUT``; a folder
given that is not there is an error. Without either the certificate covers the test images only.

Fairness and convergence: with ``lr_search``, each variant without a rate of its own (``lr``)
first trains once per rate (the largest training set, the first seed, into ``runs/_lr``) and
takes the rate whose best validation loss is lowest, for all its runs (a variant's own ``lr``
is used as stated, not searched; the search's run at the chosen rate is the same config as the
variant's cell at the largest training set and first seed, and is copied there, not trained
again); the base's ``train.early_stopping`` and ``train.schedule`` (see the run config) stop
each run at its plateau, within ``epochs`` (times 1 / fraction with ``equal_steps``). The report gives each run's best epoch and flags runs
whose best epoch was their last (not converged).

Statistics: every variant is compared with ``baseline`` at each training set, paired (same
seed, same data subset, same test images), by a bootstrap over seeds and test images
(`equiseg.evaluation.bootstrap`); a verdict only where the 95 % interval excludes 0.

Variants with ``context`` (``truth`` or ``model``, as ``data.context``) get the tissue-class
maps of one tissue model as extra input; that model is trained first (``task: tissue``, the
base with the ``tissue`` overrides, the full training split, seed 0) into ``runs/_tissue``.
Context variants take the width of their family (only the first conv grows) and are evaluated
with the tissue model's predictions, and also with the ground-truth tissue mask ("oracle").
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from equiseg.config import Config, ConfigError, apply_overrides, from_plain, read_yaml
from equiseg.data.augment import AugmentPreset
from equiseg.data.context import ContextFn, ContextKind, cached, truth_context
from equiseg.data.datamodule import model_input, training_subset
from equiseg.data.ocelot import GrandChallengeInput, OcelotFolder
from equiseg.datasets import REQUIRE_REAL, generate_synthetic, synthetic_notice
from equiseg.evaluation.data_record import DataRecord
from equiseg.evaluation.equivariance import GroupTTA, certificate
from equiseg.evaluation.evaluate import Evaluation, evaluate_model
from equiseg.evaluation.robustness import standard_transforms
from equiseg.evaluation.tissue_context import run_context
from equiseg.groups import D4
from equiseg.models import ConvFamily, Pooling, count_parameters, match_width, parameter_count
from equiseg.presets import preset_path
from equiseg.report.plots import best_and_worst
from equiseg.report.results import (
    Case,
    CasePicture,
    Certificate,
    LRTrial,
    Result,
    ResultFormatError,
    RunResult,
    StudyResult,
    TissueResult,
    TransformScores,
    TTAResult,
    from_json,
    save_cases,
    to_json,
)
from equiseg.report.study_report import write_report
from equiseg.runs import Run, load_model
from equiseg.runtime import Runtime
from equiseg.scale import Executor, LocalExecutor
from equiseg.training.fit import train_or_reuse

GC_INPUT_ENV = "EQUISEG_GC_INPUT"


@dataclass(frozen=True)
class Variant:
    """One row of the study: a conv family, an augmentation preset, a width (None: matched), the
    tissue context it takes, a learning rate of its own (None: the base's, or the search's) and
    its downsampling (``pool``: None, the base's ``model.pool``; or ``max`` / ``blur``)."""

    label: str
    family: ConvFamily
    augment: AugmentPreset = AugmentPreset.NONE
    width: int | None = None
    context: ContextKind = ContextKind.NONE
    lr: float | None = None
    pool: Pooling | None = None


@dataclass(frozen=True)
class StudyConfig:
    name: str
    base: dict
    variants: tuple[Variant, ...]
    reference_width: int = 16
    fractions: tuple[float, ...] = (0.25, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    equal_steps: bool = True
    angles: tuple[float, ...] = (15.0, 30.0, 45.0)
    gc_input: str | None = None
    tissue: tuple[str, ...] = ()
    train_images: tuple[int, ...] = ()
    lr_search: tuple[float, ...] = ()
    baseline: str | None = None
    robustness: bool = True
    bootstrap: int = 2000

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("no variants")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError("fractions must lie in (0, 1]")
        if any(n < 1 for n in self.train_images):
            raise ValueError("train_images must be at least 1 each")
        if any(not lr > 0 for lr in self.lr_search):
            raise ValueError("lr_search rates must be > 0")
        if self.baseline is not None and self.baseline not in {v.label for v in self.variants}:
            raise ValueError(f"baseline {self.baseline!r} is not a variant ({', '.join(v.label for v in self.variants)})")

    def training_fractions(self, available: int) -> tuple[float, ...]:
        """The fractions of the training split the study trains on: ``train_images`` of the
        ``available`` images when given, else ``fractions``.

        Raises:
            ConfigError: more training images asked for than there are.
        """
        if not self.train_images:
            return self.fractions
        if max(self.train_images) > available:
            raise ConfigError(f"train_images asks for {max(self.train_images)} images; the training split has "
                              f"{available}")
        return tuple(n / available for n in sorted(self.train_images))

    @classmethod
    def from_yaml(cls, path: Path | str) -> StudyConfig:
        """Read a study config: ``path`` is a YAML file or a preset name (``study-small``).

        Parsed as run configs are (`equiseg.config.from_plain`); ``base`` (a mapping, a
        preset name or a file beside the study config) gets the ``overrides`` and is checked as
        a run config, and ``variants`` maps labels to `Variant` fields.
        """
        path = preset_path(path)
        data = read_yaml(path)
        base = data.pop("base", {})
        if isinstance(base, str):
            beside = path.parent / base
            base = read_yaml(beside if beside.is_file() else preset_path(base))
        base = apply_overrides(base, data.pop("overrides", []))
        Config.from_dict(base)  # validate early
        variants = data.pop("variants", None) or {}
        if not isinstance(variants, dict):
            raise ConfigError(f"{path}: variants must map labels to their family, augment, width and context")
        data["variants"] = tuple(from_plain(Variant, {"label": label, **(spec or {})}, f"{path}: variants.{label}")
                                 for label, spec in variants.items())
        return from_plain(cls, {"name": path.stem, **data, "base": base}, str(path))

    @property
    def uses_context(self) -> bool:
        return any(v.context is not ContextKind.NONE for v in self.variants)

    def tissue_config(self, data_root: str) -> Config:
        """The tissue model's run config: the base, the ``tissue`` overrides, task tissue."""
        overrides = ["name=tissue", "task=tissue", "data.augment=none", f"data.root={data_root}", *self.tissue]
        return Config.from_dict(apply_overrides(self.base, overrides))

    def run_config(self, variant: Variant, fraction: float, seed: int, width: int, data_root: str,
                   tissue_model: str | None = None, lr: float | None = None) -> Config:
        """The full run config of one cell of the matrix (``tissue_model``: for context variants;
        ``lr``: the variant's learning rate, else the base's)."""
        base = Config.from_dict(self.base)
        epochs, val_every = base.train.epochs, base.train.val_every
        if self.equal_steps:
            # the same steps, and a validation after the same number of steps, at every fraction
            epochs, val_every = max(1, round(epochs / fraction)), max(1, round(val_every / fraction))
        overrides = [f"name={variant.label}-f{fraction:g}-s{seed}", f"model.family={variant.family.value}",
                     f"model.width={width}", f"data.augment={variant.augment.value}", f"data.train_fraction={fraction}",
                     f"train.seed={seed}", f"train.epochs={epochs}", f"train.val_every={val_every}",
                     f"data.root={data_root}"]
        if lr is not None:
            overrides.append(f"train.lr={lr}")
        if variant.pool is not None:
            overrides.append(f"model.pool={variant.pool.value}")
        if variant.context is not ContextKind.NONE:
            if tissue_model is None:
                raise ValueError(f"variant {variant.label} takes tissue context: a tissue model is needed")
            overrides += [f"data.context={variant.context.value}", f"data.tissue_model={tissue_model}"]
        return Config.from_dict(apply_overrides(self.base, overrides))


def matched_widths(study: StudyConfig) -> dict[str, int]:
    """Each variant's width: given, or matched to plain ``reference_width``'s parameter count."""

    depth = Config.from_dict(study.base).model.depth
    reference = parameter_count("plain", study.reference_width, depth)
    return {v.label: v.width or match_width(v.family, reference, depth) for v in study.variants}


"""The pictures of a run's best and worst test image, beside its study.json."""


def evaluate_run(run_dir: Path, root: Path, study: StudyConfig, cell: tuple[Variant, float, int], gc_samples: list,
                 contexts: dict[str, ContextFn] | None = None, runtime: Runtime | None = None,
                 with_cases: bool = False) -> RunResult:
    """Scores, robustness, certificate and (plain models) TTA of the trained run of ``cell``
    (variant, fraction, seed); cached in the run's study.json.

    A model with tissue context is scored with its tissue model's predictions and, as
    ``oracle``, with the ground-truth tissue mask. ``contexts`` holds context functions shared
    between runs (keyed by tissue model, and "truth"), so each tissue map is computed once.
    ``runtime``: where and how the model runs (default: the CPU, batch 1, float32); the
    certificate is always measured in float32 with TF32 off. ``with_cases``: keep the best and
    worst test image's pictures for the report (a cache without them is recomputed); until the
    test split is done every image's probabilities are held as float16, C x H x W x 2 bytes each.
    A cache that is not this version's (an older equiseg's) is recomputed too.
    """

    cache = Run(run_dir).study_cache
    known = _read_cache(cache, RunResult)
    if known is not None and (not with_cases or (known.cases_file and (run_dir / known.cases_file).is_file())):
        return known
    contexts = {} if contexts is None else contexts
    runtime = runtime or Runtime()
    model, config = load_model(run_dir, runtime.device)
    context = _study_context(config, contexts, runtime.device)
    # every test image's probabilities (float16, on the CPU) until the best and worst are known
    kept: dict[int, np.ndarray] = {}

    def keep(i: int, _: str, probs: torch.Tensor) -> None:
        kept[i] = probs.half().cpu().numpy()

    start = time.perf_counter()
    plain_eval = evaluate_model(model, config, root, "test", tile=None, context=context, runtime=runtime,
                                keep=keep if with_cases else None)
    seconds = time.perf_counter() - start
    oracle = None
    if context is not None:
        truth = contexts.setdefault("truth", cached(truth_context))
        oracle = evaluate_model(model, config, root, "test", tile=None, context=truth, oracle=True,
                                runtime=runtime).scores
    variant, fraction, seed = cell
    best_epoch, epochs_trained = Run(run_dir).best_epoch() or (-1, -1)
    result = RunResult(
        variant=variant.label, augment=variant.augment.value, fraction=fraction, seed=seed, run_dir=str(run_dir),
        reused=False, parameters=count_parameters(model), family=config.model.family, width=config.model.width,
        context=config.data.context, scores=plain_eval.scores, per_image=tuple(plain_eval.per_image),
        seconds=seconds, oracle=oracle,
        robustness=_robustness(model, config, root, study, context, runtime) if study.robustness else (),
        certificate=_certificate(model, config, root, gc_samples, context, study.angles),
        tta=_tta(model, config, root, context, runtime) if study.robustness else None,
        lr=config.train.lr, train_count=len(training_subset(len(OcelotFolder(root, "train")), fraction, seed)),
        best_epoch=best_epoch, epochs_trained=epochs_trained)
    if with_cases:
        cases = _save_cases(Run(run_dir).study_cases, root, plain_eval, kept)
        result = replace(result, cases=cases, cases_file=Run(run_dir).study_cases.name)
    cache.write_text(to_json(result))
    return result


def _read_cache(path: Path, kind: type[Result]) -> Result | None:
    """The result cached at ``path``; None when there is none or it is not this version's form."""
    if not path.is_file():
        return None
    try:
        return from_json(kind, path.read_text())
    except ResultFormatError:
        return None


def _robustness(model: torch.nn.Module, config: Config, root: Path, study: StudyConfig, context: ContextFn | None,
                runtime: Runtime) -> tuple[TransformScores, ...]:
    """Test scores under each D4 element and each rotation by ``study.angles``."""
    out = []
    for t in standard_transforms(study.angles):
        scores = evaluate_model(model, config, root, "test", tile=None, transform=t, context=context,
                                runtime=runtime).scores
        g = t.element
        out.append(TransformScores(t.name, d4=g is not None, flip=g is not None and g.flip,
                                   degrees=t.degrees if g is None else 90.0 * g.rotation, scores=scores))
    return tuple(out)


def _certificate(model: torch.nn.Module, config: Config, root: Path, gc_samples: list,
                 context: ContextFn | None, study_angles: tuple[float, ...]) -> Certificate:
    """The equivariance certificate on (up to) four test images and, if given, the real patch(es), at the
    study's angles."""
    test = OcelotFolder(root, "test")
    samples = [test[i] for i in range(min(len(test), 4))]
    images = [model_input(s.cell_image, context and context(s)) for s in samples]
    group = config.model.family.group or D4
    real = None
    if gc_samples:
        # the real patch, cropped to 512 px to keep it cheap; its context from the whole tissue patch
        crops = [model_input(s.cell_image, context and context(s))[:, 256:768, 256:768] for s in gc_samples]
        real = certificate(model, crops, group, study_angles)
    return Certificate(group.name, certificate(model, images, group, study_angles), real)


def _tta(model: torch.nn.Module, config: Config, root: Path, context: ContextFn | None,
         runtime: Runtime) -> TTAResult | None:
    """D4 test-time augmentation of a plain model (None for the others: they are invariant already)."""
    if config.model.family is not ConvFamily.PLAIN:
        return None
    start = time.perf_counter()
    scores = evaluate_model(GroupTTA(model, D4), config, root, "test", tile=None, context=context,
                            runtime=runtime).scores
    return TTAResult(scores, time.perf_counter() - start)


def _save_cases(path: Path, root: Path, evaluation: Evaluation, probs: dict[int, np.ndarray]) -> tuple[Case, ...]:
    """Keep the best and worst test image (by Dice, among images with cells) and their pictures at ``path``."""
    test = OcelotFolder(root, "test")
    chosen = best_and_worst(evaluation.per_image, [len(test.cells(i)) > 0 for i in range(len(test))])
    cases = tuple(Case(kind, i, evaluation.ids[i], evaluation.per_image[i]["dice/mean"]) for kind, i in chosen)
    samples = {c.index: test[c.index] for c in cases}  # only the two pictured images are decoded
    save_cases(path, {c.kind: CasePicture(samples[c.index].cell_image, probs[c.index],
                                          np.asarray(evaluation.points[c.index]), np.asarray(samples[c.index].cells))
                      for c in cases})
    return cases


def _study_context(config: Config, contexts: dict[str, ContextFn], device: torch.device | None = None
                   ) -> ContextFn | None:
    """The evaluation context of a run (its tissue model's predictions), shared through ``contexts``."""
    if config.data.context is ContextKind.NONE:
        return None
    key = str(config.data.tissue_model)
    if key not in contexts:
        contexts[key] = cached(run_context(config.data, evaluation=True, device=device))
    return contexts[key]


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
    finished = [0]

    def report(k: int, result: RunResult) -> None:
        finished[0] += 1
        variant, _, seed = cells[k]
        say(f"[{finished[0]}/{len(cells)}] {variant.label} n={result.train_count} s={seed}: "
            f"{'reused' if result.reused else 'trained'} (best epoch {result.best_epoch + 1} of "
            f"{result.epochs_trained}); mF1 {result.scores.get('mf1', math.nan):.3f}, Dice "
            f"{result.scores['dice/mean']:.3f} ({(time.time() - started) / 60:.1f} min so far)")

    results = executor.map(train_and_evaluate, jobs, report)
    summary = StudyResult(study.name, tuple(results), available,
                          len(OcelotFolder(root, "test")), minutes=(time.time() - started) / 60,
                          reused=sum(r.reused for r in results), tissue=tissue, baseline=study.baseline,
                          lr_trials=trials, bootstrap=study.bootstrap, data=data)
    (out / "results.json").write_text(to_json(summary))
    return write_report(summary, out / "report")


def study_data(base: Config, out: Path, say: Callable[[str], None] = print) -> tuple[Path, DataRecord]:
    """The dataset folder of a study on ``base`` and its record: ``data.root``, or the built-in
    synthetic data of ``data.synthetic``, generated into ``out/data`` (and said so)."""
    if base.data.root:
        return Path(base.data.root), DataRecord.of_folder(base.data.root)
    say(synthetic_notice(base.data.synthetic))
    root = generate_synthetic(out / "data", base.data.synthetic)
    return root, DataRecord.of_synthetic(base.data.synthetic, root)


def train_and_evaluate(config: Config, run_dir: Path, root: Path, study: StudyConfig,
                       cell: tuple[Variant, float, int], gc_samples: list, contexts: dict[str, ContextFn] | None,
                       runtime: Runtime, with_cases: bool) -> RunResult:
    """One job of a study: train ``config`` into ``run_dir`` (or reuse it) and evaluate it
    (`evaluate_run`); a plain function of picklable arguments, for any executor."""
    reused = train_or_reuse(config, run_dir, progress=False)
    result = evaluate_run(run_dir, root, study, cell, gc_samples, contexts, runtime, with_cases)
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
    the same config trained twice would give the same run (training is seeded), so once is enough."""
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
    validation loss is chosen (ties: the smaller rate). Nothing without ``lr_search``."""
    searched = [v for v in study.variants if v.lr is None] if study.lr_search else []
    grid = [(variant, lr) for variant in searched for lr in sorted(study.lr_search)]
    jobs = [(study.run_config(variant, fraction, study.seeds[0], widths[variant.label], str(root),
                              tissue and tissue.run_dir, lr), _search_dir(out, variant.label, lr))
            for variant, lr in grid]
    found = (executor or LocalExecutor()).map(_train_job, jobs)
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


def evaluate_tissue(run_dir: Path, root: Path, runtime: Runtime | None = None) -> TissueResult:
    """The tissue model's test scores (Dice, mIoU), cached in study.json beside it."""

    cache = Run(run_dir).study_cache
    known = _read_cache(cache, TissueResult)
    if known is not None:
        return known
    runtime = runtime or Runtime()
    model, config = load_model(run_dir, runtime.device)
    result = TissueResult(str(run_dir), config.model.family, config.model.width, count_parameters(model),
                          evaluate_model(model, config, root, "test", tile=None, runtime=runtime).scores)
    cache.write_text(to_json(result))
    return result


def real_samples(study: StudyConfig) -> list:
    """The real Grand Challenge pair(s) of ``study.gc_input``, else of ``$EQUISEG_GC_INPUT``; [] with neither.

    Raises:
        ConfigError: the folder given is not there (checked before any run trains).
    """

    if study.gc_input:
        path, source = study.gc_input, "gc_input"
    elif os.environ.get(GC_INPUT_ENV):
        path, source = os.environ[GC_INPUT_ENV], GC_INPUT_ENV
    else:
        return []
    if not Path(path).is_dir():
        raise ConfigError(f"{source}: {path} is not a folder (a Grand Challenge input: images/, metadata.json)")
    data = GrandChallengeInput(path)
    return [data[i] for i in range(len(data))]
