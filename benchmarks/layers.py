"""Speed of each equivariant layer against a plain nn.Conv2d with the same channel counts.

    python benchmarks/layers.py [--runs 7] [--batch 4] [--channels 64] [--size 256] [--device cpu] [--json PATH]

Each layer maps `channels` conv channels to `channels` (group layers: channels / |G| fields
of |G| channels each), like a plain Conv2d(channels, channels, 3, padding=1). Train: one
forward + backward in train mode (the filter bank is rebuilt, as at every training step).
Eval: one forward in eval mode without gradients (the bank is cached; the call after the switch
from training, which rebuilds it, is not timed). Runs of all layers are
interleaved, so drift in the machine's speed hits all of them alike; medians are reported, and
ratios to the plain conv measured in the same run. Writes docs/benchmarks/layers-DATE.json
(see benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _record import add_json_option, column, print_table, table, write_result  # this script's folder
from torch import nn

from equiseg.groups import C4, D4
from equiseg.nn import GroupConv2d, IsotropicConv2d, LiftingConv2d


def layers(channels: int) -> dict[str, tuple[nn.Module, int]]:
    """Name -> (layer, input channels)."""
    return {
        "Conv2d (reference)": (nn.Conv2d(channels, channels, 3, padding=1), channels),
        "IsotropicConv2d": (IsotropicConv2d(channels, channels), channels),
        "LiftingConv2d C4": (LiftingConv2d(channels, channels // 4, C4), channels),
        "LiftingConv2d D4": (LiftingConv2d(channels, channels // 8, D4), channels),
        "GroupConv2d C4": (GroupConv2d(channels // 4, channels // 4, C4), channels),
        "GroupConv2d D4": (GroupConv2d(channels // 8, channels // 8, D4), channels),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_train(layer: nn.Module, x: torch.Tensor) -> float:
    layer.train()
    layer.zero_grad(set_to_none=True)
    sync(x.device)
    start = time.perf_counter()
    layer(x).sum().backward()
    sync(x.device)
    return time.perf_counter() - start


def time_eval(layer: nn.Module, x: torch.Tensor) -> float:
    layer.eval()
    with torch.no_grad():
        layer(x)  # untimed: switching from training drops the cached bank; steady-state eval reuses it
    sync(x.device)
    start = time.perf_counter()
    with torch.no_grad():
        layer(x)
    sync(x.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_json_option(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    bench = {name: (layer.to(device), torch.randn(args.batch, c, args.size, args.size, device=device))
             for name, (layer, c) in layers(args.channels).items()}
    times: dict[str, dict[str, list[float]]] = {name: {"train": [], "eval": []} for name in bench}
    for run in range(args.runs + 1):  # run 0 warms up and is dropped
        for name, (layer, x) in bench.items():
            t_train, t_eval = time_train(layer, x), time_eval(layer, x)
            if run:
                times[name]["train"].append(t_train)
                times[name]["eval"].append(t_eval)
    med = {name: {mode: statistics.median(ts) for mode, ts in modes.items()} for name, modes in times.items()}
    ref = med["Conv2d (reference)"]
    rows = [{"layer": name, "train_s": m["train"], "train_x": m["train"] / ref["train"], "eval_s": m["eval"],
             "eval_x": m["eval"] / ref["eval"]} for name, m in med.items()]
    result = table([column("layer", "layer"), column("train_s", "train s", ".4f"),
                    column("train_x", "train x Conv2d", ".3f"), column("eval_s", "eval s", ".4f"),
                    column("eval_x", "eval x Conv2d", ".3f")], rows)
    print(f"device={device} threads={torch.get_num_threads()} "
          f"input={args.batch}x{args.channels}x{args.size}x{args.size} runs={args.runs} (medians)")
    print_table(result)
    write_result("layers", "each equivariant layer against a plain Conv2d with the same channel counts: median "
                 "seconds of a training step (forward + backward) and of an eval forward, ratios from the same run",
                 vars(args), {"layers": result}, args.json, str(device))

if __name__ == "__main__":
    main()
