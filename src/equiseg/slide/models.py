"""The models a slide analysis runs: a trained model with the resolution it trained at."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from equiseg.config import Config
from equiseg.data.ocelot import Resolution
from equiseg.runs import Run, load_model


def check_mpp(value: float | None, option: str) -> None:
    """Refuse microns per pixel given as ``option`` (``--mpp``, ``--cell-mpp``) that are not a positive
    finite number (None: not given) with a ValueError naming it.
    """
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{option} must be positive (microns per pixel, a finite number), got {value}")


@dataclass(frozen=True)
class SlideModel:
    """A trained model with the resolution it runs at.

    Attributes:
        model: eval mode.
        config: its run's config.
        resolution: µm per pixel of the data it trained on.
        source: the run folder or checkpoint it came from.
    """

    model: nn.Module
    config: Config
    resolution: Resolution
    source: Path

    @classmethod
    def load(cls, path: Path | str, device: str | torch.device = "cpu",
             resolution: Resolution | None = None) -> SlideModel:
        """The model of a run folder or checkpoint, with its run's resolution (``resolution``
        replaces it; needed for a checkpoint outside a run folder that recorded none).
        """
        path = Path(path)
        model, config = load_model(path, device)
        resolution = resolution or Run.of(path).resolution()
        if resolution is None:
            raise ValueError(f"{path}: the run does not record the resolution of its training data "
                             "(resolution.yaml, or its dataset's metadata.json); give it with --cell-mpp/--tissue-mpp")
        return cls(model, config, resolution, path)

    def identity(self) -> dict[str, object]:
        m = self.config.model
        return {"source": str(self.source.resolve()), "task": self.config.task.value, "family": m.family.value,
                "width": m.width, "depth": m.depth, **self.resolution.to_dict()}


def load_slide_models(model: Path | str, tissue_model: Path | str | None = None, device: str | torch.device = "cpu",
                      cell_mpp: float | None = None) -> tuple[SlideModel, SlideModel | None]:
    """The cell model and the tissue model a slide analysis runs, as ``equiseg slide`` loads them.

    ``tissue_model`` defaults to the one the cell model's config names (``data.tissue_model``),
    and may stay None. ``cell_mpp`` runs the cell model at that resolution (µm/px) instead of its
    training data's; its tissue resolution stays the recorded one (4x the cell's without a record).

    Raises:
        ValueError: ``cell_mpp`` not a positive number, or no recorded resolution and none given.
    """
    resolution = None
    check_mpp(cell_mpp, "--cell-mpp")
    if cell_mpp is not None:
        recorded = Run.of(model).resolution()
        resolution = Resolution(cell_mpp, recorded.tissue_mpp if recorded else 4 * cell_mpp)
    cells = SlideModel.load(model, device, resolution)
    tissue_source = tissue_model or cells.config.data.tissue_model
    return cells, SlideModel.load(tissue_source, device) if tissue_source else None
