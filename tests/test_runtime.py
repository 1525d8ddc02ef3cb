"""The device rule shared by every command, batching and precision of inference."""

import pytest
import torch
from typer.testing import CliRunner

from equiseg import build_model
from equiseg.cli import app
from equiseg.evaluation.equivariance import certificate
from equiseg.inference.tiling import predict_probabilities
from equiseg.runtime import Precision, Runtime, exact_float32, resolve_device

runner = CliRunner()


def test_auto_picks_the_gpu_only_when_there_is_one():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected == resolve_device(None).type
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_a_missing_gpu_is_one_clear_error(spec):
    with pytest.raises(ValueError, match=f"device '{spec}': PyTorch sees no GPU"):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu", "cuda:-1"])
def test_unknown_device_words_are_refused(spec):
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


def test_runtime_from_the_cli_words():
    runtime = Runtime.of("cpu", 3, "bf16")
    assert (runtime.device, runtime.batch, runtime.precision) == (torch.device("cpu"), 3, Precision.BF16)
    assert Runtime.of("cpu", 1, "16").precision.dtype is torch.float16
    with pytest.raises(ValueError, match="use 32, bf16 or 16"):
        Runtime.of("cpu", 1, "64")
    with pytest.raises(ValueError, match="at least 1"):
        Runtime.of("cpu", 0)


@pytest.mark.parametrize("size", [(40, 40), (37, 53)])
def test_batched_tiles_give_the_unbatched_probabilities(size):
    model = build_model("plain", width=4, depth=2).eval()
    image = torch.rand(3, *size)
    one = predict_probabilities(model, image, tile=16, overlap=4, runtime=Runtime(batch=1))
    for batch in (2, 5, 64):
        many = predict_probabilities(model, image, tile=16, overlap=4, runtime=Runtime(batch=batch))
        torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)
    assert one.shape == (3, *size) and torch.allclose(one.sum(0), torch.ones(size))


def test_lower_precision_comes_back_as_float32_probabilities():
    model = build_model("isotropic", width=4, depth=2).eval()
    image = torch.rand(3, 32, 32)
    exact = predict_probabilities(model, image, tile=None)
    half = predict_probabilities(model, image, tile=None, runtime=Runtime(precision=Precision.BF16))
    assert half.dtype is torch.float32 and half.device.type == "cpu"
    assert not torch.equal(half, exact)  # it did run in bfloat16
    torch.testing.assert_close(half, exact, atol=0.05, rtol=0)


def test_certificates_are_float32_with_tf32_off_and_the_flags_restored():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with exact_float32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    model = build_model("p4m", width=2, depth=2).eval()
    result = certificate(model, [torch.rand(3, 32, 32)], angles=())
    assert result["group"] < 1e-5


@pytest.mark.parametrize("command", ["evaluate", "predict", "challenge", "demo", "study"])
def test_every_model_command_takes_the_device_options(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--device", "--batch", "--precision"):
        assert option in result.output, (command, option)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("command", [
    ["predict", "--model", "RUN", __file__, "--out", "OUT"],
    ["evaluate", "--model", "RUN", "--out", "OUT"],
    ["challenge", "RUN", "--out", "OUT", "--model", "RUN"],
    ["study", "-c", "study-small", "--out", "OUT"],
    ["demo", "--out", "OUT"],
])
def test_a_missing_gpu_stops_every_command_with_one_line_and_nothing_written(tmp_path, command):
    words = [str(tmp_path / "out") if w == "OUT" else str(tmp_path) if w == "RUN" else w for w in command]
    result = runner.invoke(app, [*words, "--device", "cuda:1"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: device 'cuda:1': PyTorch sees no GPU"
    assert not (tmp_path / "out").exists()
