"""Where ``equiseg predict`` and ``equiseg slide`` spend their wall time, against a baseline revision.

    python benchmarks/predict_profile.py [--model RUN] [--baseline REV] [--size 4096] [--slide-size 12000]
                                         [--work DIR] [--device cpu] [--json PATH]

1. **End to end.** ``equiseg predict --no-probs`` on one SIZE² image (the model's synthetic cell patches
   tiled, as an uncompressed TIFF) and ``equiseg slide`` on a synthetic SLIDE-SIZE² slide
   (``equiseg synth-slide``), each in a child process, interleaved with the same commands of
   ``--baseline`` (a git worktree of that revision, its ``src`` on ``PYTHONPATH``): wall seconds of
   each child, the speed-up, and whether the cells are the same (one to one within 1.5 px and of the
   same class, from the CSV files both write), and the mF1 of this revision's cells scored against the
   baseline's by OCELOT's rule (15 px).
2. **Shares.** In this revision's children, timers around the network's forward (each batch; on a
   GPU with synchronisation), the tiling around it (what the stream of blocks costs beyond the
   forward: softmax, blending, batches, waiting for windows), detection (``BlockDetector``), writing
   (pictures, probability maps; for a slide what its summary counts as outputs) and reading (the
   worker thread that reads windows ahead, overlapped with the network, so not part of the sum);
   start-up and the rest is the wall time less the others; "imports" is the part of it before the
   command starts (Python, torch and equiseg imported), and "network after imports" the forward's share
   of the rest. "network alone" times the same model's forward over the same windows of the image once
   more, with nothing else running.
3. **The network's rate.** The presets' U-Nets (small: plain-small, isotropic-small; paper size:
   plain-paper, isotropic-paper; fresh weights) on one 1024² image, optimized for inference
   with the decoder's upsampling fused (this revision) and without it (as before), each timing
   alternated with one large ``Conv2d(256, 256, 3)`` on 1 x 256 x 128 x 128: GFLOP/s are 2 x the
   U-Net's multiply-adds as trained (``count_macs``) per second, "of ref" that rate over the
   reference conv's, measured a few ms apart. The fused decoder executes fewer multiply-adds
   ("executed MACs"), so its rate is the rate the trained network's work is done at, not the
   hardware's.

Without ``--model`` the plain-small preset is trained on its synthetic data into WORK (a few
minutes on 2 cores, reused next time). Writes docs/benchmarks/predict_profile-DATE.json
(see benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from _record import add_json_option, column, print_table, table, write_result  # this script's folder

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "2514038"  # main before #29: fixed tile layout, unfused decoder, square max filter, conv blur
PRESETS = {"plain-small": "small", "isotropic-small": "small", "plain-paper": "paper", "isotropic-paper": "paper"}


class Clock:
    """Seconds per stage, summed over calls and threads."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def wrap(self, owner: object, name: str, stage: str) -> None:
        """Time every call of ``owner.name`` (a function or method) as ``stage``."""
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - start)
        setattr(owner, name, timed)

    def wrap_stream(self, owner: object, name: str) -> None:
        """Time each block that ``owner.name`` (a generator of blocks) hands out, as "stream"."""
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            blocks = inner(*args, **kwargs)
            while True:
                start = time.perf_counter()
                try:
                    block = next(blocks)
                except StopIteration:
                    self.add("stream", time.perf_counter() - start)
                    return
                self.add("stream", time.perf_counter() - start)
                yield block
        setattr(owner, name, timed)


class TimedForward(torch.nn.Module):
    """A model whose forward passes are timed as "forward" (synchronised on a GPU)."""

    def __init__(self, model: torch.nn.Module, clock: Clock) -> None:
        super().__init__()
        self.model, self.clock = model, clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        out = self.model(x)
        sync()
        self.clock.add("forward", time.perf_counter() - start)
        return out


def instrument(clock: Clock, job: str) -> None:
    """Put the timers of the module docstring on this revision's code of ``job`` (predict or slide; only
    the modules the command itself imports).
    """
    from equiseg.detection import peaks
    from equiseg.inference import predict, readers, tiling

    optimized = tiling.inference_model
    tiling.inference_model = lambda model: TimedForward(optimized(model), clock)
    clock.wrap(tiling, "_read_chunk", "read")
    clock.wrap(peaks.BlockDetector, "add", "detect")
    clock.wrap(peaks.BlockDetector, "points", "detect")
    clock.wrap(peaks.BlockDetector, "candidates", "detect")
    for owner, name in [(predict._Pictures, "add"), (predict._Pictures, "save"), (readers.NpyBlocks, "write")]:
        clock.wrap(owner, name, "write")
    if job == "slide":
        from equiseg.slide import passes

        clock.wrap_stream(passes, "stream_blocks")
    else:
        clock.wrap_stream(predict, "stream_blocks")


