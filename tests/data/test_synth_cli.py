"""The synthetic world through the command line: synth -> verify -> reader -> targets."""

import json
import math

import numpy as np
from typer.testing import CliRunner

from equiseg.cli import app
from equiseg.data.ocelot import OcelotFolder
from equiseg.data.targets import cell_class_mask

runner = CliRunner()


def test_synth_output_passes_verify_and_reads_back(tmp_path):
    out = tmp_path / "synthetic"
    result = runner.invoke(app, ["synth", "--out", str(out), "--train", "3", "--val", "1", "--test", "1", "--size", "256",
                                 "--seed", "5", "--crowding", "0"])
    assert result.exit_code == 0, result.output
    assert "wrote 5 pairs" in result.stdout
    verified = runner.invoke(app, ["verify", "--data", str(out)])
    assert verified.exit_code == 0, verified.output
    samples = list(OcelotFolder(out, "train")) + list(OcelotFolder(out, "val")) + list(OcelotFolder(out, "test"))
    assert len(samples) == 5
    assert set(np.concatenate([s.cells for s in samples])[:, 2]) == {1, 2}
    # every isolated cell (no other within 60 px, 30 px from the border) gets a disk of area pi * 30^2 (2%)
    checked = 0
    for sample in samples:
        mask = cell_class_mask(sample.cells, sample.cell_image.shape[:2], radius=30)
        for x, y, cls in sample.cells:
            others = np.hypot(*(sample.cells[:, :2] - [x, y]).T)
            if (others < 60).sum() == 1 and 30 <= x < 226 and 30 <= y < 226:
                area = (mask[y - 31:y + 32, x - 31:x + 32] == cls).sum()
                assert abs(area - math.pi * 900) / (math.pi * 900) < 0.02
                checked += 1
    assert checked > 0


def test_synth_refuses_a_bad_size_and_an_occupied_folder(tmp_path):
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "a"), "--size", "100"])
    assert result.exit_code == 2 and "multiple of 32" in result.output
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "b"), "--size", "64"])
    assert result.exit_code == 2 and (tmp_path / "b" / "keep.txt").read_text() == "mine"


def test_synth_rotated_writes_crops_at_angles_that_verify_reads_back(tmp_path):
    """``--rotated``: the metadata says so, offsets leave the 1/16 grid (they turn with the crop), verify passes."""
    out = tmp_path / "rotated"
    result = runner.invoke(app, ["synth", "--out", str(out), "--train", "3", "--val", "1", "--test", "0", "--size", "128",
                                 "--rotated"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["verify", "--data", str(out)]).exit_code == 0
    metadata = json.loads((out / "metadata.json").read_text())
    assert "random angles" in metadata["general_info"]["description"]
    offsets = [meta["patch_x_offset"] for meta in metadata["sample_pairs"].values()]
    assert any(not (16 * x).is_integer() for x in offsets), offsets
