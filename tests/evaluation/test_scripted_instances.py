"""ScriptedInstances: grow_instances and instance_classes in TorchScript, the same labels (ties included)."""

import io

import numpy as np
import pytest
import torch
from scipy import ndimage

from equiseg.detection.instances import grow_instances, instance_classes
from equiseg.detection.scripted import ScriptedInstances


def scene(seed, shape=(64, 80), n=40, ties=True):
    """A smooth random foreground, class maps, and n cells: some on one pixel, some with equal scores."""
    rng = np.random.default_rng(seed)
    foreground = ndimage.gaussian_filter(rng.random(shape), 2.0)
    foreground = (foreground - foreground.min()) / (foreground.max() - foreground.min())
    classes = rng.random((3, *shape)).astype(np.float32)
    classes /= classes.sum(0, keepdims=True)
    pixels = rng.choice(shape[0] * shape[1], n, replace=True)
    scores = rng.choice([0.5, 0.7, 0.9], n) if ties else rng.random(n)
    cells = np.stack([pixels % shape[1], pixels // shape[1], rng.integers(1, 3, n), scores], 1).astype(np.float64)
    if ties:
        cells[1, :2] = cells[0, :2]  # two centres on one pixel
    return foreground.astype(np.float32), classes, cells


@pytest.mark.parametrize(("seed", "radius", "ties"), [(0, 6.0, True), (1, 9.0, True), (2, 4.5, False), (3, 30.0, True)])
def test_the_scripted_instances_equal_grow_instances_and_their_classes(seed, radius, ties):
    foreground, classes, cells = scene(seed, ties=ties)
    module = torch.jit.script(ScriptedInstances(0.5, radius))
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    expected = grow_instances(foreground, cells, 0.5, radius)
    cls, probability = instance_classes(classes, expected, len(cells))
    for run in (module, loaded):
        labels, found = run(torch.from_numpy(foreground), torch.from_numpy(classes), torch.from_numpy(cells))
        np.testing.assert_array_equal(labels.numpy(), expected)
        kept = cls > 0
        np.testing.assert_array_equal(found.numpy()[kept, 2], cls[kept])
        np.testing.assert_allclose(found.numpy()[kept, 3], probability[kept], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(found.numpy()[~kept], cells[~kept])


def one_stage_model(family):
    """A small untrained one-stage instance model (a nucleus output) with warmed batch norm, in eval mode."""
    from equiseg.config import Config

    torch.manual_seed(0)
    config = Config.from_dict({"model": {"family": family, "width": 2, "depth": 2}, "data": {"nuclei": True},
                               "detect": {"sigma": 1.0, "min_distance": 4, "threshold": 0.3}})
    model = config.build_model().train()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    return model.eval(), config


@pytest.mark.slow
def test_a_one_stage_models_cells_pt_gives_its_instances_as_one_stage_instances_does():
    from equiseg.detection.instances import instance_outlines, one_stage_instances
    from equiseg.export import scripted_cells_model

    model, config = one_stage_model("p4")
    module = scripted_cells_model(model, config)
    tile = torch.randint(0, 256, (1, 3, 128, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    probs, cells, labels, outlines = module(tile)
    expected_labels, expected_cells = one_stage_instances(probs[0], config.detect)
    assert len(expected_cells)
    np.testing.assert_array_equal(labels.numpy(), expected_labels)
    expected_rings = instance_outlines(expected_labels, len(expected_cells))
    for k, ring in enumerate(expected_rings):
        np.testing.assert_array_equal(outlines.numpy()[outlines.numpy()[:, 0] == k, 1:], ring)
    np.testing.assert_array_equal(cells.numpy()[:, :3], expected_cells[:, :3])
    np.testing.assert_allclose(cells.numpy()[:, 3], expected_cells[:, 3], rtol=0, atol=1e-12)


@pytest.mark.slow
def test_a_one_stage_models_cells_onnx_gives_its_instances_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from equiseg.detection.instances import instance_outlines, one_stage_instances
    from equiseg.export import onnx_cells_model

    model, config = one_stage_model("plain")
    onnx_cells_model(model, config, tmp_path / "cells.onnx", {})
    session = ort.InferenceSession(str(tmp_path / "cells.onnx"))
    assert [o.name for o in session.get_outputs()] == ["probabilities", "cells", "labels", "outlines"]
    tile = np.random.default_rng(2).integers(0, 256, (1, 3, 96, 128), dtype=np.uint8)
    probs, cells, labels, outlines = session.run(None, {"image": tile})
    expected_labels, expected_cells = one_stage_instances(torch.from_numpy(probs[0]), config.detect)
    assert len(expected_cells)
    np.testing.assert_array_equal(labels, expected_labels)  # on onnxruntime's own probabilities: exact
    for k, ring in enumerate(instance_outlines(expected_labels, len(expected_cells))):
        np.testing.assert_array_equal(outlines[outlines[:, 0] == k, 1:], ring)
    np.testing.assert_array_equal(cells[:, :3], expected_cells[:, :3])
