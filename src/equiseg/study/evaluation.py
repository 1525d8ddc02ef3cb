"""One trained run of a study evaluated into a cached `RunResult`: scores, rotation robustness, the
equivariance certificate, test-time augmentation and the pictures of its best and worst cases.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from equiseg.config import Config
from equiseg.data.context import ContextFn, ContextKind, cached, truth_context
from equiseg.data.datamodule import model_input, training_subset
from equiseg.data.ocelot import OcelotFolder
from equiseg.evaluation.equivariance import GroupTTA, certificate
from equiseg.evaluation.evaluate import Evaluation, evaluate_model, evaluate_run
from equiseg.evaluation.robustness import standard_transforms
from equiseg.evaluation.tissue_context import run_context
from equiseg.groups import D4
from equiseg.models import ConvFamily, count_parameters
from equiseg.report.plots import best_and_worst
from equiseg.report.results import (
    Case,
    CasePicture,
    Certificate,
    Result,
    ResultFormatError,
    RunResult,
    TissueResult,
    TransformScores,
    TTAResult,
    from_json,
    save_cases,
    to_json,
)
from equiseg.runs import Run, load_model
from equiseg.runtime import Runtime
from equiseg.study.config import StudyConfig, Variant, stage2_dir


def evaluate_study_run(run_dir: Path, root: Path, study: StudyConfig, cell: tuple[Variant, float, int], gc_samples: list,
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
        best_epoch=best_epoch, epochs_trained=epochs_trained, epoch_budget=config.train.epochs,
        patience=(config.train.early_stopping or 1) * config.train.val_every)
    if variant.stage2 is not None:
        result = _as_two_stage(result, run_dir, root, runtime)
    if with_cases:
        cases = _save_cases(Run(run_dir).study_cases, root, plain_eval, kept)
        result = replace(result, cases=cases, cases_file=Run(run_dir).study_cases.name)
    cache.write_text(to_json(result))
    return result


def _as_two_stage(result: RunResult, run_dir: Path, root: Path, runtime: Runtime) -> RunResult:
    """A two-stage variant's result: scored as instances, stage 2 (`stage2_dir`) on the cells of the run
    at ``run_dir`` (PQ, AJI, the centroids' mF1 and their per-image counts, over stage 1's own scores),
    its parameters both stages'; Dice, mIoU, robustness, certificate and test-time augmentation stay
    stage 1's.
    """
    second = stage2_dir(run_dir)
    evaluation, config = evaluate_run(second, "test", data=root, runtime=runtime, proposals=run_dir)
    return replace(result, scores={**result.scores, **evaluation.scores}, per_image=tuple(evaluation.per_image),
                   parameters=result.parameters + count_parameters(config.build_model()))


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
    study's angles.
    """
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
        context = run_context(config.data, evaluation=True, device=device)
        assert context is not None  # a context other than NONE has its function
        contexts[key] = cached(context)
    return contexts[key]


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
