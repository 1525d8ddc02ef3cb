"""``equiseg predict``: probability maps, overlays and cells for image files of any size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from equiseg.config import Config
from equiseg.data.datamodule import image_to_tensor
from equiseg.evaluation.detection import write_points_json
from equiseg.evaluation.inference import predict_probabilities
from equiseg.report.pictures import prediction_overlay, probability_picture


def read_rgb(path: Path | str) -> np.ndarray:
    """An image file (JPEG, PNG, TIFF) as (H, W, 3) uint8; grey and RGBA are converted, 16-bit scaled."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        array = tifffile.imread(path)
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
            array = np.moveaxis(array, 0, -1)  # channels first -> last
        if array.dtype == np.uint16:
            array = (array / 257).round().astype(np.uint8)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.dtype != np.uint8:
            raise ValueError(f"{path}: expected an RGB image, got shape {array.shape} {array.dtype}")
        return np.ascontiguousarray(array[..., :3])
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def predict_file(model: torch.nn.Module, config: Config, path: Path, out_dir: Path, tile: int = 1024,
                 overlap: int = 128) -> np.ndarray:
    """Write ``<stem>_probs.npy`` (float16, C x H x W), ``<stem>_probs.png``, ``<stem>_overlay.png``
    and ``<stem>_cells.csv`` (x,y,class,probability) for one image; returns its cells (N, 4)."""
    image = read_rgb(path)
    probs = predict_probabilities(model, image_to_tensor(image), tile=tile, overlap=overlap)
    points = config.detect.cells(probs) if config.task.value == "cells" else np.zeros((0, 4))
    p = probs.numpy()
    stem = out_dir / path.stem
    np.save(f"{stem}_probs.npy", p.astype(np.float16))
    Image.fromarray(probability_picture(p)).save(f"{stem}_probs.png")
    Image.fromarray(prediction_overlay(image, p, points)).save(f"{stem}_overlay.png")
    lines = ["x,y,class,probability"] + [f"{int(x)},{int(y)},{int(c)},{q:.4f}" for x, y, c, q in points]
    Path(f"{stem}_cells.csv").write_text("\n".join(lines) + "\n")
    return points


def predict_files(model: torch.nn.Module, config: Config, paths: list[Path], out_dir: Path, tile: int = 1024,
                  overlap: int = 128, on_image=None) -> Path:
    """Predict every file; also write ``cell_classification.json`` with image_i = the i-th file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError("two input files share a name; their outputs would overwrite each other")
    all_points = []
    for i, path in enumerate(paths):
        all_points.append(predict_file(model, config, path, out_dir, tile, overlap))
        if on_image is not None:
            on_image(i + 1, len(paths))
    (out_dir / "images.txt").write_text("".join(f"image_{i}\t{p}\n" for i, p in enumerate(paths)))
    return write_points_json(out_dir / "cell_classification.json", all_points)
