"""Datasets of (image, target) tensors for the cell and tissue tasks, and their DataModule."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from equiseg.data.context import ContextFn
from equiseg.data.ocelot import OcelotFolder, Sample, Split, image_to_tensor
from equiseg.data.targets import PAPER_TARGET, CellTarget, Task, tissue_class_mask


def sample_target(sample: Sample, task: Task, target: CellTarget) -> tuple[np.ndarray, np.ndarray]:
    """The (image, class-index target) pair of a sample for ``task``."""
    labels = sample.cells if task is Task.CELLS else sample.tissue_mask
    if labels is None:
        raise ValueError(f"sample {sample.meta.sample_id}: no {task.value} labels (an unlabelled input)")
    if task is Task.CELLS:
        return sample.cell_image, target.encode(labels, sample.cell_image.shape[:2])
    return sample.tissue_image, tissue_class_mask(labels)


def nucleus_mask(sample: Sample) -> np.ndarray:
    """(H, W) uint8 nucleus target of a sample's cell patch: 1 where its instance label is > 0, else 0.

    Raises:
        ValueError: a sample without instance labels (``annotations/SPLIT/cell_instances``), naming it.
    """
    if sample.instances is None:
        raise ValueError(f"sample {sample.meta.sample_id}: no instance labels (annotations/SPLIT/cell_instances); "
                         "a nucleus output (data.nuclei) trains on them")
    return (sample.instances > 0).astype(np.uint8)


def model_input(image: np.ndarray, context: torch.Tensor | None) -> torch.Tensor:
    """The model's input: the image as (3, H, W) in [0, 1], with the context channels after it."""
    tensor = image_to_tensor(image)
    return tensor if context is None else torch.cat([tensor, context.float()])


class SegmentationDataset(Dataset):
    """Images and class-index targets of one split, decoded once and kept in memory.

    Items are dicts: ``image`` (3, H, W) float in [0, 1] (with ``context``, (3 + 2, H, W): the
    tissue context of `equiseg.data.context` after the colours), ``target`` (H, W) long
    (255 = ignore), ``index`` (position in the split). With ``crop_size`` each item is a
    random square crop of image, context and target together (a fresh one each time, drawn
    from torch's seeded generator); without it, the whole image. Context is computed once per
    sample and kept as float16 (2 x 2 bytes per pixel). With ``nuclei`` (cell task) items also
    hold ``nuclei`` (H, W) long, the nucleus target (`nucleus_mask`), cropped with the target.
    """

    def __init__(self, folder: OcelotFolder, task: Task, target: CellTarget = PAPER_TARGET, crop_size: int | None = None,
                 indices: list[int] | None = None, context: ContextFn | None = None, nuclei: bool = False) -> None:
        if context is not None and task is not Task.CELLS:
            raise ValueError("tissue context is for the cell task")
        if nuclei and task is not Task.CELLS:
            raise ValueError("a nucleus target is for the cell task")
        self.folder, self.task, self.crop_size = folder, task, crop_size
        self.indices = list(range(len(folder))) if indices is None else list(indices)
        self.ids = [folder.ids[i] for i in self.indices]
        self._items, self._context, self._nuclei = [], [], []
        for i in self.indices:
            sample = folder[i]
            self._items.append(sample_target(sample, task, target))
            self._context.append(None if context is None else context(sample).half())
            self._nuclei.append(nucleus_mask(sample) if nuclei else None)
        if crop_size is not None:
            small = [self.ids[k] for k, (image, _) in enumerate(self._items) if min(image.shape[:2]) < crop_size]
            if small:
                raise ValueError(f"crop_size {crop_size} is larger than images {small[:5]}")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        k, draw = (key, -1) if isinstance(key, int) else key
        (image, target), context, nuclei = self._items[k], self._context[k], self._nuclei[k]
        if self.crop_size is not None:
            h, w = target.shape
            generator = None if draw < 0 else torch.Generator().manual_seed(draw)
            top = int(torch.randint(0, h - self.crop_size + 1, (), generator=generator))
            left = int(torch.randint(0, w - self.crop_size + 1, (), generator=generator))
            rows, cols = slice(top, top + self.crop_size), slice(left, left + self.crop_size)
            image, target = image[rows, cols], target[rows, cols]
            context = None if context is None else context[:, rows, cols]
            nuclei = None if nuclei is None else nuclei[rows, cols]
        item: dict[str, torch.Tensor | int] = {"image": model_input(image, context),
                                               "target": torch.from_numpy(target.astype(np.int64)),
                                               "index": k, "draw": draw}
        if nuclei is not None:
            item["nuclei"] = torch.from_numpy(nuclei.astype(np.int64))
        return item


