"""The OCELOT 2023 Grand Challenge algorithm interface, and ``equiseg challenge``.

The challenge container builds ``Model(metadata)`` once, then calls
``model(cell_patch, tissue_patch, pair_id)`` for each pair with uint8 [1024, 1024, 3] arrays
and expects a list of ``(x, y, class, probability)``: x, y ints in 0..1023, class 1 (BC) or
2 (TC), probability a float in [0, 1].
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from equiseg.data.datamodule import image_to_tensor
from equiseg.evaluation.detection import detect_cells, write_points_json
from equiseg.evaluation.inference import predict_probabilities

CELL_MODEL_ENV = "EQUISEG_CELL_MODEL"


class Model:
    """A trained equiseg cell model behind the challenge's call signature.

    Args:
        metadata: the challenge's metadata list (entry ``pair_id`` describes that pair).
        cell_model: run folder or checkpoint; default ``$EQUISEG_CELL_MODEL`` (the container
            calls ``Model(metadata)`` with nothing else).
        device: "cpu", "cuda", or None for CUDA when available.
    """

    def __init__(self, metadata: list[dict], cell_model: Path | str | None = None, device: str | None = None) -> None:
        from equiseg.training.fit import load_model

        path = cell_model or os.environ.get(CELL_MODEL_ENV)
        if not path:
            raise ValueError(f"no cell model: pass cell_model= or set ${CELL_MODEL_ENV}")
        self.metadata = metadata
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.config = load_model(path, map_location=self.device)
        self.model.to(self.device)

    def __call__(self, cell_patch: np.ndarray, tissue_patch: np.ndarray, pair_id: int) -> list[tuple]:
        if cell_patch.dtype != np.uint8 or cell_patch.ndim != 3 or cell_patch.shape[-1] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) cell patch, got {cell_patch.shape} {cell_patch.dtype}")
        with torch.no_grad():
            probs = predict_probabilities(self.model, image_to_tensor(cell_patch), tile=1024).float()
        detect = self.config.detect
        found = detect_cells(probs, detect.sigma, detect.min_distance, detect.threshold)
        height, width = cell_patch.shape[:2]
        return [(int(min(max(x, 0), width - 1)), int(min(max(y, 0), height - 1)), int(c), float(p))
                for x, y, c, p in found]


def run_challenge(input_dir: Path, output_dir: Path, cell_model: Path | str,
                  on_pair: Callable[[int, int], None] | None = None) -> Path:
    """Read a Grand Challenge input folder, predict every pair, write ``cell_classification.json``."""
    from equiseg.data.ocelot import GrandChallengeInput

    data = GrandChallengeInput(input_dir)
    model = Model([m.record for m in data.metadata], cell_model=cell_model)
    points = []
    for pair_id in range(len(data)):
        sample = data[pair_id]
        points.append(np.array(model(sample.cell_image, sample.tissue_image, pair_id), dtype=np.float64).reshape(-1, 4))
        if on_pair is not None:
            on_pair(pair_id + 1, len(data))
    return write_points_json(Path(output_dir) / "cell_classification.json", points)
