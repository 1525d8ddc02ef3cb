import json

from typer.testing import CliRunner

from equiseg.cli import app

runner = CliRunner()


def test_models_json_reports_every_family_with_measured_errors():
    result = runner.invoke(app, ["models", "--json", "--depth", "2", "--probe-size", "16", "--size", "64"])
    assert result.exit_code == 0, result.output
    rows = {(r["family"], r["sized_as"]): r for r in json.loads(result.stdout)}
    assert set(rows) == {("plain", "seed"), ("isotropic", "seed"), ("isotropic", "matched"),
                         ("p4", "matched"), ("p4m", "matched")}
    plain = rows["plain", "seed"]
    assert plain["width"] == 64 and plain["exact_group"] is None and plain["error_d4"] > 1e-3
    for key in [("isotropic", "seed"), ("isotropic", "matched"), ("p4", "matched"), ("p4m", "matched")]:
        assert rows[key]["error_own_group"] <= 1e-5, key
        assert rows[key]["macs"] > 0
    assert rows["p4", "matched"]["exact_group"] == "C4" and rows["p4", "matched"]["error_d4"] > 1e-3
    for key in [("isotropic", "matched"), ("p4", "matched"), ("p4m", "matched")]:
        assert abs(rows[key]["parameters"] - plain["parameters"]) / plain["parameters"] < 0.1, key


def test_models_table_prints():
    result = runner.invoke(app, ["models", "--depth", "1", "--probe-size", "8", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert "p4m" in result.stdout and "isotropic" in result.stdout