def training_subset(n: int, fraction: float, seed: int, classes: list[set[int]] | None = None) -> list[int]:
    """A seeded subset of ``round(fraction * n)`` (at least 1) indices; smaller fractions nest in larger ones.

    With ``classes`` (the cell classes each image holds) the subset is stratified: the images that bring
    every class of the split come first (the first in the seeded order that holds them all, else the first
    holding each class still missing, in that order), then the rest in the seeded order; so a subset of
    one image holds every class where an image does, and any subset of as many images as there are classes
    holds them all. The subsets still nest.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng(seed).permutation(n).tolist()
    if classes is not None:
        order = _classes_first(order, classes)
    return sorted(order[: max(1, round(fraction * n))])


def image_classes(folder: OcelotFolder) -> list[set[int]]:
    """The cell classes each image of ``folder`` holds (its points only: no image is decoded)."""
    return [{int(c) for c in folder.cells(i)[:, 2]} for i in range(len(folder))]


def _classes_first(order: list[int], classes: list[set[int]]) -> list[int]:
    """``order`` with the images that bring every class moved to its front (`training_subset`)."""
    wanted = set().union(*classes) if classes else set()
    whole = next((i for i in order if classes[i] >= wanted), None)
    if whole is not None:
        leading = [whole]
    else:
        leading, missing = [], set(wanted)
        for i in order:
            if classes[i] & missing:
                leading.append(i)
                missing -= classes[i]
    first = set(leading)
    return leading + [i for i in order if i not in first]


def position_seed(*key: int) -> int:
    """A 63-bit seed that depends only on ``key`` (e.g. seed, epoch, position): numpy's SeedSequence hash."""
    high, low = np.random.SeedSequence(list(key)).generate_state(2)
    return (int(high) << 32 | int(low)) >> 1


class EpochShuffle(Sampler[tuple[int, int]]):
    """A random order of ``length`` items that depends only on ``seed`` and the epoch
    (`set_epoch`, which Lightning calls before each epoch), each item given as
    ``(index, draw)`` with ``draw`` = `position_seed` of (seed, epoch, position).

    So every random choice of an epoch (the order, each crop and, through the batch's draws,
    the augmentation) is a function of where it happens, and a run resumed mid-epoch continues
    by skipping the items already trained on (`resume_at`) instead of drawing anew.

    Under DDP process ``rank`` of ``replicas`` takes every ``replicas``-th item of the order
    (padded with its first items to a multiple of ``replicas``, as torch's DistributedSampler
    does), so the processes together train on one draw of the epoch.
    """

    def __init__(self, length: int, seed: int, rank: int = 0, replicas: int = 1) -> None:
        self.length, self.seed, self.epoch = length, seed, 0
        self.rank, self.replicas = rank, replicas
        self._resume: tuple[int, int] | None = None  # (epoch, items to skip)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, items: int) -> None:
        """Start the next pass over ``epoch`` after its first ``items`` items (other epochs start at 0)."""
        self._resume = (epoch, items)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        order += order[: len(self) * self.replicas - self.length]
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        mine = list(enumerate(order))[self.rank::self.replicas][start:]
        return iter([(index, position_seed(self.seed, self.epoch, position)) for position, index in mine])

    def __len__(self) -> int:
        return (self.length + self.replicas - 1) // self.replicas


