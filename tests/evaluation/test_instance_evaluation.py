"""Scoring cells as instances on a split (PQ, AJI, the mF1 of centroids), and the two-stage model scored
through `evaluate_run` and `equiseg evaluate --proposals`.
"""

import numpy as np
import pytest
from typer.testing import CliRunner

from equiseg.cli import app
from equiseg.config import Config
from equiseg.data.synthetic import generate_dataset
from equiseg.evaluation.evaluate import evaluate_run
from equiseg.evaluation.instance_evaluation import centroid_points, evaluate_instances
from equiseg.runs import save_model
from tests_support import tiny_config


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    root = tmp_path_factory.mktemp("crowded") / "ds"
    return generate_dataset(root, {"train": 2, "val": 1, "test": 2}, size=128, seed=5, crowding=1.0)


def truth(sample):
    cells = np.column_stack([sample.cells[:, :3], np.ones(len(sample.cells))]).astype(np.float64)
    return sample.instances, cells


def test_the_truth_scores_one_everywhere(crowded):
    scores = evaluate_instances(truth, crowded, "test").scores
    assert scores["pq/mean"] == scores["pq/all"] == scores["aji"] == 1.0
    assert scores["mf1"] == 1.0  # each centroid lies within 15 px of its cell's point


def test_swapped_classes_lose_the_class_scores_but_not_the_nuclei(crowded):
    def swapped(sample):
        labels, cells = truth(sample)
        cells[:, 2] = 3 - cells[:, 2]
        return labels, cells

    scores = evaluate_instances(swapped, crowded, "test").scores
    assert scores["pq/BC"] == scores["pq/TC"] == scores["mf1"] == 0.0
    assert scores["pq/all"] == scores["aji"] == 1.0


def test_nothing_found_scores_zero(crowded):
    scores = evaluate_instances(lambda s: (np.zeros_like(s.instances), np.zeros((0, 4))), crowded, "test").scores
    assert scores["pq/mean"] == scores["aji"] == scores["mf1"] == 0.0


def test_centroids_are_the_pixel_holding_them():
    labels = np.zeros((6, 6), np.int32)
    labels[1:3, 1:4] = 1  # pixel centres x 1.5, 2.5, 3.5 and y 1.5, 2.5: centroid (2.5, 2.0), in pixel (2, 2)
    points = centroid_points(labels, np.array([[1.0, 1.0, 2.0, 0.9], [5.0, 5.0, 1.0, 0.5]]))
    assert points[0].tolist() == [2.0, 2.0, 2.0, 0.9]
    assert points[1].tolist() == [5.0, 5.0, 1.0, 0.5]  # no pixels: its own point


def two_stage_runs(crowded, tmp_path):
    stage1 = Config.from_dict({**tiny_config(crowded, model={"family": "p4m", "width": 1}).to_dict(),
                               "detect": {"sigma": 1.0, "min_distance": 4, "threshold": 0.0, "peaks": "per-class"}})
    stage2 = Config.from_dict({**tiny_config(crowded, model={"family": "p4m", "width": 1}).to_dict(),
                               "task": "nuclei", "window": {"side_px": 17}})
    paths = []
    for name, config in (("stage1.ckpt", stage1), ("stage2.ckpt", stage2)):
        paths.append(save_model(config.build_model().eval(), config, tmp_path / name))
    return paths


def test_a_two_stage_model_is_scored_as_instances(crowded, tmp_path):
    stage1, stage2 = two_stage_runs(crowded, tmp_path)
    evaluation, config = evaluate_run(stage2, "test", data=crowded, proposals=stage1)
    assert config.task.value == "nuclei" and len(evaluation.points) == 2
    assert {"pq/BC", "pq/TC", "pq/mean", "pq/all", "aji", "mf1"} <= set(evaluation.scores)
    assert all(len(p) for p in evaluation.points)  # a threshold of 0 proposes cells


def test_stage_two_without_its_proposals_is_refused_in_one_line(crowded, tmp_path):
    stage1, stage2 = two_stage_runs(crowded, tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "--model", str(stage2), "--data", str(crowded),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "name the cells run that proposes its cells" in result.output
    assert result.output.strip().count("\n") == 0 and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="proposals are for stage 2"):
        evaluate_run(stage1, "test", data=crowded, proposals=stage1)
    with pytest.raises(ValueError, match="not a nuclei model|proposals must come from a cells model"):
        evaluate_run(stage2, "test", data=crowded, proposals=stage2)


