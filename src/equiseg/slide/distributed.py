"""Slides spread over processes with Lightning's DDP: each slide goes to one process."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import lightning
import torch

from equiseg.inference.tiling import model_runtime
from equiseg.runtime import Runtime
from equiseg.slide.analyse import analyse_slide, check_slides
from equiseg.slide.models import SlideModel


class _EveryNth(torch.utils.data.Sampler):
    """Slides ``rank``, ``rank + n``, ... of the list: each once over all processes (Lightning's
    distributed sampler would repeat slides to even out the counts, and two processes would
    then write the same slide's files).
    """

    def __init__(self, count: int, rank: int, n: int) -> None:
        self.indices = list(range(rank, count, n))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _SlideTask(lightning.LightningModule):
    """``equiseg slide`` as Lightning's predict loop: one slide per step, on this process's device."""

    def __init__(self, paths: list[Path], cell: SlideModel, tissue: SlideModel | None, out_dir: Path,
                 runtime: Runtime, options: dict) -> None:
        super().__init__()
        self.paths, self.out_dir, self.runtime, self.options = paths, out_dir, runtime, options
        self.cell_info, self.tissue_info = cell, tissue
        # registered, so that Lightning moves them to the process's device
        self.cell = cell.model
        self.tissue = tissue.model if tissue is not None else None

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        sampler = _EveryNth(len(self.paths), self.trainer.global_rank, self.trainer.world_size)
        # a list is a map-style dataset (__getitem__, __len__); torch types the argument as its Dataset class
        return torch.utils.data.DataLoader(self.paths, batch_size=None,  # pyright: ignore[reportArgumentType]
                                           sampler=sampler)

    def predict_step(self, path: Path, batch_idx: int) -> dict:
        runtime = Runtime(self.device, self.runtime.batch, self.runtime.precision, self.runtime.optimize)
        cell = SlideModel(self.cell, self.cell_info.config, self.cell_info.resolution, self.cell_info.source)
        tissue = (SlideModel(self.tissue, self.tissue_info.config, self.tissue_info.resolution, self.tissue_info.source)
                  if self.tissue_info is not None and self.tissue is not None else None)
        return analyse_slide(path, cell, self.out_dir, tissue, runtime=runtime, **self.options).summary


def analyse_slides_distributed(paths: list[Path], cell_model: SlideModel, out_dir: Path | str,
                               tissue_model: SlideModel | None = None, devices: int = 2, nodes: int = 1,
                               runtime: Runtime | None = None, **options) -> tuple[int, list[dict]]:
    """`analyse_slide` for each slide, the slides spread over ``devices`` processes by
    Lightning (``Trainer.predict`` with the DDP strategy: one process per GPU, or per CPU
    share on ``runtime.device`` = cpu), each slide in one of them, once.

    Returns (this process's rank, the summaries this process made). Lightning starts the other
    processes by running the same command again, so a caller prints only on rank 0. Across
    ``nodes`` machines sharing the output folder: start the same command on each, with
    Lightning's ``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK`` set.
    """
    runtime = runtime or model_runtime(cell_model.model)
    check_slides(paths, out_dir, options.get("resume", False), options.get("region"), options.get("mpp"),
                 options.get("tile", 1024), options.get("overlap", 128))
    accelerator = "gpu" if runtime.device.type == "cuda" else "cpu"
    # Lightning 2.6's own use of a torch 2.13 deprecation, once per process: nothing a user can act on
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")
    trainer = lightning.Trainer(accelerator=accelerator, devices=devices, strategy="ddp", logger=False,
                                enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                                num_nodes=nodes)
    task = _SlideTask(list(paths), cell_model, tissue_model, Path(out_dir), runtime, options)
    # one predict dataloader: a flat list of the steps' summaries (a list per dataloader only with several)
    summaries = cast(list[dict], trainer.predict(task, return_predictions=True) or [])
    trainer.strategy.barrier()  # every slide done before rank 0 reports
    return trainer.global_rank, summaries
