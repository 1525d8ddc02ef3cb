"""``equiseg package``: a trained cells model (or a two-stage one) as a folder (or zip) that other tools load
without equiseg.

The folder holds

* ``weights.safetensors`` (the trained state dict) with ``config.yaml``: what equiseg itself loads (for a
  two-stage model its stage 2, with its stage 1 as ``proposals.safetensors`` and ``proposals.yaml``);
* ``probabilities.pt``: TorchScript, (1, 3, H, W) uint8 RGB -> (1, C, H, W) float32 probabilities (the
  class softmax, then p(nucleus) where the model has a nucleus output), H and W multiples of 2**depth;
* ``cells.pt``: TorchScript with the detection inside (`equiseg.export.DetectingNet`): the same input ->
  (probabilities, cells (N, 4) float64 rows x, y, class, probability), the run's own detection settings;
* ``cells.onnx``: the same as ONNX (inputs ``image``, outputs ``probabilities`` and ``cells``), for
  onnxruntime where neither torch nor equiseg is installed; for an instance model both also give the
  instance label image (``labels``): a one-stage model's grown on its p(nucleus), a two-stage model's from
  stage 2 on each proposed cell's window (`equiseg.export.TwoStageNet`: both stages inside, stage 1's
  probabilities and stage 2's classes);
* ``rdf.yaml``: its BioImage Model Zoo description (format 0.5: axes, halo, test tensors, a sha256 for
  every file it names, authors, licence, citations), whose weights are ``probabilities.pt``;
* ``test_input.npy``, ``test_output.npy`` and ``sample.png``: a tile of the run's data and what
  ``probabilities.pt`` makes of it (``bioimageio.core`` runs it to prove the package);
* ``README.md``: a model card with Hugging Face front matter, its use, its limits and its data;
* ``equiseg.json``: resolution, classes and colours, normalisation, tile and halo, family, the group it
  is exact for and the measured equivariance of its probabilities on the sample.

The BioImage Model Zoo format was checked against bioimageio.spec 0.5.12.0 and bioimageio.core 0.11.0
(``pip install 'equiseg[package]'``; its test of the package passes, tests/test_package.py).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn

from equiseg.config import Config
from equiseg.data.context import ContextKind
from equiseg.data.datamodule import model_input
from equiseg.data.ocelot import DatasetError, OcelotFolder
from equiseg.data.targets import DEFAULT_RADIUS, Task
from equiseg.datasets import data_root
from equiseg.detection.instances import NUCLEUS_THRESHOLD
from equiseg.evaluation.equivariance import certificate
from equiseg.export import (
    check_two_stage,
    onnx_cells_model,
    onnx_two_stage_model,
    quiet_jit,
    scripted_cells_model,
    scripted_two_stage_model,
    unpadded_unet,
)
from equiseg.files import owned_outputs
from equiseg.models import probabilities
from equiseg.models.build import receptive_reach
from equiseg.pictures import CELL_COLOURS
from equiseg.runs import (
    PACKAGE_MODEL,
    PACKAGE_STAGE1,
    Run,
    check_proposer,
    file_sha256,
    load_model,
    proposal_run,
)

RDF_FORMAT = "0.5.4"
OCELOT = {"text": "Ryu et al., OCELOT: Overlapped Cell on Tissue Dataset for Histopathology, CVPR 2023",
          "url": "https://lunit-io.github.io/research/publications/ocelot"}
OCELOT_CHALLENGE = {"text": "Shin et al., OCELOT 2023: Cell Detection from Cell-Tissue Interaction Challenge, "
                            "Medical Image Analysis, 2025", "doi": "10.1016/j.media.2025.103751"}


HUB_ATTRIBUTES = ("*.pt", "*.onnx", "*.safetensors", "*.npy", "*.png")  # binary files the Hub keeps in Git LFS
OWN_FILES = (*PACKAGE_MODEL, *PACKAGE_STAGE1, "resolution.yaml", "cells.pt", "cells.onnx")


class ProbabilityNet(nn.Module):
    """(1, 3, H, W) uint8 RGB -> (1, C, H, W) probabilities of an optimized U-Net's ``unpadded`` net."""

    def __init__(self, net: nn.Module, class_channels: int) -> None:
        super().__init__()
        self.net, self.class_channels = net, class_channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return probabilities(self.net(image.float().div(255)), self.class_channels)


