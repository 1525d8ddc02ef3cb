"""Cells as instances: one-stage U-Net, two-stage cell model and StarDist on the crowded and rotated worlds.

    python benchmarks/instances.py [--worlds crowded rotated] [--seeds 0 1 2] [--out DIR]
                                   [--epochs-scale X | --epochs-cells N --epochs-nuclei N]
                                   [--stardist-epochs N] [--stardist-steps N] [--json PATH] [--smoke]

For each world (``crowded``: the synthetic data of plain-small, ``data.synthetic.crowding=1``;
``rotated``: the same with ``data.synthetic.rotated=true``; ``data.synthetic.seed`` fixed, so every
seed sees the same images) and each seed (``train.seed``: weights, crops, order, augmentation), three
methods are trained (or reused from OUT/runs when finished) and scored on the test split:

- **one-stage**: plain-small with ``data.nuclei=true`` (a U-Net with a nucleus output; instances grown
  from its detected centres, one class each), its width matched (`equiseg.models.match_width`, the
  nucleus logit counted) to the two-stage model's parameters, stage 1 and stage 2 together;
- **two-stage**: plain-small as stage 1 (the cells run that proposes cells) and nuclei-small as stage 2
  (p4m windows), scored with ``evaluate_run(stage2, "test", proposals=stage1)``;
- **StarDist** (StarDist2D, 2 classes, from scratch) in its own environment
  (``benchmarks/peer/stardist_run.py`` run by ``benchmarks/peer/.venv-stardist/bin/python``), for
  ``--stardist-epochs`` x ``--stardist-steps`` batches of 4 patches of 256 px; its label images are
  scored by `equiseg.evaluation.instance_evaluation.evaluate_instances`.

The runs that detect (one-stage, stage 1) get their detection settings on the validation split
(`equiseg.evaluation.tune_detect.tune_detection`); StarDist tunes its own thresholds on it.

Per run: mF1 (OCELOT rules; for the one-stage model both its points' ``mf1`` and its instances'
centroids' ``instances/mf1``; for the others the instances' centroids), PQ per class and their mean
(mPQ+), PQ of all nuclei whatever their class, AJI, the blended share (instances whose pixels mix
BC and TC; the one-stage model only: the two-stage model and StarDist give each instance one class by
construction, reported as 0), parameters, training seconds, and two prediction times on the test
split, both measured in this run after one untimed warm-up image: ``predict_run`` (equiseg's
``predict``, files written; StarDist: its own timed prediction) and image -> instance labels in memory
(one-stage: probabilities and `one_stage_instances`; two-stage: `two_stage_predictor`; StarDist:
the same timed prediction), in seconds per megapixel.

Over the seeds: the mean and a 95 % t-interval (Student's t, n - 1 degrees of freedom) per method,
world and score, with every seed's value. Written with ``benchmarks/_record.py`` to
``docs/benchmarks/instances-YYYY-MM-DD.json`` (``--json`` elsewhere), rendered by
``docs/benchmarks/instances.md``.

``--smoke``: 128 px images (4 train, 2 val, 2 test), 64 px crops, 1 epoch, a few StarDist steps: a check
of the whole pipeline in a few minutes. Its result is not a measurement and goes to OUT only
(``OUT/instances-smoke-YYYY-MM-DD.json``, marked as a smoke run), never to docs/benchmarks.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
from _record import RESULTS, add_json_option, column, print_table, table, write_result  # this script's folder
from PIL import Image
from scipy import stats

from equiseg.config import Config
from equiseg.data.datamodule import model_input
from equiseg.data.ocelot import OcelotFolder, Sample, read_instances
from equiseg.datasets import data_root
from equiseg.detection.instances import one_stage_instances
from equiseg.evaluation.evaluate import evaluate_run, two_stage_predictor
from equiseg.evaluation.instance_evaluation import evaluate_instances
from equiseg.evaluation.tune_detect import tune_detection
from equiseg.inference.predict import predict_run
from equiseg.inference.tiling import predict_probabilities
from equiseg.models import count_parameters, match_width
from equiseg.presets import preset_path
from equiseg.runs import Run, load_model
from equiseg.training.fit import resolved_window, train_or_reuse

WORLDS = {"crowded": [], "rotated": ["data.synthetic.rotated=true"]}
DATA_SEED = 0  # data.synthetic.seed: the same images for every train.seed
METHODS = ("one-stage", "two-stage", "StarDist")
PEER = Path(__file__).resolve().parent / "peer"
PEER_PYTHON = PEER / ".venv-stardist" / "bin" / "python"
SMOKE_DATA = ["data.synthetic.train=4", "data.synthetic.val=2", "data.synthetic.test=2", "data.synthetic.size=128"]
SMOKE_CELLS = ["data.crop_size=64", "train.epochs=1"]
SMOKE_NUCLEI = ["train.epochs=1", "train.limit_train_batches=2"]
SMOKE_STARDIST = ["--epochs", "1", "--steps", "2", "--batch", "2", "--patch", "64"]
SCORES = [  # (row key, label, format): the scores of every run, in table order
    ("mf1", "mF1", ".3f"), ("instances_mf1", "mF1 instances", ".3f"), ("pq_BC", "PQ BC", ".3f"),
    ("pq_TC", "PQ TC", ".3f"), ("pq_mean", "PQ mean", ".3f"), ("pq_all", "PQ all", ".3f"), ("aji", "AJI", ".3f"),
    ("blended", "blended", ".3f"), ("train_s", "train s", ".0f"), ("predict_s_mpx", "predict s/Mpx", ".2f"),
    ("instances_s_mpx", "instances s/Mpx", ".2f")]


# ------------------------------------------------------------------------------------------ configs


def preset(name: str, args: argparse.Namespace, world: str, seed: int, extra: list[str]) -> Config:
    """Preset ``name`` in ``world`` with ``train.seed=seed``, the fixed data seed, this run's epochs and ``extra``."""
    cells = name == "plain-small"
    overrides = ["data.synthetic.crowding=1", f"data.synthetic.seed={DATA_SEED}", *WORLDS[world],
                 "train.loggers=[csv]", f"train.seed={seed}"]
    if args.smoke:
        overrides += SMOKE_DATA + (SMOKE_CELLS if cells else SMOKE_NUCLEI)
    else:
        epochs = args.epochs_cells if cells else args.epochs_nuclei
        if epochs is None and args.epochs_scale != 1:
            epochs = max(1, round(Config.from_yaml(preset_path(name)).train.epochs * args.epochs_scale))
        overrides += [f"train.epochs={epochs}"] if epochs else []
    return Config.from_yaml(preset_path(name), overrides=overrides + extra)


