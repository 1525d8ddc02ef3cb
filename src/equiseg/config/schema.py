"""The run config's schema: frozen dataclasses, one a section (``model``, ``data``, ``train``, ``detect``),
each field with its type, default and meaning, checked when it is made.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from equiseg.config.serialize import apply_overrides, from_plain, plain, read_yaml
from equiseg.data.augment import AugmentConfig
from equiseg.data.context import CONTEXT_CHANNELS, ContextKind
from equiseg.data.targets import DEFAULT_SIGMA, CellTarget, TargetKind, Task
from equiseg.models import build_model
from equiseg.models.unet import ConvFamily, Pooling
from equiseg.models.window import CellWindowNet

LOGGERS = ("csv", "tensorboard", "comet", "mlflow")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PEAK_RULES = ("foreground", "per-class")


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


def check_name(value: str, key: str) -> None:
    """Refuse a name that becomes a folder name (a run's, a study's, a variant's) unless it is one plain
    name: letters, digits and ``. _ + = -``, not starting with a dot, so no path can leave its folder.
    """
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ValueError(f"{key} must be a plain name (letters, digits and . _ + = -, not starting with . or -; "
                         f"it names a folder), got {value!r}")


def _finite(section: object, prefix: str) -> None:
    """Every float of ``section`` is a finite number; else a ValueError naming it."""
    for item in dataclasses.fields(section):  # pyright: ignore[reportArgumentType]  (every section is a dataclass)
        value = getattr(section, item.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}.{item.name} must be a finite number, got {value}")


def _at_least(section: object, prefix: str, **bounds: float) -> None:
    """Each named field of ``section`` is at least its bound (None passes); else a ValueError naming it."""
    for name, bound in bounds.items():
        value = getattr(section, name)
        if value is not None and value < bound:
            raise ValueError(f"{prefix}.{name} must be at least {bound}, got {value}")


# Upper bounds of a U-Net, so that a config (or a checkpoint's config) that asks for a model too large
# to build is refused in one line instead of running out of memory. The widest level (the bottleneck,
# width * 2**depth units of |G| channels each) may have at most MAX_CHANNELS channels: 8 times the
# paper's plain U-Net (64 * 2**4 = 1024), 2.8 times the widest a packaged preset or study asks for
# (study-gpu's p4m, width 23 at depth 4: 2944; isotropic-paper: 1760), and 1.6 times what a study of
# the paper's scale over the steerable families would (c16 or d8 matched to plain width 64: width 20,
# 5120). A plain U-Net at the bound (width 512, depth 4) has about two billion parameters, 8 GB in
# float32 before gradients and optimiser state. Depth at most MAX_DEPTH:
# every image is padded to a multiple of 2**depth, and an OCELOT patch (1024 px) is down to one pixel
# after 10 poolings (the presets and studies use 3 and 4).
MAX_CHANNELS = 8192
MAX_DEPTH = 10


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net a run trains (the ``model`` section).

    Attributes:
        family: The convolution family (`ConvFamily`): ``plain``, ``isotropic``, ``p4``, ``p4m``,
            ``c8``, ``c16`` or ``d8``.
        width: Channels of the first level (doubled at each level down); for the group families
            fields of |G| channels each. The widest level, ``width * 2**depth * |G|`` channels, may
            have at most 8192 (`MAX_CHANNELS`).
        depth: Levels down, i.e. 2x2 poolings, 1 to 10; sides are padded to a multiple of ``2**depth``.
        pool: How the U-Net goes down a level (`Pooling`): ``max`` (2x2 max pooling) or ``blur``
            (anti-aliased: a binomial low-pass at stride 2).
    """

    family: ConvFamily = ConvFamily.ISOTROPIC
    width: int = 110
    depth: int = 4
    pool: Pooling = Pooling.MAX

    def __post_init__(self) -> None:
        _finite(self, "model")
        _at_least(self, "model", width=1, depth=1)
        if self.depth > MAX_DEPTH:
            raise ValueError(f"model.depth must be at most {MAX_DEPTH} (each level halves the image; a 1024 px patch "
                             f"is one pixel after 10), got {self.depth}")
        family = ConvFamily(self.family)
        channels = self.width * 2**self.depth * family.channels_per_unit
        if channels > MAX_CHANNELS:
            raise ValueError(f"model.width={self.width} with model.depth={self.depth} gives the {family.value} "
                             f"U-Net a widest level of {channels} channels, more than the {MAX_CHANNELS} it may have: "
                             "give a smaller model.width or model.depth")


@dataclass(frozen=True)
class SyntheticConfig:
    """The built-in synthetic dataset used when ``data.root`` is empty (the ``data.synthetic`` section).

    Attributes:
        train: Pairs in the training split.
        val: Pairs in the validation split.
        test: Pairs in the test split.
        size: Side of each cell and tissue patch, px.
        seed: Seed of the generator: the same seed gives the same bytes.
        crowding: 0 for the sparse world (about 14 cells per 512 px patch, tumour nuclei 80-110
            px apart), 1 for crowded tissue (tumour nests of touching nuclei 50-65 px apart, dense
            lymphocyte clusters: about 50-400 cells per 1024 px patch); see
            `equiseg.data.synthetic.render_pair`.
        rotated: Every pair is a crop at a random angle (cells cut by the crop border at every
            orientation, glass in the corners), a setting where no orientation of the image frame
            is special.
    """

    train: int = 16
    val: int = 4
    test: int = 4
    size: int = 512
    seed: int = 0
    crowding: float = 0.0
    rotated: bool = False

    def __post_init__(self) -> None:
        _finite(self, "data.synthetic")
        _at_least(self, "data.synthetic", train=1, val=1, test=0, size=32)
        if not 0 <= self.crowding <= 1:
            raise ValueError(f"data.synthetic.crowding must lie in [0, 1], got {self.crowding}")


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is cut into training samples (the ``data`` section).

    Attributes:
        root: A dataset folder in the OCELOT Zenodo layout; empty means the built-in synthetic
            data (generated once into the cache folder, ``~/.cache/equiseg`` or
            ``$EQUISEG_CACHE``), which training announces as a warning and records in the run
            folder.
        require_real: Refuse to train on the built-in synthetic data (for configs meant for real
            OCELOT data, such as the paper presets); ``data.require_real=false`` trains on it anyway.
        synthetic: The built-in synthetic dataset (`SyntheticConfig`).
        crop_size: Side of the random square crops for training, px (empty: whole images).
        target: What the cell model learns (`TargetKind`): ``disks`` of ``radius`` px (the
            paper's) or ``centres``, Gaussians of ``sigma`` px on each cell centre, which keep
            touching cells apart.
        radius: Radius of the ``disks`` target, px.
        sigma: Standard deviation of the ``centres`` target's Gaussians, px.
        train_fraction: The share of the training split used (a seeded subset), in (0, 1].
        stratify: Stratify that subset by cell class (cells and nuclei tasks): the images that bring
            every class come first in the seeded order, so that even the smallest subsets hold each
            class (`equiseg.data.datamodule.training_subset`); a stage 2 and its stage 1 with the same
            seed and fraction train on the same images.
        augment: The augmentation (`AugmentConfig`): a preset name (``none``, ``heavy``,
            ``non_symmetry``) or a mapping of transforms to their settings.
        batch_size: Samples per training step.
        num_workers: Data-loader worker processes (0: load in the training process).
        context: Tissue context for the cell task as two extra input channels (`ContextKind`):
            ``none``, ``truth`` (the ground-truth tissue mask) or ``model`` (the probabilities of
            the tissue model at ``tissue_model``).
        tissue_model: The tissue model (a run folder or checkpoint) that gives context; evaluation
            uses it whenever it is set.
        nuclei: Give the cell U-Net a nucleus output (``task: cells`` only): a fourth logit channel
            after the three classes, whose sigmoid is p(nucleus), trained on the nucleus foreground of
            the instance labels (``annotations/SPLIT/cell_instances``; data with only points, as
            OCELOT, is refused) with Dice + binary cross-entropy beside the class loss; instances
            are then grown from the detected centres within it (one-stage instances).
    """

    root: str | None = None
    require_real: bool = False
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    crop_size: int | None = 256
    target: TargetKind = TargetKind.DISKS
    radius: float = 30.0
    sigma: float = DEFAULT_SIGMA
    train_fraction: float = 1.0
    stratify: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig.none)
    batch_size: int = 4
    num_workers: int = 0
    context: ContextKind = ContextKind.NONE
    tissue_model: str | None = None
    nuclei: bool = False

    def __post_init__(self) -> None:
        _finite(self, "data")
        _at_least(self, "data", crop_size=1, radius=1, batch_size=1, num_workers=0)
        self.cell_target  # noqa: B018 (range checks of sigma)
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"data.train_fraction must lie in (0, 1], got {self.train_fraction}")
        if self.context is ContextKind.MODEL and not self.tissue_model:
            raise ValueError("data.context=model needs data.tissue_model (a tissue run folder or checkpoint)")

    @property
    def cell_target(self) -> CellTarget:
        """The cell task's target design (ignored by the tissue task, whose targets are its mask's classes)."""
        return CellTarget(self.target, self.radius, self.sigma)


class Schedule(enum.Enum):
    """The learning rate over a run's epochs (``train.schedule``, see `TrainConfig`)."""

    CONSTANT = "constant"
    PLATEAU = "plateau"
    COSINE = "cosine"


class Selection(enum.Enum):
    """What picks a run's kept checkpoint (``train.select``)."""

    LOSS = "loss"  # the lowest val/loss
    MF1 = "mf1"  # the highest val/mf1 (cells task)

    @property
    def metric(self) -> str:
        """The logged metric: ``val/loss`` or ``val/mf1``."""
        return f"val/{self.value}"

    @property
    def mode(self) -> str:
        """Lightning's mode: ``min`` for the loss, ``max`` for mF1."""
        return "min" if self is Selection.LOSS else "max"


class Compile(enum.Enum):
    """Whether training runs the U-Net through ``torch.compile``, and in which of its modes (``train.compile``)."""

    NONE = "none"
    DEFAULT = "default"
    REDUCE_OVERHEAD = "reduce-overhead"
    MAX_AUTOTUNE = "max-autotune"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the Lightning trainer (the ``train`` section).

    Attributes:
        epochs: Passes over the training set; with ``early_stopping`` the budget.
        lr: Adam's learning rate (the peak rate with a schedule).
        dice_weight: Weight of the soft Dice term of the loss.
        ce_weight: Weight of the cross-entropy term of the loss.
        seed: Seed of every random choice of training (weights, order, crops, augmentation),
            keyed by (seed, epoch, position in the epoch).
        accelerator: As Lightning names them (``auto``, ``cpu``, ``gpu``, ``cuda``, ``mps``,
            ``tpu``); a GPU asked for must be there when training starts.
        devices: Devices (processes) Lightning trains on.
        strategy: Lightning's strategy (``auto``, ``ddp``, ...).
        precision: Lightning's training precision (``32-true``, ``bf16-mixed``, ``16-mixed``, ...).
        loggers: Any of ``csv``, ``tensorboard``, ``comet``, ``mlflow`` (comet and mlflow when
            installed).
        limit_train_batches: Lightning's limit of training batches per epoch (a fraction, or a
            count); empty: all.
        checkpoint_every_n_steps: Also write ``last.ckpt`` every N training steps (a kill then
            loses at most N steps; resuming from such a checkpoint continues mid-epoch exactly);
            empty: at the end of each epoch only.
        schedule: The learning rate over epochs (`Schedule`): ``constant``, ``cosine`` (from
            ``lr`` down to ``lr / 100`` at ``epochs``), both after a linear warm-up of
            ``warmup_epochs``, or ``plateau`` (halved when val/loss has not improved for
            ``plateau_patience`` validations).
        warmup_epochs: Epochs of linear warm-up (``constant`` and ``cosine`` schedules).
        plateau_patience: Validations without improvement before the ``plateau`` schedule halves
            the rate.
        early_stopping: Stop when val/loss has not improved for this many validations (empty: train all
            ``epochs``); the checkpoint kept is the best one's by ``select``.
        select: What picks the checkpoint kept (``best.ckpt``; `Selection`): ``loss`` (the lowest
            val/loss) or ``mf1`` (the highest val/mf1: the cells found with ``detect``'s settings on each
            whole validation image, scored by the OCELOT rule, summed over the split; task cells only).
            Early stopping and the plateau schedule follow val/loss either way (a validation mF1 can sit
            at a low plateau early in training while the loss still falls).
        val_every: Validate every N epochs (a study with few training images has short epochs: it
            validates after the same number of steps at every training-set size); the plateau
            schedule then steps with the validations.
        compile: Train and validate the U-Net through ``torch.compile`` (`Compile`): ``none``
            (eager), or one of its modes, ``default`` (kernels fused: fewer passes over memory),
            ``reduce-overhead`` (also CUDA graphs: a whole step launched at once, for small
            batches on a GPU, where issuing kernels is what takes the time) or ``max-autotune``.
            The first step of each input size and mode compiles, tens of seconds; checkpoints are
            the same as eager training writes (the same keys, loaded without compiling).
    """

    epochs: int = 20
    lr: float = 1e-4
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    seed: int = 0
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    loggers: tuple[str, ...] = ("csv", "tensorboard")
    limit_train_batches: float | None = None
    checkpoint_every_n_steps: int | None = None
    schedule: Schedule = Schedule.CONSTANT
    warmup_epochs: int = 0
    plateau_patience: int = 5
    early_stopping: int | None = None
    select: Selection = Selection.LOSS
    val_every: int = 1
    compile: Compile = Compile.NONE

    def __post_init__(self) -> None:
        _finite(self, "train")
        _at_least(self, "train", epochs=1, devices=1, dice_weight=0, ce_weight=0, checkpoint_every_n_steps=1,
                  warmup_epochs=0, plateau_patience=1, early_stopping=1, val_every=1)
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.schedule is Schedule.PLATEAU and self.warmup_epochs:
            raise ValueError("train.warmup_epochs is for the constant and cosine schedules, not plateau")
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise ValueError(f"train.loggers: unknown {', '.join(unknown)}; choose from {', '.join(LOGGERS)}")
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"train.accelerator must be one of {', '.join(ACCELERATORS)}, got {self.accelerator!r}")


@dataclass(frozen=True)
class DetectConfig:
    """Reading cells off probability maps (the ``detect`` section; ``equiseg tune-detect`` chooses
    all four on the validation split and writes them to the run's ``detect.yaml``).

    Attributes:
        sigma: Standard deviation of the Gaussian that smooths the probability map before peaks
            are found, px (0: no smoothing).
        min_distance: Least distance between two detected cells, px.
        threshold: Least smoothed probability of a detected cell.
        peaks: ``foreground`` (local maxima of the smoothed 1 - p(background), the rule for
            disks) or ``per-class`` (local maxima of each cell class's smoothed probability,
            suppressed greedily across classes: the rule for centre targets).
    """

    sigma: float = 8.0
    min_distance: int = 15
    threshold: float = 0.5
    peaks: str = "foreground"

    def __post_init__(self) -> None:
        _finite(self, "detect")
        _at_least(self, "detect", sigma=0, min_distance=1)
        if self.peaks not in PEAK_RULES:
            raise ValueError(f"detect.peaks must be one of {', '.join(PEAK_RULES)}, got {self.peaks!r}")

    @property
    def per_class(self) -> bool:
        return self.peaks == "per-class"


@dataclass(frozen=True)
class WindowConfig:
    """Stage 2 of the two-stage cell model (the ``window`` section; read by ``task: nuclei`` only).

    Each proposed cell is cut out in a square window centred on its pixel, and a
    `equiseg.models.window.CellWindowNet` returns its nucleus mask and class there.

    Attributes:
        side_um: The window's side, µm (about three nucleus diameters: the cell, its neighbours' edges
            and some tissue around it).
        side_px: The window's side, px: odd, with ``(side_px - 1)`` a multiple of ``2**model.depth``.
            Empty: the side nearest ``side_um`` at the training data's resolution, chosen when training
            starts and written into the run's config.
        jitter: Training windows are centred up to this many px off the true centre (each axis), as the
            proposals of stage 1 are; 0 centres them exactly.
        class_weight: Weight of the class's cross-entropy beside the mask's loss (binary cross-entropy
            plus ``train.dice_weight`` times soft Dice).
        proposals: The stage-1 model (a ``cells`` run folder or checkpoint) whose detected cells are
            the proposals when the two stages run together; empty while training stage 2.
    """

    side_um: float = 24.0
    side_px: int | None = None
    jitter: int = 2
    class_weight: float = 1.0
    proposals: str | None = None

    def __post_init__(self) -> None:
        _finite(self, "window")
        _at_least(self, "window", side_px=3, jitter=0, class_weight=0)
        if not self.side_um > 0:
            raise ValueError(f"window.side_um must be > 0, got {self.side_um}")
        if self.side_px is not None and self.side_px % 2 == 0:
            raise ValueError(f"window.side_px must be odd (the window's centre is the cell's pixel), got {self.side_px}")


@dataclass(frozen=True)
class Config:
    """One training run: what ``equiseg train -c`` reads (a preset or a YAML file, with
    ``KEY=VALUE`` overrides) and writes into the run folder as ``config.yaml``.

    Attributes:
        name: The run's name; run folders default to ``runs/NAME-DATE``.
        task: What the model segments (`Task`): ``cells`` (background, BC, TC) or ``tissue``
            (background, cancer area).
        model: The U-Net (`ModelConfig`).
        data: The data and its training samples (`DataConfig`).
        train: Optimisation and the trainer (`TrainConfig`).
        detect: Reading cells off probability maps (`DetectConfig`).
        window: Stage 2 of the two-stage cell model (`WindowConfig`), for ``task: nuclei``.
    """

    name: str = "run"
    task: Task = Task.CELLS
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    window: WindowConfig = field(default_factory=WindowConfig)

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        side = self.window.side_px
        if self.task is Task.NUCLEI and side is not None and (side - 1) % 2**self.model.depth:
            raise ValueError(f"window.side_px={side}: a window model of depth {self.model.depth} needs (side - 1) "
                             f"to be a multiple of {2**self.model.depth}")
        if self.task is Task.TISSUE and self.data.context is not ContextKind.NONE:
            raise ValueError("data.context is for the cell task; a tissue model takes no tissue context")
        if self.train.select is Selection.MF1 and self.task is not Task.CELLS:
            raise ValueError(f"train.select=mf1 scores cells: it is for task cells, not task {self.task.value}")
        if self.data.nuclei and self.task is not Task.CELLS:
            raise ValueError(f"data.nuclei is for task cells (a nucleus output beside the cell classes), "
                             f"not task {self.task.value}")

    @property
    def in_channels(self) -> int:
        """Input channels of the model: RGB, plus the two tissue classes with context."""
        return 3 + (CONTEXT_CHANNELS if self.data.context is not ContextKind.NONE else 0)

    @property
    def class_channels(self) -> int:
        """The class channels of the model's output (3 for cells, 2 for tissue): the probabilities of a
        map before its nucleus channel, the ones every class reading (argmax, detection, Dice) takes.
        """
        return len(self.task.class_names)

    @property
    def out_channels(self) -> int:
        """The model's output channels: the classes, then with ``data.nuclei`` one nucleus channel."""
        return self.class_channels + int(self.data.nuclei)

    def build_model(self) -> Any:
        """The network this config trains (fresh weights): a U-Net of its family, width, depth, input
        channels and classes (and with ``data.nuclei`` a nucleus channel), or for ``task: nuclei`` a `CellWindowNet` of the same.
        """
        m = self.model
        if self.task is Task.NUCLEI:
            return CellWindowNet(m.family, m.width, m.depth, self.in_channels, num_classes=len(self.task.class_names) - 1)
        return build_model(m.family, m.width, m.depth, self.in_channels, num_classes=self.class_channels,
                           pool=m.pool, nucleus=self.data.nuclei)

    def to_dict(self) -> dict[str, Any]:
        """Plain builtin types only (safe for YAML and for ``torch.load(weights_only=True)``)."""
        return plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build from nested dicts; unknown keys are an error naming the key."""
        return from_plain(cls, data or {})

    def to_yaml(self, path: Path | str) -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    @classmethod
    def from_yaml(cls, path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        return cls.from_dict(apply_overrides(read_yaml(path), overrides))
