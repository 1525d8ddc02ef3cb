"""A study end to end, shrunk to seconds, and its resume."""

import json

import yaml

from equiseg.study import StudyConfig, run_study


def test_study_runs_reports_and_resumes_without_training(tmp_path):
    spec = {
        "name": "tiny",
        "base": {"model": {"family": "plain", "width": 4, "depth": 2},
                 "data": {"synthetic": {"train": 4, "val": 1, "test": 2, "size": 64, "seed": 1}, "crop_size": 32,
                          "batch_size": 2},
                 "train": {"epochs": 1, "accelerator": "cpu", "loggers": ["csv"]},
                 "detect": {"sigma": 2.0, "min_distance": 4}},
        "reference_width": 4,
        "variants": {"plain": {"family": "plain"}, "plain+heavy": {"family": "plain", "augment": "heavy"},
                     "p4m": {"family": "p4m"}},
        "fractions": [0.5, 1.0],
        "seeds": [0, 1],
        "angles": [45],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    study = StudyConfig.from_yaml(path)
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