def configs(args: argparse.Namespace, world: str, seed: int) -> dict[str, Config]:
    """The three equiseg configs of one world and seed: stage 1, stage 2 (its window resolved, as
    training writes it) and the one-stage model at the two stages' parameters together.
    """
    stage1 = preset("plain-small", args, world, seed, [])
    stage2 = preset("nuclei-small", args, world, seed, [])
    stage2 = resolved_window(stage2, data_root(stage2))
    budget = count_parameters(stage1.build_model()) + count_parameters(stage2.build_model())
    width = match_width(stage1.model.family, budget, depth=stage1.model.depth, in_channels=3,
                        num_classes=stage1.class_channels + 1)  # the nucleus logit counted
    one = preset("plain-small", args, world, seed, ["data.nuclei=true", f"model.width={width}"])
    if stage2.data.synthetic != stage1.data.synthetic:  # the presets must share their data
        raise SystemExit(f"nuclei-small's data ({stage2.data.synthetic}) is not plain-small's ({stage1.data.synthetic})")
    return {"stage1": stage1, "stage2": stage2, "one-stage": one}


# ------------------------------------------------------------------------------------------ training


def trained(config: Config, run_dir: Path) -> tuple[float, bool]:
    """Train ``config`` into ``run_dir`` or reuse it when finished: (training seconds, reused).

    The seconds are kept beside the run (``RUN.train.json``) for a later reuse; a finished run
    without that file (trained by hand) is timed by its files (config written to last checkpoint).
    """
    record = run_dir.with_name(run_dir.name + ".train.json")
    t0 = time.perf_counter()
    reused = train_or_reuse(config, run_dir, progress=False)
    if not reused:
        record.write_text(json.dumps({"train_seconds": time.perf_counter() - t0}) + "\n")
    if record.is_file():
        return json.loads(record.read_text())["train_seconds"], reused
    run = Run(run_dir)
    return run.last.stat().st_mtime - run.config_file.stat().st_mtime, reused


