"""Peer baseline (#28): train StarDist2D from scratch on an equiseg synthetic dataset, predict its test split.

Run with the peer virtual environment's Python (``benchmarks/peer/setup.sh`` makes it), never equiseg's:

    benchmarks/peer/.venv-stardist/bin/python benchmarks/peer/stardist_run.py DATA OUT [options]

DATA is a folder written by ``equiseg synth`` (OCELOT layout): per split ``images/SPLIT/cell/ID.jpg``,
``annotations/SPLIT/cell/ID.csv`` (rows x,y,class; class 1 BC, 2 TC) and
``annotations/SPLIT/cell_instances/ID.png`` (nucleus instance labels, label k = the CSV's k-th row).
Only numpy, PIL and tifffile read it: equiseg is not installed in the peer environment.

OUT receives:

- ``labels/ID.png``: the predicted nucleus instances of each test image, 16-bit (``ID.tif``, 32-bit,
  only if an image had more than 65,535 instances), 0 background;
- ``classes/ID.csv`` (multi-class models only): header ``label,class,cell_class``, one row per label
  present in the label image, class 1 BC, 2 TC (0: the class head said background), cell_class the
  more probable of BC and TC (never 0);
- ``points/ID.csv``: one row ``x,y,class,probability`` per predicted instance (no header, the point is
  the polygon's centre pixel, class 0 for a model without classes), the layout of equiseg's point
  predictions;
- ``model/``: StarDist's own folder (config.json, thresholds.json, weights_best.h5, weights_last.h5);
- ``timing.json``: seconds spent training, tuning thresholds and predicting, megapixels predicted,
  seconds per megapixel, the settings, versions, threads and the command line.

Scoring is not done here: equiseg's own instance metrics read ``labels/`` against the dataset.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

# the benchmarks' own record helpers: standard library only at import, so this venv (without equiseg) reads them
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _record import cpu_model  # noqa: E402

SPLITS = ("train", "val", "test")
CLASS_NAMES = {1: "BC", 2: "TC"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", type=Path, help="folder written by `equiseg synth` (train, val and test splits)")
    p.add_argument("out", type=Path, help="output folder (created; an existing model/ is replaced unless --load)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs")
    p.add_argument("--steps", type=int, default=40, help="steps (batches) per epoch")
    p.add_argument("--batch", type=int, default=4, help="patches per batch")
    p.add_argument("--patch", type=int, default=256, help="side of the square training patches, px")
    p.add_argument("--n-rays", type=int, default=32, help="rays of the star-convex polygons")
    p.add_argument("--grid", type=int, default=2, help="subsampling of the prediction grid (both axes)")
    p.add_argument("--depth", type=int, default=3, help="U-Net depth")
    p.add_argument("--filters", type=int, default=32, help="U-Net filters at the first level")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    p.add_argument("--classes", action=argparse.BooleanOptionalAction, default=True,
                   help="train the multi-class variant (n_classes=2: BC, TC from the CSV rows)")
    p.add_argument("--optimize-thresholds", action=argparse.BooleanOptionalAction, default=True,
                   help="tune the probability and NMS thresholds on the val split after training")
    p.add_argument("--normalize", choices=("percentile", "fixed"), default="percentile",
                   help="percentile: each image scaled by its 1st and 99.8th percentile over all channels "
                        "(StarDist's usual H&E recipe); fixed: divide by 255")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random quarter turns, flips and per-channel intensity jitter on training patches")
    p.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op and OpenMP threads")
    p.add_argument("--seed", type=int, default=0, help="seed of numpy and TensorFlow")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images per split (quick runs)")
    p.add_argument("--load", action="store_true",
                   help="skip training: load OUT/model (weights_best.h5, thresholds.json) and only predict")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the dataset, read without equiseg


def split_ids(data: Path, split: str) -> list[str]:
    """Sample ids of a split: the stems of its cell images, sorted."""
    folder = data / "images" / split / "cell"
    if not folder.is_dir():
        raise SystemExit(f"{folder}: missing (is {data} a folder written by `equiseg synth`?)")
    return sorted(p.stem for p in folder.glob("*.jpg"))


def read_image(data: Path, split: str, sample: str) -> np.ndarray:
    """The cell patch as (H, W, 3) uint8 RGB."""
    with Image.open(data / "images" / split / "cell" / f"{sample}.jpg") as im:
        return np.asarray(im.convert("RGB"))


def read_instances(data: Path, split: str, sample: str) -> np.ndarray:
    """The nucleus instance labels as (H, W) int32 (PNG or TIFF, 8/16/32-bit)."""
    folder = data / "annotations" / split / "cell_instances"
    for ext in (".png", ".tif", ".tiff"):
        path = folder / f"{sample}{ext}"
        if path.exists():
            if ext == ".png":
                with Image.open(path) as im:
                    return np.asarray(im).astype(np.int32)
            import tifffile

            return np.asarray(tifffile.imread(path)).astype(np.int32)
    raise SystemExit(f"{folder}/{sample}.png: missing (this dataset has no instance labels; "
                     "write it with an equiseg whose `synth` writes annotations/SPLIT/cell_instances)")


def read_classes(data: Path, split: str, sample: str) -> dict[int, int]:
    """Label k (1-based) -> class of the k-th CSV row (x, y, class)."""
    with open(data / "annotations" / split / "cell" / f"{sample}.csv", newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    return {k: int(row[2]) for k, row in enumerate(rows, start=1)}


def normalize(image: np.ndarray, how: str) -> np.ndarray:
    x = image.astype(np.float32)
    if how == "fixed":
        return x / 255
    lo, hi = np.percentile(x, (1.0, 99.8))
    return (x - lo) / max(float(hi - lo), 1e-6)


def load_split(data: Path, split: str, args: argparse.Namespace, labels: bool = True
               ) -> tuple[list[str], list[np.ndarray], list[np.ndarray], list[dict[int, int]]]:
    ids = split_ids(data, split)[: args.limit]
    if not ids:
        raise SystemExit(f"{data}/images/{split}/cell: no images")
    xs = [normalize(read_image(data, split, s), args.normalize) for s in ids]
    if not labels:
        return ids, xs, [], []
    ys = [read_instances(data, split, s) for s in ids]
    cls = [read_classes(data, split, s) for s in ids]
    for s, y, c in zip(ids, ys, cls):
        present = set(np.unique(y).tolist()) - {0}
        extra = sorted(present - set(c))
        if extra:
            raise SystemExit(f"{split}/{s}: labels {extra[:5]} have no CSV row")
    # StarDist wants, per image, a class for each label present (label -> 1..n_classes)
    cls = [{k: v for k, v in c.items() if k in set(np.unique(y).tolist())} for c, y in zip(cls, ys)]
    return ids, xs, ys, cls


# ---------------------------------------------------------------- training


def augmenter(rng: np.random.Generator):
    """Quarter turns and flips of patch and labels (the square patch keeps its shape), then per-channel
    gain and offset of the normalized intensities.
    """

    def augment(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=(0, 1)), np.rot90(y, k, axes=(0, 1))
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        gain = rng.uniform(0.85, 1.15, size=(1, 1, x.shape[-1])).astype(np.float32)
        offset = rng.uniform(-0.08, 0.08, size=(1, 1, x.shape[-1])).astype(np.float32)
        return np.ascontiguousarray(x * gain + offset), np.ascontiguousarray(y)

    return augment


def git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_labels(out: Path, sample: str, labels: np.ndarray) -> Path:
    if labels.max(initial=0) <= np.iinfo(np.uint16).max:
        path = out / "labels" / f"{sample}.png"
        Image.fromarray(labels.astype(np.uint16)).save(path)
    else:
        import tifffile

        path = out / "labels" / f"{sample}.tif"
        tifffile.imwrite(path, labels.astype(np.uint32), compression="zlib")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # threads must be fixed before TensorFlow (and StarDist's OpenMP NMS) start
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(min(2, args.threads))
    import csbdeep
    import keras
    import stardist
    from stardist.models import Config2D, StarDist2D

    np.random.seed(args.seed)
    tf.random.set_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    n_classes = 2 if args.classes else None

    t0 = time.perf_counter()
    test_ids, test_x, _, _ = load_split(args.data, "test", args, labels=False)
    counts: dict[str, int] = {"test": len(test_ids)}
    train_seconds = thresholds_seconds = 0.0
    history: dict[str, list[float]] = {}
    if args.load:
        model = StarDist2D(None, name="model", basedir=str(out))
        n_classes = model.config.n_classes
        load_seconds = time.perf_counter() - t0
    else:
        train_ids, train_x, train_y, train_c = load_split(args.data, "train", args)
        val_ids, val_x, val_y, val_c = load_split(args.data, "val", args)
        counts.update(train=len(train_ids), val=len(val_ids),
                      train_instances=int(sum(len(c) for c in train_c)), val_instances=int(sum(len(c) for c in val_c)))
        load_seconds = time.perf_counter() - t0
        side = min(min(x.shape[:2]) for x in train_x + val_x)
        if args.patch > side:
            raise SystemExit(f"--patch {args.patch} is larger than the smallest image side ({side} px)")
        config = Config2D(
            n_rays=args.n_rays, grid=(args.grid, args.grid), n_channel_in=3, n_classes=n_classes,
            unet_n_depth=args.depth, unet_n_filter_base=args.filters,
            train_patch_size=(args.patch, args.patch), train_batch_size=args.batch,
            train_epochs=args.epochs, train_steps_per_epoch=args.steps, train_learning_rate=args.lr,
            train_tensorboard=False, use_gpu=False,
        )
        if (out / "model").exists():
            import shutil

            shutil.rmtree(out / "model")
        model = StarDist2D(config, name="model", basedir=str(out))  # random initial weights: from scratch
        extra = {"classes": train_c} if n_classes else {}
        validation = (val_x, val_y, val_c) if n_classes else (val_x, val_y)
        t = time.perf_counter()
        hist = model.train(train_x, train_y, validation_data=validation,
                           augmenter=augmenter(rng) if args.augment else None, seed=args.seed, **extra)
        train_seconds = time.perf_counter() - t
        history = {k: [float(v) for v in vs] for k, vs in hist.history.items()}
        if args.optimize_thresholds:
            t = time.perf_counter()
            model.optimize_thresholds(val_x, val_y)
            thresholds_seconds = time.perf_counter() - t

    for sub in ("labels", "points") + (("classes",) if n_classes else ()):
        (out / sub).mkdir(exist_ok=True)

    # one untimed prediction first: TensorFlow traces the graph on the first call of an input shape
    t = time.perf_counter()
    model.predict_instances(test_x[0], axes="YXC", show_tile_progress=False, verbose=False)
    warmup_seconds = time.perf_counter() - t

    per_image = []
    predict_seconds = 0.0
    megapixels = 0.0
    written = []
    for sample, x in zip(test_ids, test_x):
        t = time.perf_counter()
        labels, details = model.predict_instances(x, axes="YXC", show_tile_progress=False, verbose=False)
        seconds = time.perf_counter() - t
        predict_seconds += seconds
        mpx = x.shape[0] * x.shape[1] / 1e6
        megapixels += mpx
        labels = np.asarray(labels)
        written.append(str(write_labels(out, sample, labels).relative_to(out)))
        points = np.asarray(details["points"])  # (n, 2) y, x; label i + 1 is entry i
        prob = np.asarray(details["prob"])
        class_id = np.asarray(details["class_id"]) if n_classes else np.zeros(len(points), int)
        # the most probable cell class (BC or TC) of each detection, also where the class head said background:
        # every detected nucleus is a cell of some class, as it is for equiseg's instances
        cell_class = (1 + np.asarray(details["class_prob"])[:, 1:].argmax(axis=1) if n_classes
                      else np.zeros(len(points), int))
        with open(out / "points" / f"{sample}.csv", "w", newline="") as f:
            w = csv.writer(f)
            for (py, px), c, pr in zip(points, class_id, prob):
                w.writerow([int(px), int(py), int(c), f"{float(pr):.4f}"])
        present = np.unique(labels)
        present = present[present > 0]
        if n_classes:
            with open(out / "classes" / f"{sample}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["label", "class", "cell_class"])
                for label in present:
                    w.writerow([int(label), int(class_id[label - 1]), int(cell_class[label - 1])])
        per_image.append({"id": sample, "shape": list(x.shape[:2]), "seconds": round(seconds, 4),
                          "instances": int(len(present)), "detections": int(len(points))})
        print(f"predicted {sample}: {len(present)} instances in {seconds:.2f} s", flush=True)

    timing = {
        "tool": "StarDist2D",
        "from_scratch": not args.load,
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": str(args.data),
        "counts": counts,
        "load_seconds": round(load_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "thresholds_seconds": round(thresholds_seconds, 3),
        "warmup_predict_seconds": round(warmup_seconds, 3),
        "predict_seconds": round(predict_seconds, 3),
        "megapixels": round(megapixels, 6),
        "seconds_per_megapixel": round(predict_seconds / megapixels, 4) if megapixels else None,
        "per_image": per_image,
        "thresholds": {"prob": float(model.thresholds.prob), "nms": float(model.thresholds.nms)},
        "settings": {"epochs": args.epochs, "steps_per_epoch": args.steps, "batch": args.batch,
                     "patch": args.patch, "n_rays": args.n_rays, "grid": args.grid, "depth": args.depth,
                     "filters": args.filters, "lr": args.lr, "n_classes": n_classes,
                     "normalize": args.normalize, "augment": args.augment,
                     "optimize_thresholds": args.optimize_thresholds and not args.load, "seed": args.seed,
                     "limit": args.limit, "load": args.load},
        "parameters": int(model.keras_model.count_params()),
        "history": history,
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                     "keras": keras.__version__, "stardist": stardist.__version__,
                     "csbdeep": csbdeep.__version__, "numpy": np.__version__},
        "threads": {"requested": args.threads,
                    "tf_intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                    "tf_inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
                    "omp": os.environ["OMP_NUM_THREADS"], "cpus_usable": len(os.sched_getaffinity(0)),
                    "cpu_count": os.cpu_count()},
        "machine": {"cpu": cpu_model(), "platform": platform.platform(),
                    "loadavg_at_end": [round(v, 2) for v in os.getloadavg()]},
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "command": shlex.join([sys.executable, *sys.argv]),
        "written": written,
    }
    (out / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    print(f"train {train_seconds:.1f} s, thresholds {thresholds_seconds:.1f} s, predict {predict_seconds:.2f} s "
          f"for {megapixels:.3f} Mpx ({timing['seconds_per_megapixel']} s/Mpx); wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
