"""A whole U-Net training step and forward pass, each family against the plain U-Net with the same conv shapes.

    python benchmarks/unet_step.py [--batch 4] [--size 256] [--steps 20] [--device cuda] [--norm view] [--profile FILE]

The layer benchmark (layers.py) times one conv with a synchronisation around it, which exposes
every kernel launch of the filter expansion. Inside a network the GPU runs ahead of Python, so
this measures what a user pays: the plain U-Net at width 64 against isotropic width 64, p4 width
16 and p4m width 8, whose convolutions have the same channel counts level by level (64, 128, ...;
group families as 16 or 8 fields of 4 or 8 channels). Train: forward, Dice-CE loss, backward and
an Adam step on a batch of random crops. Eval: one forward without gradients. Medians over
``steps`` after 3 warm-up steps, the families interleaved, ratios to plain from the same run.
``--norm view`` trains the group batch norm through its definition, ``BatchNorm2d`` over the
(B, C, |G|*H, W) view, instead of per-channel passes (see ``GroupBatchNorm2d``), for comparison.
``--profile FILE`` writes PyTorch's profiler table (kernels by device time) of 5 training steps
of plain and of each group family to FILE.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
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
    parser.add_argument("--profile", help="write the profiler's kernel table of 5 training steps per family here")
    args = parser.parse_args()
    GroupBatchNorm2d.TRAINING_PATH = args.norm
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the usual setting for fixed-size training crops
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, 3, (args.batch, args.size, args.size), device=device)
    loss_fn = DiceCELoss()
    models = {f: build_model(f, w, args.depth).to(device) for f, w in WIDTHS.items()}
    optimisers = {f: torch.optim.Adam(m.parameters(), lr=1e-4) for f, m in models.items()}

    def train_step(family: str) -> float:
        model, optimiser = models[family].train(), optimisers[family]
        sync(device)
        start = time.perf_counter()
        optimiser.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        optimiser.step()
        sync(device)
        return time.perf_counter() - start

    def eval_step(family: str) -> float:
        model = models[family].eval()
        with torch.no_grad():
            model(x)  # the bank is rebuilt once after training; steady-state evaluation reuses it
            sync(device)
            start = time.perf_counter()
            model(x)
            sync(device)
        return time.perf_counter() - start

    times = {f: {"train": [], "eval": []} for f in models}
    for step in range(args.steps + 3):
        for family in models:
            t_train, t_eval = train_step(family), eval_step(family)
            if step >= 3:
                times[family]["train"].append(t_train)
                times[family]["eval"].append(t_eval)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"U-Net depth {args.depth}, group norm path {args.norm}, batch {args.batch}x3x{args.size}x{args.size}, {name}, torch {torch.__version__}, "
          f"median of {args.steps} steps")
    base = {k: statistics.median(times["plain"][k]) for k in ("train", "eval")}
    print(f"{'family':<10} {'width':>5} {'train step':>12} {'ratio':>6} {'forward':>10} {'ratio':>6}")
    for family, t in times.items():
        tr, ev = statistics.median(t["train"]), statistics.median(t["eval"])
        print(f"{family:<10} {WIDTHS[family]:>5} {tr * 1e3:>9.2f} ms {tr / base['train']:>6.3f} "
              f"{ev * 1e3:>7.2f} ms {ev / base['eval']:>6.3f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        with open(args.profile, "w") as out:
            for family in models:
                with profile(activities=activities) as prof:
                    for _ in range(5):
                        train_step(family)
                out.write(f"\n## {family}, 5 training steps, batch {args.batch}x3x{args.size}x{args.size}\n")
                out.write(prof.key_averages().table(sort_by=key, row_limit=25) + "\n")


if __name__ == "__main__":
    main()