def stardist(args: argparse.Namespace, root: Path, out: Path, seed: int) -> tuple[dict, bool]:
    """Train StarDist on ``root`` and predict its test split into ``out`` (reused when ``out`` holds
    a finished run of the same data and settings): its ``timing.json`` and whether it was reused.
    """
    options = [*stardist_budget(args), "--seed", str(seed), "--threads", str(args.threads)]
    timing = out / "timing.json"
    if timing.is_file():
        done = json.loads(timing.read_text())
        same = done.get("from_scratch") and done.get("data") == str(root) and done.get("options") == options
        if same and _has_cell_classes(out):
            return done, True
    if not PEER_PYTHON.is_file():
        raise SystemExit(f"{PEER_PYTHON}: missing; run `bash benchmarks/peer/setup.sh` first")
    out.mkdir(parents=True, exist_ok=True)
    command = [str(PEER_PYTHON), str(PEER / "stardist_run.py"), str(root), str(out), *options]
    with (out / "log.txt").open("w") as log:
        done_process = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done_process.returncode:
        raise SystemExit(f"StarDist failed ({done_process.returncode}); see {out / 'log.txt'}")
    done = json.loads(timing.read_text())
    timing.write_text(json.dumps({**done, "options": options}, indent=1) + "\n")
    return {**done, "options": options}, False


def stardist_budget(args: argparse.Namespace) -> list[str]:
    """StarDist's training options: ``--stardist-epochs`` x ``--stardist-steps`` (or the smoke run's)."""
    if args.smoke:
        return list(SMOKE_STARDIST)
    return ["--epochs", str(args.stardist_epochs), "--steps", str(args.stardist_steps)]


def _has_cell_classes(out: Path) -> bool:
    """Whether StarDist's class files there name each instance's cell class (newer stardist_run.py)."""
    files = sorted((out / "classes").glob("*.csv"))
    return bool(files) and "cell_class" in files[0].read_text().splitlines()[0]


# ------------------------------------------------------------------------------------------ prediction


def test_images(root: Path) -> tuple[list[Path], float]:
    """The test split's cell images and their megapixels."""
    folder = OcelotFolder(root, "test", labels=False)
    paths = [folder.paths(sid)["cell_image"] for sid in folder.ids]
    mpx = 0.0
    for path in paths:
        with Image.open(path) as im:
            mpx += im.width * im.height / 1e6
    return paths, mpx


def predict_seconds(model: Path, paths: list[Path], out: Path, proposals: Path | None = None) -> float:
    """Seconds of ``predict_run`` over ``paths`` (probability maps not written), after an untimed
    warm-up on the first image.
    """
    predict_run(model, paths[:1], out / "warm-up", probs=False, force=True, proposals=proposals)
    t0 = time.perf_counter()
    predict_run(model, paths, out / "test", probs=False, force=True, proposals=proposals)
    return time.perf_counter() - t0


def instance_seconds(predict, root: Path) -> float:
    """Seconds of ``predict(sample)`` (image -> instance labels, in memory) over the test split, after
    an untimed warm-up on its first image.
    """
    folder = OcelotFolder(root, "test", labels=False)
    samples = [folder[i] for i in range(len(folder))]
    predict(samples[0])
    t0 = time.perf_counter()
    for sample in samples:
        predict(sample)
    return time.perf_counter() - t0


