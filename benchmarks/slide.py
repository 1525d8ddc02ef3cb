"""Speed and peak memory of ``equiseg slide`` on synthetic slides: does memory stay flat as slides grow?

    python benchmarks/slide.py [--sizes 12000 48000] [--band SIZE:HEIGHT ...] [--cell-model RUN] [--work DIR]
                               [--device cpu] [--batch N]

For each size S: a synthetic pyramidal slide of S x S px at 0.2 µm/px (``equiseg synth-slide``,
kept in the work folder for the next run), then ``equiseg slide`` on it in a child process,
whose peak resident memory is its own ``ru_maxrss`` (from ``os.wait4``). Without
``--cell-model`` the model is an untrained U-Net of the plain-small preset's shape (width 16,
depth 4: the time per pixel is the architecture's; its cells are not meaningful, so cells/s
then measures detection on noise). The table gives the tissue area analysed, wall seconds,
megapixels of tissue per second at the model's resolution, cells per second, the mF1 of the
cells against the slide's true ones (OCELOT's rule: 15 px at level 0), peak RSS and its growth
over the first size. What grows with the slide: strips across the analysed box's width
(about ``overlap`` rows of window terms and twice the detection halo of final rows, C float32
each: ~2 KB per px of width), the tissue mask (1 byte per 8 µm pixel) and the cells found.
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

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_untrained_run(path: Path) -> Path:
    """A run folder holding an untrained plain-small-shaped U-Net and a recorded resolution."""
    from equiseg.config import Config
    from equiseg.presets import preset_path
    from equiseg.runs import Run, save_model

    config = Config.from_yaml(preset_path("plain-small"))
    run = Run(path)
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_model(config.build_model(), config, run.best)
    config.to_yaml(run.config_file)
    run.resolution_file.write_text(yaml.safe_dump({"cell_mpp": 0.2, "tissue_mpp": 0.8}))
    return path


def child(command: list[str]) -> tuple[float, float, str]:
    """Run one child: wall seconds, its peak RSS (MB), its output."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output}")
    return seconds, usage.ru_maxrss / 1024, output


def score(found: Path, truth: Path, mpp: float, region: dict) -> float:
    """The OCELOT mF1 of the cells found against the slide's true cells in the analysed region
    (one image, 15 px at level 0).
    """
    from equiseg.detection import detection_scores

    points = np.loadtxt(found, delimiter=",", skiprows=1, usecols=(2, 3, 4, 6), ndmin=2)
    points[:, :2] /= mpp  # the continuous centre in level-0 px
    true = np.loadtxt(truth, delimiter=",", skiprows=1, ndmin=2)
    x, y, w, h = region["x"], region["y"], region["width"], region["height"]
    true = true[(true[:, 0] >= x) & (true[:, 0] < x + w) & (true[:, 1] >= y) & (true[:, 1] < y + h)]
    return detection_scores([points], [true])["mf1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[12000, 48000])
    parser.add_argument("--cell-model", type=Path, help="A trained cell run (default: untrained, plain-small shape).")
    parser.add_argument("--work", type=Path, help="Folder for slides and outputs (default: a temporary one).")
    parser.add_argument("--band", nargs="*", default=[], metavar="SIZE:HEIGHT",
                        help="Analyse only a full-width band of HEIGHT px of the SIZE slide.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} cpus={os.cpu_count()} device={args.device} "
          f"batch={args.batch}")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        model = args.cell_model or write_untrained_run(work / "untrained-plain-small")
        print(f"model: {model}")
        print(f"{'size':>6} {'synth s':>7} {'tissue mm²':>10} {'tissue Mpx':>10} {'wall s':>7} {'Mpx/s':>6} "
              f"{'cells':>7} {'cells/s':>7} {'mF1':>5} {'peak RSS MB':>11} {'RSS above first':>15}")
        first = None
        for size in args.sizes:
            slide = work / f"synthetic-{size}.tif"
            synth_seconds = 0.0
            if not slide.is_file():
                synth_seconds, _, _ = child([sys.executable, "-m", "equiseg.cli", "synth-slide", str(slide),
                                             "--size", str(size)])
            bands = {int(a): int(b) for a, b in (band.split(":") for band in args.band)}
            region = []
            if size in bands:
                region = ["--region", f"0,{(size - bands[size]) // 2},{size},{bands[size]}"]
            out = work / (f"out-{size}" + ("" if not region else f"-band{bands[size]}"))
            seconds, rss, _ = child([sys.executable, "-m", "equiseg.cli", "slide", str(slide), "--cell-model",
                                     str(model), "--out", str(out), "--device", args.device, "--batch",
                                     str(args.batch), *region,
                                     *(["--resume"] if (out / f"{slide.stem}.summary.json").is_file() else [])])
            summary = json.loads((out / f"{slide.stem}.summary.json").read_text())
            cells = sum(summary["cells"].values())
            mpx = summary["tissue_mm2"] / (summary["cell_view"]["mpp"] ** 2)  # mm² / (µm/px)² = Mpx
            model_seconds = summary["seconds"]["cell model"]
            first = rss if first is None else first
            mf1 = score(out / f"{slide.stem}.cells.csv", slide.with_suffix(".cells.csv"), summary["slide"]["mpp"],
                        summary["region"])
            print(f"{size:>6} {synth_seconds:>7.0f} {summary['tissue_mm2']:>10.2f} {mpx:>10.0f} {seconds:>7.0f} "
                  f"{mpx / model_seconds:>6.2f} {cells:>7} {cells / model_seconds:>7.0f} {mf1:>5.3f} {rss:>11.0f} "
                  f"{rss - first:>+15.0f}", flush=True)
            print(f"{'':>8}| stages (s): {summary['seconds']}")


if __name__ == "__main__":
    main()