def child(out: Path, command: list[str]) -> None:
    """Run ``equiseg COMMAND`` in this process with the timers on; write the stages to ``out``."""
    clock = Clock()
    instrument(clock, command[0])
    from equiseg.cli import app

    ready = process_age()  # imports done: the command starts
    try:
        app(command, standalone_mode=False)
    except SystemExit as stop:
        if stop.code:
            raise
    stages = {**clock.seconds, "imports": ready}
    if command[0] == "predict":  # after the command: its own wall is the parent's less this
        start = time.perf_counter()
        stages["alone"] = network_alone(command)
        stages["after_command"] = time.perf_counter() - start
    else:  # a slide's outputs (its summary's count) are written outside predict's writers
        folder, slide = Path(command[command.index("--out") + 1]), Path(command[1])
        stages["write"] = json.loads((folder / f"{slide.stem}.summary.json").read_text())["seconds"]["outputs"]
    out.write_text(json.dumps(stages))


def network_alone(command: list[str]) -> float:
    """Seconds of the model's forward (optimized, batch 1) over the windows that ``predict`` ran."""
    from equiseg.inference.readers import RgbFile
    from equiseg.inference.tiling import inference_model, tile_grid
    from equiseg.runs import load_model

    image, model = Path(command[1]), Path(command[command.index("--model") + 1])
    net = inference_model(load_model(model, torch.device("cpu"))[0])
    reader = RgbFile(image)
    try:
        tiles = [reader.window(*window) for window in tile_grid(reader.height, reader.width, 1024, 128)]
    finally:
        reader.close()
    with torch.no_grad():
        net(tiles[0][None])  # warm-up
        start = time.perf_counter()
        for tile in tiles:
            net(tile[None])
    return time.perf_counter() - start


def process_age() -> float:
    """Seconds since this process started (Linux: /proc; 10 ms steps)."""
    started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: start time, ticks
    return float(Path("/proc/uptime").read_text().split()[0]) - started / os.sysconf("SC_CLK_TCK")


def run_child(command: list[str], env: dict | None = None) -> float:
    """Wall seconds of one child process (its output shown only when it fails)."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def same_cells(before: np.ndarray, after: np.ndarray) -> int:
    """How many cells of ``after`` (rows x, y, class) pair one to one with a cell of ``before`` of their class
    within 1.5 px (closest pairs first: one px of rounding along each axis).
    """
    from scipy.spatial import cKDTree

    if not len(before) or not len(after):
        return 0
    distances = cKDTree(after[:, :2]).sparse_distance_matrix(cKDTree(before[:, :2]), 1.5, output_type="ndarray")
    used_after, used_before, same = set(), set(), 0
    for i, j, _ in sorted(distances.tolist(), key=lambda pair: pair[2]):
        i, j = int(i), int(j)
        if i not in used_after and j not in used_before and after[i, 2] == before[j, 2]:
            used_after.add(i), used_before.add(j)
            same += 1
    return same


def agreement(before: np.ndarray, after: np.ndarray) -> float:
    """The mF1 of the cells ``after`` (x, y, class) scored against those ``before`` as if they were the truth,
    by OCELOT's rule (15 px, same class): how far the change moves the cells at the score's own tolerance.
    """
    from equiseg.detection import detection_scores

    scored = np.concatenate([after, np.ones((len(after), 1))], 1)  # a probability for the matching order
    return detection_scores([scored], [before])["mf1"]


def cells_csv(path: Path, columns: tuple[int, int, int]) -> np.ndarray:
    """(N, 3) rows (x, y, class) of a cells CSV, from its ``columns``."""
    return np.loadtxt(path, delimiter=",", skiprows=1, usecols=columns, ndmin=2).reshape(-1, 3)


def tiled_image(root: Path, path: Path, size: int) -> Path:
    """A size² RGB TIFF of the dataset's cell images (all splits), tiled row by row."""
    import tifffile
    from PIL import Image

    if path.is_file():
        return path
    patches = sorted((root / "images").glob("*/cell/*.jpg"))
    image = np.zeros((size, size, 3), np.uint8)
    k = 0
    for top in range(0, size, 512):
        for left in range(0, size, 512):
            patch = np.asarray(Image.open(patches[k % len(patches)]).convert("RGB"))[:512, :512]
            h, w = min(512, size - top, patch.shape[0]), min(512, size - left, patch.shape[1])
            image[top:top + h, left:left + w] = patch[:h, :w]
            k += 1
    tifffile.imwrite(path, image, photometric="rgb")
    return path


