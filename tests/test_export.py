"""equiseg export: ONNX (run with onnxruntime), TorchScript and pt2 files that match PyTorch at any allowed size."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from equiseg.cli import app
from equiseg.config import Config
from equiseg.runs import load_model, save_model

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A p4m U-Net with non-trivial batch-norm statistics, saved as training saves it."""
    torch.manual_seed(0)
    config = Config.from_dict({"model": {"family": "p4m", "width": 2, "depth": 3}})
    model = config.build_model().train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, 32, 32) * 2)
    return save_model(model.eval(), config, tmp_path_factory.mktemp("export") / "model.ckpt")


def _reference(checkpoint, x):
    model, _ = load_model(checkpoint)
    with torch.no_grad():
        return model(x).numpy()


SIZES = [(1, 3, 32, 48), (3, 3, 64, 24)]  # batch, height and width all differ from the example


@pytest.mark.slow
def test_onnx_runs_in_onnxruntime_and_matches_pytorch(checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", "--model", str(checkpoint), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(out))
    for shape in SIZES:
        x = torch.rand(*shape)
        got = session.run(None, {"image": x.numpy()})[0]
        ref = _reference(checkpoint, x)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    card = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(card["classes"]) == ["background", "BC", "TC"] and card["size_multiple"] == "8"
    assert "uint8 / 255" in card["normalisation"]
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_torchscript_and_pt2_match_pytorch_and_carry_the_card(checkpoint, tmp_path, fmt):
    out = tmp_path / f"model.{fmt}"
    result = runner.invoke(app, ["export", "--model", str(checkpoint), "--format", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    extra = {"equiseg.json": ""}
    if fmt == "torchscript":
        loaded = torch.jit.load(str(out), _extra_files=extra)
    else:
        loaded = torch.export.load(out, extra_files=extra).module()
    assert json.loads(extra["equiseg.json"])["family"] == "p4m"
    for shape in SIZES:
        x = torch.rand(*shape)
        with torch.no_grad():
            got = loaded(x).numpy()
        ref = _reference(checkpoint, x)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), (fmt, shape)


def test_export_refuses_an_unknown_format_and_a_hostile_file(checkpoint, tmp_path):
    result = runner.invoke(app, ["export", "--model", str(checkpoint), "--format", "keras", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and not (tmp_path / "m").exists()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["export", "--model", str(bad), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "not a safe equiseg checkpoint" in result.output
    assert not (tmp_path / "m.onnx").exists()
