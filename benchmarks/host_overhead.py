"""Host overhead of a training step: operations dispatched and time, where the arithmetic is negligible.

    python benchmarks/host_overhead.py [--steps 20] [--json PATH]

A GPU at small batches waits on the host that issues its kernels; this measures that host side
on the CPU. Each family of ``unet_step.py`` (plain and isotropic width 8, p4 width 2, p4m width 1:
the same conv channel counts, 8 at level 0), depth 4, one 32x32 image: the ATen operations one
training step (forward, Dice-CE, backward, Adam) dispatches, counted with a dispatch mode, and
the median time of a step over ``--steps`` (families interleaved, one thread), as ratios to plain.
The counts are the CPU's: on CUDA the group batch norm takes its own kernels (fewer operations).
Writes docs/benchmarks/host_overhead-DATE.json (see benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _record import add_json_option, column, print_table, table, write_result  # this script's folder
from torch.utils._python_dispatch import TorchDispatchMode

from equiseg.evaluation.losses import DiceCELoss
from equiseg.models import build_model

WIDTHS = {"plain": 8, "isotropic": 8, "p4": 2, "p4m": 1}


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.operations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operations += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    add_json_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, target, loss_fn = torch.rand(1, 3, 32, 32), torch.randint(0, 3, (1, 32, 32)), DiceCELoss()
    models = {f: build_model(f, w, depth=4) for f, w in WIDTHS.items()}
    optimisers = {f: torch.optim.Adam(m.parameters(), 1e-4) for f, m in models.items()}

    def step(family: str) -> None:
        optimisers[family].zero_grad(set_to_none=True)
        loss_fn(models[family](x), target).backward()
        optimisers[family].step()

    counts = {}
    for family in models:
        step(family)  # the optimiser's state exists from here on
        with Count() as count:
            step(family)
        counts[family] = count.operations
    times = {f: [] for f in models}
    for k in range(args.steps + 3):
        for family in models:
            start = time.perf_counter()
            step(family)
            if k >= 3:
                times[family].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    rows = [{"family": f, "width": WIDTHS[f], "operations": counts[f], "operations_x": counts[f] / counts["plain"],
             "step_ms": statistics.median(times[f]) * 1e3, "step_x": statistics.median(times[f]) / base}
            for f in models]
    result = table([column("family", "family"), column("width", "width"), column("operations", "operations"),
                    column("operations_x", "x plain", ".2f"), column("step_ms", "step ms", ".2f"),
                    column("step_x", "x plain", ".2f")], rows)
    print(f"torch {torch.__version__}, 1 thread, depth 4, batch 1x3x32x32, median of {args.steps} steps")
    print_table(result)
    write_result("host_overhead", "the ATen operations one training step dispatches and its median time, each "
                 "family at depth 4 on one 32x32 image (one thread), ratios to plain from the same run",
                 vars(args), {"steps": result}, args.json)

if __name__ == "__main__":
    main()
