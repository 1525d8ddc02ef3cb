import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from equiseg.cli import app
from equiseg.data.ocelot import read_cells, read_instances
from equiseg.data.synthetic import generate_dataset
from equiseg.data.verify import verify_dataset

runner = CliRunner()


def messages(problems):
    return sorted(f"{p.path.name}:{p.line}: {p.message}" if p.line else f"{p.path.name}: {p.message}"
                  for p in problems)


def test_clean_dataset_has_no_problems(tiny_dataset):
    assert verify_dataset(tiny_dataset) == []
    result = runner.invoke(app, ["verify", "--data", str(tiny_dataset)])
    assert result.exit_code == 0, result.output


def test_every_kind_of_problem_is_listed_with_its_file(tiny_dataset):
    root = tiny_dataset
    (root / "images/train/cell/001.jpg").unlink()                                   # missing file
    (root / "images/train/cell/099.jpg").write_bytes(b"")                           # extra file, no id
    (root / "images/train/cell/notes.txt").write_text("x")                          # extra, wrong kind
    data = (root / "images/train/tissue/002.jpg").read_bytes()
    (root / "images/train/tissue/002.jpg").write_bytes(data[: len(data) // 2])     # truncated image
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(root / "images/val/cell/003.jpg")  # wrong size
    (root / "annotations/val/cell/003.csv").write_text("1,2,1\n1;2;1\n5,6,7\n70,3,2\n4.5,1,1\n")
    mask = np.ones((64, 64), np.uint8)
    mask[0, 0] = 3
    Image.fromarray(mask).save(root / "annotations/test/tissue/004.png")            # bad mask value
    problems = messages(verify_dataset(root))
    expected_fragments = [
        "001.jpg: missing",
        "099.jpg: extra file: no train sample '099'",
        "notes.txt: extra file: expected only *.jpg",
        "002.jpg: unreadable or truncated image",
        "003.jpg: size 64x32, expected 64x64",
        "003.csv:2: expected 'x,y,class' with integers, got '1;2;1'",
        "003.csv:3: unknown class 7",
        "003.csv:4: point (70, 3) outside the 64x64 image",
        "003.csv:5: expected 'x,y,class' with integers",
        "004.png: mask values [3] outside {1, 2, 255}",
    ]
    for fragment in expected_fragments:
        assert any(fragment in p for p in problems), (fragment, problems)
    assert len(problems) == len(expected_fragments), problems


def test_metadata_ids_without_files_and_unknown_subsets(tiny_dataset):
    meta = json.loads((tiny_dataset / "metadata.json").read_text())
    meta["sample_pairs"]["777"] = dict(meta["sample_pairs"]["001"])
    meta["sample_pairs"]["888"] = dict(meta["sample_pairs"]["001"], subset="holdout")
    (tiny_dataset / "metadata.json").write_text(json.dumps(meta))
    problems = messages(verify_dataset(tiny_dataset))
    assert sum("777." in p and "missing" in p for p in problems) == 4
    assert any("sample 888: subset 'holdout'" in p for p in problems)


def test_missing_metadata_or_folder(tmp_path):
    assert messages(verify_dataset(tmp_path / "nope")) == ["nope: no such dataset folder"]
    assert messages(verify_dataset(tmp_path)) == ["metadata.json: missing"]


def test_cli_exit_status_and_json(tiny_dataset):
    (tiny_dataset / "annotations/train/cell/001.csv").write_text("1,2\n")
    result = runner.invoke(app, ["verify", "--data", str(tiny_dataset), "--json"])
    assert result.exit_code == 1
    listed = json.loads(result.stdout)
    assert listed == [{"path": str(tiny_dataset / "annotations/train/cell/001.csv"), "line": 1,
                       "message": "expected 'x,y,class' with integers, got '1,2'", "kind": "problem"}]


def test_images_that_are_not_8_bit_rgb_are_clean_but_noted_with_the_rule_applied(tiny_dataset):
    """RGBA (alpha dropped), grey (repeated) and 16-bit grey (scaled) files pass, each named with
    what reading does to it; a plain RGB file gets no note.
    """
    cell = tiny_dataset / "images/train/cell/001.jpg"
    tissue = tiny_dataset / "images/train/tissue/001.jpg"
    rgb = np.asarray(Image.open(cell).convert("RGB"))
    alpha = np.full(rgb.shape[:2] + (1,), 7, np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(cell, format="PNG")  # the name stays .jpg
    grey = np.asarray(Image.open(tissue).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tissue, format="PNG")
    result = runner.invoke(app, ["verify", "--data", str(tiny_dataset)])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {cell}: read as RGB by rule: RGBA: alpha dropped (not blended)",
                     (f"note: {tissue}: read as RGB by rule: 16-bit grey: 16-bit scaled to 8 by round(v / 257), "
                      "grey repeated into R, G and B")]
    assert "clean (2 image(s) converted" in result.stderr


def test_images_and_masks_over_the_size_limit_are_problems_naming_the_file(tiny_dataset, monkeypatch):
    """One limit for every reader: a mask over it is a problem like an image, not a crash."""
    mask = tiny_dataset / "annotations/test/tissue/004.png"
    Image.fromarray(np.ones((64, 200), np.uint8)).save(mask)  # 12,800 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # limit 10,000 px: the 64 x 64 images pass
    problems = messages(verify_dataset(tiny_dataset))
    assert len(problems) == 1 and problems[0].startswith("004.png: refused"), problems
    assert "decompression-bomb limit of 10,000 px" in problems[0] and "12800" in problems[0]  # Pillow's count
    result = runner.invoke(app, ["verify", "--data", str(tiny_dataset)])
    assert result.exit_code == 1 and "Traceback" not in result.output and str(mask) in result.output


# --- instance labels (issue 28) ---------------------------------------------------------------------------------------


def test_verify_checks_instance_labels_against_the_points_one_line_per_problem(tmp_path):
    root = generate_dataset(tmp_path / "synth", {"train": 1, "val": 1}, size=256, seed=7, crowding=1.0)
    assert verify_dataset(root) == []  # synth's labels and points agree
    path = root / "annotations/train/cell_instances/001.png"
    labels = read_instances(path)
    count = int(labels.max())
    assert count >= 3
    labels[:4, :4] = count + 1  # a label without its point
    cells = read_cells(root / "annotations/train/cell/001.csv")
    labels[labels == 2] = 0  # label 2 moved away from its point ...
    labels[-4:, -4:] = 2  # ... to a corner
    found = int(labels[cells[1, 1], cells[1, 0]])
    assert found != 2
    Image.fromarray(labels.astype(np.uint16)).save(path)
    assert messages(verify_dataset(root)) == sorted([
        f"001.png: label {count + 1} has no point: the CSV has {count} cells",
        f"001.png: label 2 does not contain its point ({cells[1, 0]}, {cells[1, 1]}) (CSV row 2), which lies in "
        f"{'the background' if found == 0 else f'label {found}'}",
    ])
    labels[labels == 2] = 0  # label 2 gone: its point lies in no label of its own
    Image.fromarray(labels.astype(np.uint16)).save(path)
    assert f"001.png: point ({cells[1, 0]}, {cells[1, 1]}) (CSV row 2) has no label 2: it lies in the background" in \
        messages(verify_dataset(root))


def test_verify_names_bad_and_extra_instance_files_and_is_silent_without_them(tiny_dataset):
    assert verify_dataset(tiny_dataset) == []  # OCELOT-like: no instance files, no instance checks
    folder = tiny_dataset / "annotations/train/cell_instances"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 64), np.uint16)).save(folder / "001.png")  # wrong size
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(folder / "001.tif")  # a second file of 001
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(folder / "099.png")  # no such sample
    (folder / "notes.txt").write_text("x")
    assert messages(verify_dataset(tiny_dataset)) == sorted([
        "001.png: size 64x32, expected 64x64",
        "001.tif: extra file: this sample has another instance label image here, which is read first "
        "(.png, .tif, .tiff in this order)",
        "099.png: extra file: no sample '099' of this split in metadata.json",
        "notes.txt: extra file: expected only .png, .tif, .tiff here",
    ])
