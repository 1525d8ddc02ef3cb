"""What an evaluation of a split gives: its scores, each image's cells and row, where the tissue context
came from, and the data it ran on (`Evaluation`), for pixels and points (`equiseg.evaluation.evaluate`) and
for instances (`equiseg.evaluation.instance_evaluation`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from equiseg.detection import official_format_refusal
from equiseg.evaluation.data_record import DataRecord


class ContextSource(enum.Enum):
    """Where an evaluated model's tissue context came from."""

    NONE = "none"                  # a model without context
    TISSUE_MODEL = "tissue model"  # a tissue model's probabilities, as deployed
    ORACLE = "oracle"              # the ground-truth tissue mask: an upper bound


@dataclass
class Evaluation:
    """Scores of one split, what each image gave (for pictures and the prediction file), and which data it was."""

    scores: dict[str, float]
    ids: list[str]
    points: list[np.ndarray]            # per image (N, 4): x, y, class, probability
    per_image: list[dict[str, float]]   # per image: loss, dice/mean; cells: tp/BC, fp/BC, gt/BC, the same for TC
    context: ContextSource = ContextSource.NONE  # where the model's tissue context came from
    shapes: list[tuple[int, int]] = field(default_factory=list)  # per image (H, W), px
    data: DataRecord | None = None  # the dataset: a folder and its digest, or equiseg's synthetic data

    def json_refusal(self) -> str | None:
        """Why ``cell_classification.json`` cannot hold these images' points, or None (see
        `official_format_refusal`).
        """
        return official_format_refusal(self.shapes, self.ids) if self.points else None

    @property
    def context_line(self) -> str | None:
        """One line saying where the tissue context came from, or None for a model without it."""
        match self.context:
            case ContextSource.ORACLE:
                return ("tissue context: ORACLE (the ground-truth tissue mask) - an upper bound, not what a deployed "
                        "model sees")
            case ContextSource.TISSUE_MODEL:
                return f"tissue context: {self.context.value}"
        return None
