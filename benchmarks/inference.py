"""Inference speed of each family at paper size: eager vs optimized vs ONNX Runtime.

    python benchmarks/inference.py [--sizes 512] [--repeats 3] [--modes eager optimized onnxruntime] [--json PATH]
    python benchmarks/inference.py --device cuda --sizes 512 1024 --repeats 10 --modes eager optimized compiled

For each family at the paper's matched widths (plain 64, isotropic 110, p4 32, p4m 23, and the
steerable c8 28, c16 20, d8 20, each closest to plain 64's 15.7 M parameters; depth 4,
fresh weights with warmed batch norm) and each image side, one child process per mode times
the forward pass of one image (eval mode, no gradients), alternating each timing with a
reference: one large ``Conv2d(256, 256, 3)`` on 1 x 256 x 128 x 128, the best case for this
machine's convolution kernels. GFLOP/s counts 2 x the model's multiply-adds (``count_macs``)
per second; "of ref" is that rate as a fraction of the reference's, measured in the same
process a few milliseconds apart, so machine load moves both alike. Peak RSS is the child's
maximum resident memory (``ru_maxrss``). Modes: ``eager`` (the trained U-Net as it is),
``optimized`` (``equiseg.optimize_for_inference``) and ``onnxruntime`` (the optimized model
exported to ONNX, run by onnxruntime's CPU provider with its default threads). "x plain" is the
family's time over plain's at the same side and mode, each first divided by its own reference
timing (so load between the two child processes cancels); blank until plain has run.

With ``--device cuda`` every mode runs in this process (no child processes: CUDA starts once),
timed with synchronisation, after cuDNN's benchmark-mode search; the reference is the same conv
on a batch of 16 (one image would not fill a GPU); "fwd GPU" is the GPU memory one forward
allocates at its peak beyond what was already held (weights, input), after the warm-up, so
cuDNN's trial workspaces are left out; ``compiled`` is the optimized model under ``torch.compile`` (compiled before timing).
TF32 stays as PyTorch leaves it for cuDNN convolutions (on). Writes docs/benchmarks/inference-DATE.json
(see benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _record import add_json_option, column, print_table, table, write_result  # this script's folder

FAMILIES = {"plain": 64, "isotropic": 110, "p4": 32, "p4m": 23, "c8": 28, "c16": 20, "d8": 20}


def child(family: str, width: int, side: int, mode: str, repeats: int, device: str = "cpu") -> dict:
    import resource
    import statistics
    import tempfile

    import torch

    from equiseg import build_model, optimize_for_inference
    from equiseg.models import count_macs

    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    model = build_model(family, width, depth=4).train()
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))
    model.eval()
    macs = count_macs(model, side, side)
    model = model.to(device)
    x = torch.rand(1, 3, side, side, device=device)
    if cuda:
        torch.backends.cudnn.benchmark = True
    if mode == "eager":
        run = model
    else:
        run = optimize_for_inference(model, compile=mode == "compiled")
        if mode == "onnxruntime":
            import onnxruntime

            path = os.path.join(tempfile.mkdtemp(), "m.onnx")
            plain = optimize_for_inference(model, channels_last=False)
            torch.onnx.export(plain, (x,), path, input_names=["image"], output_names=["logits"], dynamo=True,
                              verbose=False)
            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            feed = {"image": x.numpy()}
            def run(_):
                return session.run(None, feed)
    ref_batch = 16 if cuda else 1
    reference = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False, device=device).eval()
    ref_x = torch.rand(ref_batch, 256, 128, 128, device=device)
    ref_macs = ref_batch * 256 * 256 * 9 * 128 * 128

    def timed(fn, arg) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(arg)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        for _ in range(3 if cuda else 1):  # warm up (oneDNN primitive caches, ORT session, cuDNN search, compile)
            run(x), reference(ref_x)
        if cuda:  # the model's own peak, after cuDNN's search (its trial workspaces) and the reference's
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()  # weights, input, the reference's tensors
            run(x)
            peak_gpu = (torch.cuda.max_memory_allocated() - resident) / 2**20
        model_s, ref_s = [], []
        for _ in range(repeats):
            ref_s.append(timed(reference, ref_x))
            model_s.append(timed(run, x))
    model_rate = 2 * macs / statistics.median(model_s) / 1e9
    ref_rate = 2 * ref_macs / statistics.median(ref_s) / 1e9
    return {"family": family, "width": width, "side": side, "mode": mode, "seconds": statistics.median(model_s),
            "ref_seconds": statistics.median(ref_s),
            "gflops": model_rate, "ref_gflops": ref_rate, "of_ref": model_rate / ref_rate,
            "peak_mb": peak_gpu if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["eager", "optimized", "onnxruntime"])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--device", default="cpu", help="cpu (each mode in a child process) or cuda[:N] (in process)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    add_json_option(parser)
    args = parser.parse_args()
    if args.child:
        family, width, side, mode, repeats = args.child
        print(json.dumps(child(family, int(width), int(side), mode, int(repeats))))
        return
    import torch

    cuda = args.device.startswith("cuda")
    where = (torch.cuda.get_device_name(args.device) if cuda
             else f"{os.cpu_count()} cores, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}")
    rows = []
    plain: dict[tuple[int, str], float] = {}  # (side, mode) -> plain's seconds in units of its reference
    for side in args.sizes:
        for family in args.families:
            for mode in args.modes:
                if cuda:
                    try:
                        r = child(family, FAMILIES[family], side, mode, args.repeats, args.device)
                    except Exception as error:  # noqa: BLE001 (one failed family or mode must not stop the table)
                        print(f"{family} {mode}: failed: {error!r}"[:2000])
                        continue
                    finally:
                        torch.cuda.empty_cache()
                else:
                    out = subprocess.run([sys.executable, __file__, "--child", family, str(FAMILIES[family]),
                                          str(side), mode, str(args.repeats)], capture_output=True, text=True,
                                         check=False)
                    if out.returncode:
                        print(f"{family} {mode}: failed\n{out.stderr[-2000:]}")
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                relative = r["seconds"] / r["ref_seconds"]
                if family == "plain":
                    plain[side, mode] = relative
                r["x_plain"] = relative / plain[side, mode] if (side, mode) in plain else None
                rows.append(r)
                print(f"{family} {side} {mode}: {r['seconds']:.4f} s", flush=True)
    result = table([column("family", "family"), column("width", "width"), column("side", "side"),
                    column("mode", "mode"), column("seconds", "s/image", ".4f"), column("gflops", "GFLOP/s", ".1f"),
                    column("ref_gflops", "reference GFLOP/s", ".1f"), column("of_ref", "of reference", ".0%"),
                    column("peak_mb", "forward GPU MB" if cuda else "peak RSS MB", ".0f"),
                    column("x_plain", "x plain", ".1f")], rows)
    print_table(result)
    write_result("inference", "inference of one image by each family at the paper's matched widths (depth 4): "
                 "seconds, GFLOP/s against a reference conv timed alongside, peak memory, ratios to plain",
                 vars(args), {"inference": result}, args.json, args.device)

if __name__ == "__main__":
    main()
