"""Training throughput of the small presets, and inference cost of the paper-size models.

    python benchmarks/pipeline.py [--steps 8] [--skip-inference] [--json PATH]

1. Training samples per second (forward + backward + Adam step, augmentation included where
   the preset has it) for the presets isotropic-small and plain-small, on random
   batches of the preset's batch and crop size; median over ``--steps`` steps after one warm-up.
2. Inference of the paper-size models (plain width 64, isotropic width 110, depth 4) on one
   1024x1024 image in eval mode without gradients: seconds (median of 3 after a warm-up) and
   peak resident memory of the process, each model in a fresh process so peaks do not mix.

Writes docs/benchmarks/pipeline-DATE.json (see benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from _record import add_json_option, column, print_table, table, write_result  # this script's folder


def train_rate(config_name: str, steps: int) -> float:
    from equiseg.config import Config
    from equiseg.presets import preset_path
    from equiseg.training.module import SegmentationModule

    config = Config.from_yaml(preset_path(config_name))
    module = SegmentationModule(config.to_dict())
    optimiser = module.configure_optimizers()["optimizer"]  # without its schedule: steps only
    b, s = config.data.batch_size, config.data.crop_size
    image, target = torch.rand(b, 3, s, s), torch.randint(0, 3, (b, s, s))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        x, y = image, target
        if module.augment is not None:
            x, masks = module.augment(image, {"target": target})
            y = masks["target"]
        optimiser.zero_grad()
        module.loss(module(x), y).backward()
        optimiser.step()
        if step:
            times.append(time.perf_counter() - start)
    return b / statistics.median(times)


def inference_child(family: str, width: int) -> None:
    from equiseg.models import build_model

    torch.manual_seed(0)
    model = build_model(family, width).eval()
    image = torch.rand(1, 3, 1024, 1024)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.no_grad():
        for k in range(4):
            start = time.perf_counter()
            model(image)
            if k:
                times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"seconds": statistics.median(times), "peak_mib": peak / 1024, "before_mib": before / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    add_json_option(parser)
    args = parser.parse_args()
    if args.child:
        inference_child(args.child[0], int(args.child[1]))
        return
    print(f"torch={torch.__version__} threads={torch.get_num_threads()}")
    training = [{"preset": name, "samples_per_s": train_rate(name, args.steps)}
                for name in ("isotropic-small", "plain-small")]
    tables = {"training": table([column("preset", "preset"), column("samples_per_s", "samples/s", ".2f")], training)}
    print_table(tables["training"])
    if not args.skip_inference:
        inference = []
        for family, width in (("plain", 64), ("isotropic", 110)):
            out = subprocess.run([sys.executable, __file__, "--child", family, str(width)], capture_output=True,
                                 text=True, check=True)
            inference.append({"family": family, "width": width,
                              **json.loads(out.stdout.strip().splitlines()[-1])})
        tables["inference"] = table([column("family", "family"), column("width", "width"),
                                     column("seconds", "s per 1024x1024 image", ".1f"),
                                     column("peak_mib", "peak RSS MiB", ".0f"),
                                     column("before_mib", "model loaded MiB", ".0f")], inference)
        print_table(tables["inference"])
    write_result("pipeline", "training samples per second of the small presets, and inference of the paper-size "
                 "plain and isotropic U-Nets on one 1024x1024 image", vars(args), tables, args.json)

if __name__ == "__main__":
    main()
