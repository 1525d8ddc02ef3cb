"""Speed of the data path at 1024x1024 on this machine.

    python benchmarks/data.py [--pairs 12] [--size 1024] [--json PATH]

1. Synthetic generation: pairs per second of ``generate_dataset`` (rendering and writing JPEG/PNG).
2. Reading: samples per second of the reader (JPEG decode, CSV, mask) + targets (disks of 30 px)
   + the heavy augmentation (batch of 1 on the CPU), over the generated train split.
Each figure is the median of 3 passes over the same files. Writes docs/benchmarks/data-DATE.json
(see benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _record import add_json_option, column, print_table, table, write_result  # this script's folder

from equiseg.data.augment import Augment, AugmentConfig
from equiseg.data.ocelot import OcelotFolder, image_to_tensor
from equiseg.data.synthetic import generate_dataset
from equiseg.data.targets import cell_class_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--size", type=int, default=1024)
    add_json_option(parser)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="equiseg-bench-"))
    try:
        gen = []
        for k in range(3):
            start = time.perf_counter()
            generate_dataset(work / f"ds{k}", {"train": args.pairs, "val": 0, "test": 0}, size=args.size, seed=k)
            gen.append(args.pairs / (time.perf_counter() - start))
        folder = OcelotFolder(work / "ds0", "train")
        augment = Augment(AugmentConfig.heavy())
        generator = torch.Generator().manual_seed(0)
        read, full = [], []
        for _ in range(3):
            start = time.perf_counter()
            items = []
            for sample in folder:
                items.append((sample, cell_class_mask(sample.cells, sample.cell_image.shape[:2])))
            read.append(len(folder) / (time.perf_counter() - start))
            start = time.perf_counter()
            for sample, target in items:
                augment(image_to_tensor(sample.cell_image)[None],
                        {"target": torch.from_numpy(target).long()[None]}, generator=generator)
            augment_seconds = time.perf_counter() - start
            full.append(len(folder) / (len(folder) / read[-1] + augment_seconds))
        rows = [{"step": "synthetic generation", "rate": statistics.median(gen), "unit": "pairs/s"},
                {"step": "reader + targets", "rate": statistics.median(read), "unit": "samples/s"},
                {"step": "reader + targets + heavy augmentation", "rate": statistics.median(full),
                 "unit": "samples/s"}]
        result = table([column("step", "step"), column("rate", "rate", ".2f"), column("unit", "unit")], rows)
        print(f"torch={torch.__version__} threads={torch.get_num_threads()} size={args.size} pairs={args.pairs} "
              "(medians of 3)")
        print_table(result)
        write_result("data", f"the data path at {args.size} px: synthetic generation, reading with targets, and "
                     "with the heavy augmentation; medians of 3 passes", vars(args), {"rates": result}, args.json)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
