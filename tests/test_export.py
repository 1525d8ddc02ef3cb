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


@pytest.mark.parametrize(("family", "per_class"), [("p4m", False), ("plain", True)])
def test_a_scripted_cells_model_finds_predicts_cells_where_only_torch_is_installed(tmp_path, family, per_class):
    """export.scripted_cells_model: saved, then loaded in another Python in which equiseg cannot be imported,
    a 64x64 uint8 tile gives the cells of `equiseg predict` (predict_file): positions and classes exactly,
    probabilities to float32 rounding (the other process may run on another number of threads).
    """
    import subprocess
    import sys

    from PIL import Image

    from equiseg.export import scripted_cells_model
    from equiseg.inference.predict import predict_file
    from equiseg.runtime import Runtime

    torch.manual_seed(1)
    config = Config.from_dict({"model": {"family": family, "width": 2, "depth": 3},
                               "detect": {"sigma": 2.0, "min_distance": 4, "threshold": 0.3,
                                          "peaks": "per-class" if per_class else "foreground"}})
    model = config.build_model().train()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32) * 2)  # batch-norm statistics
    model.eval()
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "tile.png")
    result = predict_file(model, config, tmp_path / "tile.png", tmp_path, probs=True, runtime=Runtime())
    assert len(result.points)
    torch.jit.save(scripted_cells_model(model, config), str(tmp_path / "cells.pt"))
    np.save(tmp_path / "tile.npy", image.transpose(2, 0, 1)[None])
    script = (
        "import sys; sys.modules['equiseg'] = None  # any import of equiseg fails\n"
        "import numpy as np, torch\n"
        f"model = torch.jit.load({str(tmp_path / 'cells.pt')!r})\n"
        f"probs, cells = model(torch.from_numpy(np.load({str(tmp_path / 'tile.npy')!r})))\n"
        f"np.save({str(tmp_path / 'probs.npy')!r}, probs.numpy()); np.save({str(tmp_path / 'cells.npy')!r}, cells.numpy())\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    cells = np.load(tmp_path / "cells.npy")  # positions and classes exact, probabilities to float32 rounding
    np.testing.assert_array_equal(cells[:, :3], result.points[:, :3])  # (another thread count: another last bit)
    np.testing.assert_allclose(cells[:, 3], result.points[:, 3], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy")[0], np.load(tmp_path / "tile_probs.npy"), atol=1e-3)


def test_a_model_with_detection_inside_is_a_cells_model():
    from equiseg.export import scripted_cells_model

    config = Config.from_dict({"task": "tissue", "model": {"family": "plain", "width": 2, "depth": 2}})
    with pytest.raises(ValueError, match="detection inside is a cells model"):
        scripted_cells_model(config.build_model().eval(), config)
