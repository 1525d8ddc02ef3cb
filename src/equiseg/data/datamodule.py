"""Datasets of (image, target) tensors for the cell and tissue tasks, and their DataModule."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from equiseg.data.context import ContextFn
from equiseg.data.ocelot import OcelotFolder, Sample, Split, image_to_tensor
from equiseg.data.targets import Task, cell_class_mask, tissue_class_mask


def sample_target(sample: Sample, task: Task, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """The (image, class-index target) pair of a sample for ``task``."""
    if task is Task.CELLS:
        return sample.cell_image, cell_class_mask(sample.cells, sample.cell_image.shape[:2], radius)
    return sample.tissue_image, tissue_class_mask(sample.tissue_mask)


def model_input(image: np.ndarray, context: torch.Tensor | None) -> torch.Tensor:
    """The model's input: the image as (3, H, W) in [0, 1], with the context channels after it."""
    tensor = image_to_tensor(image)
    return tensor if context is None else torch.cat([tensor, context.float()])


class SegmentationDataset(Dataset):
    """Images and class-index targets of one split, decoded once and kept in memory.

    Items are dicts: ``image`` (3, H, W) float in [0, 1] (with ``context``, (3 + 2, H, W): the
    tissue context of :mod:`equiseg.data.context` after the colours), ``target`` (H, W) long
    (255 = ignore), ``index`` (position in the split). With ``crop_size`` each item is a
    random square crop of image, context and target together (a fresh one each time, drawn
    from torch's seeded generator); without it, the whole image. Context is computed once per
    sample and kept as float16 (2 x 2 bytes per pixel).
    """

    def __init__(self, folder: OcelotFolder, task: Task, radius: float = 30.0, crop_size: int | None = None,
                 indices: list[int] | None = None, context: ContextFn | None = None) -> None:
        if context is not None and task is not Task.CELLS:
            raise ValueError("tissue context is for the cell task")
        self.folder, self.task, self.crop_size = folder, task, crop_size
        self.indices = list(range(len(folder))) if indices is None else list(indices)
        self.ids = [folder.ids[i] for i in self.indices]
        self._items, self._context = [], []
        for i in self.indices:
            sample = folder[i]
            self._items.append(sample_target(sample, task, radius))
            self._context.append(None if context is None else context(sample).half())
        if crop_size is not None:
            small = [self.ids[k] for k, (image, _) in enumerate(self._items) if min(image.shape[:2]) < crop_size]
            if small:
                raise ValueError(f"crop_size {crop_size} is larger than images {small[:5]}")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor | int]:
        (image, target), context = self._items[k], self._context[k]
        if self.crop_size is not None:
            h, w = target.shape
            # torch's generator: Lightning seeds it per worker (seed_everything(workers=True))
            top = int(torch.randint(0, h - self.crop_size + 1, ()))
            left = int(torch.randint(0, w - self.crop_size + 1, ()))
            rows, cols = slice(top, top + self.crop_size), slice(left, left + self.crop_size)
            image, target = image[rows, cols], target[rows, cols]
            context = None if context is None else context[:, rows, cols]
        return {"image": model_input(image, context), "target": torch.from_numpy(target.astype(np.int64)),
                "index": k}


def training_subset(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded subset of ``round(fraction * n)`` (at least 1) indices; smaller fractions nest in larger ones."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[: max(1, round(fraction * n))].tolist())


class EpochShuffle(Sampler[int]):
    """A random order of ``length`` items that depends only on ``seed`` and the epoch
    (:meth:`set_epoch`, which Lightning calls before each epoch)."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class SegmentationDataModule(L.LightningDataModule):
    """Train, val and test loaders over a Zenodo-layout folder for one task."""

    def __init__(self, root: Path | str, task: Task = Task.CELLS, radius: float = 30.0, crop_size: int | None = 256,
                 train_fraction: float = 1.0, batch_size: int = 4, num_workers: int = 0, seed: int = 0,
                 context: ContextFn | None = None) -> None:
        super().__init__()
        self.root, self.task, self.radius, self.crop_size = Path(root), task, radius, crop_size
        self.context = context
        self.train_fraction, self.batch_size, self.num_workers, self.seed = train_fraction, batch_size, num_workers, seed
        self.datasets: dict[Split, SegmentationDataset] = {}

    def dataset(self, split: Split | str) -> SegmentationDataset:
        split = Split(split)
        if split not in self.datasets:
            folder = OcelotFolder(self.root, split)
            if not len(folder):
                raise ValueError(f"{self.root}: the {split.value} split is empty")
            train = split is Split.TRAIN
            indices = training_subset(len(folder), self.train_fraction, self.seed) if train else None
            self.datasets[split] = SegmentationDataset(folder, self.task, self.radius,
                                                       self.crop_size if train else None, indices, self.context)
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.dataset(Split.TRAIN), self.dataset(Split.VAL)
        if stage in (None, "test"):
            self.dataset(Split.TEST)

    def _loader(self, split: Split, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        # the order comes from (seed, epoch) and the loader has its own generator, so making an
        # iterator draws nothing from torch's global one: a resumed run sees the same batches
        sampler = EpochShuffle(len(dataset), self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size if split is Split.TRAIN else 1, sampler=sampler,
                          generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(Split.TRAIN, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(Split.VAL, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(Split.TEST, shuffle=False)
