"""Where and how a model runs: one device rule and one precision rule for every command.

``equiseg evaluate``, ``predict``, ``study``, ``demo`` and ``challenge`` all take
``--device auto|cpu|cuda[:N]`` (auto: this process's GPU when PyTorch sees one, else the CPU),
``--batch N`` (tiles per forward pass) and ``--precision 32|bf16|16`` (autocast for inference;
32 by default). Probabilities always come back as float32 on the CPU.

Equivariance certificates are measured in float32 with TF32 off whatever the precision asked
for (`exact_float32`): TF32 (PyTorch's default for cuDNN convolutions) rounds the inputs
of every product to 10 mantissa bits, and that rounding alone leaves ~1e-3 relative error on
models that are exact to ~1e-6 in float32.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


class Precision(enum.Enum):
    """Inference precision: float32, or autocast to bfloat16 or float16 (the CLI's 32, bf16, 16)."""

    FP32 = "32"
    BF16 = "bf16"
    FP16 = "16"

    @property
    def dtype(self) -> torch.dtype:
        return {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}[self]


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device named by ``spec``: ``auto`` (or None), ``cpu``, ``cuda`` or ``cuda:N``.

    ``auto`` picks this process's GPU (``cuda:$LOCAL_RANK`` under DDP, else ``cuda:0``) when
    PyTorch sees one, else the CPU. A GPU that is not there is a ``ValueError`` naming what is.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::([0-9]+))?", spec)
    if match is None:
        raise ValueError(f"device {spec!r}: use auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(match.group(1) or 0)
    if index >= count:
        seen = f"{count} GPU(s): cuda:0..cuda:{count - 1}" if count else "no GPU"
        raise ValueError(f"device {spec!r}: PyTorch sees {seen}")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Runtime:
    """How inference runs: on ``device``, ``batch`` tiles per forward pass, at ``precision``, with
    the model optimized for inference (``optimize``, see
    `equiseg.models.optimize.optimize_for_inference`) or as trained.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch: int = 1
    precision: Precision = Precision.FP32
    optimize: bool = True

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}")

    @classmethod
    def of(cls, device: str | torch.device | None = "auto", batch: int = 1,
           precision: str | Precision = Precision.FP32, optimize: bool = True) -> Runtime:
        """From the CLI's words: ``device`` as `resolve_device`, ``precision`` 32, bf16 or 16."""
        if not isinstance(precision, Precision):
            try:
                precision = Precision(str(precision).strip().lower())
            except ValueError:
                raise ValueError(f"precision {precision!r}: use 32, bf16 or 16") from None
        return cls(resolve_device(device), batch, precision, optimize)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the chosen precision on this device; nothing for float32."""
        if self.precision is Precision.FP32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.dtype)

    def kernels(self) -> contextlib.AbstractContextManager:
        """On a CUDA device, cuDNN's benchmark mode for the block: tiles have one size, so the
        fastest algorithm is searched once and reused (TF32 and determinism settings kept).
        """
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        cudnn = torch.backends.cudnn
        return cudnn.flags(enabled=True, benchmark=True, deterministic=cudnn.deterministic,
                           allow_tf32=cudnn.allow_tf32)

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` moved to this device, in eval mode."""
        return model.to(self.device).eval()

    def __str__(self) -> str:
        return (f"{self.device}, batch {self.batch}, precision {self.precision.value}"
                + ("" if self.optimize else ", not optimized"))


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions inside the block (restored after).

    For measurements that must see float32 rounding only, such as equivariance certificates.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