def trained_model(args: argparse.Namespace) -> tuple[Path, Path]:
    """The cell run to time (``--model`` or plain-small trained into WORK) and its dataset folder."""
    from equiseg.config import Config
    from equiseg.datasets import data_root
    from equiseg.presets import preset_path
    from equiseg.runs import Run
    from equiseg.training.fit import train_or_reuse

    if args.model is not None:
        return args.model, data_root(Config.from_yaml(Run(args.model).config_file))
    config = Config.from_yaml(preset_path("plain-small"))
    run = args.work / "plain-small"
    train_or_reuse(config, run, progress=False)
    return run, data_root(config)


def baseline_tree(work: Path, revision: str) -> Path:
    """A git worktree of ``revision`` in WORK (made once)."""
    tree = work / f"baseline-{revision}"
    if not (tree / "src" / "equiseg").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(tree), revision], cwd=ROOT, check=True,
                       capture_output=True)
    return tree


def end_to_end(args: argparse.Namespace, model: Path, image: Path, slide: Path, tree: Path) -> list[dict]:
    """Each job (predict, slide) by the baseline, then by this revision with its timers: one row per job."""
    device = ["--device", args.device]
    jobs = {"predict": (["predict", str(image), "--model", str(model), "--no-probs", "--force", *device],
                        f"{image.stem}_cells.csv", (0, 1, 2)),
            "slide": (["slide", str(slide), "--model", str(model), *device], f"{slide.stem}.cells.csv", (0, 1, 4))}
    rows = []
    for job, (command, csv, columns) in jobs.items():
        walls, cells = {}, {}
        for who in ("before", "after"):
            out = args.work / f"{job}-{who}"
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)  # this benchmark's own output folder
            full = [*command, "--out", str(out)]
            if who == "before":
                env = {**os.environ, "PYTHONPATH": str(tree / "src")}
                walls[who] = run_child([sys.executable, "-m", "equiseg.cli", *full], env)
            else:
                stages_file = args.work / f"{job}-stages.json"
                walls[who] = run_child([sys.executable, __file__, "--child", str(stages_file), "--", *full])
                stages = json.loads(stages_file.read_text())
            cells[who] = cells_csv(out / csv, columns)
        rows.append(job_row(job, walls, cells, stages))
        print(f"{job}: before {walls['before']:.1f} s, after {walls['after']:.1f} s; stages {stages}", flush=True)
    return rows


def job_row(job: str, walls: dict, cells: dict, stages: dict) -> dict:
    """One row of the end-to-end table: walls, speed-up, cells, and each stage's share of the wall."""
    wall = walls["after"] = walls["after"] - stages.get("after_command", 0.0)  # less the network timed alone
    forward, stream = stages.get("forward", 0.0), stages.get("stream", 0.0)
    parts = {"network": forward, "tiling": max(0.0, stream - forward), "detection": stages.get("detect", 0.0),
             "writing": stages.get("write", 0.0)}
    parts["start-up and rest"] = max(0.0, wall - sum(parts.values()))
    row = {"job": job, "before_s": walls["before"], "after_s": wall, "speedup": walls["before"] / wall,
           "cells_before": len(cells["before"]), "cells_after": len(cells["after"]),
           "same_cells": same_cells(cells["before"], cells["after"]),
           "agreement": agreement(cells["before"], cells["after"]),
           "read_s": stages.get("read", 0.0), "alone_s": stages.get("alone")}
    row.update({f"share_{name}": seconds / wall for name, seconds in parts.items()})
    if row["alone_s"] is not None:
        row["share_alone"] = row["alone_s"] / wall
    row["imports_s"] = stages.get("imports", 0.0)
    row["share_network_command"] = forward / (wall - row["imports_s"])  # of the command, once Python and its imports are up
    return row