class ContextProbabilityNet(ProbabilityNet):
    """`ProbabilityNet` of a model with tissue context: (image, context (1, 2, H, W) float32) -> probabilities."""

    def forward(self, image: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # pyright: ignore[reportIncompatibleMethodOverride]
        return probabilities(self.net(torch.cat([image.float().div(255), context.float()], 1)), self.class_channels)


# the test context of a package of a model with tissue context: uniform, all cancer area (the tissue model
# is not in the package, so no context of the sample tile can be made here)
SAMPLE_CONTEXT = (0.0, 1.0)


@dataclass(frozen=True, eq=False)
class Stages:
    """What a package holds: a cells model, and for a two-stage model (`stage2` set) the cells model is its
    stage 1, whose cells the nuclei model ``stage2`` segments and classifies.
    """

    model: nn.Module
    config: Config
    stage2: nn.Module | None = None
    stage2_config: Config | None = None

    @classmethod
    def of(cls, run: Path | str, proposals: Path | str | None = None) -> Stages:
        """The models of ``run``: a cells run, or stage 2 of a two-stage model with its stage 1 (``proposals``,
        else its config's ``window.proposals``).
        """
        model, config = load_model(run)
        if config.task is Task.NUCLEI:
            stage1, stage1_config = load_model(proposal_run(run, config, proposals))
            check_proposer(stage1_config)
            check_two_stage(stage1_config, config)
            return cls(stage1, stage1_config, model, config)
        if proposals is not None:
            raise ValueError(f"{run}: --proposals names stage 1 of a two-stage model; this is a {config.task.value} model")
        if config.task is not Task.CELLS:
            raise ValueError(f"{run}: equiseg package takes a cells model or stage 2 of a two-stage one (this one: a "
                             f"{config.task.value} model)")
        return cls(model, config)


def package_run(run: Path | str, out: Path | str, as_zip: bool = False, force: bool = False,
                hub: bool = False, proposals: Path | str | None = None) -> Path:
    """Write the package of ``run`` (see the module docstring) into the folder ``out`` (and, with
    ``as_zip``, ``out`` + ``.zip`` beside it); returns what was written. With ``hub`` the folder is also
    laid out as a Hugging Face Hub model repository (`HUB_ATTRIBUTES` in ``.gitattributes``: the binary
    files through Git LFS; ``config.json``: equiseg's description), ready for ``git push``; nothing
    goes over the network. Stage 2 of a two-stage model is packaged with its stage 1 (``proposals``, else
    its config's ``window.proposals``): the networks hold both.

    Raises:
        ValueError: a model that is neither a cells model nor stage 2 of a two-stage one (a tissue model).
    """
    stages = Stages.of(run, proposals)
    config = stages.config
    sample = _sample_tile(config, 2 ** config.model.depth)
    with owned_outputs(out, force) as partial:
        _write_networks(stages, sample, partial)
        _write_weights(stages, partial)
        resolution = Run.of(run).resolution()
        if resolution is not None:
            (partial / "resolution.yaml").write_text(yaml.safe_dump(dataclasses.asdict(resolution)))
        Image.fromarray(sample).save(partial / "sample.png")
        description = equiseg_description(run, stages, sample)
        description["scores"] = run_scores(run)
        # what equiseg reads back (`runs.check_package`) beside the files rdf.yaml lists
        description["sha256"] = {name: file_sha256(partial / name) for name in OWN_FILES if (partial / name).is_file()}
        (partial / "equiseg.json").write_text(json.dumps(description, indent=1) + "\n")
        (partial / "README.md").write_text(model_card(config, description))
        rdf = bioimageio_description(config, description, partial)
        (partial / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True))
        if hub:
            (partial / ".gitattributes").write_text("".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n"
                                                            for p in HUB_ATTRIBUTES))
            (partial / "config.json").write_text(json.dumps({"library_name": "equiseg", **description}, indent=1))
    if not as_zip:
        return Path(out)
    return Path(shutil.make_archive(str(Path(out)), "zip", root_dir=out))


