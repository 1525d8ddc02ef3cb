"""Small datasets written by the tests themselves."""

from pathlib import Path

import lightning as L
import numpy as np

from equiseg.data.ocelot import pair_record, write_metadata, write_pair


def tiny_dataset_with_cells(tmp: Path, size: int = 32, count: int = 2) -> Path:
    """A test split of random-texture images with a few cells each (size x size px)."""
    rng = np.random.default_rng(1)
    root = tmp / "cells"
    pairs = {}
    for k in range(1, count + 1):
        sid = f"{k:03d}"
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        cells = np.array([[int(rng.integers(4, size - 4)), int(rng.integers(4, size - 4)), 1 + (j % 2)]
                          for j in range(3)])
        write_pair(root, "test", sid, image, image, cells, np.ones((size, size), np.uint8))
        pairs[sid] = pair_record("test", 0.2, 0.8, 0.5, 0.5, cell_size=size, tissue_size=size)
    write_metadata(root, pairs)
    return root


def tiny_config(root, **sections):
    from equiseg.config import Config

    data = {"model": {"family": "plain", "width": 4, "depth": 2},
            "data": {"root": str(root), "crop_size": 32, "batch_size": 2},
            "train": {"epochs": 1, "lr": 1e-2, "loggers": ["csv"], "accelerator": "cpu"},
            "detect": {"sigma": 2.0, "min_distance": 4}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return Config.from_dict(data)


def write_pyramid(path: Path, image: np.ndarray, mpp: float, tile: int = 128, factor: int = 4) -> Path:
    """A tiled pyramidal TIFF as OpenSlide reads it (generic TIFF): ``image`` as level 0 at ``mpp``
    µm/px (resolution tags in cm), then levels ``factor`` x smaller (area means) down to 512 px,
    each a reduced-resolution page.
    """
    import tifffile

    levels = [image]
    while max(levels[-1].shape[:2]) > 512:
        last = levels[-1]
        h, w = last.shape[0] // factor * factor, last.shape[1] // factor * factor
        levels.append(last[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))
                      .round().astype(np.uint8))
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate(levels):
            resolution = 1e4 / (mpp * factor ** k)
            tif.write(level, tile=(tile, tile), photometric="rgb", compression="zlib", subfiletype=1 if k else 0,
                      resolution=(resolution, resolution), resolutionunit="CENTIMETER")
    return path


def tissue_on_glass(height: int, width: int, patches: dict[tuple[int, int], np.ndarray], seed: int = 0) -> np.ndarray:
    """Pale noisy glass (H, W, 3) uint8 with ``patches`` pasted at their (row, column) corners."""
    rng = np.random.default_rng(seed)
    image = (236 + rng.integers(0, 5, (height, width, 3))).astype(np.uint8)
    for (row, col), patch in patches.items():
        image[row:row + patch.shape[0], col:col + patch.shape[1]] = patch
    return image


class Crash(L.Callback):
    """Raises "simulated crash" as a run's second epoch starts."""

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def resumed_equals_uninterrupted(config, tmp: Path) -> bool:
    """Whether ``config`` crashed at the start of its second epoch and resumed ends on the weights of the
    same config trained without a break (each in its own folder under ``tmp``).
    """
    import pytest
    import torch

    from equiseg.training.fit import fit

    whole = fit(config, run_dir=tmp / "whole", progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(config, run_dir=tmp / "cut", progress=False, callbacks=[Crash()])
    fit(None, resume=tmp / "cut", progress=False)
    a = torch.load(whole / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp / "cut/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
