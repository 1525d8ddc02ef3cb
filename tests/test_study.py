"""A study end to end, shrunk to seconds, and its resume."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

import equiseg.runs
import equiseg.study.evaluation
from equiseg.config import Config
from equiseg.evaluation.data_record import DataSource
from equiseg.models import ConvFamily
from equiseg.report.results import RunResult, StudyResult, from_json, load_cases, to_json
from equiseg.report.study_report import reading, write_report
from equiseg.runs import dataset_digest
from equiseg.study import StudyConfig, evaluate_study_run, run_study

TINY_BASE = {"model": {"family": "plain", "width": 4, "depth": 2},
             "data": {"synthetic": {"train": 4, "val": 1, "test": 2, "size": 64, "seed": 1}, "crop_size": 32,
                      "batch_size": 2},
             "train": {"epochs": 1, "accelerator": "cpu", "loggers": ["csv"]},
             "detect": {"sigma": 2.0, "min_distance": 4}}


def tiny_study(tmp_path, name, variants, fractions, **extra):
    """A study config on TINY_BASE (reference width 4, seeds 0 and 1, 45 degrees), read back from YAML."""
    spec = {"name": name, "base": TINY_BASE, "reference_width": 4, "variants": variants, "fractions": fractions,
            "seeds": [0, 1], "angles": [45], **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return StudyConfig.from_yaml(path)


@pytest.mark.slow
def test_study_runs_reports_and_resumes_without_training(tmp_path, monkeypatch):
    study = tiny_study(tmp_path, "tiny", {"plain": {"family": "plain"},
                                          "plain+heavy": {"family": "plain", "augment": "heavy"},
                                          "p4m": {"family": "p4m"}}, [0.5, 1.0])
    lines = []
    report = run_study(study, tmp_path / "out", say=lines.append)
    (tmp_path / "lines.txt").write_text("\n".join(lines))
    assert sum("trained" in line for line in lines) == 12
    html = report.read_text()
    assert "data:image/png;base64," in html and "Reading" in html
    summary = (report.parent / "summary.md").read_text()
    assert "| p4m |" in summary and "±" in summary
    study_result = from_json(StudyResult, (tmp_path / "out/results.json").read_text())
    results = study_result.results
    assert len(results) == 12
    # the data is recorded: the built-in synthetic data of the base, generated into the study's folder
    assert study_result.data.is_synthetic and study_result.data.synthetic == Config.from_dict(TINY_BASE).data.synthetic
    assert study_result.data.digest == dataset_digest(tmp_path / "out/data")
    assert "These are synthetic images from one generator" in summary
    p4m = [r for r in results if r.variant == "p4m"]
    assert all(r.certificate.test["group"] < 1e-5 for r in p4m)
    plain = [r for r in results if r.variant == "plain"]
    assert all(r.tta is not None for r in plain) and not any(r.tta is not None for r in p4m)
    assert all(len(r.robustness) == 9 and sum(t.d4 for t in r.robustness) == 8 for r in results)  # D4 and 45°
    # the equivariant model scores the same under every D4 element
    for r in p4m:
        d4 = [t.scores["mf1"] for t in r.robustness if t.d4]
        assert max(d4) - min(d4) < 1e-6
    # the case figure's pictures were kept for each variant's first seed at the full fraction, and only there
    first = [r for r in results if r.fraction == 1.0 and r.seed == 0]
    assert sorted(r.variant for r in first) == ["p4m", "plain", "plain+heavy"]
    assert all(r.cases_file and [c.kind for c in r.cases] == ["best", "worst"] for r in first)
    assert not any(r.cases for r in results if r not in first)
    pictures = first[0].case_pictures()
    assert pictures[0][1].probs.shape == (3, 64, 64) and pictures[0][1].image.shape == (64, 64, 3)
    assert load_cases(tmp_path / "out/runs/plain/f1/s0/cases.npz")["best"].probs.dtype.name == "float32"
    # the report is a function of the results: it loads no model
    def no_model(*args, **kwargs):
        raise AssertionError("the report loaded a model")

    monkeypatch.setattr(equiseg.study.evaluation, "load_model", no_model)
    monkeypatch.setattr(equiseg.runs, "load_model", no_model)
    summary = from_json(StudyResult, (tmp_path / "out/results.json").read_text())
    again = write_report(summary, tmp_path / "again")
    assert (tmp_path / "again/cases.png").is_file() and "| p4m |" in (again.parent / "summary.md").read_text()
    monkeypatch.undo()
    lines.clear()
    run_study(study, tmp_path / "out", say=lines.append)
    assert sum("reused" in line for line in lines) == 12 and not any("trained" in line for line in lines)
    # a copy of the study folder elsewhere (its data inside it) reuses every run too
    shutil.copytree(tmp_path / "out", tmp_path / "moved")
    lines.clear()
    run_study(study, tmp_path / "moved", say=lines.append)
    assert sum("reused" in line for line in lines) == 12 and not any("trained" in line for line in lines)


@pytest.mark.slow
def test_study_with_tissue_context_trains_the_tissue_model_once_and_compares(tmp_path):
    study = tiny_study(tmp_path, "tiny-context",
                       {"p4m": {"family": "p4m"}, "p4m+ctx": {"family": "p4m", "context": "model"}}, [1.0],
                       tissue=["model.family=p4m", "model.width=2"])
    lines = []
    report = run_study(study, tmp_path / "out", say=lines.append)
    assert any(line.startswith("tissue model (p4m, width 2): trained") for line in lines)
    data = from_json(StudyResult, (tmp_path / "out/results.json").read_text())
    assert data.tissue.run_dir == str(tmp_path / "out/runs/_tissue") and "miou" in data.tissue.scores
    with_context = [r for r in data.results if r.variant == "p4m+ctx"]
    assert len(with_context) == 2 and all(r.context.value == "model" and "mf1" in r.oracle for r in with_context)
    assert not any(r.oracle is not None for r in data.results if r.variant == "p4m")
    # the context model is exact too: the pair turns together, so its context channels turn with the image
    assert all(r.certificate.test["group"] < 1e-5 for r in with_context)
    config = yaml.safe_load((tmp_path / "out/runs/p4m+ctx/f1/s0/config.yaml").read_text())
    assert config["data"]["tissue_model"] == str(tmp_path / "out/runs/_tissue")
    summary = (report.parent / "summary.md").read_text()
    assert "## Tissue context" in summary and "| p4m+ctx | model | p4m | 1 |" in summary
    assert "Tissue context" in report.read_text()
    lines.clear()
    run_study(study, tmp_path / "out", say=lines.append)
    assert any("tissue model (p4m, width 2): reused" in line for line in lines)
    assert sum("reused" in line for line in lines) == 5


def test_a_study_on_a_dataset_folder_names_it_and_never_says_synthetic(tmp_path):
    from equiseg.data.synthetic import generate_dataset

    root = generate_dataset(tmp_path / "folder", {"train": 4, "val": 1, "test": 2}, size=64, seed=1)
    metadata = json.loads((root / "metadata.json").read_text())  # a folder of someone's images, not equiseg's
    metadata["general_info"]["description"] = "A small folder of test images."
    for record in metadata["sample_pairs"].values():
        record["organ"] = "kidney"
    (root / "metadata.json").write_text(json.dumps(metadata))
    base = {**TINY_BASE, "data": {**TINY_BASE["data"], "root": str(root)}}
    spec = {"name": "folder", "base": base, "reference_width": 4, "variants": {"plain": {"family": "plain"}},
            "fractions": [1.0], "seeds": [0], "robustness": False}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    lines = []
    report = run_study(StudyConfig.from_yaml(tmp_path / "study.yaml"), tmp_path / "out", say=lines.append)
    result = from_json(StudyResult, (tmp_path / "out/results.json").read_text())
    assert result.data.source is DataSource.FOLDER and result.data.path == str(root.resolve())
    assert result.data.digest == dataset_digest(root) and result.data.synthetic is None
    summary = (report.parent / "summary.md").read_text()
    assert "synthetic" not in summary.lower() and "synthetic" not in report.read_text().lower()
    assert not any("synthetic" in line.lower() for line in lines)
    assert f"the dataset folder {root.resolve()} (sha256 {dataset_digest(root)[:12]})" in summary


def test_results_written_before_the_data_record_load_and_say_it_was_not_recorded():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs/study-steerable/results.json").read_text()
    committed = from_json(StudyResult, text)
    assert committed.data.is_synthetic and committed.data.synthetic.size == 256  # added to the committed file
    old = json.loads(text)
    del old["data"]
    result = from_json(StudyResult, json.dumps(old))
    assert result.data.source is DataSource.UNKNOWN
    lines = " ".join(reading(result, []))
    assert "was not recorded" in lines and "synthetic" not in lines


def test_the_base_is_a_preset_name_or_a_file_beside_the_study(tmp_path):
    spec = {"name": "s", "base": "plain-small", "variants": {"plain": {"family": "plain"}}}
    (tmp_path / "by-name.yaml").write_text(yaml.safe_dump(spec))
    assert StudyConfig.from_yaml(tmp_path / "by-name.yaml").base["name"] == "plain-small"
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(TINY_BASE))
    (tmp_path / "beside.yaml").write_text(yaml.safe_dump({**spec, "base": "mine.yaml"}))
    assert StudyConfig.from_yaml(tmp_path / "beside.yaml").base["model"]["width"] == 4


def test_a_variant_may_pool_otherwise_than_the_base(tmp_path):
    spec = {"name": "s", "base": TINY_BASE, "variants": {"c8": {"family": "c8"}, "c8+blur": {"family": "c8", "pool": "blur"}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    study = StudyConfig.from_yaml(tmp_path / "study.yaml")
    pools = {v.label: study.run_config(v, 1.0, 0, 2, str(tmp_path)).model.pool.value for v in study.variants}
    assert pools == {"c8": "max", "c8+blur": "blur"}
    assert study.run_config(study.variants[1], 1.0, 0, 2, str(tmp_path)).build_model().pool.value == "blur"


def test_the_real_grand_challenge_input_comes_from_the_key_or_the_environment(tmp_path, monkeypatch):
    from pathlib import Path

    from equiseg.config import ConfigError
    from equiseg.study import GC_INPUT_ENV, real_samples

    monkeypatch.delenv(GC_INPUT_ENV, raising=False)
    variants = {"plain": {"family": "plain"}}
    assert real_samples(tiny_study(tmp_path, "none", variants, [1.0])) == []  # nothing found by walking up
    with pytest.raises(ConfigError, match="gc_input: .* is not a folder"):
        real_samples(tiny_study(tmp_path, "missing", variants, [1.0], gc_input=str(tmp_path / "nope")))
    gc = Path(__file__).resolve().parents[2] / "shared" / "ocelot" / "gc_input"
    if not gc.is_dir():
        pytest.skip("the real Grand Challenge input is not in ../shared/ocelot")
    monkeypatch.setenv(GC_INPUT_ENV, str(gc))
    samples = real_samples(tiny_study(tmp_path, "env", variants, [1.0]))
    assert samples and samples[0].cell_image.shape[:2] == (1024, 1024)


def test_a_study_on_a_real_data_base_refuses_synthetic_data_before_writing(tmp_path):
    from equiseg.config import ConfigError

    base = {**TINY_BASE, "data": {**TINY_BASE["data"], "require_real": True}}
    spec = {"name": "real", "base": base, "reference_width": 4, "variants": {"plain": {"family": "plain"}},
            "fractions": [1.0], "seeds": [0]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="meant for real OCELOT data"):
        run_study(StudyConfig.from_yaml(tmp_path / "study.yaml"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the packaged GPU study asks for the synthetic world explicitly
    assert StudyConfig.from_yaml("study-gpu").base["data"]["require_real"] is False


def test_a_run_result_survives_json_and_nan_is_null(tmp_path):
    study = tiny_study(tmp_path, "json", {"plain": {"family": "plain"}}, [1.0], seeds=[0])
    run_study(study, tmp_path / "out", say=lambda _: None)
    text = (tmp_path / "out/runs/plain/f1/s0/study.json").read_text()
    result = from_json(RunResult, text)
    assert result.family is ConvFamily.PLAIN and result.tta is not None and result.oracle is None
    scores = {k: v for k, v in result.scores.items() if not math.isnan(v)}
    clean = dataclasses.replace(result, scores=scores, per_image=(), robustness=result.robustness[:1],
                                cases=result.cases[:1])
    clean = dataclasses.replace(clean, robustness=tuple(dataclasses.replace(t, scores={"mf1": 0.5})
                                                        for t in clean.robustness))
    assert from_json(RunResult, to_json(clean)) == clean
    with_nan = dataclasses.replace(clean, scores={**scores, "mf1": math.nan})
    written = to_json(with_nan)
    assert json.loads(written)["scores"]["mf1"] is None and "NaN" not in written
    assert math.isnan(from_json(RunResult, written).scores["mf1"])


def test_an_old_cache_is_recomputed(tmp_path, monkeypatch):
    study = tiny_study(tmp_path, "old", {"plain": {"family": "plain"}}, [1.0], seeds=[0])
    run_study(study, tmp_path / "out", say=lambda _: None)
    run_dir = tmp_path / "out/runs/plain/f1/s0"
    old = {"parameters": 1, "family": "plain", "width": 4, "context": "none", "seconds": 0.1,
           "scores": {"mf1": 0.5}, "per_image": [], "robustness": {"rot0": {"mf1": 0.5}},
           "certificate": {"test": {"group": 0.1}, "group": "D4"}}
    (run_dir / "study.json").write_text(json.dumps(old))
    variant = study.variants[0]
    result = evaluate_study_run(run_dir, tmp_path / "out/data", study, (variant, 1.0, 0), [])
    assert result.variant == "plain" and len(result.robustness) == 9 and result.parameters > 1
    assert (run_dir / "study.json").read_text() == to_json(result)  # as JSON: NaN scores are not equal to themselves
    # and the new cache is read, not recomputed
    monkeypatch.setattr(equiseg.study.evaluation, "load_model", lambda *a, **k: pytest.fail("recomputed a current cache"))
    assert to_json(evaluate_study_run(run_dir, tmp_path / "out/data", study, (variant, 1.0, 0), [])) == to_json(result)


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, r"unknown key\(s\) \['colour'\]"),
    ({"variants": {"x": {"family": "p8"}}}, r"variants\.x\.family: 'p8' is not one of plain, isotropic, p4, p4m"),
    ({"variants": {"x": {"augment": "heavy"}}}, r"variants\.x: needs family \("),
    ({"variants": {"x": {"family": "plain", "colour": 1}}}, r"unknown key\(s\) \['colour'\] in .*variants\.x"),
    ({"variants": {}}, "no variants"),
    ({"fractions": [0.5, 1.5]}, r"fractions must lie in \(0, 1\]"),
    ({"seeds": ["a"]}, r"seeds\[0\]: expected an integer"),
    ({"seeds": []}, "seeds: give at least one seed"),
    ({"name": "../outside"}, "name must be a plain name"),
    ({"variants": {"../x": {"family": "plain"}}}, "variant must be a plain name"),
    ({"variants": {"x": {"family": "c8", "pool": "avg"}}}, r"variants\.x\.pool: 'avg' is not one of max, blur"),
])
def test_a_bad_study_config_is_one_error_naming_the_key(tmp_path, change, message):
    from equiseg.config import ConfigError

    spec = {"name": "bad", "base": TINY_BASE, "variants": {"plain": {"family": "plain"}}, **change}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        StudyConfig.from_yaml(tmp_path / "study.yaml")


@pytest.mark.slow
def test_study_by_training_images_with_lr_search_and_paired_intervals(tmp_path):
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": 3, "early_stopping": 1}}
    spec = {"name": "tiny-paired", "base": base, "reference_width": 4, "seeds": [0, 1], "angles": [45],
            "variants": {"plain+heavy": {"family": "plain", "augment": "heavy", "lr": 3.0e-3}, "p4m": {"family": "p4m"}},
            "train_images": [2, 4], "lr_search": [1.0e-3, 3.0e-2], "baseline": "plain+heavy", "robustness": False,
            "bootstrap": 200}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    study = StudyConfig.from_yaml(tmp_path / "study.yaml")
    lines = []
    report = run_study(study, tmp_path / "out", say=lines.append)
    result = from_json(StudyResult, (tmp_path / "out/results.json").read_text())
    # the search: two rates for p4m on the largest training set, one chosen, used by every run of it;
    # plain+heavy states its own rate and is not searched
    assert len(result.lr_trials) == 2 and sum(t.chosen for t in result.lr_trials) == 1
    chosen = {t.variant: t.lr for t in result.lr_trials if t.chosen} | {"plain+heavy": 3.0e-3}
    assert {t.variant for t in result.lr_trials} == {"p4m"}
    assert all(r.lr == chosen[r.variant] for r in result.results)
    assert (tmp_path / "out/runs/_lr/p4m/lr0.03").is_dir() and not (tmp_path / "out/runs/_lr/plain+heavy").exists()
    # the search's run at the chosen rate is the study's first cell of p4m (4 images, seed 0): copied, not retrained
    cell = next(r for r in result.results if r.variant == "p4m" and r.train_count == 4 and r.seed == 0)
    source = tmp_path / f"out/runs/_lr/p4m/lr{chosen['p4m']:g}"
    copied = [line for line in lines if "the learning-rate search's run at this rate" in line]
    assert len(copied) == 1 and str(source) in copied[0]
    assert cell.reused and sum(r.reused for r in result.results) == 1
    best = "checkpoints/best.ckpt"
    assert (source / best).read_bytes() == (tmp_path / "out" / cell.run_dir.split("/out/", 1)[1] / best).read_bytes()
    assert sorted({r.train_count for r in result.results}) == [2, 4]
    assert all(0 <= r.best_epoch < r.epochs_trained for r in result.results)
    assert all(not r.robustness and r.tta is None for r in result.results)
    assert all({"tp/BC", "fp/TC", "gt/TC"} <= set(r.per_image[0]) for r in result.results)
    summary = (report.parent / "summary.md").read_text()
    assert "## Against plain+heavy: paired differences with 95 % intervals" in summary
    assert "## Convergence" in summary and "## Learning rate of each variant" in summary
    assert "| plain+heavy | 0.003 |  |  | stated (not searched) |" in summary
    assert "(1 of 8 runs were not trained in their turn but reused" in summary  # the copied search run
    assert "With 2 training images, against plain+heavy" in summary and "resolves" in summary
    assert "| p (Holm) | verdict (Holm) |" in summary and "Δ mF1 (seeds, t)" in summary and "\nPlan: " in summary
    assert (report.parent / "scarcity.png").is_file() and "Rotation robustness" not in summary
    with pytest.raises(Exception, match="train_images asks for 9 images; the training split has 4"):
        run_study(dataclasses.replace(study, train_images=(9,)), tmp_path / "out2")
    with pytest.raises(ValueError, match="baseline 'plain' is not a variant"):
        dataclasses.replace(study, baseline="plain")


def test_the_reading_leaves_runs_that_found_no_cell_out_of_the_robustness_comparison():
    """study-steerable's real results: c16 and d8 found no cell with seed 0 (mF1 0 at every angle, so
    their range is 0); the sentence must not take that flatness for robustness, and must say so.
    """
    from pathlib import Path

    from equiseg.report.study_report import reading

    result = from_json(StudyResult, (Path(__file__).parents[1] / "docs/study-steerable/results.json").read_text())
    failed = {(r.variant, r.seed) for r in result.results if r.scores["mf1"] == 0}
    assert failed == {("c16", 0), ("d8", 0)}
    lines = reading(result, [])
    assert "left out of that comparison: c16 seed 0, d8 seed 0." in " ".join(lines)
    sentence = next(line for line in lines if line.startswith("Under rotation"))
    # d8's range is the mean over its two seeds that learnt (with the flat seed 0 it would be a third lower)
    ranges = [max(t.scores["mf1"] for t in r.robustness) - min(t.scores["mf1"] for t in r.robustness)
              for r in result.results if r.variant == "d8" and r.seed != 0]
    assert f"the mF1 of d8 varies least (mean range {sum(ranges) / 2:.3f})" in sentence
    assert f"{sum(ranges) / 3:.3f}" not in sentence


def test_a_run_cut_off_by_its_budget_while_still_improving_counts_as_unconverged():
    from equiseg.report.results import RunResult

    assert {"epoch_budget", "patience"} <= {f.name for f in dataclasses.fields(RunResult)}

    class Stand:  # the property alone: a RunResult needs many fields
        converged = RunResult.converged

        def __init__(self, best, trained, budget=-1, patience=0):
            self.best_epoch, self.epochs_trained, self.epoch_budget, self.patience = best, trained, budget, patience

    assert not Stand(17, 20, budget=20, patience=5).converged  # best epoch 18 of 20, patience 5: cut off
    assert Stand(14, 20, budget=20, patience=5).converged  # best epoch more than a patience before the end
    assert Stand(12, 18, budget=20, patience=5).converged  # stopped early, before the budget: it converged
    assert not Stand(17, 18, budget=20, patience=5).converged  # stopped early (by the loss) at its best (by mF1)
    assert not Stand(19, 20).converged and Stand(18, 20).converged  # recorded without the budget: best = last
    assert Stand(-1, -1, budget=20).converged  # unknown


@pytest.mark.slow
def test_a_study_that_tunes_detection_scores_each_run_with_its_own_tuned_settings(tmp_path):
    from equiseg.runs import load_model

    base = {**TINY_BASE, "data": {**TINY_BASE.get("data", {}), "stratify": True},
            "train": {**TINY_BASE["train"], "epochs": 2, "select": "mf1"}}
    spec = {"name": "tiny-tuned", "base": base, "reference_width": 4, "seeds": [0], "angles": [45],
            "variants": {"plain": {"family": "plain"}}, "train_images": [2], "robustness": False,
            "tune_detect": True, "bootstrap": 50}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    run_study(StudyConfig.from_yaml(tmp_path / "study.yaml"), tmp_path / "out", say=lambda line: None)
    result = from_json(StudyResult, (tmp_path / "out/results.json").read_text())
    (run,) = result.results
    tuned = yaml.safe_load((Path(run.run_dir) / "detect.yaml").read_text())
    _, config = load_model(run.run_dir)
    assert config.detect.sigma == tuned["sigma"] and config.detect.threshold == tuned["threshold"]
    assert config.data.stratify and config.train.select.value == "mf1"
    assert run.epoch_budget >= 2 and run.patience >= 1  # (equal_steps lengthens the budget of small subsets)


@pytest.mark.slow
def test_a_study_compares_a_one_stage_with_a_two_stage_variant_as_instances(tmp_path):
    stage2 = {"name": "tiny-stage2", "task": "nuclei", "model": {"family": "p4", "width": 1, "depth": 2},
              "data": {"batch_size": 4}, "window": {"side_um": 3.4},
              "train": {"epochs": 1, "accelerator": "cpu", "loggers": ["csv"], "limit_train_batches": 2}}
    (tmp_path / "stage2.yaml").write_text(yaml.safe_dump(stage2))
    base = {**TINY_BASE, "data": {**TINY_BASE["data"], "synthetic": {**TINY_BASE["data"]["synthetic"], "crowding": 1.0},
                                  "stratify": True}}
    spec = {"name": "tiny-instances", "base": base, "reference_width": 4, "seeds": [0, 1], "angles": [45],
            "variants": {"one-stage": {"family": "plain", "nuclei": True},
                         "two-stage": {"family": "plain", "stage2": str(tmp_path / "stage2.yaml")}},
            "train_images": [2], "robustness": False, "baseline": "two-stage", "bootstrap": 50}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    report = run_study(StudyConfig.from_yaml(tmp_path / "study.yaml"), tmp_path / "out", say=lambda line: None)
    result = from_json(StudyResult, (tmp_path / "out/results.json").read_text())
    two = [r for r in result.results if r.variant == "two-stage"]
    one = [r for r in result.results if r.variant == "one-stage"]
    assert all("pq/mean" in r.scores and "aji" in r.scores and "tp/BC" in r.per_image[0] for r in two + one)
    assert all("instances/mf1" in r.scores for r in one) and all("blended" not in r.scores for r in two)
    for run in two:  # stage 2 trained beside stage 1, on its cells; both stages' parameters counted
        second = Path(run.run_dir).with_name(Path(run.run_dir).name + "-stage2")
        assert (second / "checkpoints" / "best.ckpt").is_file()
        assert equiseg.runs.Run(second).config().window.proposals == run.run_dir
        assert run.parameters > one[0].parameters / 2
    summary = (report.parent / "summary.md").read_text()
    assert "## Cells as instances (mean ± std over seeds)" in summary
    assert "| one-stage | one-stage |" in summary and "| two-stage | two-stage |" in summary
    spec["variants"] = {"x": {"family": "plain", "nuclei": True, "stage2": "nuclei-small"}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="takes neither nuclei nor tissue context"):
        StudyConfig.from_yaml(tmp_path / "bad.yaml")


def test_a_planned_study_reports_the_half_width_it_reached_against_the_plan():
    from equiseg.evaluation.comparisons import half_width
    from equiseg.report.results import StudyPlan, to_json
    from equiseg.report.study_report import against_plan, baseline_comparisons

    old = from_json(StudyResult, (Path(__file__).resolve().parents[1] / "docs/study-cpu/results.json").read_text())
    assert old.plan is None and against_plan(old, baseline_comparisons(old)) == []  # written before plans
    planned = from_json(StudyResult, to_json(dataclasses.replace(old, plan=StudyPlan(0.07, 0.11, source="pilot"))))
    assert planned.plan == StudyPlan(0.07, 0.11, 0.05, 0.8, "pilot")
    (line,) = against_plan(planned, baseline_comparisons(planned))
    expected = half_width(0.07, 0.11, len(planned.seeds), planned.test_images)
    assert f"expected to give intervals of ± {expected:.3f}" in line and "(pilot)" in line
