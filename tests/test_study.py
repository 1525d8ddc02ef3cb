"""A study end to end, shrunk to seconds, and its resume."""

import json

import yaml

from equiseg.study import StudyConfig, run_study

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


def test_study_runs_reports_and_resumes_without_training(tmp_path):
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
    results = json.loads((tmp_path / "out/results.json").read_text())["results"]
    assert len(results) == 12
    p4m = [r for r in results if r["variant"] == "p4m"]
    assert all(r["certificate"]["test"]["group"] < 1e-5 for r in p4m)
    plain = [r for r in results if r["variant"] == "plain"]
    assert all("tta" in r for r in plain) and not any("tta" in r for r in p4m)
    assert all(len(r["robustness"]) == 9 for r in results)  # 8 elements of D4 and 45 degrees
    # the equivariant model scores the same under every D4 element
    for r in p4m:
        d4 = [s["mf1"] for name, s in r["robustness"].items() if name != "rot45"]
        assert max(d4) - min(d4) < 1e-6
    lines.clear()
    run_study(study, tmp_path / "out", say=lines.append)
    assert sum("reused" in line for line in lines) == 12 and not any("trained" in line for line in lines)


def test_study_with_tissue_context_trains_the_tissue_model_once_and_compares(tmp_path):
    study = tiny_study(tmp_path, "tiny-context",
                       {"p4m": {"family": "p4m"}, "p4m+ctx": {"family": "p4m", "context": "model"}}, [1.0],
                       tissue=["model.family=p4m", "model.width=2"])
    lines = []
    report = run_study(study, tmp_path / "out", say=lines.append)
    assert any(line.startswith("tissue model (p4m, width 2): trained") for line in lines)
    data = json.loads((tmp_path / "out/results.json").read_text())
    assert data["tissue"]["run_dir"] == str(tmp_path / "out/runs/_tissue") and "miou" in data["tissue"]["scores"]
    with_context = [r for r in data["results"] if r["variant"] == "p4m+ctx"]
    assert len(with_context) == 2 and all(r["context"] == "model" and "mf1" in r["oracle"] for r in with_context)
    assert not any("oracle" in r for r in data["results"] if r["variant"] == "p4m")
    # the context model is exact too: the pair turns together, so its context channels turn with the image
    assert all(r["certificate"]["test"]["group"] < 1e-5 for r in with_context)
    config = yaml.safe_load((tmp_path / "out/runs/p4m+ctx/f1/s0/config.yaml").read_text())
    assert config["data"]["tissue_model"] == str(tmp_path / "out/runs/_tissue")
    summary = (report.parent / "summary.md").read_text()
    assert "## Tissue context" in summary and "| p4m+ctx | model | p4m | 1 |" in summary
    assert "Tissue context" in report.read_text()
    lines.clear()
    run_study(study, tmp_path / "out", say=lines.append)
    assert any("tissue model (p4m, width 2): reused" in line for line in lines)
    assert sum("reused" in line for line in lines) == 5
