"""The device rule on a GPU: every model command's inference path on CUDA, its scores against the
CPU's, and the speed of tile batching and lower precision. One prepared script for a lent GPU.

    python benchmarks/device_check.py                  # needs CUDA; about 2-3 minutes on an H100
    python benchmarks/device_check.py --device cpu     # the same steps on the CPU (a dry run, slow)
    python benchmarks/device_check.py --parts train    # some of the steps (norm, placement, train, speed)

0. Group batch norm on CUDA kernels: ``GroupBatchNorm2d``'s training path (PyTorch's
   batch-norm kernels over fields), and the same layer under ``torch.compile`` (its formula
   backend in the compiled graph), against its definition (``BatchNorm2d`` over the view):
   output, gradients of input, weight and bias, running statistics; float32 checked ≤ 1e-4,
   bf16 reported.
1. Placement: a synthetic test split (4 pairs of 1024 px) is scored through ``evaluate_model``
   with ``Runtime(device)`` for a plain and a p4m model (random weights, saved and loaded as
   checkpoints): every parameter on the device, and Dice/mF1 on the device in float32 (TF32
   off) against the CPU's (equal up to float rounding of borderline pixels), in bf16 against
   float32 (differences reported, not asserted).
2. Certificate on the device: max D4 error of the p4m model < 1e-5 (float32, TF32 off).
3. Training on the GPU (``fit``, Lightning, 3 epochs of a p4m width 4 on 4 pairs of 512 px,
   precision 32 and bf16-mixed): the run trains; a run stopped by an exception in epoch 1 and
   resumed ends at the uninterrupted run's weights to float tolerance (max |difference| printed;
   cuDNN's algorithm choice is not bitwise repeatable). Then the float32 run again with
   ``train.compile=reduce-overhead`` (CUDA graphs): its time, and its weights against eager's.
4. Speed: ``predict_probabilities`` of a 4096x4096 image in 1024 px tiles (overlap 128, 25
   tiles), plain width 64 and isotropic width 110 (the paper's sizes), batch 1 / 4 / 8 at
   precision 32 and bf16: seconds (median of 2 after a warm-up) and the ratio to batch 1 float32
   of the same model, all in one run; the model's forward alone on a batch of random 1024 px
   tiles on the device, per tile (so the pipeline's share shows); and the largest difference of
   each one's probabilities from batch 1's in float32 (TF32 on: a few 1e-3 expected).
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


PARTS = ("norm", "placement", "train", "speed")


def main() -> None:
    from equiseg.runtime import resolve_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="which steps: norm (0), placement (1, 2), train (3), speed (4); default all")
    parser.add_argument("--size", type=int, default=4096, help="side of the speed test's image, px")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}")
    torch.backends.cudnn.benchmark = True  # fixed tile sizes

    if device.type == "cuda" and "norm" in args.parts:
        check_group_norm(device)
    with tempfile.TemporaryDirectory() as tmp:
        if "placement" in args.parts:
            check_placement(device, Path(tmp))
        if "train" in args.parts:
            check_training(device, Path(tmp))
        if "speed" in args.parts:
            check_speed(device, args.size)


def check_placement(device: torch.device, tmp: Path) -> None:
    from equiseg.config import Config
    from equiseg.data.synthetic import generate_dataset
    from equiseg.evaluation.equivariance import certificate
    from equiseg.evaluation.evaluate import evaluate_model
    from equiseg.runs import load_model, save_model
    from equiseg.runtime import Precision, Runtime, exact_float32

    root = generate_dataset(tmp / "data", {"train": 0, "val": 0, "test": 4}, size=1024, seed=0)
    print("\n1. placement and scores (4 test pairs of 1024 px; random weights)")
    for family, width in (("plain", 16), ("p4m", 4)):
        torch.manual_seed(0)
        config = Config.from_dict({"name": family, "model": {"family": family, "width": width},
                                   "data": {"root": str(root)}})
        path = save_model(config.build_model(), config, tmp / f"{family}.ckpt")
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



def check_speed(device: torch.device, size: int) -> None:
    from equiseg.config import Config
    from equiseg.inference.tiling import predict_probabilities
    from equiseg.runtime import Precision, Runtime

    print(f"\n4. predict_probabilities of a {size}x{size} image, 1024 px tiles, overlap 128; and the model's "
          "forward alone on a batch of 1024 px tiles (per tile)")
    image = torch.rand(3, size, size)
    for family, width in (("plain", 64), ("isotropic", 110)):
        torch.manual_seed(0)
        model = Config.from_dict({"model": {"family": family, "width": width}}).build_model().to(device).eval()
        base = first = None
        for precision in (Precision.FP32, Precision.BF16):
            for batch in (1, 4, 8):
                runtime = Runtime(device, batch, precision)
                times, forward = [], []
                tiles = torch.rand(batch, 3, 1024, 1024, device=device)
                for k in range(3):
                    sync(device)
                    start = time.perf_counter()
                    probs = predict_probabilities(model, image, tile=1024, overlap=128, runtime=runtime)
                    sync(device)
                    middle = time.perf_counter()
                    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16,
                                                         enabled=precision is Precision.BF16):
                        model(tiles)
                    sync(device)
                    if k:
                        times.append(middle - start)
                        forward.append((time.perf_counter() - middle) / batch)
                seconds = statistics.median(times)
                base = base or seconds
                first = probs if first is None else first
                print(f"   {family:<9} {width:>3}  precision {precision.value:<4} batch {batch}: "
                      f"{seconds:7.2f} s = {seconds / base:.3f}x; forward {statistics.median(forward) * 1e3:6.1f} ms/tile; "
                      f"max |p - p(batch 1, 32)| {(probs - first).abs().max().item():.1e}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def check_group_norm(device: torch.device) -> None:
    from equiseg.groups import D4
    from equiseg.nn import GroupBatchNorm2d

    print("\n0. group batch norm: CUDA kernels against the definition (BatchNorm2d over the view)")
    torch.backends.cudnn.allow_tf32 = False
    for shape, dtype in (((4, 8 * 8, 256, 256), torch.float32), ((2, 3 * 8, 37, 41), torch.float32),
                         ((4, 8 * 8, 256, 256), torch.bfloat16)):
        norms = {path: GroupBatchNorm2d(shape[1] // 8, D4).to(device).train() for path in ("view", "fields", "compiled")}
        norms["compiled"].compile()  # traced: the formula backend inside the graph, not the CUDA kernels
        with torch.no_grad():
            norms["view"].norm.weight.uniform_(0.5, 2.0)
            norms["view"].norm.bias.uniform_(-1.0, 1.0)
        norms["fields"].load_state_dict(norms["view"].state_dict())
        norms["compiled"].load_state_dict(norms["view"].state_dict())
        x = torch.randn(shape, device=device) * 3 + 1
        grad = torch.randn(shape, device=device)
        results = {}
        for path, norm in norms.items():
            GroupBatchNorm2d.TRAINING_PATH = "view" if path == "view" else "fields"
            xi = x.clone().to(dtype).requires_grad_()
            out = norm(xi)
            out.float().backward(grad)
            results[path] = (out.float(), xi.grad.float(), norm.norm.weight.grad, norm.norm.bias.grad,
                             norm.norm.running_mean, norm.norm.running_var)
        GroupBatchNorm2d.TRAINING_PATH = "fields"
        names = ("out", "dx", "dw", "db", "running mean", "running var")
        for path in ("fields", "compiled"):
            errors = [((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                      for a, b in zip(results[path], results["view"], strict=True)]
            ok = dtype != torch.float32 or max(errors) < 1e-4
            print(f"   {path:<8} {tuple(shape)} {dtype!s:<14} " + ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errors))
                  + ("" if dtype != torch.float32 else (" ok" if ok else " FAILED")))
    torch.backends.cudnn.allow_tf32 = True


def check_training(device: torch.device, tmp: Path) -> None:
    import lightning as L

    from equiseg.config import Config
    from equiseg.data.synthetic import generate_dataset
    from equiseg.training.fit import fit

    class Crash(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                raise RuntimeError("simulated crash")

    print("\n3. training on the device: 3 epochs, p4m width 4, 4 pairs of 512 px; stopped in epoch 1 and resumed")
    root = generate_dataset(tmp / "train-data", {"train": 4, "val": 2, "test": 0}, size=512, seed=0)
    for precision in ("32", "bf16-mixed"):
        config = Config.from_dict({
            "name": "gpu", "model": {"family": "p4m", "width": 4, "depth": 3},
            "data": {"root": str(root), "crop_size": 256, "batch_size": 4, "augment": "heavy"},
            "train": {"epochs": 3, "lr": 1e-3, "loggers": ["csv"], "accelerator": device.type,
                      "precision": precision}})
        start = time.perf_counter()
        whole = fit(config, run_dir=tmp / f"whole-{precision}", progress=False)
        seconds = time.perf_counter() - start
        try:
            fit(config, run_dir=tmp / f"cut-{precision}", progress=False, callbacks=[Crash()])
        except RuntimeError:
            pass
        fit(None, resume=tmp / f"cut-{precision}", progress=False)
        a = torch.load(whole / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
        b = torch.load(tmp / f"cut-{precision}/checkpoints/last.ckpt", weights_only=True)["state_dict"]
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
        scale = max(a[k].float().abs().max().item() for k in a if a[k].is_floating_point())
        print(f"   precision {precision:<10} 3 epochs in {seconds:5.1f} s; resumed against whole: "
              f"max |diff| {diff:.1e} (largest weight {scale:.2f})")
        if precision == "32":
            eager_weights = a
    compiled = Config.from_dict({**config.to_dict(), "train": {**config.to_dict()["train"], "precision": "32",
                                                               "compile": "reduce-overhead"}})
    start = time.perf_counter()
    run = fit(compiled, run_dir=tmp / "compiled", progress=False)
    seconds = time.perf_counter() - start
    c = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert list(c) == list(eager_weights), "compiled checkpoint keys differ"
    diff = max((c[k].float() - eager_weights[k].float()).abs().max().item() for k in c if c[k].is_floating_point())
    print(f"   compile reduce-overhead, precision 32: 3 epochs in {seconds:5.1f} s (compiling included); "
          f"against eager: max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
