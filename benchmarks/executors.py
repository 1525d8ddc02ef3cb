"""A small study under each executor: wall time, and whether the numbers are the same.

    python benchmarks/executors.py [--work DIR] [--seeds 4] [--epochs 6]

One study (plain and p4m, 4 seeds, 128 px crowded synthetic patches, depth 3, robustness off) is
run three times, each in its own ``equiseg study`` process and folder: ``--executor local``,
``--executor ray --cpus-per-run 2`` (one run at a time on a local 2-CPU Ray cluster, with the
local run's torch thread count) and ``--executor ray --cpus-per-run 1`` (two runs at a time, one
thread each). The table gives each one's wall time (Ray's start-up included), its ratio to the
local one, and the largest difference of any run's test mF1 from the local study's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def study_file(folder: Path, seeds: int, epochs: int) -> Path:
    spec = {"name": "executors", "base": "plain-small", "reference_width": 8,
            "overrides": ["data.synthetic.train=8", "data.synthetic.val=2", "data.synthetic.test=4",
                          "data.synthetic.size=128", "data.crop_size=64", "model.depth=3", f"train.epochs={epochs}",
                          "train.loggers=[csv]"],
            "variants": {"plain": {"family": "plain"}, "p4m": {"family": "p4m"}},
            "fractions": [1.0], "seeds": list(range(seeds)), "robustness": False, "angles": [45]}
    path = folder / "executors.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    print(f"cpus={os.cpu_count()}")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        config = study_file(work, args.seeds, args.epochs)
        modes = {"local": ["--executor", "local"], "ray, 2 CPUs a run": ["--executor", "ray", "--cpus-per-run", "2"],
                 "ray, 1 CPU a run": ["--executor", "ray", "--cpus-per-run", "1"]}
        scores, first = {}, None
        print(f"{'executor':<20} {'wall s':>7} {'ratio':>6} {'max |Δ mF1| vs local':>21}")
        for k, (label, options) in enumerate(modes.items()):
            out = work / f"study-{k}"
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "equiseg.cli", "study", "-c", str(config), "--out",
                                     str(out), "--device", "cpu", *options], check=False, cwd=ROOT,
                                    capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if result.returncode != 0:
                raise RuntimeError(f"{label} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
            runs = json.loads((out / "results.json").read_text())["results"]
            scores[label] = [r["scores"]["mf1"] for r in runs]
            first = first or seconds
            delta = max(abs(a - b) for a, b in zip(scores[label], scores["local"]))
            print(f"{label:<20} {seconds:>7.1f} {seconds / first:>6.2f} {delta:>21.4f}", flush=True)


if __name__ == "__main__":
    main()
