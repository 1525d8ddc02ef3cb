"""The tiled prediction's own cost, per window, at batch 1, 4 and 8: what a GPU waits on between its forwards.

    python benchmarks/tiling.py [--size 4096] [--repeats 5] [--threads 1] [--json PATH]

``predict_probabilities`` of a size x size image in 1024 px windows (overlap 128), with a model
that costs next to nothing (a 1x1 conv, 3 -> 3 channels), on the CPU: what is timed is reading the
windows, making the batch, the softmax, the move to the host and the blending. On a GPU the
forward runs on the device, and everything here but the softmax stays on the host, so batch sizes
whose pipeline is slower per window than batch 1's cost the GPU that difference. Median of
``--repeats`` after a warm-up, batch sizes interleaved, ratios to batch 1 from the same run.
Writes docs/benchmarks/tiling-DATE.json (see benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _record import add_json_option, column, print_table, table, write_result  # this script's folder
from torch import nn

from equiseg.inference.tiling import predict_probabilities, tile_grid
from equiseg.runtime import Runtime

BATCHES = (1, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: as the host side of a GPU run)")
    add_json_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 1).eval()
    image = torch.rand(3, args.size, args.size)
    windows = len(tile_grid(args.size, args.size, 1024, 128))
    runtimes = {b: Runtime(torch.device("cpu"), b, optimize=False) for b in BATCHES}
    times = {b: [] for b in BATCHES}
    for k in range(args.repeats + 1):
        for b, runtime in runtimes.items():
            start = time.perf_counter()
            predict_probabilities(model, image, tile=1024, overlap=128, runtime=runtime)
            if k:
                times[b].append(time.perf_counter() - start)
    base = statistics.median(times[1])
    rows = [{"batch": b, "seconds": statistics.median(times[b]), "ms_per_window": statistics.median(times[b]) /
             windows * 1e3, "x_batch_1": statistics.median(times[b]) / base} for b in BATCHES]
    result = table([column("batch", "batch"), column("seconds", "s per image", ".3f"),
                    column("ms_per_window", "ms per window", ".2f"), column("x_batch_1", "x batch 1", ".2f")], rows)
    print(f"{args.size}x{args.size} image, {windows} windows of 1024 px, 1x1 conv model, CPU, "
          f"{args.threads} thread(s), torch {torch.__version__}, median of {args.repeats}")
    print_table(result)
    write_result("tiling", f"the tiled prediction's own cost per window (a {args.size} px image in {windows} "
                 "windows of 1024 px, a 1x1 conv model) at batch 1, 4 and 8; medians, ratios from the same run",
                 vars(args), {"batches": result}, args.json)

if __name__ == "__main__":
    main()
