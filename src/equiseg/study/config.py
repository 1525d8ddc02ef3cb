"""A study's config: its variants, training sets, seeds and statistics, read from YAML, and the widths
that match each variant's parameter count to the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from equiseg.config import Config, ConfigError, apply_overrides, from_plain, path_override, read_yaml
from equiseg.config.schema import check_name
from equiseg.data.augment import AugmentPreset
from equiseg.data.context import ContextKind
from equiseg.data.ocelot import GrandChallengeInput
from equiseg.models import ConvFamily, Pooling, match_width, parameter_count
from equiseg.presets import load_config, preset_path
from equiseg.report.results import StudyPlan

GC_INPUT_ENV = "EQUISEG_GC_INPUT"


@dataclass(frozen=True)
class Variant:
    """One row of the study: a conv family, an augmentation preset, a width (None: matched), the
    tissue context it takes, a learning rate of its own (None: the base's, or the search's) and
    its downsampling (``pool``: None, the base's ``model.pool``; or ``max`` / ``blur``).

    Cells as instances (data with instance labels): ``nuclei: true`` gives the U-Net a nucleus output
    (the one-stage model: instances grown from its cells); ``stage2: PRESET`` (a ``nuclei`` preset or
    YAML file, e.g. ``nuclei-small``) makes the variant a two-stage model: its U-Net proposes the cells
    and a stage-2 run (`stage2_dir`), trained on the same data, training subset and seed, segments and
    classifies each in its window; the variant is scored as instances (PQ, AJI, the centroids' mF1).
    """

    label: str
    family: ConvFamily
    augment: AugmentPreset = AugmentPreset.NONE
    width: int | None = None
    context: ContextKind = ContextKind.NONE
    lr: float | None = None
    pool: Pooling | None = None
    nuclei: bool = False
    stage2: str | None = None


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
    tune_detect: bool = False
    plan: StudyPlan | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        for variant in self.variants:
            check_name(variant.label, "variant")
        if not self.variants:
            raise ValueError("no variants")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError("fractions must lie in (0, 1]")
        if any(n < 1 for n in self.train_images):
            raise ValueError("train_images must be at least 1 each")
        if any(not lr > 0 for lr in self.lr_search):
            raise ValueError("lr_search rates must be > 0")
        for variant in self.variants:
            if variant.stage2 is not None and (variant.nuclei or variant.context is not ContextKind.NONE):
                raise ValueError(f"variant {variant.label}: a two-stage variant (stage2) takes neither nuclei nor "
                                 "tissue context")
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
        overrides = ["name=tissue", "task=tissue", "data.augment=none", path_override("data.root", data_root), *self.tissue]
        return Config.from_dict(apply_overrides(self.base, overrides))

    def run_config(self, variant: Variant, fraction: float, seed: int, width: int, data_root: str,
                   tissue_model: str | None = None, lr: float | None = None) -> Config:
        """The full run config of one cell of the matrix (``tissue_model``: for context variants;
        ``lr``: the variant's learning rate, else the base's).
        """
        base = Config.from_dict(self.base)
        epochs, val_every = base.train.epochs, base.train.val_every
        if self.equal_steps:
            # the same steps, and a validation after the same number of steps, at every fraction
            epochs, val_every = max(1, round(epochs / fraction)), max(1, round(val_every / fraction))
        overrides = [f"name={variant.label}-f{fraction:g}-s{seed}", f"model.family={variant.family.value}",
                     f"model.width={width}", f"data.augment={variant.augment.value}", f"data.train_fraction={fraction}",
                     f"train.seed={seed}", f"train.epochs={epochs}", f"train.val_every={val_every}",
                     path_override("data.root", data_root)]
        if lr is not None:
            overrides.append(f"train.lr={lr}")
        if variant.nuclei:
            overrides.append("data.nuclei=true")
        if variant.pool is not None:
            overrides.append(f"model.pool={variant.pool.value}")
        if variant.context is not ContextKind.NONE:
            if tissue_model is None:
                raise ValueError(f"variant {variant.label} takes tissue context: a tissue model is needed")
            overrides += [f"data.context={variant.context.value}", path_override("data.tissue_model", tissue_model)]
        return Config.from_dict(apply_overrides(self.base, overrides))


def stage2_config(study: StudyConfig, variant: Variant, fraction: float, seed: int, data_root: str,
                  stage1: Path) -> Config:
    """The stage-2 run config of a two-stage variant's cell: its ``stage2`` preset on the study's data, the
    cell's training subset and seed, its cells proposed by the cell's own run ``stage1``.
    """
    if variant.stage2 is None:
        raise ValueError(f"variant {variant.label} is not a two-stage variant")
    base = Config.from_dict(study.base)
    return load_config(variant.stage2, [f"name={variant.label}-stage2-f{fraction:g}-s{seed}",
                                        path_override("data.root", data_root), f"data.train_fraction={fraction}",
                                        f"data.stratify={str(base.data.stratify).lower()}", f"train.seed={seed}",
                                        path_override("window.proposals", str(stage1))])


def stage2_dir(run_dir: Path) -> Path:
    """Where the stage-2 run of a two-stage variant's cell goes: beside the cell's run (``s0`` -> ``s0-stage2``)."""
    return run_dir.with_name(f"{run_dir.name}-stage2")


def matched_widths(study: StudyConfig) -> dict[str, int]:
    """Each variant's width: given, or matched to plain ``reference_width``'s parameter count."""
    depth = Config.from_dict(study.base).model.depth
    reference = parameter_count("plain", study.reference_width, depth)
    return {v.label: v.width or match_width(v.family, reference, depth) for v in study.variants}
"""The pictures of a run's best and worst test image, beside its study.json."""


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
