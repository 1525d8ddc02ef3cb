"""The device rule on a GPU: every model command's inference path on CUDA, its scores against the
CPU's, and the speed of tile batching and lower precision. One prepared script for a lent GPU.

    python benchmarks/device_check.py                  # needs CUDA; about 2-3 minutes on an H100
    python benchmarks/device_check.py --device cpu     # the same steps on the CPU (a dry run, slow)

1. Placement: a synthetic test split (4 pairs of 1024 px) is scored through ``evaluate_model``
   with ``Runtime(device)`` for a plain and a p4m model (random weights, saved and loaded as
   checkpoints): every parameter on the device, and Dice/mF1 on the device in float32 (TF32
   off) against the CPU's (equal up to float rounding of borderline pixels), in bf16 against
   float32 (differences reported, not asserted).
2. Certificate on the device: max D4 error of the p4m model < 1e-5 (float32, TF32 off).
3. Speed: ``predict_probabilities`` of a 4096x4096 image in 1024 px tiles (overlap 128, 25
   tiles), plain width 64 and isotropic width 110 (the paper's sizes), batch 1 / 4 / 8 at
   precision 32 and bf16: seconds (median of 3 after a warm-up) and the ratio to batch 1 float32
   of the same model, all in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    from equiseg.config import Config
    from equiseg.data.synthetic import generate_dataset
    from equiseg.evaluation.equivariance import certificate
    from equiseg.evaluation.evaluate import evaluate_model
    from equiseg.evaluation.inference import predict_probabilities
    from equiseg.runs import load_model, save_model
    from equiseg.runtime import Precision, Runtime, exact_float32, resolve_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=4096, help="side of the speed test's image, px (0: skip it)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}")
    torch.backends.cudnn.benchmark = True  # fixed tile sizes

    with tempfile.TemporaryDirectory() as tmp:
        root = generate_dataset(Path(tmp) / "data", {"train": 0, "val": 0, "test": 4}, size=1024, seed=0)
        print("\n1. placement and scores (4 test pairs of 1024 px; random weights)")
        for family, width in (("plain", 16), ("p4m", 4)):
            torch.manual_seed(0)
            config = Config.from_dict({"name": family, "model": {"family": family, "width": width},
                                       "data": {"root": str(root)}})
            path = save_model(config.build_model(), config, Path(tmp) / f"{family}.ckpt")
            scores = {}
            for label, runtime in (("cpu 32", Runtime()), (f"{device.type} 32", Runtime(device)),
                                   (f"{device.type} bf16", Runtime(device, 2, Precision.BF16))):
                model, _ = load_model(path, runtime.device)
                assert all(p.device.type == runtime.device.type for p in model.parameters())
                with exact_float32() if runtime.precision is Precision.FP32 else contextlib.nullcontext():
                    scores[label] = evaluate_model(model, config, root, "test", runtime=runtime).scores
            for label, s in scores.items():
                print(f"   {family:<6} {label:<10} Dice {s['dice/mean']:.6f}  mF1 {s['mf1']:.4f}  loss {s['loss']:.6f}")
            if device.type == "cuda":
                model, _ = load_model(path, device)
                images = [torch.rand(3, 256, 256) for _ in range(2)]
                if family == "p4m":
                    error = certificate(model, images, angles=())["group"]
                    print(f"2. certificate of p4m on {device}: {error:.1e} ({'ok' if error < 1e-5 else 'FAILED'})")

        if not args.size:
            return
        print(f"\n3. predict_probabilities of a {args.size}x{args.size} image, 1024 px tiles, overlap 128")
        image = torch.rand(3, args.size, args.size)
        for family, width in (("plain", 64), ("isotropic", 110)):
            torch.manual_seed(0)
            model = Config.from_dict({"model": {"family": family, "width": width}}).build_model().to(device).eval()
            base = None
            for precision in (Precision.FP32, Precision.BF16):
                for batch in (1, 4, 8):
                    runtime = Runtime(device, batch, precision)
                    times = []
                    for k in range(4):
                        sync(device)
                        start = time.perf_counter()
                        predict_probabilities(model, image, tile=1024, overlap=128, runtime=runtime)
                        sync(device)
                        if k:
                            times.append(time.perf_counter() - start)
                    seconds = statistics.median(times)
                    base = base or seconds
                    print(f"   {family:<9} {width:>3}  precision {precision.value:<4} batch {batch}: "
                          f"{seconds:7.2f} s = {seconds / base:.3f}x")
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