def timed(function, repeats: int, warm: bool = True) -> float:
    """The median of ``repeats`` timings of ``function()`` (after one untimed call when ``warm``)."""
    if warm:
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def network_rates(repeats: int) -> list[dict]:
    """Each preset's U-Net, optimized with and without the fused decoder, against the reference conv."""
    from equiseg.config import Config
    from equiseg.models.build import count_macs
    from equiseg.models.optimize import optimize_for_inference
    from equiseg.presets import preset_path

    reference = torch.nn.Conv2d(256, 256, 3, padding=1).eval()
    reference_input = torch.rand(1, 256, 128, 128)
    reference_macs = 256 * 256 * 9 * 128 * 128
    image = torch.rand(1, 3, 1024, 1024)
    rows = []
    for preset, size in PRESETS.items():
        config = Config.from_yaml(preset_path(preset))
        torch.manual_seed(0)
        model = config.build_model().eval()
        macs = count_macs(model, 1024, 1024)
        for fused in (False, True):
            net = optimize_for_inference(model, fuse_up=fused)
            with torch.no_grad():
                net(image)  # warm-up
                seconds, reference_seconds = [], []
                for _ in range(repeats):  # each timing of the U-Net beside one of the reference
                    seconds.append(timed(lambda net=net: net(image), 1, warm=False))
                    reference_seconds.append(timed(lambda: reference(reference_input), 3))
            rate = 2 * macs / statistics.median(seconds) / 1e9
            reference_rate = 2 * reference_macs / statistics.median(reference_seconds) / 1e9
            rows.append({"preset": preset, "size": size, "family": config.model.family.value,
                         "width": config.model.width, "decoder": "fused" if fused else "as before",
                         "seconds": statistics.median(seconds), "macs": macs / 1e9,
                         "executed": count_macs(net, 1024, 1024) / 1e9, "gflops": rate,
                         "reference": reference_rate, "of_reference": rate / reference_rate})
            print(f"{preset} {rows[-1]['decoder']}: {rows[-1]['seconds']:.2f} s, {rate:.0f} GFLOP/s, "
                  f"{rate / reference_rate:.0%} of the reference", flush=True)
    return rows


def main() -> None:
    if "--child" in sys.argv:
        split = sys.argv.index("--")
        child(Path(sys.argv[sys.argv.index("--child") + 1]), sys.argv[split + 1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a trained cell run (default: plain-small trained into WORK)")
    parser.add_argument("--baseline", default=BASELINE, help="the revision to compare with (default: %(default)s)")
    parser.add_argument("--size", type=int, default=4096, help="side of the image predict runs on, px")
    parser.add_argument("--slide-size", type=int, default=12000, help="side of the synthetic slide, px")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "predict_profile",
                        help="model, inputs, outputs and the baseline's worktree (kept for the next run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each U-Net's forward")
    parser.add_argument("--skip-rates", action="store_true", help="leave out the network's rate")
    add_json_option(parser)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model, root = trained_model(args)
    image = tiled_image(root, args.work / f"tiled-{args.size}.tif", args.size)
    slide = args.work / f"slide-{args.slide_size}.tif"
    if not slide.is_file():
        run_child([sys.executable, "-m", "equiseg.cli", "synth-slide", "--out", str(slide), "--size", str(args.slide_size)])
    jobs = end_to_end(args, model, image, slide, baseline_tree(args.work, args.baseline))
    rates = [] if args.skip_rates else network_rates(args.repeats)
    share = "0.0%"
    result = {"jobs": table([
        column("job", "job"), column("before_s", "before s", ".1f"), column("after_s", "after s", ".1f"),
        column("speedup", "x faster", ".2f"), column("share_network", "network", share),
        column("share_tiling", "tiling", share), column("share_detection", "detection", share),
        column("share_writing", "writing", share), column("share_start-up and rest", "start-up, rest", share),
        column("share_alone", "network alone", share), column("imports_s", "imports s", ".1f"),
        column("share_network_command", "network after imports", share),
        column("read_s", "reading s (overlapped)", ".1f"),
        column("cells_before", "cells before", ",d"), column("cells_after", "cells after", ",d"),
        column("same_cells", "same cells", ",d"), column("agreement", "mF1 against before", ".4f")], jobs)}
    if rates:
        result["rates"] = table([
            column("preset", "preset"), column("family", "family"), column("width", "width"),
            column("decoder", "decoder"), column("seconds", "s per 1024²", ".3f"), column("macs", "GMAC", ".1f"),
            column("executed", "GMAC executed", ".1f"), column("gflops", "GFLOP/s", ".0f"),
            column("reference", "reference GFLOP/s", ".0f"), column("of_reference", "of reference", ".0%")], rates)
    for name, view in result.items():
        print(name)
        print_table(view)
    write_result("predict_profile", "predict and slide end to end against a baseline revision, the share of "
                 "their wall time in each stage, and the U-Nets' rate against a large conv", vars(args), result,
                 args.json, device=args.device)


if __name__ == "__main__":
    main()
