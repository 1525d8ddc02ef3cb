"""Peak memory and time of ``equiseg predict`` on large images: does memory stay bounded by the tile?

    python benchmarks/predict_memory.py [--sizes 2048 4096 8192] [--tile 1024] [--work DIR]

For each size S: a synthetic uncompressed RGB TIFF of S x S px (a random 512 px texture, tiled;
written band by band through ``tifffile.memmap``), and ``equiseg predict`` on it in a child
process with a small untrained plain U-Net (width 4, depth 2; its checkpoint is written here in
the format ``equiseg.runs.load_model`` reads), once writing the probability maps and
once with ``--no-probs``. Each run is one child, and its peak resident memory is that child's
own ``ru_maxrss`` (from ``os.wait4``), so runs do not mix. The table gives the area relative to
the first size, wall seconds, seconds per megapixel, peak RSS, the size of what was written, and
the peak RSS above the first size's (same mode). Streaming in blocks of windows
(``equiseg.inference.tiling.stream_blocks``) should keep that nearly flat: what grows with
the image is only strips across its width (about ``overlap`` rows of window terms and twice the
detection halo of final rows, C float32 each: ~4 MB per 1000 px of width together) and the
pictures (uint8, capped at 4096 px a side, so ~100 MB at most with ``--probs``) - not a row of
tiles, and never the area.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

ROOT = Path(__file__).resolve().parents[1]


def write_checkpoint(path: Path) -> Path:
    """A plain U-Net (width 4, depth 2, seeded, untrained) as a checkpoint ``load_model`` reads."""
    from equiseg.config import Config
    from equiseg.runs import save_model

    config = Config.from_dict({"name": "bench-plain", "model": {"family": "plain", "width": 4, "depth": 2}})
    torch.manual_seed(0)
    return save_model(config.build_model(), config, path)


def write_tiff(path: Path, size: int, seed: int = 0) -> Path:
    """An S x S uncompressed RGB TIFF of a tiled random texture, without holding it in memory."""
    patch = np.random.default_rng(seed).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    image = tifffile.memmap(path, shape=(size, size, 3), dtype=np.uint8, photometric="rgb")
    for top in range(0, size, 512):
        rows = min(512, size - top)
        image[top:top + rows] = np.tile(patch[:rows], (1, -(-size // 512), 1))[:, :size]
    image.flush()
    del image
    return path


def run_predict(checkpoint: Path, image: Path, out: Path, tile: int, probs: bool) -> dict[str, float]:
    """One ``equiseg predict`` child: wall seconds, its peak RSS (MB) and the MB it wrote."""
    command = [sys.executable, "-m", "equiseg.cli", "predict", str(checkpoint), str(image), "--out", str(out),
               "--tile", str(tile)] + ([] if probs else ["--no-probs"])
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = child.stdout.read().decode()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output}")
    written = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    return {"seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, "written_mb": written,
            "output": output.strip().splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--work", type=Path, help="Folder for the images and outputs (default: a temporary one).")
    args = parser.parse_args()
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} cpus={os.cpu_count()} tile={args.tile}")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = write_checkpoint(work / "plain-w4-d2.ckpt")
        print(f"{'size':>6} {'mode':<9} {'area':>5} {'wall s':>7} {'s/Mpx':>6} {'peak RSS MB':>11} "
              f"{'output MB':>9} {'RSS above first':>15}")
        first: dict[bool, float] = {}
        for size in args.sizes:
            image = write_tiff(work / f"synthetic-{size}.tif", size)
            for probs in (True, False):
                out = work / f"out-{size}-{'probs' if probs else 'no-probs'}"
                result = run_predict(checkpoint, image, out, args.tile, probs)
                first.setdefault(probs, result["rss_mb"])
                print(f"{size:>6} {'probs' if probs else 'no-probs':<9} {(size / args.sizes[0]) ** 2:>5.0f} "
                      f"{result['seconds']:>7.1f} {result['seconds'] / (size * size / 1e6):>6.2f} "
                      f"{result['rss_mb']:>11.0f} {result['written_mb']:>9.0f} "
                      f"{result['rss_mb'] - first[probs]:>+15.0f}", flush=True)
                for line in result["output"][-3:]:
                    print(f"{'':>8}| {line}")
            image.unlink()


if __name__ == "__main__":
    main()