class ResumableLoader(DataLoader):
    """The training loader, with the ``state_dict``/``load_state_dict`` pair that Lightning saves
    in each checkpoint and gives back on resume: the epoch and how many batches of it were
    trained (``batches_done``, read from Lightning's own progress when it saves), so a run
    resumed from a checkpoint taken mid-epoch skips exactly those batches.
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        assert isinstance(self.sampler, EpochShuffle)  # the sampler `SegmentationDataModule` gives it
        return {"epoch": self.sampler.epoch, "batches_done": self._batches_done()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        assert isinstance(self.sampler, EpochShuffle) and self.batch_size is not None  # as `_loader` makes it
        self.sampler.resume_at(state["epoch"], state["batches_done"] * self.batch_size)


class SegmentationDataModule(L.LightningDataModule):
    """Train, val and test loaders over a Zenodo-layout folder for one task (with ``nuclei``, items
    with the nucleus target: `SegmentationDataset`).
    """

    def __init__(self, root: Path | str, task: Task = Task.CELLS, target: CellTarget = PAPER_TARGET,
                 crop_size: int | None = 256,
                 train_fraction: float = 1.0, batch_size: int = 4, num_workers: int = 0, seed: int = 0,
                 context: ContextFn | None = None, nuclei: bool = False, stratify: bool = False) -> None:
        super().__init__()
        self.root, self.task, self.target, self.crop_size = Path(root), task, target, crop_size
        self.context, self.nuclei, self.stratify = context, nuclei, stratify
        self.train_fraction, self.batch_size, self.num_workers, self.seed = train_fraction, batch_size, num_workers, seed
        self.datasets: dict[Split, Dataset] = {}

    def dataset(self, split: Split | str) -> Dataset:
        """The split's dataset (`make_dataset`), made once: the training split's seeded subset."""
        split = Split(split)
        if split not in self.datasets:
            folder = OcelotFolder(self.root, split)
            if not len(folder):
                raise ValueError(f"{self.root}: the {split.value} split is empty")
            train = split is Split.TRAIN
            # stratified by the cells' classes (a nuclei run's windows too: the same images as its stage 1's)
            classes = image_classes(folder) if train and self.stratify and self.task is not Task.TISSUE else None
            indices = training_subset(len(folder), self.train_fraction, self.seed, classes) if train else None
            self.datasets[split] = self.make_dataset(folder, indices, train)
        return self.datasets[split]

    def make_dataset(self, folder: OcelotFolder, indices: list[int] | None, train: bool) -> Dataset:
        """The dataset of one split: random crops for training, whole images otherwise."""
        return SegmentationDataset(folder, self.task, self.target, self.crop_size if train else None, indices,
                                   self.context, self.nuclei)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.dataset(Split.TRAIN)
            self.dataset(Split.VAL)
        if stage in (None, "test"):
            self.dataset(Split.TEST)

    def _loader(self, split: Split, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        # the order and every draw come from (seed, epoch, position) and the loader has its own
        # generator, so making an iterator draws nothing from torch's global one: a resumed run
        # sees the same batches
        options = {"generator": torch.Generator().manual_seed(self.seed), "num_workers": self.num_workers,
                   "persistent_workers": self.num_workers > 0}
        if not shuffle:
            return DataLoader(dataset, batch_size=1, **options)
        # Lightning is told not to put its DistributedSampler in (use_distributed_sampler=False)
        trainer = self.trainer
        rank, replicas = (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)
        sampler = EpochShuffle(len(cast(Sized, dataset)), self.seed, rank, replicas)  # map-style: sized
        return ResumableLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                               batches_done=self._batches_done, **options)

    def _batches_done(self) -> int:
        """Training batches finished in the current epoch (Lightning's count; 0 outside a fit)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        # batch_progress counts with a _ProcessedTracker; Lightning types the field as its base class
        current = trainer.fit_loop.epoch_loop.batch_progress.current
        return current.processed  # pyright: ignore[reportAttributeAccessIssue]

    def train_dataloader(self) -> DataLoader:
        return self._loader(Split.TRAIN, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(Split.VAL, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(Split.TEST, shuffle=False)
