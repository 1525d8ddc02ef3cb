"""``equiseg predict``: probability maps, overlays and cells for image files of any size.

An image goes through in blocks of windows (`stream_blocks`):
each finished block is written into ``<stem>_probs.npy`` (float16 on disk), added to the
pictures and handed to the cell detector (`BlockDetector`),
then dropped. The input is read lazily, a window at a time, where its format allows
(`RgbFile`) and the pictures have at most `PICTURE_SIDE` px on their longer side,
so memory is about one block (classes x about BLOCK_SIDE² float32), two batches of windows and strips
of about ``overlap`` rows across the width, whatever the image's size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from equiseg.config import Config
from equiseg.data.context import ContextKind
from equiseg.data.targets import Task
from equiseg.detection import BlockDetector, official_format_refusal, write_points_json
from equiseg.detection.instances import instances_of_cells
from equiseg.files import owned_outputs
from equiseg.inference.instance_outputs import ImageInstances, two_stage_file, write_instances
from equiseg.inference.readers import ImageReading, NpyBlocks, RgbFile
from equiseg.inference.tiling import BlockSink, check_tiling, model_runtime, stream_blocks
from equiseg.pictures import (
    CELL_COLOURS,
    class_overlay,
    dot_radius,
    draw_points,
    predicted_classes,
    probability_picture,
    write_png,
)
from equiseg.runs import Run, check_proposer, load_model, proposal_run
from equiseg.runtime import Runtime


def draw_outlines(image: np.ndarray, rings: list[np.ndarray], classes: np.ndarray) -> np.ndarray:
    """A copy of ``image`` (H, W, 3) uint8 with each closed ring (x, y px, continuous) drawn one px wide
    in its class's colour (`CELL_COLOURS`).
    """
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    for ring, cls in zip(rings, np.asarray(classes).tolist()):
        if len(ring) >= 2:
            draw.line([(float(x), float(y)) for x, y in ring], fill=CELL_COLOURS.get(int(cls), (0, 0, 0)), width=1)
    return np.asarray(picture)


DEFAULT_MPP = 0.2  # µm/px: OCELOT's cell patches, for a checkpoint whose run folder does not say
PICTURE_SIDE = 4096  # px: the pictures of a larger image keep every k-th row and column
JSON_NAME = "cell_classification.json"
PNG_LEVEL = 1  # zlib level of the pictures
THREADED_SINK = False  # finish blocks on a worker thread on the CPU too (on a GPU they always are)


class _Pictures:
    """``<stem>_overlay.png`` and ``<stem>_probs.png`` built a finished block at a time from
    every ``step``-th row and column, as uint8 only (never a float copy of the whole map); per
    pixel what ``prediction_overlay`` and ``probability_picture`` make of the whole map.
    """

    def __init__(self, height: int, width: int, step: int, probs: bool) -> None:
        self.step = step
        shape = (-(-height // step), -(-width // step), 3)
        self.overlay = np.zeros(shape, np.uint8)
        self.probs = np.zeros(shape, np.uint8) if probs else None

    def add(self, top: int, left: int, block: torch.Tensor, image: RgbFile) -> None:
        """The finished block at (top, left), (C, h, w) probabilities, of ``image``."""
        first_row, first_column = -top % self.step, -left % self.step  # the first ones the pictures keep
        _, rows, columns = block.shape
        if first_row >= rows or first_column >= columns:
            return
        kept = block[:, first_row::self.step, first_column::self.step].numpy()  # (C, k, l)
        at_row, at_column = (top + first_row) // self.step, (left + first_column) // self.step
        pixels = image.region(top + first_row, top + rows, left + first_column,
                              left + columns)[::self.step, ::self.step]
        where = np.s_[at_row:at_row + kept.shape[1], at_column:at_column + kept.shape[2]]
        self.overlay[where] = class_overlay(pixels, predicted_classes(kept))
        if self.probs is not None:
            self.probs[where] = probability_picture(kept)

    def save(self, stem: Path, points: np.ndarray,
             outlines: tuple[list[np.ndarray], np.ndarray] | None = None) -> None:
        """Write the pictures, with ``points`` (N, 4 image px) as dots on the overlay, and ``outlines``
        (rings in image px, and each one's class) drawn in their class's colour.
        """
        scaled = np.array(points, dtype=np.float64).reshape(-1, 4)
        scaled[:, :2] /= self.step
        overlay = draw_points(self.overlay, scaled, radius=dot_radius(self.overlay.shape[0]), filled=True)
        if outlines is not None:
            overlay = draw_outlines(overlay, [ring / self.step for ring in outlines[0]], outlines[1])
        # a 4096² overlay in a quarter of Pillow's time at zlib level 1 (benchmarks/predict_profile.py)
        write_png(f"{stem}_overlay.png", overlay, PNG_LEVEL)
        if self.probs is not None:
            write_png(f"{stem}_probs.png", self.probs, PNG_LEVEL)


def picture_step(height: int, width: int) -> int:
    """The pictures of an H x W image keep every k-th row and column: the least k that brings
    the longer side to at most `PICTURE_SIDE` px (1: full size).
    """
    return -(-max(height, width) // PICTURE_SIDE)


@dataclass(frozen=True, eq=False)
class ImagePrediction:
    """What ``equiseg predict`` made of one image.

    Attributes:
        path: the image file.
        height, width: its size, px.
        points: (N, 4) rows (x, y, class, probability), image px (x = column), never clipped.
        picture_step: the pictures keep every picture_step-th row and column (1: full size).
        reading: how the image was read.
    """

    path: Path
    height: int
    width: int
    points: np.ndarray
    picture_step: int
    reading: ImageReading

    @property
    def size(self) -> str:
        """``WxH`` (width first, as image viewers write it)."""
        return f"{self.width}x{self.height}"


@dataclass(frozen=True, eq=False)
class Predictions:
    """What ``equiseg predict`` made of a list of images.

    Attributes:
        images: one per input, in order (image_i of the JSON is ``images[i]``).
        json_path: ``cell_classification.json`` when written, else None.
        json_skipped: when not written, the line that says why.
    """

    images: tuple[ImagePrediction, ...]
    json_path: Path | None
    json_skipped: str | None

    @property
    def cell_counts(self) -> tuple[int, ...]:
        """The number of cells found in each image."""
        return tuple(len(image.points) for image in self.images)

    def notes(self) -> list[str]:
        """Lines for the user: why the JSON was skipped, and which pictures are scaled down."""
        lines = [self.json_skipped] if self.json_skipped else []
        for image in self.images:
            if image.picture_step > 1:
                side = -(-image.width // image.picture_step), -(-image.height // image.picture_step)
                lines.append(f"{image.path.name} ({image.size}): pictures at 1/{image.picture_step} scale, "
                             f"{side[0]}x{side[1]} (one px in {image.picture_step} along each side)")
        return lines


@dataclass(frozen=True, eq=False)
class InstanceOutput:
    """How predict writes its cells as instances: the µm per px its measurements take the image to be at
    (the resolution the model trained at) and, for a two-stage cell model, its stage 2 (the window net and
    its window's side, px); without one, the model is a one-stage model with a nucleus output.
    """

    mpp: float
    stage2: torch.nn.Module | None = None
    side: int = 0


class _HeldMap:
    """The whole probability map kept in memory as float16, a finished block at a time (a one-stage model's
    instances are grown on it at the end: 2 bytes a px and channel).
    """

    def __init__(self, height: int, width: int) -> None:
        self.shape, self.map = (height, width), None

    def add(self, top: int, left: int, block: torch.Tensor) -> None:
        if self.map is None:
            self.map = np.zeros((block.shape[0], *self.shape), np.float16)
        self.map[:, top:top + block.shape[1], left:left + block.shape[2]] = block.numpy()


class _BlockOutputs:
    """What `predict_file` does with each finished block: the held map (a one-stage model's instances),
    the probability file, the cell detector and the pictures.
    """

    def __init__(self, config: Config, image: RgbFile, stem: Path, probs: bool, held: bool) -> None:
        height, width, detect = image.height, image.width, config.detect
        self.image, self.stem, self.probs, self.class_channels = image, stem, probs, config.class_channels
        self.pictures = _Pictures(height, width, picture_step(height, width), probs)
        self.detector = (BlockDetector(height, width, detect.sigma, detect.min_distance, detect.threshold,
                                       per_class=detect.per_class) if config.task is Task.CELLS else None)
        self.held = _HeldMap(height, width) if held else None
        self.npy: NpyBlocks | None = None

    def add(self, top: int, left: int, block: torch.Tensor) -> None:
        if self.held is not None:
            self.held.add(top, left, block)
        if self.probs and self.npy is None:
            self.npy = NpyBlocks(f"{self.stem}_probs.npy", (block.shape[0], self.image.height, self.image.width))
        if self.npy is not None:
            self.npy.write(top, left, block)
        if self.detector is not None:
            self.detector.add(top, left, block[:self.class_channels])
        self.pictures.add(top, left, block, self.image)


def predict_file(model: torch.nn.Module, config: Config, path: Path, out_dir: Path, tile: int = 1024,
                 overlap: int = 128, probs: bool = True, runtime: Runtime | None = None,
                 instances: InstanceOutput | None = None) -> ImagePrediction:
    """Predict one image of any size, streaming it through in blocks of windows.

    Writes ``<stem>_overlay.png``, ``<stem>_cells.csv`` (x,y,class,probability in image px,
    never clipped) and, with ``probs``, ``<stem>_probs.npy`` (float16, C x H x W) and
    ``<stem>_probs.png``. The probabilities equal `predict_probabilities`
    on the whole image bit for bit in float32 (the .npy holds them rounded to float16) and the
    cells equal `find_cells` on them; pictures are full size up to
    `PICTURE_SIDE` px, else scaled down by `picture_step`. Memory: one block of
    windows' sums ((C + 1) x about 2048² float32, `stream_blocks`),
    two batches of windows, strips across the width of about ``overlap`` rows (window terms) and
    2 x ``detection_halo`` rows (the detector's context) of C float32 each, up to
    `SEGMENT_CACHE_BYTES` of decoded TIFF segments, and the pictures (at most
    2 x 4096² x 3 bytes), plus the whole image as uint8 where its format cannot be read lazily.

    With ``instances`` the cells are written as instances (`write_instances`: the label image, the CSV
    with measurements, QuPath polygons) and drawn as outlines on the overlay: for a two-stage model
    ``model`` is stage 1, whose cells stage 2 segments and classifies (`two_stage_file`); for a one-stage
    model (``data.nuclei``) the cells are grown on its nucleus map (`instances_of_cells`), which is then
    held in memory whole (float16, 2 bytes a px and channel).

    Args:
        model: in eval mode, on ``runtime.device``.
        runtime: device, batch and precision (default: the model's device, batch 1, float32).
        instances: write the cells as instances (see above).
    """
    path = Path(path)
    stem = out_dir / path.stem
    runtime = runtime or model_runtime(model)
    with contextlib.closing(RgbFile(path)) as image:
        height, width = image.height, image.width
        step = picture_step(height, width)
        outputs = _BlockOutputs(config, image, stem, probs, held=instances is not None and instances.stage2 is None)
        pictures, detector, held = outputs.pictures, outputs.detector, outputs.held
        # on a GPU the host finishes each block while the device computes the next ones
        with BlockSink(outputs.add, threaded=runtime.device.type == "cuda" or THREADED_SINK) as sink:
            for top, left, block in stream_blocks(model, image.window, height, width, tile, overlap, runtime):
                sink.put(top, left, block)
        points = detector.points() if detector is not None else np.zeros((0, 4))
        if instances is not None:
            points = _write_instances(stem, image, points, instances, held, pictures, runtime)
            return ImagePrediction(path, height, width, points, step, image.reading)
    pictures.save(stem, points)
    lines = ["x,y,class,probability"] + [f"{int(x)},{int(y)},{int(c)},{q:.4f}" for x, y, c, q in points]
    Path(f"{stem}_cells.csv").write_text("\n".join(lines) + "\n")
    return ImagePrediction(path, height, width, points, step, image.reading)


def _write_instances(stem: Path, image: RgbFile, points: np.ndarray, instances: InstanceOutput,
                     held: _HeldMap | None, pictures: _Pictures, runtime: Runtime) -> np.ndarray:
    """The cells of one image as instances (see `predict_file`), written with the pictures; returns the cells."""
    if instances.stage2 is not None:
        labels, points = two_stage_file(instances.stage2, instances.side, image, points, runtime)
    else:
        assert held is not None and held.map is not None  # held for a one-stage model; an image has a block
        labels, points = instances_of_cells(held.map, points)
    found = ImageInstances.of(labels, points, instances.mpp)
    write_instances(stem, found)
    pictures.save(stem, np.zeros((0, 4)), outlines=(found.outlines, points[:, 2]))
    return points


def predict_files(model: torch.nn.Module, config: Config, paths: list[Path], out_dir: Path, tile: int = 1024,
                  overlap: int = 128, on_image: Callable[[int, int], None] | None = None, probs: bool = True,
                  runtime: Runtime | None = None, force: bool = False,
                  instances: InstanceOutput | None = None) -> Predictions:
    """Predict every file (`predict_file`) into ``out_dir``, and list them in images.txt.

    ``cell_classification.json`` (the official format, image_i = the i-th file) is written only
    when every image fits that format (`official_format_refusal`:
    no side over 1024 px, so no point moves); otherwise `Predictions.json_skipped` says
    why, naming the first larger image. The cells are in the CSV files either way. All of it
    is staged and moved into ``out_dir`` at the end (`equiseg.files.owned_outputs`): equiseg's
    earlier outputs there are replaced, a folder holding anything else is refused (``force``: its
    other files are kept as they are), and nothing of the user's is touched.
    ``on_image(done, total)`` is called after each image. With ``instances`` the cells are written as
    instances (see `predict_file`).
    """
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError("two input files share a name; their outputs would overwrite each other")
    odd = [str(p) for p in paths if any(ord(c) < 32 for c in str(p))]
    if odd:  # images.txt is one line per image: a newline in a name would forge an entry
        raise ValueError(f"{odd[0]!r}: a file name with a line break or another control character; rename it")
    runtime = runtime or model_runtime(model)
    model = runtime.place(model)
    images = []
    with owned_outputs(out_dir, force) as partial:
        for i, path in enumerate(paths):
            images.append(predict_file(model, config, path, partial, tile, overlap, probs, runtime, instances))
            if on_image is not None:
                on_image(i + 1, len(paths))
        (partial / "images.txt").write_text("".join(f"image_{i}\t{p}\n" for i, p in enumerate(paths)))
        refusal = official_format_refusal([(image.height, image.width) for image in images],
                                          [image.path.name for image in images])
        if refusal is None:
            write_points_json(partial / JSON_NAME, [image.points for image in images])
    if refusal is None:
        return Predictions(tuple(images), out_dir / JSON_NAME, None)
    return Predictions(tuple(images), None, f"{refusal}; the cells are in the *_cells.csv files")


def predict_run(model: Path | str, paths: list[Path], out_dir: Path, tile: int = 1024, overlap: int = 128,
                on_image: Callable[[int, int], None] | None = None, probs: bool = True,
                runtime: Runtime | None = None, force: bool = False,
                proposals: Path | str | None = None) -> Predictions:
    """`predict_files` with the model of a run folder or checkpoint, as ``equiseg predict`` runs it.

    Args:
        model: a run folder (its best checkpoint) or a ``.ckpt`` file.
        paths: JPEG, PNG or TIFF images of any size.
        out_dir: the output folder, written whole (it must not hold other files).
        tile: tile side in px; larger images go through in overlapping tiles.
        overlap: overlap of neighbouring tiles, px.
        runtime: where and how the model runs (device, batch, precision, optimized); None: the
            CPU with the defaults (``Runtime.of("cpu")``).
        on_image: called with (images done, images in all) after each image (progress).
        probs: write the probability maps (``*_probs.npy``, ``*_probs.png``).
        proposals: for stage 2 of a two-stage cell model (``task: nuclei``), the cells run that
            proposes its cells; None: its config's ``window.proposals``. The cells are then written
            as instances (see `predict_file`).

    Raises:
        FileNotFoundError: an image that is not a file, or no such model.
        ValueError: a model that takes tissue context, which a lone image lacks (score it with
            its tissue patches: ``equiseg challenge`` or ``equiseg evaluate``); a tile or overlap
            that cannot cover an image (`check_tiling`).
    """
    check_tiling(tile, overlap)
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no such file(s): {', '.join(missing)}")
    runtime = runtime or Runtime.of("cpu")
    net, config = load_model(model, runtime.device)
    instances = _instance_output(model, net, config)
    if config.task is Task.NUCLEI:  # the model is stage 2: stage 1 proposes the cells
        net, config = load_model(proposal_run(model, config, proposals), runtime.device)
        check_proposer(config)
    elif proposals is not None:
        raise ValueError(f"{model} is a {config.task.value} model: proposals are for stage 2 of a two-stage cell "
                         "model (task nuclei)")
    if config.data.context is not ContextKind.NONE:
        raise ValueError(f"{model} takes tissue context (data.context={config.data.context.value}), which a lone "
                         "image lacks: use `equiseg challenge` (cell and tissue patches) or `equiseg evaluate`")
    return predict_files(net, config, [Path(p) for p in paths], Path(out_dir), tile=tile, overlap=overlap,
                         on_image=on_image, probs=probs, runtime=runtime, force=force, instances=instances)


def _instance_output(model: Path | str, net: torch.nn.Module, config: Config) -> InstanceOutput | None:
    """How `predict_file` writes a model's cells as instances: stage 2 of a two-stage model (refused with
    tissue context: a lone image has none), a one-stage model with a nucleus output; None for others.
    """
    resolution = Run.of(model).resolution()
    mpp = resolution.cell_mpp if resolution is not None else DEFAULT_MPP
    if config.task is Task.CELLS and config.data.nuclei:
        return InstanceOutput(mpp)
    if config.task is not Task.NUCLEI:
        return None
    if config.data.context is not ContextKind.NONE:
        raise ValueError(f"{model} takes tissue context (data.context={config.data.context.value}), which a lone "
                         "image lacks: use `equiseg evaluate`")
    side = config.window.side_px
    if side is None:
        raise ValueError(f"{model}: its config has no window.side_px (it is set when stage 2 trains)")
    return InstanceOutput(mpp, net, side)
