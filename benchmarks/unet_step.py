"""A whole U-Net training step and forward pass, each family against the plain U-Net with the same conv shapes.

    python benchmarks/unet_step.py [--batch 4] [--size 256] [--steps 20] [--device cuda] [--norm view]
                                   [--compile default|reduce-overhead] [--families plain p4m] [--train-only]
                                   [--profile FILE] [--json PATH]

The layer benchmark (layers.py) times one conv with a synchronisation around it, which exposes
every kernel launch of the filter expansion. Inside a network the GPU runs ahead of Python, so
this measures what a user pays: the plain U-Net at width 64 against isotropic width 64, p4 width
16 and p4m width 8, whose convolutions have the same channel counts level by level (64, 128, ...;
group families as 16 or 8 fields of 4 or 8 channels). Train: forward, Dice-CE loss, backward and
an Adam step on a batch of random crops. Eval: one forward without gradients. Medians over
``steps`` after 3 warm-up steps, the families interleaved, ratios to plain from the same run.
``--norm view`` trains the group batch norm through its definition, ``BatchNorm2d`` over the
(B, C, |G|*H, W) view, instead of per-channel passes (see ``GroupBatchNorm2d``), for comparison.
``--compile MODE`` runs every U-Net through ``torch.compile`` in that mode, as ``train.compile``
does, next to the eager ones with the same weights (the warm-up steps compile; "x plain"
compares a family with plain run the same way, "x eager" the compiled U-Net with the eager one).
``--families`` times only those (plain is always among them); ``--train-only`` skips the forward
pass (compiling then builds one graph per U-Net, not two).
``--profile FILE`` writes PyTorch's profiler table (kernels by device time) of 5 training steps
of plain and of each group family to FILE. Writes docs/benchmarks/unet_step-DATE.json (see
benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _record import add_json_option, column, print_table, table, write_result
from layers import sync  # benchmarks/layers.py: this script's folder is on the path when run

from equiseg.evaluation.losses import DiceCELoss
from equiseg.models import build_model
from equiseg.nn import GroupBatchNorm2d

WIDTHS = {"plain": 64, "isotropic": 64, "p4": 16, "p4m": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--norm", choices=["fields", "view"], default="fields",
                        help="how the group batch norm trains (GroupBatchNorm2d.TRAINING_PATH)")
    parser.add_argument("--compile", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile every U-Net in this mode (as train.compile does)")
    parser.add_argument("--families", nargs="+", choices=list(WIDTHS), default=list(WIDTHS))
    parser.add_argument("--train-only", action="store_true", help="time the training step only")
    parser.add_argument("--profile", help="write the profiler's kernel table of 5 training steps per family here")
    add_json_option(parser)
    args = parser.parse_args()
    GroupBatchNorm2d.TRAINING_PATH = args.norm
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the usual setting for fixed-size training crops
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, 3, (args.batch, args.size, args.size), device=device)
    loss_fn = DiceCELoss()
    # every family eager, and with --compile also compiled (same weights), timed interleaved
    models = {}
    for family in dict.fromkeys(["plain", *args.families]):
        width = WIDTHS[family]
        eager = build_model(family, width, args.depth).to(device)
        models[family, "eager"] = eager
        if args.compile:
            compiled = copy.deepcopy(eager)
            compiled.compile(mode=args.compile)
            models[family, args.compile] = compiled
    optimisers = {key: torch.optim.Adam(m.parameters(), lr=1e-4) for key, m in models.items()}

    def train_step(key: tuple[str, str]) -> float:
        model, optimiser = models[key].train(), optimisers[key]
        sync(device)
        start = time.perf_counter()
        if key[1] == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the graphs' earlier outputs are free
        optimiser.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        optimiser.step()
        sync(device)
        return time.perf_counter() - start

    def eval_step(key: tuple[str, str]) -> float:
        model = models[key].eval()
        with torch.no_grad():
            model(x)  # the bank is rebuilt once after training; steady-state evaluation reuses it
            sync(device)
            start = time.perf_counter()
            model(x)
            sync(device)
        return time.perf_counter() - start

    times = {key: {"train": [], "eval": []} for key in models}
    for step in range(args.steps + 3):  # the first steps compile, when compiling
        for key in models:
            t_train, t_eval = train_step(key), (0.0 if args.train_only else eval_step(key))
            if step >= 3:
                times[key]["train"].append(t_train)
                times[key]["eval"].append(t_eval)
    median = {key: {k: statistics.median(v) for k, v in t.items()} for key, t in times.items()}
    rows = []
    for (family, how), t in median.items():
        plain, eager = median["plain", how], median[family, "eager"]
        row = {"family": family, "width": WIDTHS[family], "mode": how, "train_ms": t["train"] * 1e3,
               "train_x_plain": t["train"] / plain["train"], "train_x_eager": t["train"] / eager["train"]}
        if not args.train_only:
            row |= {"forward_ms": t["eval"] * 1e3, "forward_x_plain": t["eval"] / plain["eval"],
                    "forward_x_eager": t["eval"] / eager["eval"]}
        rows.append(row)
    columns = [column("family", "family"), column("width", "width"), column("mode", "mode"),
               column("train_ms", "train step ms", ".2f"), column("train_x_plain", "x plain", ".3f")]
    columns += [column("train_x_eager", "x eager", ".3f")] if args.compile else []
    if not args.train_only:
        columns += [column("forward_ms", "forward ms", ".2f"), column("forward_x_plain", "x plain", ".3f")]
        columns += [column("forward_x_eager", "x eager", ".3f")] if args.compile else []
    result = table(columns, rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"U-Net depth {args.depth}, group norm path {args.norm}, batch {args.batch}x3x{args.size}x{args.size}, "
          f"{name}, torch {torch.__version__}, median of {args.steps} steps")
    print_table(result)
    write_result("unet_step", "a whole U-Net training step (forward, Dice-CE, backward, Adam) and an eval forward "
                 "of each family against the plain U-Net with the same conv channel counts; medians, ratios from "
                 "the same run", vars(args), {"steps": result}, args.json, str(device))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        with open(args.profile, "w") as out:
            for key in models:
                with profile(activities=activities) as prof:
                    for _ in range(5):
                        train_step(key)
                out.write(f"\n## {' '.join(key)}, 5 training steps, batch {args.batch}x3x{args.size}x{args.size}\n")
                out.write(prof.key_averages().table(sort_by=by, row_limit=25) + "\n")


if __name__ == "__main__":
    main()
