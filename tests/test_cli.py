import json

from typer.testing import CliRunner

from equiseg.cli import app
from equiseg.models import parameter_count
from tests_support import tiny_dataset_with_cells

runner = CliRunner()


def test_models_json_reports_every_family_with_measured_errors():
    result = runner.invoke(app, ["models", "--json", "--depth", "2", "--probe-size", "16", "--size", "64",
                                 "--angle-probe", "32", "--reference-width", "16"])
    assert result.exit_code == 0, result.output
    rows = {(r["family"], r["sized_as"]): r for r in json.loads(result.stdout)}
    matched = ["isotropic", "p4", "p4m", "c8", "c16", "d8"]
    assert set(rows) == {("plain", "paper"), ("isotropic", "paper")} | {(f, "matched") for f in matched}
    plain = rows["plain", "paper"]
    assert plain["width"] == 64 and plain["exact_group"] is None and plain["error_d4"] > 1e-3
    for key in [("isotropic", "paper"), *((f, "matched") for f in matched)]:
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
    result = runner.invoke(app, ["train", "-c", "no-such-preset", "--out", str(tmp_path / "runs" / "run")])
    assert result.exit_code == 2 and "presets: isotropic-paper, isotropic-small" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_paper_preset_refuses_synthetic_data_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("EQUISEG_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["train", "-c", "isotropic-paper", "--out", str(tmp_path / "runs" / "run")])
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
        result = runner.invoke(app, ["train", "-c", "isotropic-paper", "--out", str(tmp_path / "runs" / "run"),
                                     "data.require_real=false", *shrink])
    assert result.exit_code == 0, result.output
    assert any("training on the built-in SYNTHETIC dataset" in r.getMessage() for r in caplog.records)
    assert result.stdout.strip().splitlines()[-1] == (
        "trained on synthetic data (train=2 val=1 test=1 size=64 seed=0 crowding=0), not OCELOT: pass --data DIR to train on "
        "real data")
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "synthetic.txt").is_file()


def _commands():
    import typer.main

    group = typer.main.get_command(app)
    return {name: group.commands[name] for name in sorted(group.commands)}


# the things a command processes may be positional; everything else is an option (docs/reference/cli.md)
PROCESSED = {("predict", "images"), ("slide", "slides"), ("score", "pred"), ("score", "gt"),
             ("challenge", "input_dir")}


def test_one_vocabulary_in_every_command():
    shown = {name: [p for p in command.params if not getattr(p, "hidden", False)]
             for name, command in _commands().items()}
    for name, params in shown.items():
        positional = {(name, p.name) for p in params if p.param_type_name == "argument"}
        assert positional <= PROCESSED, (name, positional - PROCESSED)
        options = {opt for p in params if p.param_type_name == "option" for opt in p.opts}
        assert not options & {"--cell-model", "--devices", "--runs", "--output", "--output-dir"}, name
        for p in params:
            if p.param_type_name == "option" and "model" in p.opts[0]:
                assert p.opts[0] in ("--model", "--tissue-model"), (name, p.opts)
            if "--resume" in getattr(p, "opts", ()) or "--json" in getattr(p, "opts", ()):
                assert p.is_flag, (name, p.opts)
    makers = set(shown) - {"verify"}  # verify's result is its problem list, --json there too
    assert all(any("--json" in p.opts for p in shown[name] if p.param_type_name == "option") for name in makers | {"verify"})
    for option in ("--model", "--data", "--out", "--device"):
        helps = {p.help for params in shown.values() for p in params if option in getattr(p, "opts", ())
                 and option != "--out" and option != "--data"}
        assert len(helps) <= 1, (option, helps)  # the same words wherever it appears


def test_no_help_text_says_the_seed():
    for name in [None, *_commands()]:
        result = runner.invoke(app, [*([name] if name else []), "--help"], terminal_width=200)
        assert result.exit_code == 0, name
        assert "the seed" not in result.output.lower() and "seed's" not in result.output.lower(), name


def test_old_spellings_work_for_one_release_with_a_one_line_notice(tmp_path):
    tiny_dataset = tiny_dataset_with_cells(tmp_path)
    result = runner.invoke(app, ["verify", str(tiny_dataset)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == ("note: a positional dataset folder is now --data (the old spelling is "
                                             "accepted until equiseg 0.3)")
    result = runner.invoke(app, ["slide", "missing.svs", "--cell-model", "RUN"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "note: --cell-model is now --model (the old spelling is accepted until equiseg 0.3)",
        "error: no such file(s): missing.svs"]


def test_a_missing_or_doubled_model_is_one_line():
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 2 and result.output.strip() == "error: missing option --model"
    result = runner.invoke(app, ["challenge", "IN", "--out", "OUT", "--model", "A", "--cell-model", "B"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --cell-model and --model name the same thing: give --model only"


def test_presets_and_verify_print_json(tmp_path):
    tiny_dataset = tiny_dataset_with_cells(tmp_path)
    result = runner.invoke(app, ["presets", "--json"])
    assert result.exit_code == 0
    assert "isotropic-small" in {row["name"] for row in json.loads(result.stdout)}
    result = runner.invoke(app, ["verify", "--data", str(tiny_dataset), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == []


def test_train_refuses_an_existing_run_folder_and_resume_needs_one(tmp_path, monkeypatch):
    monkeypatch.setenv("EQUISEG_CACHE", str(tmp_path / "cache"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "exists" in result.output, result.output
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine" and not (tmp_path / "cache").exists()
    result = runner.invoke(app, ["train", "--resume"])
    assert result.exit_code == 2 and result.output.strip() == "error: --resume continues the run in --out: give --out RUN_DIR"
