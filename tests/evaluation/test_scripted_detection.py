"""ScriptedDetector: detect_cells in TorchScript, the same cells bit for bit, compiled, saved and loaded."""

import io

import numpy as np
import pytest
import torch

from equiseg.data.targets import cell_class_mask
from equiseg.detection import detect_cells
from equiseg.detection.scripted import ScriptedDetector


def disk_map(seed: int, size: int = 96, cells: int = 25, noise: float = 0.01) -> torch.Tensor:
    """A softmax-like map of touching disks of both classes; without noise, saturated plateaus whose every
    pixel is a tied candidate (the suppression's order of ties decides).
    """
    rng = np.random.default_rng(seed)
    points = np.column_stack([rng.integers(0, size, cells), rng.integers(0, size, cells), rng.integers(1, 3, cells)])
    mask = torch.as_tensor(cell_class_mask(points, (size, size), radius=8))
    probs = torch.nn.functional.one_hot(mask.long(), 3).permute(2, 0, 1).float() * 0.9 + 0.1 / 3
    return probs + noise * torch.rand(probs.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("sigma", "min_distance", "threshold", "per_class"),
                         [(2.0, 5, 0.5, False), (1.0, 6, 0.4, True), (0.0, 3, 0.3, False), (6.0, 15, 0.5, True)])
def test_the_scripted_detector_finds_detect_cells_cells_bit_for_bit(sigma, min_distance, threshold, per_class):
    detector = torch.jit.script(ScriptedDetector(sigma, min_distance, threshold, per_class))
    buffer = io.BytesIO()
    torch.jit.save(detector, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for seed, noise in [(0, 0.01), (1, 0.01), (2, 0.0), (3, 0.0)]:
        probs = disk_map(seed, noise=noise)
        expected = detect_cells(probs, sigma, min_distance, threshold, per_class)
        assert len(expected)
        for module in (detector, loaded):
            got = module(probs)
            assert got.dtype == torch.float64
            np.testing.assert_array_equal(got.numpy(), expected)


def test_no_cells_on_background():
    probs = torch.zeros(3, 40, 50)
    probs[0] = 1
    assert torch.jit.script(ScriptedDetector(1.0, 6, 0.4, True))(probs).shape == (0, 4)
    assert torch.jit.script(ScriptedDetector(2.0, 6, 0.4, False))(probs).shape == (0, 4)


class _Detect(torch.nn.Module):
    def __init__(self, detector: torch.nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return self.detector(probs)


@pytest.mark.slow
@pytest.mark.parametrize(("sigma", "min_distance", "threshold", "per_class"), [(2.0, 5, 0.5, False), (0.0, 3, 0.3, True)])
def test_the_exported_detector_finds_detect_cells_cells_in_onnxruntime(tmp_path, sigma, min_distance, threshold,
                                                                       per_class):
    """Ties included (the noise-free maps' plateaus): ONNX TopK keeps equal values in index order, as the
    stable sorts do; probabilities to float32 rounding (the blur's multiply-adds are not fused there).
    """
    ort = pytest.importorskip("onnxruntime")
    from equiseg.detection.scripted import ExportedDetector

    dims = {1: torch.export.Dim("h", min=8, max=2048), 2: torch.export.Dim("w", min=8, max=2048)}
    torch.onnx.export(_Detect(ExportedDetector(sigma, min_distance, threshold, per_class)), (disk_map(0),),
                      str(tmp_path / "detect.onnx"), dynamo=True, verbose=False, external_data=False,
                      dynamic_shapes={"probs": dims})
    session = ort.InferenceSession(str(tmp_path / "detect.onnx"))
    background = torch.zeros(3, 40, 50)
    background[0] = 1
    maps = [disk_map(seed, size=size, noise=noise) for seed, size, noise in [(1, 96, 0.01), (2, 96, 0.0), (3, 200, 0.0)]]
    for probs in [*maps, background]:
        expected = detect_cells(probs, sigma, min_distance, threshold, per_class)
        (got,) = session.run(None, {session.get_inputs()[0].name: probs.numpy()})
        assert got.dtype == np.float64 and got.shape == expected.shape
        np.testing.assert_array_equal(got[:, :3], expected[:, :3])
        np.testing.assert_allclose(got[:, 3], expected[:, 3], rtol=0, atol=1e-6)
