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

from equiseg.data.context import ContextKind
from equiseg.data.datamodule import model_input
from equiseg.data.ocelot import GrandChallengeInput, image_to_tensor, parse_pair
from equiseg.data.targets import Task
from equiseg.detection import find_cells, write_points_json
from equiseg.evaluation.tissue_context import load_tissue_model, model_context
from equiseg.files import check_file, owned_file
from equiseg.inference.tiling import predict_probabilities
from equiseg.runs import load_model
from equiseg.runtime import Runtime

CELL_MODEL_ENV = "EQUISEG_CELL_MODEL"
TISSUE_MODEL_ENV = "EQUISEG_TISSUE_MODEL"


class Model:
    """A trained equiseg cell model behind the challenge's call signature.

    A cell model trained with tissue context (``data.context`` truth or model) also needs a
    tissue model: each call then segments the tissue patch, cuts the cell patch's block out of
    its probabilities (located from the pair's metadata) and feeds it to the cell model with
    the cell patch, exactly as ``equiseg evaluate`` does.

    Args:
        metadata: the challenge's metadata list (entry ``pair_id`` describes that pair).
        cell_model: run folder or checkpoint; default ``$EQUISEG_CELL_MODEL`` (the container
            calls ``Model(metadata)`` with nothing else).
        tissue_model: run folder or checkpoint of the tissue model, for a cell model with
            context; default ``$EQUISEG_TISSUE_MODEL``, then the cell model's
            ``data.tissue_model``.
        runtime: device, tile batch and precision (`equiseg.runtime.Runtime`); default
            this process's GPU when there is one, else the CPU, float32.
    """

    def __init__(self, metadata: list[dict], cell_model: Path | str | None = None,
                 tissue_model: Path | str | None = None, runtime: Runtime | None = None) -> None:

        path = cell_model or os.environ.get(CELL_MODEL_ENV)
        if not path:
            raise ValueError(f"no cell model: pass cell_model= or set ${CELL_MODEL_ENV}")
        self.metadata = metadata
        self.runtime = runtime or Runtime.of("auto")
        self.model, self.config = load_model(path, self.runtime.device)
        if self.config.task is not Task.CELLS:
            raise ValueError(f"{path}: a {self.config.task.value} model, not a cell model")
        self.tissue_model = None
        if self.config.data.context is not ContextKind.NONE:
            tissue = tissue_model or os.environ.get(TISSUE_MODEL_ENV) or self.config.data.tissue_model
            if not tissue:
                raise ValueError(f"{path} was trained with tissue context (data.context={self.config.data.context.value}): "
                                 f"pass a tissue model (--tissue-model, tissue_model= or ${TISSUE_MODEL_ENV})")
            self.tissue_model = load_tissue_model(tissue, self.runtime.device)
            # each pair's place in its tissue patch; a malformed entry fails here, before any pair runs
            self.metas = [parse_pair(str(i), record, "metadata") for i, record in enumerate(metadata)]
        elif tissue_model:
            raise ValueError(f"{path} was trained without tissue context, so it cannot use a tissue model")

    def probabilities(self, cell_patch: np.ndarray, tissue_patch: np.ndarray, pair_id: int) -> torch.Tensor:
        """The cell model's class probabilities (3, H, W) for one pair, on the CPU (with a nucleus output
        (``data.nuclei``), p(nucleus) after them: (4, H, W)).
        """
        for name, patch in (("cell", cell_patch), ("tissue", tissue_patch)):
            if patch.dtype != np.uint8 or patch.ndim != 3 or patch.shape[-1] != 3:
                raise ValueError(f"expected a uint8 (H, W, 3) {name} patch, got {patch.shape} {patch.dtype}")
        context = None
        if self.tissue_model is not None:
            context = model_context(self.tissue_model, image_to_tensor(tissue_patch), self.metas[pair_id],
                                    cell_patch.shape[:2])
        with torch.no_grad():
            return predict_probabilities(self.model, model_input(cell_patch, context), tile=1024, runtime=self.runtime)

    def __call__(self, cell_patch: np.ndarray, tissue_patch: np.ndarray, pair_id: int) -> list[tuple]:
        probs = self.probabilities(cell_patch, tissue_patch, pair_id)
        found = find_cells(probs[:self.config.class_channels], self.config.detect)  # a p(nucleus) is no class
        # detected cells are pixels of the patch, so x and y are already in range: nothing is moved
        return [(int(x), int(y), int(c), float(p)) for x, y, c, p in found]


def run_challenge(input_dir: Path, output_dir: Path, cell_model: Path | str, tissue_model: Path | str | None = None,
                  on_pair: Callable[[int, int], None] | None = None, runtime: Runtime | None = None) -> Path:
    """Read a Grand Challenge input folder, predict every pair, write ``cell_classification.json``."""
    dest = Path(output_dir) / "cell_classification.json"
    check_file(dest)  # a file in the way is refused before the work
    data = GrandChallengeInput(input_dir)
    model = Model([m.record for m in data.metadata], cell_model=cell_model, tissue_model=tissue_model, runtime=runtime)
    points = []
    for pair_id in range(len(data)):
        sample = data[pair_id]
        points.append(np.array(model(sample.cell_image, sample.tissue_image, pair_id), dtype=np.float64).reshape(-1, 4))
        if on_pair is not None:
            on_pair(pair_id + 1, len(data))
    with owned_file(dest) as partial:
        write_points_json(partial, points)
    return dest
