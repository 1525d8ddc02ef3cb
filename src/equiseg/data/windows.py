"""Windows centred on cells, for stage 2 of the two-stage cell model (``task: nuclei``).

A window of odd side S around the cell at pixel (x, y) holds the rows y - S // 2 .. y + S // 2 and
the same columns, so its centre pixel is the cell's. Beyond the image's edge the image is its own
mirror image (as the U-Net pads, `equiseg.models.unet.reflect_pad`: ``np.pad``'s ``reflect``), the
tissue context likewise, and the nucleus target is ``IGNORE_INDEX`` there (what lies beyond the
patch is unknown).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from equiseg.data.context import ContextFn
from equiseg.data.datamodule import SegmentationDataModule, model_input
from equiseg.data.ocelot import OcelotFolder, Sample, Split
from equiseg.data.targets import IGNORE_INDEX, Task

OUTSIDE = -1  # the padded instance labels beyond the image


def padded(array: np.ndarray, margin: int, fill: int | None = None) -> np.ndarray:
    """``array`` (H, W, ...) with ``margin`` px added on every side of its first two axes: its mirror
    image (``fill`` None) or the constant ``fill``.
    """
    pad = [(margin, margin), (margin, margin)] + [(0, 0)] * (array.ndim - 2)
    if fill is None:
        return np.pad(array, pad, mode="reflect")
    return np.pad(array, pad, mode="constant", constant_values=fill)


def window_at(array: np.ndarray, x: int, y: int, side: int, margin: int) -> np.ndarray:
    """The window of odd ``side`` centred on pixel (x, y) of the image that ``array`` is, padded by
    ``margin`` >= side // 2 (`padded`); a view, first two axes.
    """
    top, left = y + margin - side // 2, x + margin - side // 2
    return array[top:top + side, left:left + side]


def nucleus_target(labels: np.ndarray, label: int) -> np.ndarray:
    """(S, S) uint8 of a window of padded instance labels: 1 on the nucleus ``label``, 0 elsewhere,
    ``IGNORE_INDEX`` beyond the image.
    """
    target = (labels == label).astype(np.uint8)
    target[labels == OUTSIDE] = IGNORE_INDEX
    return target


class WindowDataset(Dataset):
    """One item per labelled cell of a split: the window centred on it, its nucleus and its class.

    Items are dicts: ``image`` (C, S, S) float (colours in [0, 1], then the tissue context),
    ``target`` (S, S) long (1 nucleus, 0 not, 255 beyond the image), ``cell_class`` (0 BC, 1 TC),
    ``index``, ``draw``. With ``jitter`` > 0 and an item asked for with a draw (training), the
    window's centre moves by a whole number of px in [-jitter, jitter] along each axis, drawn from
    a generator seeded by the draw. Samples are padded once and kept in memory.

    Raises:
        ValueError: a sample without instance labels (``annotations/SPLIT/cell_instances``).
    """

    def __init__(self, folder: OcelotFolder, side: int, jitter: int = 0, indices: list[int] | None = None,
                 context: ContextFn | None = None) -> None:
        self.side, self.jitter, self.margin = side, jitter, side // 2 + jitter
        indices = list(range(len(folder))) if indices is None else list(indices)
        self.ids = [folder.ids[i] for i in indices]
        self._images, self._labels, self._context, cells = [], [], [], []
        for k, i in enumerate(indices):
            sample = folder[i]
            self._keep(sample, context)
            assert sample.cells is not None  # checked by _keep
            cells += [(k, row + 1, int(x), int(y), int(c)) for row, (x, y, c) in enumerate(sample.cells[:, :3])]
        self.cells = np.asarray(cells, np.int64).reshape(-1, 5)  # sample, label, x, y, class

    def _keep(self, sample: Sample, context: ContextFn | None) -> None:
        if sample.instances is None or sample.cells is None:
            raise ValueError(f"sample {sample.meta.sample_id}: no instance labels (annotations/SPLIT/cell_instances); "
                             "task nuclei trains on them")
        self._images.append(padded(sample.cell_image, self.margin))
        self._labels.append(padded(sample.instances, self.margin, OUTSIDE))
        extra = None if context is None else padded(context(sample).half().permute(1, 2, 0).numpy(), self.margin)
        self._context.append(extra)

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        k, draw = (key, -1) if isinstance(key, int) else key
        sample, label, x, y, cell_class = self.cells[k].tolist()
        if self.jitter and draw >= 0:
            generator = torch.Generator().manual_seed(draw)
            dx, dy = torch.randint(-self.jitter, self.jitter + 1, (2,), generator=generator).tolist()
            x, y = x + dx, y + dy
        image = window_at(self._images[sample], x, y, self.side, self.margin)
        extra = self._context[sample]
        context = None if extra is None else torch.from_numpy(
            np.ascontiguousarray(window_at(extra, x, y, self.side, self.margin))).permute(2, 0, 1)
        target = nucleus_target(window_at(self._labels[sample], x, y, self.side, self.margin), label)
        return {"image": model_input(np.ascontiguousarray(image), context),
                "target": torch.from_numpy(target.astype(np.int64)), "cell_class": cell_class - 1,
                "index": k, "draw": draw}


class WindowDataModule(SegmentationDataModule):
    """Train, val and test loaders of `WindowDataset`s (task ``nuclei``): the training split's windows
    shuffled and jittered, the others centred and in batches of ``batch_size``.
    """

    def __init__(self, root: Path | str, side: int, jitter: int = 0, train_fraction: float = 1.0,
                 batch_size: int = 4, num_workers: int = 0, seed: int = 0, context: ContextFn | None = None,
                 stratify: bool = False) -> None:
        super().__init__(root, Task.NUCLEI, crop_size=None, train_fraction=train_fraction, batch_size=batch_size,
                         num_workers=num_workers, seed=seed, context=context, stratify=stratify)
        self.side, self.jitter = side, jitter

    def make_dataset(self, folder: OcelotFolder, indices: list[int] | None, train: bool) -> WindowDataset:
        """The windows of one split's labelled cells: jittered for training, centred otherwise."""
        return WindowDataset(folder, self.side, self.jitter if train else 0, indices, self.context)

    def _loader(self, split: Split, shuffle: bool) -> DataLoader:
        if shuffle:
            return super()._loader(split, shuffle)
        return DataLoader(self.dataset(split), batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)