def one_stage_predictor(run: Path):
    """The one-stage model of ``run`` as image -> (instance labels, cells), as its evaluation grows them."""
    model, config = load_model(run)
    model.eval()

    def predict(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        probs = predict_probabilities(model, model_input(sample.cell_image, None))
        return one_stage_instances(probs, config.detect)

    return predict


def stage_predictor(stage1: Path, stage2: Path):
    """The two-stage model as image -> (instance labels, cells)."""
    net1, config1 = load_model(stage1)
    net2, config2 = load_model(stage2)
    net1.eval()
    net2.eval()
    return two_stage_predictor(net1, config1, net2, config2)[0]


def stardist_predictor(out: Path):
    """StarDist's written predictions as image -> (instance labels, cells): its labels renumbered
    1..N in order (a polygon drawn over entirely leaves a gap), each row its polygon's centre, its
    cell class (the more probable of BC and TC) and its probability.
    """

    def predict(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        sid = sample.meta.sample_id
        png = out / "labels" / f"{sid}.png"  # a .tif where an image had more than 65,535 instances
        labels = read_instances(png if png.is_file() else png.with_suffix(".tif"),
                                sample.cell_image.shape[:2]).astype(np.int64)
        with (out / "classes" / f"{sid}.csv").open(newline="") as f:
            classes = {int(r["label"]): int(r["cell_class"]) for r in csv.DictReader(f)}
        with (out / "points" / f"{sid}.csv").open(newline="") as f:
            points = [row for row in csv.reader(f) if row]  # x, y, class, probability; row i: label i + 1
        present = sorted(classes)
        renumber = np.zeros(int(labels.max(initial=0)) + 1, np.int64)
        renumber[present] = np.arange(1, len(present) + 1)
        cells = np.array([[float(points[k - 1][0]), float(points[k - 1][1]), classes[k], float(points[k - 1][3])]
                          for k in present], np.float64).reshape(-1, 4)
        return renumber[labels].astype(np.int32), cells

    return predict


# ------------------------------------------------------------------------------------------ one world and seed


def scored(scores: dict, **extra: object) -> dict:
    """A table row from an evaluation's scores (PQ, AJI, mF1 under their row keys) and ``extra``."""
    keys = {"mf1": "mf1", "instances_mf1": "instances/mf1", "pq_BC": "pq/BC", "pq_TC": "pq/TC",
            "pq_mean": "pq/mean", "pq_all": "pq/all", "aji": "aji", "aji_plus": "aji_plus", "blended": "blended"}
    return {key: scores.get(name) for key, name in keys.items()} | extra


def one_world_seed(args: argparse.Namespace, world: str, seed: int) -> list[dict]:
    """Train (or reuse), tune, score and time the three methods in one world with one seed: their rows."""
    runs = args.out / "runs"
    cfg = configs(args, world, seed)
    root = data_root(cfg["stage1"])
    paths, mpx = test_images(root)
    dirs = {name: runs / f"{world}-{name}-seed{seed}" for name in cfg}
    seconds, reused = {}, {}
    for name, config in cfg.items():
        seconds[name], reused[name] = trained(config, dirs[name])
        print(f"{world} seed {seed} {name}: {'reused' if reused[name] else 'trained'} "
              f"({seconds[name] / 60:.1f} min)", flush=True)
    for name in ("stage1", "one-stage"):
        tune_detection(dirs[name], "val")
    base = {"world": world, "seed": seed}
    where = args.out / "predict" / f"{world}-seed{seed}"

    one, _ = evaluate_run(dirs["one-stage"], "test")
    rows = [scored(one.scores, **base, method="one-stage", parameters=count_parameters(cfg["one-stage"].build_model()),
                   width=cfg["one-stage"].model.width, train_s=seconds["one-stage"], reused=reused["one-stage"],
                   predict_s_mpx=predict_seconds(dirs["one-stage"], paths, where / "one-stage") / mpx,
                   instances_s_mpx=instance_seconds(one_stage_predictor(dirs["one-stage"]), root) / mpx)]

    two, _ = evaluate_run(dirs["stage2"], "test", proposals=dirs["stage1"])
    parameters = sum(count_parameters(cfg[name].build_model()) for name in ("stage1", "stage2"))
    rows.append(scored(two.scores, **base, method="two-stage", instances_mf1=None, blended=0.0, parameters=parameters,
                       width=cfg["stage1"].model.width, train_s=seconds["stage1"] + seconds["stage2"],
                       reused=reused["stage1"] and reused["stage2"],
                       predict_s_mpx=predict_seconds(dirs["stage2"], paths, where / "two-stage", dirs["stage1"]) / mpx,
                       instances_s_mpx=instance_seconds(stage_predictor(dirs["stage1"], dirs["stage2"]), root) / mpx))

    peer_out = args.out / "stardist" / f"{world}-seed{seed}"
    timing, peer_reused = stardist(args, root, peer_out, seed)
    peer = evaluate_instances(stardist_predictor(peer_out), root, "test")
    rows.append(scored(peer.scores, **base, method="StarDist", instances_mf1=None, blended=0.0,
                       parameters=timing["parameters"], width=None, train_s=timing["train_seconds"],
                       reused=peer_reused, predict_s_mpx=timing["seconds_per_megapixel"],
                       instances_s_mpx=timing["seconds_per_megapixel"]))
    return rows


# ------------------------------------------------------------------------------------------ over seeds


def finite(value: object) -> object:
    """None for NaN or an infinite float (the result file holds no NaN), else the value."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def interval(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high) of a 95 % t-interval of ``values``; no interval for fewer than 2."""
    if not values:
        return None, None, None
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def summary(rows: list[dict], worlds: list[str]) -> list[dict]:
    """Per world, score and method: the mean over seeds, its 95 % t-interval and each seed's value."""
    out = []
    for world, (key, label, fmt) in itertools.product(worlds, SCORES):
        for method in METHODS:
            group = sorted((r for r in rows if (r["world"], r["method"]) == (world, method)), key=lambda r: r["seed"])
            values = [r[key] for r in group if r.get(key) is not None]
            if not values:
                continue
            mean, low, high = interval(values)
            out.append({"world": world, "score": label, "method": method, "n": len(values), "mean": mean,
                        "low": low, "high": high, "seeds": ", ".join(format(v, fmt) for v in values)})
    return out


def result_tables(rows: list[dict], worlds: list[str]) -> dict[str, dict]:
    """The result file's tables: ``summary`` (over seeds), ``runs`` (every run) and ``budgets``."""
    fmt = ".3f"
    summary_table = table([column("world", "world"), column("score", "score"), column("method", "method"),
                           column("n", "seeds", "d"), column("mean", "mean", fmt), column("low", "95 % low", fmt),
                           column("high", "95 % high", fmt), column("seeds", "each seed")], summary(rows, worlds))
    runs_table = table([column("world", "world"), column("method", "method"), column("seed", "seed", "d"),
                        *[column(key, label, f) for key, label, f in SCORES], column("aji_plus", "AJI+", ".3f"),
                        column("parameters", "parameters", ",d"), column("reused", "reused")], rows)
    return {"summary": summary_table, "runs": runs_table}


def budgets(args: argparse.Namespace) -> dict:
    """What each method trained for (the first world and seed's configs; the same for all)."""
    cfg = configs(args, args.worlds[0], args.seeds[0])
    rows = []
    for method, names in (("one-stage", ["one-stage"]), ("two-stage", ["stage1", "stage2"])):
        parts = [f"{cfg[n].name} width {cfg[n].model.width}: {cfg[n].train.epochs} epochs"
                 + (f" x {cfg[n].train.limit_train_batches:g} batches" if cfg[n].train.limit_train_batches else "")
                 for n in names]
        rows.append({"method": method, "budget": "; ".join(parts),
                     "parameters": sum(count_parameters(cfg[n].build_model()) for n in names)})
    rows.append({"method": "StarDist", "budget": "stardist_run.py " + " ".join(stardist_budget(args))
                 + " (batches of 4 patches of 256 px unless given; thresholds tuned on val)", "parameters": None})
    return table([column("method", "method"), column("budget", "training budget"),
                  column("parameters", "parameters", ",d")], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/instances"), help="runs, predictions and StarDist here")
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.seed of each repetition")
    parser.add_argument("--epochs-scale", type=float, default=1.0,
                        help="multiply the presets' epochs (plain-small 30, nuclei-small 20)")
    parser.add_argument("--epochs-cells", type=int, default=None, help="epochs of plain-small (one-stage, stage 1)")
    parser.add_argument("--epochs-nuclei", type=int, default=None, help="epochs of nuclei-small (stage 2)")
    parser.add_argument("--stardist-epochs", type=int, default=30, help="StarDist's epochs")
    parser.add_argument("--stardist-steps", type=int, default=40, help="StarDist's batches per epoch")
    parser.add_argument("--threads", type=int, default=2, help="StarDist's TensorFlow and OpenMP threads")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny data and budgets to check the pipeline; the result goes to OUT only")
    add_json_option(parser)
    args = parser.parse_args()
    if args.smoke and args.json is not None and args.json.resolve().is_relative_to(RESULTS.resolve()):
        parser.error("a smoke run is not a measurement: its result does not go to docs/benchmarks")
    started = time.time()
    rows = []
    for world, seed in itertools.product(args.worlds, args.seeds):
        rows += one_world_seed(args, world, seed)
    rows = [{k: finite(v) for k, v in row.items()} for row in rows]
    tables = {**result_tables(rows, args.worlds), "budgets": budgets(args)}
    for name, result in tables.items():
        print(f"\n{name}:")
        print_table(result)
    minutes = (time.time() - started) / 60
    what = ("one-stage U-Net with a nucleus output, two-stage cell model and StarDist as instances on the "
            f"crowded and rotated synthetic worlds ({minutes:.0f} min)")
    out = args.json
    if args.smoke:
        what = "SMOKE RUN, a pipeline check on tiny data and budgets, NOT a measurement: " + what
        out = out or args.out / f"instances-smoke-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    write_result("instances", what, {**vars(args), "data_seed": DATA_SEED, "minutes": round(minutes, 1)}, tables,
                 out=out)


if __name__ == "__main__":
    main()
