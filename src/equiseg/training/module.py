"""The networks equiseg trains as LightningModules: the U-Net (`SegmentationModule`) and stage 2 of the two-stage
cell model (`NucleusModule`), with their losses, augmentation and metrics.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix

from equiseg.config import Compile, Config, Schedule, Selection, TrainConfig
from equiseg.data.augment import Augment, AugmentConfig
from equiseg.data.datamodule import position_seed
from equiseg.data.ocelot import CELL_CLASSES, Split
from equiseg.data.targets import IGNORE_INDEX, Task
from equiseg.detection.peaks import find_cells
from equiseg.detection.score import detection_scores
from equiseg.evaluation.bootstrap import f1_of_counts
from equiseg.evaluation.losses import DiceCELoss
from equiseg.evaluation.metrics import segmentation_scores

MASKS = ("target", "nuclei")  # the label masks of a batch that augmentation moves with the image


def nucleus_logits(mask: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) logits (0, m) of a nucleus logit m (B, 1, H, W): their softmax is (1 - sigmoid(m),
    sigmoid(m)), so a `DiceCELoss` over them is soft Dice + binary cross-entropy of the nucleus.
    """
    return torch.cat([torch.zeros_like(mask), mask], dim=1)


class ConfiguredModule(L.LightningModule):
    """What every equiseg LightningModule shares: the config (stored in the checkpoint as plain builtin
    types, so checkpoints load with ``torch.load(weights_only=True)``), the network it builds
    (compiled in place with ``train.compile``: its parameters, and so the checkpoint's keys, are the
    eager ones), the augmentation on the device, and Adam with the schedule.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.config = Config.from_dict(config)
        cfg = self.config
        self.class_names = cfg.task.class_names
        self.model = cfg.build_model()
        if cfg.train.compile is not Compile.NONE:
            self.model.compile(mode=cfg.train.compile.value)
        self.augment = None if cfg.data.augment == AugmentConfig.none() else Augment(cfg.data.augment)

    def forward(self, image: torch.Tensor) -> Any:
        return self.model(image)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.trainer is not None and self.trainer.training and self.augment is not None:
            masks = {name: batch[name] for name in MASKS if name in batch}  # the target, and the nucleus target
            image, masks = self.augment(batch["image"], masks, self._batch_generator(batch))
            batch = {**batch, "image": image, **masks}
        return batch

    @staticmethod
    def _batch_generator(batch: dict) -> torch.Generator | None:
        """The augmentation's generator for a batch: seeded by its items' draws (see
        `EpochShuffle`), on the batch's device, so a batch is
        augmented the same way whenever and wherever it is trained; None (torch's global
        generator) for items asked for by bare index.
        """
        draws = [int(d) for d in batch.get("draw", [-1])]
        if min(draws) < 0:
            return None
        return torch.Generator(batch["image"].device).manual_seed(position_seed(*draws))

    def configure_optimizers(self) -> dict:
        """Adam at ``train.lr`` with ``train.schedule`` per epoch (see `lr_schedule`)."""
        train = self.config.train
        optimizer = torch.optim.Adam(self.parameters(), lr=train.lr)
        return {"optimizer": optimizer, "lr_scheduler": lr_schedule(optimizer, train)}


class DetectionCounts(Metric):
    """TP, FP and ground-truth cells of each cell class, summed over a validation epoch (and, under DDP,
    over processes): ``update`` with one image's cells and its true points; ``compute`` gives mF1 by the
    OCELOT rule (each class's F1 from the summed counts, unrounded, then their mean).
    """

    full_state_update = False
    counts: torch.Tensor  # (classes, 3), a state that add_state makes

    def __init__(self) -> None:
        super().__init__()
        self.add_state("counts", default=torch.zeros(len(CELL_CLASSES), 3, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, cells: Any, truth: Any) -> None:
        scores = detection_scores([cells], [truth])
        found = [[scores[f"{kind}/{name}"] for kind in ("tp", "fp", "gt")] for name in CELL_CLASSES.values()]
        self.counts += torch.tensor(found, dtype=torch.float64, device=self.counts.device)

    def compute(self) -> torch.Tensor:
        return torch.tensor(f1_of_counts(self.counts.cpu().numpy()).mean())


class SegmentationModule(ConfiguredModule):
    """Trains ``config.build_model()`` (a U-Net) with Adam on Dice + cross-entropy.

    Augmentation (``config.data.augment``) runs on the batch after it reaches the device, so
    it runs on the GPU when there is one. Logged: ``train/loss`` (per step and epoch),
    ``val/loss``, ``val/dice_mean``, ``val/miou`` and per-class Dice (per epoch).

    With ``data.nuclei`` the U-Net's channel after the classes is a nucleus logit m, and the loss
    adds (weight 1) the nucleus target's ``train.dice_weight`` x soft Dice + ``train.ce_weight`` x
    binary cross-entropy, as `NucleusModule` does for its mask (`DiceCELoss` over the logits (0, m):
    `nucleus_logits`); the class terms and scores read the class channels only. Also logged:
    ``val/nucleus_dice``. With ``train.select=mf1``: ``val/mf1``, the cells of each whole validation
    image scored against its points (`DetectionCounts`).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        cfg = self.config
        self.target = cfg.data.cell_target if cfg.task is Task.CELLS else None
        self.loss = DiceCELoss(cfg.train.dice_weight, cfg.train.ce_weight, target=self.target)
        # summed over the epoch and, under DDP, over processes by torchmetrics
        self.val_confusion = MulticlassConfusionMatrix(len(self.class_names), ignore_index=IGNORE_INDEX)
        self.nucleus_loss: DiceCELoss | None = None
        self.val_nucleus: MulticlassConfusionMatrix | None = None
        if cfg.data.nuclei:
            self.nucleus_loss = DiceCELoss(cfg.train.dice_weight, cfg.train.ce_weight)
            self.val_nucleus = MulticlassConfusionMatrix(2, ignore_index=IGNORE_INDEX)
        self.val_cells = DetectionCounts() if cfg.train.select is Selection.MF1 else None

    def _loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.nucleus_loss is None:
            return self.loss(logits, batch["target"])
        classes = len(self.class_names)
        return (self.loss(logits[:, :classes], batch["target"])
                + self.nucleus_loss(nucleus_logits(logits[:, classes:]), batch["nuclei"]))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(self(batch["image"]), batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["image"]),
                 sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["image"])
        loss = self._loss(logits, batch)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch["image"]), sync_dist=True)
        target = batch["target"] if self.target is None else self.target.classes(batch["target"])
        classes = len(self.class_names)
        self.val_confusion.update((logits if self.val_nucleus is None else logits[:, :classes]).argmax(1), target)
        if self.val_nucleus is not None:
            self.val_nucleus.update(nucleus_logits(logits[:, classes:]).argmax(1), batch["nuclei"])
        if self.val_cells is not None:
            self._count_cells(logits[:, :classes], batch["index"])

    def _count_cells(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        """The cells of each whole validation image (``detect``'s settings) against its true points."""
        dataset = self.trainer.datamodule.dataset(Split.VAL)  # pyright: ignore[reportAttributeAccessIssue]
        probs = torch.softmax(logits.float(), dim=1).cpu()
        for k, index in enumerate(indices.tolist()):
            truth = dataset.folder.cells(dataset.indices[index])
            assert self.val_cells is not None
            self.val_cells.update(find_cells(probs[k], self.config.detect), truth)

    def on_validation_epoch_end(self) -> None:
        scores = segmentation_scores(self.val_confusion.compute().cpu(), self.class_names)
        self.val_confusion.reset()
        # every process holds the same summed matrix, so syncing averages equal values
        self.log("val/dice_mean", scores["dice/mean"], prog_bar=True, sync_dist=True)
        self.log("val/miou", scores["miou"], sync_dist=True)
        for name in self.class_names[1:]:
            self.log(f"val/dice_{name}", scores[f"dice/{name}"], sync_dist=True)
        if self.val_nucleus is not None:
            nucleus = segmentation_scores(self.val_nucleus.compute().cpu(), ["outside", "nucleus"])
            self.val_nucleus.reset()
            self.log("val/nucleus_dice", nucleus["dice/nucleus"], prog_bar=True, sync_dist=True)
        if self.val_cells is not None:
            self.log("val/mf1", self.val_cells.compute().float(), prog_bar=True, sync_dist=True)
            self.val_cells.reset()


class NucleusModule(ConfiguredModule):
    """Trains stage 2 of the two-stage cell model (``task: nuclei``, a `CellWindowNet`) on windows
    centred on cells (`equiseg.data.windows.WindowDataset`).

    Loss: the nucleus mask's ``train.dice_weight`` x soft Dice + ``train.ce_weight`` x binary
    cross-entropy (`DiceCELoss` over the two logits (0, m), whose softmax is the sigmoid of m;
    pixels beyond the image ignored), plus ``window.class_weight`` x the class's cross-entropy.
    Logged: ``train/loss``, ``val/loss``, ``val/nucleus_dice`` (over the validation windows),
    ``val/class_accuracy`` and ``val/class_f1_BC``, ``val/class_f1_TC``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        cfg = self.config
        self.mask_loss = DiceCELoss(cfg.train.dice_weight, cfg.train.ce_weight)
        self.val_nucleus = MulticlassConfusionMatrix(2, ignore_index=IGNORE_INDEX)
        self.val_classes = MulticlassConfusionMatrix(len(self.class_names) - 1)

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask, classes = self(batch["image"])
        two = nucleus_logits(mask)
        loss = (self.mask_loss(two, batch["target"])
                + self.config.window.class_weight * F.cross_entropy(classes.float(), batch["cell_class"]))
        return loss, two, classes

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["image"]),
                 sync_dist=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, two, classes = self._loss(batch)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch["image"]), sync_dist=True)
        self.val_nucleus.update(two.argmax(1), batch["target"])
        self.val_classes.update(classes.argmax(1), batch["cell_class"])

    def on_validation_epoch_end(self) -> None:
        nucleus = segmentation_scores(self.val_nucleus.compute().cpu(), ["outside", "nucleus"])
        matrix = self.val_classes.compute().cpu().double()
        self.val_nucleus.reset()
        self.val_classes.reset()
        self.log("val/nucleus_dice", nucleus["dice/nucleus"], prog_bar=True, sync_dist=True)
        self.log("val/class_accuracy", float(matrix.diagonal().sum() / matrix.sum().clamp_min(1)), sync_dist=True)
        f1 = 2 * matrix.diagonal() / (matrix.sum(0) + matrix.sum(1)).clamp_min(1)
        for name, value in zip(self.class_names[1:], f1.tolist()):
            self.log(f"val/class_f1_{name}", value, sync_dist=True)


def module_for(config: Config) -> ConfiguredModule:
    """The LightningModule that trains ``config``: `NucleusModule` for ``task: nuclei``, else
    `SegmentationModule`.
    """
    kind = NucleusModule if config.task is Task.NUCLEI else SegmentationModule
    return kind(config.to_dict())


def lr_schedule(optimizer: torch.optim.Optimizer, train: TrainConfig) -> dict:
    """Lightning's scheduler entry for ``train.schedule``, stepped once per epoch.

    ``constant`` and ``cosine`` start with a linear warm-up over ``warmup_epochs`` (lr x (e + 1)
    / (w + 1) in epoch e < w); then ``constant`` keeps lr and ``cosine`` gives lr x (0.01 + 0.99
    (1 + cos(pi t)) / 2), t the fraction of the remaining epochs done. ``plateau``: lr halved
    when val/loss has not improved for ``plateau_patience`` validations (torch's ReduceLROnPlateau,
    stepped after each validation: every ``val_every`` epochs).
    """
    warmup, epochs = train.warmup_epochs, train.epochs

    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        if train.schedule is Schedule.COSINE:
            t = min(1.0, (epoch - warmup) / max(1, epochs - warmup))
            return 0.01 + 0.99 * (1 + math.cos(math.pi * t)) / 2
        return 1.0

    if train.schedule is Schedule.PLATEAU:
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5,
                                                             patience=train.plateau_patience)
        return {"scheduler": plateau, "monitor": "val/loss", "interval": "epoch", "frequency": train.val_every}
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "epoch"}
