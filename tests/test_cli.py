import json

from typer.testing import CliRunner

from equiseg.cli import app
from equiseg.models import parameter_count

runner = CliRunner()


def test_models_json_reports_every_family_with_measured_errors():
    result = runner.invoke(app, ["models", "--json", "--depth", "2", "--probe-size", "16", "--size", "64",
                                 "--angle-probe", "32", "--reference-width", "16"])
    assert result.exit_code == 0, result.output
    rows = {(r["family"], r["sized_as"]): r for r in json.loads(result.stdout)}
    matched = ["isotropic", "p4", "p4m", "c8", "c16", "d8"]
    assert set(rows) == {("plain", "seed"), ("isotropic", "seed")} | {(f, "matched") for f in matched}
    plain = rows["plain", "seed"]
    assert plain["width"] == 64 and plain["exact_group"] is None and plain["error_d4"] > 1e-3
    for key in [("isotropic", "seed"), *((f, "matched") for f in matched)]:
        assert rows[key]["error_own_group"] <= 1e-5, key
        assert rows[key]["macs"] > 0 and rows[key]["error_22.5"] > 0, key
    for family, group in [("p4", "C4"), ("c8", "C4"), ("c16", "C4"), ("d8", "D4")]:
        assert rows[family, "matched"]["exact_group"] == group, family
    for family in ("p4", "c8", "c16"):  # exact for rotations, not for flips
        assert rows[family, "matched"]["error_d4"] > 1e-3, family
    reference = parameter_count("plain", 16, depth=2)
    for family in matched:
        assert abs(rows[family, "matched"]["parameters"] - reference) / reference < 0.15, family


def test_models_table_prints():
    result = runner.invoke(app, ["models", "--depth", "1", "--probe-size", "8", "--size", "32", "--angle-probe", "16",
                                 "--reference-width", "8"])
    assert result.exit_code == 0, result.output
    assert "p4m" in result.stdout and "isotropic" in result.stdout and "max pooling" in result.stdout


def test_models_with_blur_pooling_stay_exact_and_a_bad_pool_is_one_line():
    args = ["models", "--json", "--depth", "1", "--probe-size", "8", "--size", "32", "--angle-probe", "16",
            "--reference-width", "8"]
    result = runner.invoke(app, [*args, "--pool", "blur"])
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads(result.stdout) if r["family"] != "plain"]
    assert all(r["error_own_group"] <= 1e-5 for r in rows), rows
    bad = runner.invoke(app, [*args, "--pool", "avg"])
    assert bad.exit_code == 2 and bad.output.strip().splitlines()[-1] == "error: --pool must be one of max, blur, got 'avg'"


def test_presets_lists_the_packaged_presets_with_their_descriptions():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0, result.output
    rows = dict(line.split(maxsplit=1) for line in result.stdout.splitlines())
    assert {"isotropic-small", "plain-small", "isotropic-paper", "plain-paper", "study-small"} <= set(rows)
    assert "real OCELOT data" in rows["isotropic-paper"]


def test_train_refuses_an_unknown_preset_and_lists_the_presets(tmp_path):
    result = runner.invoke(app, ["train", "-c", "no-such-preset", "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "presets: isotropic-paper, isotropic-small" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_paper_preset_refuses_synthetic_data_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("EQUISEG_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["train", "-c", "isotropic-paper", "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        ("error: this config is meant for real OCELOT data (data.require_real=true): pass --data DIR, or "
         "data.require_real=false to train on the built-in synthetic data anyway")]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_a_paper_preset_trains_on_synthetic_data_when_asked_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EQUISEG_CACHE", str(tmp_path / "cache"))
    shrink = ["data.synthetic.train=2", "data.synthetic.val=1", "data.synthetic.test=1", "data.synthetic.size=64",
              "data.num_workers=0", "model.width=2", "model.depth=2", "train.epochs=1", "train.accelerator=cpu",
              "train.loggers=[csv]"]
    with caplog.at_level("WARNING", logger="equiseg"):
        result = runner.invoke(app, ["train", "-c", "isotropic-paper", "--runs", str(tmp_path / "runs"),
                                     "data.require_real=false", *shrink])
    assert result.exit_code == 0, result.output
    assert any("training on the built-in SYNTHETIC dataset" in r.getMessage() for r in caplog.records)
    assert result.stdout.strip().splitlines()[-1] == (
        "trained on synthetic data (train=2 val=1 test=1 size=64 seed=0 crowding=0), not OCELOT: pass --data DIR to train on "
        "real data")
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "synthetic.txt").is_file()
