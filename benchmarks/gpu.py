"""GPU checks: exact equivariance with cuDNN (TF32 off and on), and paper-size inference cost.

    python benchmarks/gpu.py            # needs CUDA

1. Each family at the paper's matched widths (plain 64, isotropic 110, p4 32, p4m 23, c8 28, c16 20, d8 20), eval
   mode, one random 512x512 input: max over the family's exact group (C4 for p4, c8, c16; D4 otherwise) of
   max|f(T x) - T f(x)| / max|f(x)|, with TF32 convolutions off (true float32) and on
   (PyTorch's default for cuDNN convolutions on Ampere and later).
2. Inference of one 1024x1024 image, eval mode without gradients, PyTorch's default settings
   (TF32 on) and bf16 autocast: milliseconds (median of 10 after 3 warm-ups, synchronised) and
   peak allocated GPU memory (cuDNN workspaces included).
"""

from __future__ import annotations

import statistics
import time

import torch

from equiseg.evaluation.equivariance import equivariance_errors
from equiseg.groups import D4
from equiseg.models import ConvFamily, build_model

WIDTHS = {"plain": 64, "isotropic": 110, "p4": 32, "p4m": 23, "c8": 28, "c16": 20, "d8": 20}


def main() -> None:
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()} torch={torch.__version__}")
    x = torch.randn(1, 3, 512, 512, device=device)
    print(f"{'family':<10} {'width':>5} {'err fp32':>9} {'err tf32':>9} {'tf32 ms':>8} {'bf16 ms':>8} "
          f"{'tf32 GiB':>9} {'bf16 GiB':>9}")
    for family, width in WIDTHS.items():
        torch.manual_seed(0)
        model = build_model(family, width).to(device).eval()
        group = ConvFamily(family).group or D4
        errors = {}
        for tf32 in (False, True):
            torch.backends.cudnn.allow_tf32 = tf32
            errors[tf32] = max(equivariance_errors(model, x, group.elements).values())
        image = torch.rand(1, 3, 1024, 1024, device=device)
        timing, memory = {}, {}
        for mode in ("tf32", "bf16"):
            torch.cuda.reset_peak_memory_stats()
            times = []
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=mode == "bf16"):
                for k in range(13):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    model(image)
                    torch.cuda.synchronize()
                    if k >= 3:
                        times.append(time.perf_counter() - start)
            timing[mode] = statistics.median(times) * 1e3
            memory[mode] = torch.cuda.max_memory_allocated() / 2**30
        print(f"{family:<10} {width:>5} {errors[False]:>9.1e} {errors[True]:>9.1e} {timing['tf32']:>8.1f} "
              f"{timing['bf16']:>8.1f} {memory['tf32']:>9.2f} {memory['bf16']:>9.2f}")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
