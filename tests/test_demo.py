"""The demo end to end, shrunk: tiny data and models, one epoch."""

import json

from equiseg.demo import run_demo


def test_demo_writes_the_report(tmp_path):
    shrink = ["data.synthetic.train=2", "data.synthetic.val=1", "data.synthetic.test=2", "data.synthetic.size=64",
              "data.crop_size=32", "model.width=4", "model.depth=2", "train.loggers=[csv]"]
    lines = []
    report = run_demo(tmp_path / "demo", epochs=1, say=lines.append, overrides=shrink)
    assert "expected" in lines[0]  # says what it will do and how long it takes
    for name in ("README.md", "results.json", "loss_curves.png", "cases.png"):
        assert (report / name).is_file(), name
    results = json.loads((report / "results.json").read_text())["results"]
    assert set(results) == {"isotropic", "plain"}
    for row in results.values():
        assert {"loss", "dice/mean", "miou", "mf1", "parameters"} <= set(row)
    assert results["plain"]["augment"] == "heavy" and results["isotropic"]["augment"] == "none"
    table = (report / "README.md").read_text()
    assert "| isotropic | isotropic |" in table and "| plain | plain |" in table
    # a second call reuses the finished runs
    lines.clear()
    run_demo(tmp_path / "demo", epochs=1, say=lines.append, overrides=shrink)
    assert sum("reusing" in line for line in lines) == 2