def _sample_tile(config: Config, multiple: int, side: int = 256) -> np.ndarray:
    """(side, side, 3) uint8: the top-left corner of the run's first test image (else its first training
    image; a uniform grey where the data is gone), ``side`` a multiple of ``multiple``.
    """
    side = -(-side // multiple) * multiple
    root = data_root(config)
    for split in ("test", "train"):
        try:
            folder = OcelotFolder(root, split, labels=False)
        except (DatasetError, FileNotFoundError, ValueError):  # the run's data is gone or never was here
            continue
        if len(folder):
            image = np.asarray(folder[0].cell_image)
            if image.shape[0] >= side and image.shape[1] >= side:
                return np.ascontiguousarray(image[:side, :side, :3])
    return np.full((side, side, 3), 200, np.uint8)


def sample_inputs(config: Config, sample: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The networks' inputs on the (H, W, 3) uint8 ``sample``: (1, 3, H, W) uint8, and for a model with tissue
    context its (1, 2, H, W) float32 context (`SAMPLE_CONTEXT`).
    """
    image = torch.from_numpy(sample.transpose(2, 0, 1)[None].copy())
    if config.data.context is ContextKind.NONE:
        return (image,)
    context = torch.tensor(SAMPLE_CONTEXT, dtype=torch.float32)[None, :, None, None]
    return image, context.expand(1, -1, *image.shape[2:]).contiguous()


def _write_networks(stages: Stages, sample: np.ndarray, folder: Path) -> None:
    """``probabilities.pt`` (the cells model's: stage 1's of a two-stage model), ``cells.pt``, ``cells.onnx``
    (the whole model), and the test tensors of the first.
    """
    model, config = stages.model, stages.config
    unpadded = unpadded_unet(model)
    kind = ProbabilityNet if config.data.context is ContextKind.NONE else ContextProbabilityNet
    net = kind(unpadded, config.class_channels).eval()
    inputs = sample_inputs(config, sample)
    with quiet_jit():
        traced = cast(nn.Module, torch.jit.trace(net, inputs))  # a traced module (trace is also typed as a graph)
        torch.jit.save(traced, str(folder / "probabilities.pt"))
        for name, tensor in zip(("test_input.npy", "test_context.npy"), inputs):
            np.save(folder / name, tensor.numpy())
        np.save(folder / "test_output.npy", traced(*inputs).numpy())
    card = {"producer": f"equiseg {version('equiseg')}", "classes": config.task.class_names,
            "detect": {"sigma": config.detect.sigma, "min_distance": config.detect.min_distance,
                       "threshold": config.detect.threshold, "per_class": config.detect.per_class},
            "size_multiple": 2**config.model.depth}
    if stages.stage2 is None or stages.stage2_config is None:
        with quiet_jit():
            torch.jit.save(scripted_cells_model(model, config), str(folder / "cells.pt"))
        onnx_cells_model(model, config, folder / "cells.onnx", card)
        return
    card["window_side_px"] = stages.stage2_config.window.side_px
    with quiet_jit():
        torch.jit.save(scripted_two_stage_model(model, config, stages.stage2, stages.stage2_config),
                       str(folder / "cells.pt"))
    onnx_two_stage_model(model, config, stages.stage2, stages.stage2_config, folder / "cells.onnx", card)


def _write_weights(stages: Stages, folder: Path) -> None:
    """The weights and config equiseg loads: the model's, or a two-stage model's stage 2 (`PACKAGE_MODEL`,
    its ``window.proposals`` left empty: loading names the package's stage 1) and stage 1 (`PACKAGE_STAGE1`).
    """
    from safetensors.torch import save_file

    def write(model: nn.Module, config: Config, names: tuple[str, str]) -> None:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / names[1]),
                  metadata={"format": "pt", "producer": f"equiseg {version('equiseg')}"})
        config.to_yaml(folder / names[0])

    if stages.stage2 is None or stages.stage2_config is None:
        write(stages.model, stages.config, PACKAGE_MODEL)
        return
    data = stages.stage2_config.to_dict()
    write(stages.stage2, Config.from_dict({**data, "window": {**data["window"], "proposals": None}}), PACKAGE_MODEL)
    write(stages.model, stages.config, PACKAGE_STAGE1)


def equiseg_description(run: Path | str, stages: Stages, sample: np.ndarray) -> dict[str, Any]:
    """The description of the packaged model that equiseg keeps (``equiseg.json``)."""
    model, config = stages.model, stages.config
    resolution = Run.of(run).resolution()
    depth, group = config.model.depth, config.model.family.group
    reach = receptive_reach(model, depth)
    inputs = sample_inputs(config, sample)  # the certificate takes the model's own input: colours in [0, 1]
    x = model_input(sample, inputs[1][0] if len(inputs) > 1 else None)
    with torch.no_grad():
        measured = certificate(model, [x], group) if group is not None else None
    names = config.task.class_names
    return {
        "producer": f"equiseg {version('equiseg')}", "task": config.task.value,
        "cell_mpp": resolution.cell_mpp if resolution is not None else None,
        "tissue_mpp": resolution.tissue_mpp if resolution is not None else None,
        "classes": names, "colours": {names[k]: list(c) for k, c in CELL_COLOURS.items() if k < len(names)},
        "nucleus_channel": config.class_channels if config.data.nuclei else None,
        "instances": _instances_description(stages),
        "two_stage": _two_stage_description(stages),
        "input": f"uint8 RGB (1, 3, H, W), H and W multiples of {2**depth}; the networks divide by 255 "
                 "(no mean or std)",
        "tile": {"side": 1024, "overlap": 128, "halo": reach,
                 "note": f"each output pixel sees {reach} px each way: tiles should overlap by at least twice that"},
        "family": config.model.family.value, "width": config.model.width, "depth": depth,
        "exact_for": group.name if group is not None else None,
        # JSON has no NaN: a measure the sample cannot give (a featureless tile) is null
        "certificate": {k: None if np.isnan(v) else v for k, v in measured.items()} if measured else None,
        "detect": {"sigma": config.detect.sigma, "min_distance": config.detect.min_distance,
                   "threshold": config.detect.threshold, "peaks": config.detect.peaks},
        "synthetic": config.data.root is None,
        "tissue_context": _context_description(config),
        "files": {"probabilities": "probabilities.pt", "cells": "cells.pt", "cells_onnx": "cells.onnx",
                  "weights": "weights.safetensors", "config": "config.yaml"},
    }


INSTANCES_WHERE = ("cells.pt and cells.onnx (outputs 'labels' and 'outlines'): the (H, W) int32 instance label image "
                   "(k: the cell of row k - 1), with each cell's class and probability its instance's, and each "
                   "cell's outline, (M, 3) float64 rows (row of the cell, x, y): its closed outer ring, vertices "
                   "midway between the centres of an inside and an outside pixel, pixel (row i, column j) spanning "
                   "[j, j + 1) x [i, i + 1) (equiseg.detection.instances.instance_outlines); equiseg predict and "
                   "evaluate with this package also write measurements")


def _instances_description(stages: Stages) -> dict[str, str] | None:
    """How an instance model's cells get their outlines, and where the package gives them (None: points only)."""
    if stages.stage2_config is not None:
        return {"rule": f"stage 2's p(nucleus) in each proposed cell's window of {stages.stage2_config.window.side_px} "
                        f"px; a pixel goes to the window most certain of it, if at least {NUCLEUS_THRESHOLD:g} (ties: "
                        "the higher proposal score, then the higher class, then the earlier cell), every cell owns its "
                        "centre's pixel and keeps the 4-connected piece holding it "
                        "(equiseg.inference.cell_instances.paste_instances); one class each: stage 2's",
                "where": INSTANCES_WHERE}
    if not stages.config.data.nuclei:
        return None
    return {"rule": f"each cell grown on p(nucleus) >= {NUCLEUS_THRESHOLD:g} within {DEFAULT_RADIUS:g} px of its centre, in "
                    "its connected foreground, the nearest centre winning (equiseg.detection.instances.grow_instances); "
                    "one class each: the largest mean class probability inside it",
            "where": INSTANCES_WHERE}


def _two_stage_description(stages: Stages) -> dict[str, Any] | None:
    """Stage 2 of a two-stage model: its network, its window and the group it is exact for (None: one stage)."""
    config = stages.stage2_config
    if config is None:
        return None
    group = config.model.family.group
    return {"stage1": "the cells U-Net that this description's family, width and depth describe (probabilities.pt; "
                      f"equiseg loads it from {PACKAGE_STAGE1[0]} and {PACKAGE_STAGE1[1]}): its cells are the proposals",
            "stage2": f"a CellWindowNet on each proposal's window (equiseg loads it from {PACKAGE_MODEL[0]} and "
                      f"{PACKAGE_MODEL[1]}): the nucleus's mask in the window and the cell's class",
            "family": config.model.family.value, "width": config.model.width, "depth": config.model.depth,
            "window_side_px": config.window.side_px, "window_side_um": config.window.side_um,
            "exact_for": group.name if group is not None else None,
            "windows": "centred on the proposal's pixel, mirrored beyond the tile's edges (numpy's 'reflect')"}


def _context_description(config: Config) -> dict[str, Any] | None:
    """What a model with tissue context needs beside the tile, and which tissue model it was trained with."""
    if config.data.context is ContextKind.NONE:
        return None
    named = config.data.tissue_model
    checkpoint = Run.of(named).best if named and Path(named).is_dir() else Path(named) if named else None
    return {
        "input": "context: float32 (1, 2, H, W), the tissue model's probabilities (background, cancer) over the "
                 "tile's block of its tissue patch, resampled to the tile's grid",
        "trained_on": "the ground-truth tissue masks" if config.data.context is ContextKind.TRUTH
                      else "a tissue model's probabilities",
        "tissue_model": {"path": named, "sha256": file_sha256(checkpoint) if checkpoint and checkpoint.is_file()
                         else None},
        "needs": "a tissue model: equiseg slide, challenge and evaluate make the context with --tissue-model RUN "
                 "(or the config's data.tissue_model); the package does not hold one",
        "test_context": f"uniform {list(SAMPLE_CONTEXT)} (background, cancer)",
    }


def run_scores(run: Path | str) -> list[dict[str, Any]]:
    """The mF1 the run reached, each with its split and data: ``equiseg evaluate``'s scores of the test and
    validation splits where the run folder holds them, else the best of its detection tuning on the
    validation split (``detect-tuning.csv``); none for a bare checkpoint.
    """
    folder = Run.of(run)
    data = f"equiseg synthetic ({folder.synthetic()})" if folder.synthetic() else str(folder.data_root() or "unknown")
    found = []
    for split in ("test", "val"):
        scores = folder.eval_dir(split) / f"scores-{split}.json"
        if scores.is_file():
            mf1 = json.loads(scores.read_text()).get("scores", {}).get("mf1")
            if mf1 is not None:
                found.append({"split": split, "data": data, "mf1": float(mf1), "source": "equiseg evaluate"})
    if not found and folder.tuning_file.is_file():
        with open(folder.tuning_file, newline="") as file:
            rows = [float(row["mf1"]) for row in csv.DictReader(file) if row.get("mf1")]
        if rows:
            found.append({"split": "val", "data": data, "mf1": max(rows), "source": "equiseg tune-detect (best setting)"})
    return found


def model_card(config: Config, description: dict[str, Any]) -> str:
    """``README.md``: Hugging Face front matter, then what the model is for, its limits and its data."""
    synthetic = description["synthetic"]
    front = {"license": "mit", "library_name": "equiseg", "pipeline_tag": "image-segmentation",
             "tags": ["histopathology", "cell-detection", "rotation-equivariant", "bioimage-io", "torchscript", "onnx",
                      config.model.family.value],
             "datasets": [] if synthetic else ["OCELOT 2023"]}
    if description.get("scores"):
        front["model-index"] = [{"name": f"equiseg-{config.model.family.value}-cells", "results": [
            {"task": {"type": "object-detection", "name": "cell detection and classification"},
             "dataset": {"name": score["data"], "type": "synthetic" if synthetic else "ocelot", "split": score["split"]},
             "metrics": [{"type": "f1", "name": "mF1 (OCELOT's rule: 15 px, mean over BC and TC)",
                          "value": score["mf1"]}]} for score in description["scores"]]}]
    exact = description["exact_for"]
    labels = description.get("instances") is not None
    outputs = "`probabilities`, `cells`" + (", `labels`, `outlines`" if labels else "")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# equiseg {config.model.family.value} U-Net"
        + (f" and {description['two_stage']['family']} window net" if description.get("two_stage") else "")
        + ": cells (background cell, tumour cell)", "",
        f"A {config.model.family.value} U-Net (width {config.model.width}, depth {config.model.depth}) that finds "
        "cells in H&E tiles and classifies them as background (BC) or tumour (TC) cells, made with equiseg, "
        "after the paper (Liem, 2025) and the OCELOT 2023 challenge's task.",
        f"It is exact for {exact}: turning or flipping a tile by an element of the group turns or flips its "
        "probabilities alike." if exact else "It is a plain U-Net: no symmetry is built in.", "",
        "**Trained on synthetic data** (equiseg's built-in procedural world): it shows the format and the "
        "pipeline, not a model for real slides." if synthetic else
        "Trained on the data its config names (config.yaml).", "",
        "## Use", "",
        "- `cells.pt` (TorchScript, only torch needed): a (1, 3, H, W) uint8 RGB tile in, probabilities and "
        "cells (x, y, class, probability) out, with the run's detection settings"
        + (", the instance label image (k: the nucleus of the cell of row k - 1) and each cell's outline "
           "((M, 3) rows: row of the cell, x, y; a closed ring a cell)." if labels else "."),
        f"- `cells.onnx` (onnxruntime, neither torch nor equiseg needed): the same input (`image`) and outputs ({outputs}).",
        "- `probabilities.pt`: the probabilities alone (the BioImage Model Zoo weights, `rdf.yaml`).",
        "- `equiseg predict --model FOLDER` and `equiseg slide --model FOLDER` with this folder, for whole "
        "images and slides (tiles stitched, outputs for QuPath).", "",
        *_two_stage_lines(description), *_context_lines(description), "## Limits", "",
        "- Input at " + (f"{description['cell_mpp']:.4g} µm per px" if description["cell_mpp"] else "the training "
                         "data's resolution") + "; other resolutions need resampling.",
        f"- Tiles larger than the model sees ({description['tile']['halo']} px each way) should overlap by twice "
        "that; `cells.pt` and `cells.onnx` run one tile and do not stitch.",
        "- Research use only; not a medical device.", "",
        "## Validation", "",
        "`test_input.npy` and `test_output.npy` hold a tile and its probabilities: `bioimageio.core` runs "
        "`probabilities.pt` on the one and compares with the other. The equivariance measured on it is in "
        "`equiseg.json` (`certificate`).", "",
    ]
    return "\n".join(lines)


def _two_stage_lines(description: dict[str, Any]) -> list[str]:
    """The card's section on stage 2, for a two-stage model."""
    stage2 = description.get("two_stage")
    if not stage2:
        return []
    exact = f"exact for {stage2['exact_for']} about the window's centre" if stage2["exact_for"] else "no symmetry built in"
    return ["## Two stages", "",
            "The U-Net above proposes the cells; stage 2, a "
            f"{stage2['family']} CellWindowNet (width {stage2['width']}, depth {stage2['depth']}; {exact}), segments "
            f"each one's nucleus and classifies it in a {stage2['window_side_px']} px window centred on it. "
            "`cells.pt` and `cells.onnx` hold both stages and the pasting of the nuclei into one label image "
            f"({description['instances']['rule']}); `probabilities.pt` is stage 1 alone.", ""]


def _context_lines(description: dict[str, Any]) -> list[str]:
    """The card's section on tissue context, for a model that takes it."""
    context = description.get("tissue_context")
    if not context:
        return []
    named = context["tissue_model"]["path"] or "none recorded"
    return ["## Tissue context", "",
            f"This model takes a second input, `context`: {context['input']}. It was trained on "
            f"{context['trained_on']}; its tissue model: `{named}`. The package does not hold a tissue model: "
            "`equiseg slide`, `challenge` and `evaluate` make the context with `--tissue-model RUN`.", ""]


def bioimageio_description(config: Config, description: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``rdf.yaml``: the BioImage Model Zoo description (format 0.5) of ``probabilities.pt``."""
    multiple, halo = 2**config.model.depth, description["tile"]["halo"]
    least = (2 * halo // multiple + 1) * multiple  # the least size larger than the halo on both sides
    channels = config.task.class_names + (["nucleus"] if config.data.nuclei else [])

    def space(axis: str) -> dict:
        return {"type": "space", "id": axis, "size": {"min": least, "step": multiple}}

    def out_space(axis: str) -> dict:
        return {"type": "space", "id": axis, "size": {"tensor_id": "image", "axis_id": axis}, "halo": halo}

    def file(name: str) -> dict:
        return {"source": name, "sha256": file_sha256(folder / name)}

    return {
        "format_version": RDF_FORMAT, "type": "model",
        "name": f"equiseg {config.model.family.value} cells",
        "description": "Cells found and classified (background cell, tumour cell) in H&E tiles by a "
                       f"{config.model.family.value} U-Net" + (", trained on synthetic data" if description["synthetic"]
                                                             else ""),
        "authors": [{"name": "equiseg"}], "cite": [OCELOT, OCELOT_CHALLENGE], "license": "MIT",
        "tags": ["histopathology", "cell-detection", "rotation-equivariant", "2d", "pytorch"],
        "documentation": "README.md", "covers": ["sample.png"],
        "inputs": [{"id": "image", "description": "RGB, uint8", "data": {"type": "uint8"},
                    "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["R", "G", "B"]},
                             space("y"), space("x")],
                    "test_tensor": file("test_input.npy"), "sample_tensor": file("sample.png")},
                   *_context_input(description, out_space, file)],
        "outputs": [{"id": "probabilities", "data": {"type": "float32", "range": [0.0, 1.0]},
                     "axes": [{"type": "batch"}, {"type": "channel", "channel_names": channels},
                              out_space("y"), out_space("x")],
                     "test_tensor": file("test_output.npy")}],
        "weights": {"torchscript": {**file("probabilities.pt"), "pytorch_version": torch.__version__.split("+")[0]}},
        "config": {"equiseg": {k: description[k] for k in ("cell_mpp", "classes", "tile", "family", "exact_for")}},
    }


def _context_input(description: dict[str, Any], out_space: Callable[[str], dict],
                   file: Callable[[str], dict]) -> list[dict[str, Any]]:
    """rdf.yaml's second input for a model with tissue context (none without): sized as the image."""
    context = description.get("tissue_context")
    if not context:
        return []
    def same(axis: str) -> dict:
        return {key: value for key, value in out_space(axis).items() if key != "halo"}
    return [{"id": "context", "description": "tissue model's probabilities (background, cancer) on the tile's grid",
             "data": {"type": "float32", "range": [0.0, 1.0]},
             "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["tissue background", "tissue cancer"]},
                      same("y"), same("x")],
             "test_tensor": file("test_context.npy")}]
