"""Score a trained model on a split: loss, Dice, IoU and the OCELOT detection score."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from equiseg.config import Config, json_text
from equiseg.data.context import ContextFn, ContextKind, truth_context
from equiseg.data.datamodule import model_input, sample_target
from equiseg.data.ocelot import CELL_CLASSES, OcelotFolder, Sample
from equiseg.data.targets import IGNORE_INDEX, Task
from equiseg.datasets import data_root
from equiseg.detection import (
    detection_scores,
    find_cells,
    match_counts,
    write_points_json,
)
from equiseg.detection.instances import cell_class_map, one_stage_instances
from equiseg.evaluation.data_record import DataRecord
from equiseg.evaluation.instance_evaluation import InstanceTally, Predictor, evaluate_instances
from equiseg.evaluation.losses import DiceCELoss
from equiseg.evaluation.metrics import confusion_matrix, segmentation_scores
from equiseg.evaluation.result import ContextSource, Evaluation
from equiseg.evaluation.tissue_context import run_context
from equiseg.files import owned_outputs
from equiseg.inference.cell_instances import two_stage_instances
from equiseg.inference.tiling import predict_probabilities
from equiseg.runs import Run, check_proposer, load_model, proposal_run
from equiseg.runtime import Runtime


def evaluate_model(model: nn.Module, config: Config, root: Path | str, split: str = "test",
                   tile: int | None = 1024, on_image: Callable[[int, int], None] | None = None,
                   keep: Callable[[int, str, torch.Tensor], None] | None = None,
                   transform: Callable | None = None, context: ContextFn | None = None, oracle: bool = False,
                   runtime: Runtime | None = None) -> Evaluation:
    """Evaluate ``model`` (eval mode) on ``split`` of the dataset at ``root``.

    Loss: Dice + cross-entropy as in training, averaged over images. Dice and IoU: from the confusion matrix
    summed over the split. Detection (cell task): cells read off each probability map with ``config.detect`` and
    scored by the OCELOT rules (15 px); a model with a nucleus output (``data.nuclei``) on images with instance
    labels is also scored as instances (`one_stage_instances`: PQ, AJI, ``blended``, ``instances/mf1``).
    ``keep(i, id, probs)`` receives each probability map (C, H, W), for pictures. ``transform`` (see
    `equiseg.evaluation.robustness`) turns each image with its labels first; only its valid region is scored.
    ``context`` gives a context model its tissue channels (default: `equiseg.data.context.run_context` of the
    config for evaluation, i.e. the tissue model's probabilities where the config names one); it is ignored
    for models without context. ``oracle=True`` feeds the ground-truth tissue mask (``context``, if given,
    must compute that) and labels the result as such; a model trained with ``data.context=truth`` and no
    tissue model is refused without it, so that oracle scores are never reported unawares. ``runtime``: device,
    tile batch and precision (default: the model's device, batch 1, float32).
    """
    task, names, folder = config.task, config.task.class_names, OcelotFolder(root, split)
    cell_target = config.data.cell_target if task is Task.CELLS else None
    loss_fn = DiceCELoss(config.train.dice_weight, config.train.ce_weight, target=cell_target)
    cm = torch.zeros(len(names), len(names), dtype=torch.long)
    points, gts, per_image, shapes = [], [], [], []
    tally = InstanceTally() if config.data.nuclei and transform is None else None  # one-stage instances
    context, source = evaluation_context(config, context, oracle, runtime.device if runtime is not None else None)
    model.eval()
    for i in range(len(folder)):
        sample = folder[i]
        image, target = sample_target(sample, task, config.data.cell_target)
        image = model_input(image, None if context is None else context(sample))
        target = torch.from_numpy(target.astype(np.int64))
        shapes.append(tuple(target.shape))
        cells, valid = sample.cells, None
        if transform is not None:
            image, target, cells, valid = transform(image, target, cells)
            target = torch.where(valid, target, torch.full_like(target, IGNORE_INDEX))
        probs = predict_probabilities(model, image, tile=tile, runtime=runtime)
        class_probs = probs[:config.class_channels]  # a nucleus model's channel 3 is p(nucleus), no class
        logits = class_probs.clamp_min(1e-12).log()  # softmax is shift-invariant: log p are valid logits
        loss = float(loss_fn(logits[None], target[None]))
        classes = target if cell_target is None else cell_target.classes(target)
        image_cm = confusion_matrix(class_probs.argmax(0), classes, len(names))
        cm += image_cm
        per_image.append({"loss": loss, "dice/mean": segmentation_scores(image_cm, names)["dice/mean"]})
        if task is Task.CELLS:
            assert cells is not None  # sample_target refuses a sample without labels
            points.append(_image_cells(class_probs, config, valid, cells, per_image[-1]))
            gts.append(cells)
            _add_instances(tally, sample, probs, config, per_image[-1])
        if keep is not None:
            keep(i, folder.ids[i], probs)
        if on_image is not None:
            on_image(i + 1, len(folder))
    scores = {"loss": float(np.mean([p["loss"] for p in per_image])), **segmentation_scores(cm, names)}
    if task is Task.CELLS:
        scores |= detection_scores(points, gts)
    scores |= _prefixed(tally.scores()) if tally is not None and tally.points else {}
    return Evaluation(scores, list(folder.ids), points, per_image, source, shapes, DataRecord.of_folder(root))


def _add_instances(tally: InstanceTally | None, sample: Sample, probs: torch.Tensor, config: Config,
                   row: dict[str, float]) -> None:
    """A one-stage model's instances of one image (`one_stage_instances`) added to ``tally`` and its ``row``,
    where the model has a nucleus output and the image instance labels.
    """
    if tally is None or sample.instances is None:
        return
    labels, cells = one_stage_instances(probs, config.detect)
    row |= _prefixed(tally.add(sample, labels, cells, cell_class_map(probs)))


def _prefixed(scores: dict[str, float]) -> dict[str, float]:
    """Instance scores beside a model's point scores: PQ, AJI and blending as they are, the OCELOT scores of
    the instances' centroids under ``instances/`` (``instances/mf1``).
    """
    plain = ("pq/", "sq/", "rq/", "aji", "blended")
    return {(key if key.startswith(plain) else f"instances/{key}"): value for key, value in scores.items()}


def _image_cells(probs: torch.Tensor, config: Config, valid: torch.Tensor | None, truth: np.ndarray,
                 row: dict[str, float]) -> np.ndarray:
    """The cells found on one probability map (those in the valid region), with the image's matches
    against ``truth`` added to its ``row`` so that scores can be resampled over images (a bootstrap).
    """
    found = find_cells(probs, config.detect)
    if valid is not None and len(found):
        found = found[valid[found[:, 1].astype(int), found[:, 0].astype(int)].numpy()]
    for cls, name in CELL_CLASSES.items():
        tp, fp, n_gt = match_counts(found, truth, cls)
        row |= {f"tp/{name}": tp, f"fp/{name}": fp, f"gt/{name}": n_gt}
    return found


def evaluation_context(config: Config, context: ContextFn | None = None, oracle: bool = False,
                       device: torch.device | None = None) -> tuple[ContextFn | None, ContextSource]:
    """The context an evaluation feeds a model of ``config``, and its label (see `Evaluation`).

    None and ``NONE`` for a model without context; the ground-truth tissue mask and ``ORACLE``
    when ``oracle``; else ``context`` or the config's tissue model (loaded onto ``device``) and
    ``TISSUE_MODEL``. A model trained with ``data.context=truth`` and no tissue model is a
    ``ValueError``: its only context would be the oracle, which must be asked for.
    """
    if config.data.context is ContextKind.NONE:
        return None, ContextSource.NONE
    if oracle:
        return context or truth_context, ContextSource.ORACLE
    if context is None and config.data.tissue_model is None:
        raise ValueError(f"{config.name} was trained with data.context={config.data.context.value} and names no tissue "
                         "model: give a tissue model (--tissue-model RUN) to score it as deployed, or ask for "
                         "the ground-truth tissue mask explicitly (--oracle-context; reported as oracle)")
    return context or run_context(config.data, evaluation=True, device=device), ContextSource.TISSUE_MODEL


def write_evaluation(evaluation: Evaluation, out_dir: Path | str, split: str, force: bool = False) -> dict[str, Path]:
    """``scores-<split>.json`` (the split, the data it ran on as a `DataRecord`, where the tissue
    context came from, the image ids, the scores and each image's row) and, for cells,
    ``cell_classification.json`` (official format).

    The official format holds patches of at most 1024 x 1024 px: with a larger image the JSON
    is not written (its points would have to move; `Evaluation.json_refusal` says why)
    and the cells go to ``cells-<split>.csv`` (image,id,x,y,class,probability) instead. The
    files are staged and moved into ``out_dir`` together (`equiseg.files.owned_outputs`):
    equiseg's earlier outputs there are replaced, never left beside the new ones; a folder
    holding anything else is refused (``force``: its other files are kept as they are).
    """
    out_dir = Path(out_dir)
    names = {"scores": f"scores-{split}.json"}
    with owned_outputs(out_dir, force) as partial:
        (partial / names["scores"]).write_text(json_text({
            "split": split, "data": evaluation.data, "context": evaluation.context, "ids": evaluation.ids,
            "scores": evaluation.scores, "per_image": evaluation.per_image}))
        if evaluation.points and evaluation.json_refusal() is None:
            names["points"] = write_points_json(partial / "cell_classification.json", evaluation.points).name
        elif evaluation.points:  # the true coordinates, unmoved
            names["cells"] = f"cells-{split}.csv"
            lines = ["image,id,x,y,class,probability"] + [
                f"{i},{sid},{int(x)},{int(y)},{int(c)},{q:.4f}"
                for i, (sid, rows) in enumerate(zip(evaluation.ids, evaluation.points)) for x, y, c, q in rows]
            (partial / names["cells"]).write_text("\n".join(lines) + "\n")
    return {key: out_dir / name for key, name in names.items()}


SCORE_ROWS = [("loss", "Dice-CE loss"), ("dice/mean", "Dice (mean)"), ("dice/BC", "Dice BC"), ("dice/TC", "Dice TC"),
              ("dice/background", "Dice background"), ("dice/cancer", "Dice cancer"), ("miou", "mIoU"),
              ("precision/BC", "precision BC"), ("recall/BC", "recall BC"), ("f1/BC", "F1 BC"),
              ("precision/TC", "precision TC"), ("recall/TC", "recall TC"), ("f1/TC", "F1 TC"), ("mf1", "mF1"),
              ("pq/BC", "PQ BC"), ("pq/TC", "PQ TC"), ("pq/mean", "PQ (mean)"), ("pq/all", "PQ (all nuclei)"),
              ("aji", "AJI"), ("blended", "blended cells")]


def evaluate_run(model: Path | str, split: str = "test", data: Path | str | None = None,
                 tissue_model: Path | str | None = None, oracle_context: bool = False,
                 runtime: Runtime | None = None,
                 on_image: Callable[[int, int], None] | None = None,
                 proposals: Path | str | None = None) -> tuple[Evaluation, Config]:
    """Score a trained model (a run folder, its best checkpoint, or a ``.ckpt``) on a split.

    What ``equiseg evaluate`` does, as one call: the dataset is ``data``, else the one the run
    trained on, else the config's (the built-in synthetic data when it names none,
    `equiseg.datasets.data_root`). A cell model trained with tissue context gets
    ``tissue_model``'s probabilities, or its config's tissue model, or with ``oracle_context`` the
    ground-truth tissue mask (labelled oracle in the result).

    Args:
        model: a run folder (its best checkpoint) or a ``.ckpt`` file.
        split: ``train``, ``val`` or ``test``.
        data: a dataset folder in the OCELOT Zenodo layout; None: the one the run trained on.
        tissue_model: the tissue model (run folder or checkpoint) that gives a context model its
            context; None: the one its config names.
        oracle_context: feed a context model the ground-truth tissue mask instead.
        runtime: where and how the model runs (device, batch, precision, optimized); None: the
            CPU with the defaults (``Runtime.of("cpu")``).
        on_image: called with (images done, images in all) after each image (progress).
        proposals: for stage 2 of a two-stage cell model (``task: nuclei``), the ``cells`` run whose
            detected cells it segments and classifies; None: its config's ``window.proposals``. The
            two stages are scored as instances (`evaluate_instances`: PQ, AJI and the mF1 of the
            instances' centroids) on a dataset with instance labels.

    Returns:
        The evaluation and the model's config.

    Raises:
        ValueError: context options given for a model without context, both given, or a model
            with ``data.context=truth`` and neither (see `evaluation_context`).
        FileNotFoundError, DatasetError: no such run or dataset.
    """
    runtime = runtime or Runtime.of("cpu")
    net, config = load_model(model, runtime.device)
    root = Path(data) if data is not None else Run.of(model).data_root() or data_root(config)
    if config.task is Task.NUCLEI:
        if tissue_model is not None or oracle_context:
            raise ValueError(f"{model} is stage 2 of a two-stage cell model: each stage takes the tissue model its "
                             "config names; a tissue model or the oracle context cannot be given here")
        return _evaluate_two_stage(model, net, config, proposals, root, split, runtime, on_image), config
    if proposals is not None:
        raise ValueError(f"{model} is a {config.task.value} model: proposals are for stage 2 of a two-stage cell "
                         "model (task nuclei)")
    if (tissue_model is not None or oracle_context) and config.data.context is ContextKind.NONE:
        raise ValueError(f"{model} was trained without tissue context: a tissue model and the oracle context "
                         "do not apply")
    if tissue_model is not None and oracle_context:
        raise ValueError("a tissue model and the oracle context exclude each other")
    context = None
    if tissue_model is not None:
        context = run_context(config.data, evaluation=True, tissue_model=tissue_model, device=runtime.device)
    context, _ = evaluation_context(config, context, oracle_context, runtime.device)
    evaluation = evaluate_model(net, config, root, split, on_image=on_image, context=context, oracle=oracle_context,
                                runtime=runtime)
    return evaluation, config


def _evaluate_two_stage(model: Path | str, stage2: nn.Module, config: Config, proposals: Path | str | None,
                        root: Path, split: str, runtime: Runtime,
                        on_image: Callable[[int, int], None] | None) -> Evaluation:
    """A two-stage cell model (its stage 2 at ``model``) scored as instances (`evaluate_instances`)."""
    stage1, stage1_config = load_model(proposal_run(model, config, proposals), runtime.device)
    predict, source = two_stage_predictor(stage1, stage1_config, stage2, config, runtime)
    return evaluate_instances(predict, root, split, source, on_image)


def two_stage_predictor(stage1: nn.Module, stage1_config: Config, stage2: nn.Module, stage2_config: Config,
                        runtime: Runtime | None = None) -> tuple[Predictor, ContextSource]:
    """The two-stage cell model as a `Predictor` (each stage with its own tissue context, from its config's
    tissue model as evaluation gives it), and where its context came from.
    """
    check_proposer(stage1_config)
    device = runtime.device if runtime is not None else None
    context1, source1 = evaluation_context(stage1_config, None, False, device)
    context2, source2 = evaluation_context(stage2_config, None, False, device)

    def inputs(sample: Sample, context: ContextFn | None) -> torch.Tensor:
        return model_input(sample.cell_image, None if context is None else context(sample))

    def predict(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        found = two_stage_instances(stage1, stage1_config, stage2, stage2_config, inputs(sample, context1),
                                    inputs(sample, context2), runtime=runtime)
        return found.labels, found.cells

    source = source2 if source2 is not ContextSource.NONE else source1
    return predict, source
