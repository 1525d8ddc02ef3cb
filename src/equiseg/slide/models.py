"""The models a slide analysis runs: a trained model with the resolution it trained at."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from equiseg.config import Config
from equiseg.data.ocelot import Resolution
from equiseg.data.targets import Task
from equiseg.runs import Run, check_proposer, load_model, proposal_run


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
        stage2: for stage 1 of a two-stage cell model, its stage 2 (a ``nuclei`` model), which
            segments and classifies each cell this model finds.
    """

    model: nn.Module
    config: Config
    resolution: Resolution
    source: Path
    stage2: SlideModel | None = None

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
        stage2 = {} if self.stage2 is None else {"stage2": self.stage2.identity()}
        return {"source": str(self.source.resolve()), "task": self.config.task.value, "family": m.family.value,
                "width": m.width, "depth": m.depth, **self.resolution.to_dict(), **stage2}


def load_slide_models(model: Path | str, tissue_model: Path | str | None = None, device: str | torch.device = "cpu",
                      cell_mpp: float | None = None,
                      proposals: Path | str | None = None) -> tuple[SlideModel, SlideModel | None]:
    """The cell model and the tissue model a slide analysis runs, as ``equiseg slide`` loads them.

    ``tissue_model`` defaults to the one the cell model's config names (``data.tissue_model``),
    and may stay None. ``cell_mpp`` runs the cell model at that resolution (µm/px) instead of its
    training data's; its tissue resolution stays the recorded one (4x the cell's without a record).
    With stage 2 of a two-stage cell model as ``model``, the cell model is its stage 1 (``proposals``,
    else its config's ``window.proposals``) carrying it as `SlideModel.stage2`; ``cell_mpp`` applies
    to both.

    Raises:
        ValueError: ``cell_mpp`` not a positive number, or no recorded resolution and none given.
    """
    resolution = None
    check_mpp(cell_mpp, "--cell-mpp")
    if cell_mpp is not None:
        recorded = Run.of(model).resolution()
        resolution = Resolution(cell_mpp, recorded.tissue_mpp if recorded else 4 * cell_mpp)
    cells = SlideModel.load(model, device, resolution)
    if cells.config.task is Task.NUCLEI:
        stage1 = SlideModel.load(proposal_run(model, cells.config, proposals), device, resolution)
        check_proposer(stage1.config)
        cells = dataclasses.replace(stage1, stage2=cells)
    elif proposals is not None:
        raise ValueError(f"{model} is a {cells.config.task.value} model: proposals are for stage 2 of a two-stage "
                         "cell model (task nuclei)")
    tissue_source = tissue_model or cells.config.data.tissue_model
    return cells, SlideModel.load(tissue_source, device) if tissue_source else None