def test_predict_refuses_stage_two_without_its_proposals(crowded, tmp_path):
    from equiseg.inference.predict import predict_run

    _, stage2 = two_stage_runs(crowded, tmp_path)
    image = next((crowded / "images" / "test" / "cell").iterdir())
    with pytest.raises(ValueError, match="name the cells run that proposes its cells"):
        predict_run(stage2, [image], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_predict_writes_a_two_stage_model_s_cells_as_instances(crowded, tmp_path):
    import json

    import tifffile
    from shapely.geometry import Point, shape

    from equiseg.data.datamodule import model_input
    from equiseg.data.ocelot import OcelotFolder
    from equiseg.inference.cell_instances import two_stage_instances
    from equiseg.inference.predict import predict_run
    from equiseg.runs import load_model

    stage1, stage2 = two_stage_runs(crowded, tmp_path)
    sample = OcelotFolder(crowded, "test")[0]
    image = crowded / "images" / "test" / "cell" / f"{sample.meta.sample_id}.jpg"
    result = predict_run(stage2, [image], tmp_path / "out", proposals=stage1)
    stem = tmp_path / "out" / sample.meta.sample_id
    labels = tifffile.imread(f"{stem}_instances.tif")
    # the same instances as the evaluation's two-stage path on the same pixels
    (m1, c1), (m2, c2) = load_model(stage1), load_model(stage2)
    expected = two_stage_instances(m1, c1, m2, c2, model_input(sample.cell_image, None))
    assert labels.dtype == np.uint32 and np.array_equal(labels, expected.labels)
    assert np.array_equal(result.images[0].points, expected.cells)
    rows = (stem.parent / f"{stem.name}_cells.csv").read_text().splitlines()
    assert rows[0] == "x,y,class,probability,area_um2,perimeter_um,solidity,eccentricity"
    assert len(rows) - 1 == len(expected.cells) > 0
    features = json.loads((stem.parent / f"{stem.name}_cells.geojson").read_text())["features"]
    assert len(features) == len(expected.cells)
    for feature, (x, y, cls, _) in zip(features, expected.cells.tolist()):
        polygon = shape(feature["geometry"])
        assert polygon.is_valid and polygon.contains(Point(x + 0.5, y + 0.5))
        assert feature["properties"]["classification"]["name"] == {1: "Background cell", 2: "Tumor cell"}[int(cls)]
        assert feature["properties"]["measurements"]["Area µm^2"] > 0


def test_a_one_stage_nucleus_model_is_also_scored_as_instances(crowded, tmp_path):
    config = Config.from_dict({**tiny_config(crowded, model={"family": "p4m", "width": 1}).to_dict(),
                               "data": {**tiny_config(crowded).to_dict()["data"], "nuclei": True},
                               "detect": {"sigma": 1.0, "min_distance": 4, "threshold": 0.0, "peaks": "per-class"}})
    path = save_model(config.build_model().eval(), config, tmp_path / "one-stage.ckpt")
    evaluation, _ = evaluate_run(path, "test", data=crowded)
    scores = evaluation.scores
    assert {"mf1", "dice/mean", "pq/mean", "pq/all", "aji", "blended", "instances/mf1"} <= set(scores)
    assert 0 <= scores["blended"] <= 1 and 0 <= scores["pq/mean"] <= 1
    assert "pq/all" in evaluation.per_image[0] and "instances/tp/BC" in evaluation.per_image[0]
    # a model without the nucleus output is scored as points only
    plain = Config.from_dict({**config.to_dict(), "data": tiny_config(crowded).to_dict()["data"]})
    scores = evaluate_run(save_model(plain.build_model().eval(), plain, tmp_path / "points.ckpt"), "test",
                          data=crowded)[0].scores
    assert "mf1" in scores and "pq/mean" not in scores


def test_predict_writes_a_one_stage_model_s_cells_as_instances(crowded, tmp_path):
    import tifffile

    from equiseg.data.datamodule import model_input
    from equiseg.data.ocelot import OcelotFolder
    from equiseg.detection.instances import one_stage_instances
    from equiseg.inference.predict import predict_run
    from equiseg.inference.tiling import predict_probabilities
    from equiseg.runs import load_model

    config = Config.from_dict({**tiny_config(crowded, model={"family": "p4m", "width": 1}).to_dict(),
                               "data": {**tiny_config(crowded).to_dict()["data"], "nuclei": True},
                               "detect": {"sigma": 1.0, "min_distance": 4, "threshold": 0.0, "peaks": "per-class"}})
    path = save_model(config.build_model().eval(), config, tmp_path / "one-stage.ckpt")
    sample = OcelotFolder(crowded, "test")[0]
    image = crowded / "images" / "test" / "cell" / f"{sample.meta.sample_id}.jpg"
    for probs in (True, False):  # the map held in memory either way
        out = tmp_path / f"out-{probs}"
        result = predict_run(path, [image], out, probs=probs)
        labels = tifffile.imread(out / f"{sample.meta.sample_id}_instances.tif")
        model, _ = load_model(path)
        full = predict_probabilities(model, model_input(sample.cell_image, None))
        # the instances grown on the float32 map, but for the float16 rounding of the map held
        expected_labels, expected_cells = one_stage_instances(full.half().float(), config.detect)
        assert np.array_equal(labels, expected_labels) and len(result.images[0].points) == len(expected_cells) > 0
        header = (out / f"{sample.meta.sample_id}_cells.csv").read_text().splitlines()[0]
        assert header.endswith("area_um2,perimeter_um,solidity,eccentricity")
        assert (out / f"{sample.meta.sample_id}_cells.geojson").is_file()


def test_predict_s_two_stage_pasting_by_tiles_equals_the_whole_image(crowded, tmp_path):
    from equiseg.inference.instance_outputs import two_stage_file
    from equiseg.inference.readers import RgbFile
    from equiseg.runs import load_model

    _, stage2 = two_stage_runs(crowded, tmp_path)
    model, _ = load_model(stage2)
    image = RgbFile(next((crowded / "images" / "test" / "cell").iterdir()))
    rng = np.random.default_rng(1)
    proposals = np.column_stack([rng.integers(0, 128, 80), rng.integers(0, 128, 80), rng.integers(1, 3, 80),
                                 rng.random(80)]).astype(np.float64)
    whole = two_stage_file(model, 17, image, proposals, threshold=0.45)
    tiled = two_stage_file(model, 17, image, proposals, threshold=0.45, tile=32)  # seams every 32 px
    assert np.array_equal(whole[0], tiled[0]) and np.array_equal(whole[1], tiled[1])
    assert len(np.unique(whole[0])) > 20


def test_export_says_how_a_two_stage_model_runs(crowded, tmp_path):
    from equiseg.export import ExportFormat, export_model

    _, stage2 = two_stage_runs(crowded, tmp_path)
    with pytest.raises(ValueError, match="export writes U-Nets.*--proposals CELLS_RUN"):
        export_model(stage2, ExportFormat.TORCHSCRIPT, tmp_path / "model.pt")
    assert not (tmp_path / "model.pt").exists()
