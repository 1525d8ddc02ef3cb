"""Results record their data: equiseg's synthetic generator and its settings, or a folder and its digest."""

import json

from equiseg.config import SyntheticConfig
from equiseg.config import plain as plain_values
from equiseg.data.synthetic import generate_dataset
from equiseg.evaluation.data_record import NOT_RECORDED, DataRecord, DataSource
from equiseg.evaluation.evaluate import evaluate_model, write_evaluation
from equiseg.models import build_model
from equiseg.runs import dataset_digest
from tests_support import tiny_config, tiny_dataset_with_cells


def test_a_folder_is_named_by_its_path_and_digest(tmp_path):
    root = tiny_dataset_with_cells(tmp_path)
    record = DataRecord.of_folder(root)
    assert record.source is DataSource.FOLDER and not record.is_synthetic
    assert record.path == str(root.resolve()) and record.digest == dataset_digest(root)
    assert record.describe() == f"the dataset folder {root.resolve()} (sha256 {record.digest[:12]})"


def test_data_equiseg_generated_is_synthetic_whether_or_not_its_settings_are_known(tmp_path):
    spec = SyntheticConfig(train=1, val=1, test=1, size=32, seed=2, crowding=1)
    root = generate_dataset(tmp_path / "ds", {"train": 1, "val": 1, "test": 1}, size=32, seed=2, crowding=1)
    known = DataRecord.of_synthetic(spec, root)
    assert known.is_synthetic and known.synthetic == spec
    assert known.describe() == ("synthetic images from equiseg's generator "
                                "(train=1 val=1 test=1 size=32 seed=2 crowding=1)")
    found = DataRecord.of_folder(root)  # a folder `equiseg synth` wrote, given as --data
    assert found.is_synthetic and found.synthetic is None and found.digest == known.digest
    assert "synthetic images from equiseg's generator (Synthetic H&E-like pairs from equiseg (seed 2" in found.describe()


def test_a_record_survives_json_and_none_is_not_recorded(tmp_path):
    spec = SyntheticConfig(train=3, size=64, rotated=True)
    record = DataRecord(DataSource.SYNTHETIC, "/data/x", "ab" * 32, spec, "made here")
    assert DataRecord.from_dict(json.loads(json.dumps(plain_values(record)))) == record
    assert DataRecord.from_dict(None) is NOT_RECORDED and NOT_RECORDED.source is DataSource.UNKNOWN
    assert "not recorded" in NOT_RECORDED.describe()


def test_an_evaluation_writes_which_data_it_ran_on(tmp_path):
    root = tiny_dataset_with_cells(tmp_path)
    config = tiny_config(root)
    evaluation = evaluate_model(build_model("plain", 4, 2).eval(), config, root, "test", tile=None)
    assert evaluation.data == DataRecord.of_folder(root)
    saved = json.loads(write_evaluation(evaluation, tmp_path / "eval", "test")["scores"].read_text())
    assert saved["data"]["source"] == "folder" and saved["data"]["digest"] == dataset_digest(root)
    assert saved["data"]["path"] == str(root.resolve()) and saved["data"]["synthetic"] is None
