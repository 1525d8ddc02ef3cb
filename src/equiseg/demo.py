"""``equiseg demo``: the paper's experiment (Liem, 2025), small, end to end on the built-in synthetic data.

Generates a synthetic dataset, trains the paper's two models at matched parameter counts
(isotropic U-Net without augmentation; plain U-Net with heavy augmentation) from the small
presets ``isotropic-small`` and ``plain-small`` (packaged, see `equiseg.presets`),
evaluates both on the test split and writes a report folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from equiseg.config import Config, json_text
from equiseg.data.ocelot import OcelotFolder
from equiseg.datasets import generate_synthetic
from equiseg.evaluation.evaluate import evaluate_model, write_evaluation
from equiseg.evaluation.tune_detect import tune_detection
from equiseg.models import count_parameters
from equiseg.presets import preset_path
from equiseg.report.plots import best_and_worst, fmt, machine_line, markdown_table, plot_cases, plot_loss_curves
from equiseg.runs import Run, load_model
from equiseg.runtime import Runtime
from equiseg.training.fit import train_or_reuse

PRESETS = {"isotropic": "isotropic-small", "plain": "plain-small"}


def run_demo(out: Path, epochs: int | None = None, say: Callable[[str], None] = print,
             overrides: list[str] | None = None, runtime: Runtime | None = None) -> Path:
    """Train, evaluate and report; returns the report folder ``out/report``.

    ``overrides`` (``key=value``) apply to both presets, e.g. to shrink the demo in tests.
    ``runtime``: where evaluation runs (default: this machine's GPU when there is one);
    training follows the presets' ``train.accelerator`` (auto).
    """
    started = time.time()
    runtime = runtime or Runtime.of("auto")
    overrides = [*(overrides or []), *([f"train.epochs={epochs}"] if epochs else [])]
    configs = {label: Config.from_yaml(preset_path(name), overrides) for label, name in PRESETS.items()}
    iso, plain = configs["isotropic"], configs["plain"]
    syn = iso.data.synthetic
    world = "crowded" if syn.crowding == 1 else "sparse" if syn.crowding == 0 else f"crowding {syn.crowding:g}"
    target = iso.data.target.value + (f" (sigma {iso.data.sigma:g} px)" if iso.data.target.value == "centres" else
                                      f" (radius {iso.data.radius:g} px)")
    say(f"equiseg demo: the comparison of the paper (Liem, 2025), small, on 2 CPU cores (expected: about 12 minutes).\n"
        f"  1. synthetic data ({world} tissue): {syn.train} train / {syn.val} val / {syn.test} test pairs of "
        f"{syn.size}x{syn.size} px; targets: {target}\n"
        f"  2. train isotropic U-Net width {iso.model.width} (no augmentation) and plain U-Net width "
        f"{plain.model.width} ({plain.data.augment.preset_name} augmentation), matched parameter counts, "
        f"{iso.train.epochs} epochs each on {iso.data.crop_size} px crops; choose each one's detection settings on "
        f"the validation split (as equiseg tune-detect)\n"
        f"  3. evaluate both on the test split (loss, Dice, mIoU, OCELOT mF1) and write {out / 'report'}")
    out.mkdir(parents=True, exist_ok=True)
    root = generate_synthetic(out / "data", syn)
    configs = {label: Config.from_dict({**config.to_dict(), "data": {**config.to_dict()["data"], "root": str(root)}})
               for label, config in configs.items()}
    runs = {}
    for label, config in configs.items():
        say(f"\n== training {label} (width {config.model.width}) ==")
        run_dir = out / "runs" / config.name
        if train_or_reuse(config, run_dir):
            say(f"   reusing the finished run in {run_dir}")
        chosen, _ = tune_detection(run_dir, "val", runtime)
        say(f"   detection chosen on val: peaks {chosen.peaks}, sigma {chosen.sigma:g}, min_distance "
            f"{chosen.min_distance}, threshold {chosen.threshold:g}")
        runs[label] = run_dir
    report = out / "report"
    report.mkdir(exist_ok=True)
    test = OcelotFolder(root, "test")
    results, cases = {}, []
    for label, run_dir in runs.items():
        say(f"\n== evaluating {label} on the test split ==")
        results[label], picked = _evaluate(label, run_dir, root, test, runtime)
        cases += picked
    plot_loss_curves({label: run for label, run in runs.items()}, report / "loss_curves.png")
    plot_cases(cases, report / "cases.png")
    minutes = (time.time() - started) / 60
    table = _write_report(report, results, minutes, f"{len(test)} images of {syn.size} px")
    say("\n" + table)
    say(f"\nreport: {report} ({minutes:.1f} min)")
    return report


def _evaluate(label: str, run_dir: Path, root: Path, test: OcelotFolder, runtime: Runtime) -> tuple[dict, list[dict]]:
    """One model's row of the results table (family, width, augmentation, parameters, scores),
    with its evaluation written to ``run_dir/eval-test``, and its best and worst test images.
    """
    model, config = load_model(run_dir, runtime.device)
    kept: dict[int, np.ndarray] = {}

    def keep(i: int, sample_id: str, probs) -> None:
        kept[i] = probs.numpy()

    evaluation = evaluate_model(model, config, root, "test", keep=keep, runtime=runtime)
    write_evaluation(evaluation, Run(run_dir).eval_dir("test"), "test")
    row = {"family": config.model.family.value, "width": config.model.width, "augment": config.data.augment.preset_name,
           "parameters": count_parameters(model), **evaluation.scores}
    cases = []
    for kind, i in best_and_worst(evaluation.per_image, [len(test.cells(i)) > 0 for i in range(len(test))]):
        sample, dice = test[i], evaluation.per_image[i]["dice/mean"]
        cases.append({"title": f"{label}: {kind} ({test.ids[i]}, Dice {dice:.2f})", "image": sample.cell_image,
                      "probs": kept[i], "points": evaluation.points[i], "gt": sample.cells})
    return row, cases


def _write_report(report: Path, results: dict[str, dict], minutes: float, test_images: str) -> str:
    """``results.json`` and ``README.md`` (the table and the pictures) in ``report``; returns the table."""
    header = ["model", "family", "width", "params", "augment", "loss", "Dice", "Dice BC", "Dice TC", "mIoU", "mF1"]
    rows = [[label, r["family"], str(r["width"]), f"{r['parameters']:,}", r["augment"], fmt(r["loss"]),
             fmt(r["dice/mean"]), fmt(r["dice/BC"]), fmt(r["dice/TC"]), fmt(r["miou"]), fmt(r["mf1"])]
            for label, r in results.items()]
    table = markdown_table(header, rows)
    machine = machine_line()
    (report / "results.json").write_text(json_text({"results": results, "minutes": minutes, "machine": machine,
                                                    "date": time.strftime("%Y-%m-%d")}))
    (report / "README.md").write_text(
        f"# equiseg demo report\n\n{time.strftime('%Y-%m-%d %H:%M')}, {machine}, {minutes:.1f} min in all.\n\n"
        f"Test split of the synthetic data ({test_images}). Loss: Dice + cross-entropy on each model's "
        "target; Dice and mIoU over background, BC and TC on that target (disks, or the cores of the "
        "centre Gaussians); mF1: OCELOT detection score (15 px), with detection settings chosen on the "
        "validation split.\n\n"
        f"{table}\n\n![loss curves](loss_curves.png)\n\n![good and bad cases](cases.png)\n")
    return table

