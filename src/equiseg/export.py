"""``equiseg export``: a trained model as one standard file that runs without equiseg.

The file holds the model optimized for inference (`optimize_for_inference`:
equivariant convs expanded, batch norm folded) without the U-Net's padding: its input is
(N, C, H, W) float32 with H and W multiples of 2**depth (any such size; pad other images
yourself, as equiseg does by reflection, evenly on both sides, then crop the logits back), its
output the logits (N, classes, H, W); softmax over axis 1 gives probabilities. A cell model with a
nucleus output (``data.nuclei``) gives (N, 4, H, W): softmax over channels 0..2 gives the class
probabilities, and channel 3 is a nucleus logit (its sigmoid is p(nucleus)); its card says so
(``output``, ``nucleus_channel``).
C = 3 (RGB in [0, 1], i.e. uint8 / 255, no mean or std), plus 2 tissue-context channels
(background, cancer probabilities on the cell patch's grid) for models trained with context.

Formats: ``onnx`` (``torch.onnx.export`` with dynamic batch, height and width; needs the
``export`` extra: onnx, onnxscript, onnxruntime to check it), ``torchscript`` (``torch.jit.trace``;
loads with ``torch.jit.load``; PyTorch 2.13 marks TorchScript deprecated, so prefer pt2) and ``pt2``
(``torch.export``; loads with ``torch.export.load``).
Every file carries the same description (`model_card`): in ONNX as metadata properties,
in TorchScript and pt2 as an extra file ``equiseg.json``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import warnings
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from equiseg.config import Config
from equiseg.data.targets import Task
from equiseg.detection.scripted import ExportedDetector, ExportedInstances, ScriptedDetector, ScriptedInstances
from equiseg.detection.scripted_outlines import ScriptedOutlines
from equiseg.files import owned_file
from equiseg.inference.scripted_windows import ExportedWindows, ScriptedWindows
from equiseg.models import UNet, optimize_for_inference, probabilities
from equiseg.models.window import window_classes
from equiseg.runs import load_model

INSTANCE_OUTPUTS = ("probabilities", "cells", "labels", "outlines")  # an instance model's cells.pt and cells.onnx


class ExportFormat(enum.Enum):
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"
    PT2 = "pt2"


class _Unpadded(nn.Module):
    """The optimized U-Net's `unpadded` as a module's forward."""

    def __init__(self, model: UNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.unpadded(image)


def unpadded_unet(model: nn.Module, for_other_runtimes: bool = False) -> _Unpadded:
    """``model`` optimized for inference without its padding, in eval mode; ``for_other_runtimes``: its graph as
    trained (contiguous, the decoder's upsample, concatenation and conv unfused), the one ONNX and other
    runtimes read.
    """
    if for_other_runtimes:
        optimized = optimize_for_inference(model, channels_last=False, fuse_up=False)
    else:
        optimized = optimize_for_inference(model)
    return _Unpadded(cast(UNet, optimized)).eval()


class DetectingNet(nn.Module):
    """A cell model with its own detection: (1, 3, H, W) uint8 RGB (H and W multiples of 2**depth) ->
    (probabilities (1, C, H, W) float32: the softmax of the class channels, then the sigmoid of a
    nucleus channel where the model has one; cells (N, 4) float64 rows x, y, class, probability, highest
    first), as ``equiseg predict`` finds them with the run's detection settings on a tile it runs whole.
    ``net`` maps (1, 3, H, W) float32 in [0, 1] to logits (a traced U-Net: `scripted_cells_model`).
    """

    def __init__(self, net: nn.Module, class_channels: int, detector: ScriptedDetector) -> None:
        super().__init__()
        self.net, self.class_channels, self.detector = net, class_channels, detector

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._detect(image.float().div(255))

    def _detect(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one window's probabilities, over its channel axis, as tiling._batched takes them
        probs = probabilities(self.net(x)[0], self.class_channels, 0)
        return probs.unsqueeze(0), self.detector(probs[:self.class_channels])


class ContextDetectingNet(DetectingNet):
    """`DetectingNet` of a cell model with tissue context: a second input, ``context`` (1, 2, H, W) float32,
    the tissue model's probabilities (background, cancer) on the tile's grid, after the RGB channels.
    """

    def forward(self, image: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pyright: ignore[reportIncompatibleMethodOverride]
        return self._detect(torch.cat([image.float().div(255), context.float()], 1))


class InstanceDetectingNet(DetectingNet):
    """`DetectingNet` of a one-stage instance model (``data.nuclei``): also the instance label image
    (H, W) int32 (k: the cell of row k - 1), grown on p(nucleus) as `one_stage_instances` grows it
    (`ScriptedInstances`), each cell's class and probability those of its instance, and each cell's
    outline (`ScriptedOutlines`: (M, 3) float64 rows (row of the cell, x, y), `instance_outlines`' rings).
    """

    def __init__(self, net: nn.Module, class_channels: int, detector: ScriptedDetector,
                 instances: ScriptedInstances) -> None:
        super().__init__(net, class_channels, detector)
        self.instances, self.outlines = instances, ScriptedOutlines()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # pyright: ignore[reportIncompatibleMethodOverride]
        probs, cells = self._detect(image.float().div(255))
        maps = probs[0]
        labels, cells = self.instances(maps[-1], maps[:self.class_channels], cells)
        return probs, cells, labels, self.outlines(labels, cells.shape[0])


def detecting_net(net: nn.Module, config: Config, detector: ScriptedDetector,
                  instances: ScriptedInstances | None = None) -> DetectingNet:
    """`DetectingNet` of ``net``: `ContextDetectingNet` for a model with tissue context, `InstanceDetectingNet`
    with ``instances`` for a one-stage instance model (``data.nuclei``).
    """
    if instances is not None and config.data.nuclei and config.in_channels == 3:
        return InstanceDetectingNet(net, config.class_channels, detector, instances).eval()
    kind = ContextDetectingNet if config.in_channels > 3 else DetectingNet
    return kind(net, config.class_channels, detector).eval()


def example_inputs(config: Config, side: int) -> tuple[torch.Tensor, ...]:
    """A (1, 3, side, side) uint8 tile, and its (1, 2, side, side) context for a model with tissue context."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, side, side), dtype=torch.uint8, generator=generator)
    if config.in_channels == 3:
        return (image,)
    return image, torch.softmax(torch.randn(1, config.in_channels - 3, side, side, generator=generator), 1)


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """No gradients, and torch.jit's warnings that say nothing to a user of equiseg: a traced layer's shape
    checks becoming constants (the sizes they check are the file's stated rule) and TorchScript's
    deprecation (the formats are asked for by the tools that load them).
    """
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit's own warning class, left out of its __all__
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # pyright: ignore[reportPrivateImportUsage]
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated.*")
        yield


def _check_cells_model(config: Config) -> None:
    if config.task is not Task.CELLS:
        raise ValueError(f"a model with its detection inside is a cells model (this one: task {config.task.value})")


class TwoStageNet(nn.Module):
    """The two-stage cell model with everything inside: (1, 3, H, W) uint8 RGB -> (stage 1's probabilities
    (1, C, H, W), cells (N, 4) float64 rows x, y, class, probability: stage 1's positions with stage 2's class
    and its probability, in stage 1's order, labels (H, W) int32: k for the nucleus of row k - 1, outlines
    (M, 3) float64 rows (row of the cell, x, y): `ScriptedOutlines`), as ``equiseg predict --model STAGE2
    --proposals STAGE1`` finds them on a tile it runs whole.
    """

    def __init__(self, stage1: DetectingNet, windows: ScriptedWindows) -> None:
        super().__init__()
        self.stage1, self.windows, self.outlines = stage1, windows, ScriptedOutlines()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = image.float().div(255)
        probs, proposals = self.stage1._detect(x)
        labels, cells = self.windows(x[0], proposals)
        return probs, cells, labels, self.outlines(labels, cells.shape[0])


def _traced_unet(model: nn.Module, config: Config) -> nn.Module:
    """The U-Net optimized for inference without its padding, traced (any side a multiple of 2**depth)."""
    unpadded = unpadded_unet(model)
    side = 2 * 2**config.model.depth
    # a traced module (torch.jit.trace is typed to return a graph too, for another call form)
    return cast(nn.Module, torch.jit.trace(unpadded, torch.rand(1, config.in_channels, side, side)))


def _detector(config: Config, kind: type[ScriptedDetector] = ScriptedDetector) -> ScriptedDetector:
    detect = config.detect
    return kind(detect.sigma, detect.min_distance, detect.threshold, detect.per_class)


def scripted_cells_model(model: nn.Module, config: Config) -> torch.jit.ScriptModule:
    """`DetectingNet` (`ContextDetectingNet` with tissue context) of a cells run's model, compiled: the U-Net
    optimized for inference and traced (any side that is a multiple of 2**depth), the detection scripted
    (`ScriptedDetector`); it loads with ``torch.jit.load`` where only torch is installed.

    Raises:
        ValueError: a model that is not a cells model.
    """
    _check_cells_model(config)
    with quiet_jit():
        return torch.jit.script(detecting_net(_traced_unet(model, config), config, _detector(config),
                                              ScriptedInstances()))


def check_two_stage(stage1_config: Config, stage2_config: Config) -> int:
    """Stage 2's window side, once both stages are found to be what a packaged two-stage model takes (a
    one-line ValueError otherwise).
    """
    _check_cells_model(stage1_config)
    side = stage2_config.window.side_px
    if stage2_config.task is not Task.NUCLEI or side is None:
        raise ValueError("stage 2 of a two-stage model is a nuclei model with its window.side_px set by training")
    if stage1_config.in_channels > 3 or stage2_config.in_channels > 3:
        raise ValueError("a two-stage model with tissue context is not packaged (a stage 2 with context does not "
                         "run on tiles alone)")
    return side


def scripted_two_stage_model(stage1: nn.Module, stage1_config: Config, stage2: nn.Module,
                             stage2_config: Config) -> torch.jit.ScriptModule:
    """`TwoStageNet` compiled: stage 1 as `scripted_cells_model` makes it, stage 2 (a `CellWindowNet`)
    optimized for inference and traced on its window side, the windows, pasting and settling scripted
    (`ScriptedWindows`); it loads with ``torch.jit.load`` where only torch is installed.

    Raises:
        ValueError: stage 1 not a cells model, stage 2 not a trained nuclei model, or tissue context.
    """
    side = check_two_stage(stage1_config, stage2_config)
    with quiet_jit():
        window_net = cast(nn.Module, torch.jit.trace(optimize_for_inference(stage2), torch.rand(2, 3, side, side)))
        stage1_net = DetectingNet(_traced_unet(stage1, stage1_config), stage1_config.class_channels,
                                  _detector(stage1_config))
        return torch.jit.script(TwoStageNet(stage1_net, ScriptedWindows(window_net, side, window_classes(stage2))))


def onnx_two_stage_model(stage1: nn.Module, stage1_config: Config, stage2: nn.Module, stage2_config: Config,
                         path: Path, card: dict[str, Any]) -> None:
    """`TwoStageNet` as an ONNX file at ``path`` (needs ``equiseg[export]``): input ``image``; outputs
    ``probabilities``, ``cells``, ``labels`` and ``outlines``; the detection, the batches of windows and the settling
    ONNX ``Loop``s (`ExportedDetector`, `ExportedWindows`); ``card`` goes in as metadata properties.
    """
    side = check_two_stage(stage1_config, stage2_config)
    unpadded = unpadded_unet(stage1, for_other_runtimes=True)
    window_net = optimize_for_inference(stage2, channels_last=False)
    net = TwoStageNet(DetectingNet(unpadded, stage1_config.class_channels, _detector(stage1_config, ExportedDetector)),
                      ExportedWindows(window_net, side, window_classes(stage2))).eval()
    example = example_inputs(stage1_config, max(64, 2 * 2**stage1_config.model.depth))
    space = _free_space(stage1_config.model.depth)
    _onnx(net, example, path, card, INSTANCE_OUTPUTS, {"image": space}, optimize=False)


def onnx_cells_model(model: nn.Module, config: Config, path: Path, card: dict[str, Any]) -> None:
    """`DetectingNet` (`ContextDetectingNet`) of a cells run's model as an ONNX file at ``path`` (needs
    ``equiseg[export]``): input ``image`` (1, 3, H, W) uint8, H and W multiples of 2**depth (and ``context``
    for a model with tissue context); outputs ``probabilities`` and ``cells`` as `DetectingNet` gives them
    (and ``labels`` and ``outlines``, the instance label image and rings, for a one-stage instance model),
    the detection an ONNX ``Loop`` (`ExportedDetector`); ``card`` goes in as metadata properties. It runs
    in onnxruntime where neither equiseg nor torch is installed.

    Raises:
        ValueError: a model that is not a cells model.
    """
    _check_cells_model(config)
    unpadded = unpadded_unet(model, for_other_runtimes=True)
    net = detecting_net(unpadded, config, _detector(config, ExportedDetector), ExportedInstances())
    example = example_inputs(config, max(64, 2 * 2**config.model.depth))  # the file takes any multiple of 2**depth
    space = _free_space(config.model.depth)
    names = ("image", "context")[:len(example)]
    outputs = INSTANCE_OUTPUTS if isinstance(net, InstanceDetectingNet) else ("probabilities", "cells")
    _onnx(net, example, path, card, outputs, {name: space for name in names}, names, optimize=False)


def model_card(config: Config, checkpoint: Path) -> dict[str, Any]:
    """What a user of the file needs to know: input, output, normalisation, classes, origin."""
    multiple = 2 ** config.model.depth
    context = config.in_channels > 3
    return {
        "producer": f"equiseg {version('equiseg')}",
        "source_checkpoint": str(checkpoint),
        "task": config.task.value,
        "family": config.model.family.value,
        "width": config.model.width,
        "depth": config.model.depth,
        "input": f"image: float32 (N, {config.in_channels}, H, W), H and W multiples of {multiple} "
                 "(pad other sizes by reflection, evenly on both sides, and crop the logits back)",
        "input_channels": ["R", "G", "B", *(["tissue background", "tissue cancer"] if context else [])],
        "normalisation": "RGB as uint8 / 255 (values in [0, 1]); no mean or std"
                         + ("; tissue channels are probabilities on the cell patch's grid" if context else ""),
        "output": _output_line(config),
        "classes": config.task.class_names,
        **({"nucleus_channel": config.class_channels} if config.data.nuclei else {}),
        "size_multiple": multiple,
        "detect": config.detect.__dict__ if config.task.value == "cells" else None,
        "cell_mpp_of_training_data": "the run's dataset (OCELOT: about 0.2 µm/px)",
    }


def _output_line(config: Config) -> str:
    """What the file's output is: the class logits, and a nucleus logit after them where the model has one."""
    if not config.data.nuclei:
        return "logits: float32 (N, classes, H, W); softmax over axis 1 gives class probabilities"
    classes, last = config.class_channels, config.class_channels - 1
    return (f"logits: float32 (N, {classes + 1}, H, W); softmax over channels 0..{last} of axis 1 gives class "
            f"probabilities; channel {classes} is a nucleus logit: its sigmoid is p(nucleus)")


def export_model(run: Path | str, fmt: ExportFormat, out: Path | str) -> Path:
    """Write the run's model (best checkpoint) as ``fmt`` to ``out``; returns ``out``.

    The file is written beside ``out`` and renamed into place, so ``out`` holds a whole file or
    stays as it was.

    Args:
        run: a run folder (its best checkpoint) or a ``.ckpt`` file.
        fmt: ``ExportFormat.ONNX`` (needs ``equiseg[export]``), ``TORCHSCRIPT`` or ``PT2``.
        out: the file to write.
    """
    model, config = load_model(run)
    if config.task is Task.NUCLEI:
        raise ValueError(f"{run}: stage 2 of a two-stage cell model (task nuclei); export writes U-Nets, and a "
                         "two-stage model runs through `equiseg predict --model RUN --proposals CELLS_RUN`")
    checkpoint = Path(run)
    # a folded UNet, its decoder as trained (upsample, concatenate, conv): the graph other runtimes read
    unpadded = unpadded_unet(model, for_other_runtimes=True)
    side = 2 * 2**config.model.depth  # the example's size; the file takes any multiple of 2**depth
    example = torch.rand(2, config.in_channels, side, side)
    card = model_card(config, checkpoint)
    with owned_file(out) as partial:
        match fmt:
            case ExportFormat.ONNX:
                _onnx(unpadded, (example,), partial, card, ("logits",), _dynamic(config.model.depth))
            case ExportFormat.TORCHSCRIPT:
                with quiet_jit():
                    traced = torch.jit.trace(unpadded, example)
                    torch.jit.save(traced, str(partial), _extra_files={"equiseg.json": json.dumps(card)})
            case ExportFormat.PT2:
                program = torch.export.export(unpadded, (example,), dynamic_shapes=_dynamic(config.model.depth))
                torch.export.save(program, partial, extra_files={"equiseg.json": json.dumps(card)})
    return Path(out)


def _dynamic(depth: int) -> dict:
    """Batch, height and width free; height and width multiples of 2**depth."""
    return {"image": {0: torch.export.Dim("batch", min=1, max=4096), **_free_space(depth)}}


def _free_space(depth: int) -> dict:
    """The height and width axes (2, 3) free, each a multiple of 2**depth."""
    multiple = 2**depth
    rows, cols = torch.export.Dim("rows", min=1, max=4096), torch.export.Dim("cols", min=1, max=4096)
    return {2: multiple * rows, 3: multiple * cols}


# loggers whose warnings say nothing to a user of equiseg: torch's ONNX registry (no torchvision to skip),
# onnx_ir on an empty attribute list it writes as ints (the loop's empty axes; the file is checked by onnxruntime)
EXPORTER_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnx_ir._convenience")


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from the loggers ``names`` while inside."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _onnx(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path, card: dict, outputs: tuple[str, ...],
          dynamic: dict, inputs: tuple[str, ...] = ("image",), optimize: bool = True) -> None:
    """``model`` on ``example`` through torch's dynamo exporter into ``path``, the ``card`` as metadata; with
    ``optimize`` through onnxscript's optimizer too, else only its constant folding (`_fold_constants`; for the
    graphs with detection inside: their loops make the optimizer's rewriting take most of the export's time,
    and ONNX Runtime optimizes a graph it loads).
    """
    try:
        import onnx
    except ImportError:
        raise ValueError("ONNX export needs the export extra: pip install 'equiseg[export]'") from None
    with warnings.catch_warnings(), _quiet_loggers(*EXPORTER_LOGGERS):
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch's exporter, on a deprecation of its own
        torch.onnx.export(model, example, str(path), input_names=list(inputs), output_names=list(outputs),
                          dynamic_shapes=dynamic, dynamo=True, verbose=False, external_data=False,
                          optimize=optimize)
    if not optimize:
        _fold_constants(path)
    proto = onnx.load(str(path))
    for key, value in card.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(path))


def _fold_constants(path: Path) -> None:
    """The ONNX file at ``path`` with its constants folded and its unused nodes removed (onnxscript's two cheap
    passes, a fraction of a second): without them ONNX Runtime warns about the exporter's leftovers (casts it
    cannot fold, unused initializers) each time it loads the file.
    """
    import onnx_ir
    from onnxscript import optimizer

    model = onnx_ir.load(str(path))
    optimizer.fold_constants(model)
    optimizer.remove_unused_nodes(model)
    onnx_ir.save(model, str(path))
