"""User mistakes and hostile files: one line on stderr naming the key or file, exit code 2,
nothing written, no code run.
"""

import errno
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from equiseg import build_model
from equiseg.cli import app
from equiseg.runs import save_model
from tests_support import tiny_config, tiny_dataset_with_cells

runner = CliRunner()


def assert_one_line_refusal(result, *words):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("override, words", [
    ("model.width=0", ["model.width", "at least 1"]),
    ("model.width=-3", ["model.width"]),
    ("data.batch_size=0", ["data.batch_size"]),
    ("train.epochs=0", ["train.epochs"]),
    ("train.epochs=-1", ["train.epochs"]),
    ("train.loggers=[wandb]", ["train.loggers", "wandb"]),
    ("train.accelerator=quantum", ["train.accelerator", "quantum"]),
    ("data.train_fraction=0", ["data.train_fraction"]),
    ("data.crop_size=128", ["data.crop_size=128", "64 px"]),
    ("name=../outside", ["name", "plain name", "../outside"]),
    ("name=/tmp/x", ["name", "plain name"]),
    ("train.lr=.inf", ["train.lr", "finite"]),
    ("train.lr=inf", ["train.lr"]),
    ("detect.sigma=.nan", ["detect.sigma", "finite"]),
    ("train.dice_weight=-.inf", ["train.dice_weight"]),
    ("model.width=100000", ["model.width=100000", "widest level", "8192"]),  # could not be built
    ("model.depth=60", ["model.depth", "at most 10"]),
    ("train.precision=nonsense", ["train.precision='nonsense'", "Allowed precision values"]),
    ("train.strategy=nonsense", ["train.strategy='nonsense'", "invalid strategy"]),
])
def test_a_config_mistake_is_one_line_and_no_run_folder(synthetic_small, tmp_path, override, words):
    result = runner.invoke(app, ["train", "--data", str(synthetic_small), "--out", str(tmp_path / "runs" / "run"),
                                 "model.family=plain", "model.width=4", "model.depth=2", "train.loggers=[csv]",
                                 override])
    assert_one_line_refusal(result, *words)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_gpu_accelerator_without_a_gpu_is_refused_before_the_run_folder(synthetic_small, tmp_path):
    result = runner.invoke(app, ["train", "--data", str(synthetic_small), "--out", str(tmp_path / "runs" / "run"),
                                 "train.accelerator=gpu"])
    assert_one_line_refusal(result, "train.accelerator=gpu", "no GPU")
    assert not (tmp_path / "runs").exists()


def test_a_dataset_without_a_training_split_is_refused_before_the_run_folder(tmp_path):
    root = tiny_dataset_with_cells(tmp_path)  # a test split only
    result = runner.invoke(app, ["train", "--data", str(root), "--out", str(tmp_path / "runs" / "run")])
    assert_one_line_refusal(result, "train split is empty")
    assert not (tmp_path / "runs").exists()


class Payload:
    """Unpickling this would run code: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["payload", "garbage", "foreign"])
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_hostile_or_foreign_checkpoint_is_refused_in_one_line(tmp_path, kind, command):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "model.ckpt"
    match kind:
        case "payload":
            torch.save({"state_dict": {}, "hyper_parameters": Payload(marker)}, checkpoint)
        case "garbage":
            checkpoint.write_bytes(pickle.dumps("not a checkpoint")[:5] + b"\x00" * 64)
        case "foreign":
            torch.save({"weights": torch.zeros(3)}, checkpoint)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    args = [command, "--model", str(checkpoint), *([str(image)] if command == "predict" else []), "--out", str(tmp_path / "out")]
    result = runner.invoke(app, args)
    assert_one_line_refusal(result, str(checkpoint), "not a safe equiseg checkpoint")
    assert "weights_only=False" not in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    checkpoint = save_model(build_model("plain", width=4, depth=2), config, tmp_path / "tiny.ckpt")
    bomb = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 px is then over twice the limit
    result = runner.invoke(app, ["predict", "--model", str(checkpoint), str(bomb), "--out", str(tmp_path / "out")])
    assert_one_line_refusal(result, str(bomb), "decompression-bomb limit")


def test_a_duplicate_sample_id_is_refused_naming_the_file(tmp_path):
    root = tiny_dataset_with_cells(tmp_path)
    metadata = root / "metadata.json"
    text = metadata.read_text()
    first = text.index('"001"')
    end = text.index('"002"')  # the record of 001 again, as a second entry with the same id
    metadata.write_text(text[:end] + text[first:end] + text[end:])
    result = runner.invoke(app, ["verify", "--data", str(root)])
    assert result.exit_code == 1 and str(metadata) in result.output and "appears twice" in result.output


def test_16_bit_images_are_scaled_the_same_way_whatever_their_format(tmp_path):
    import tifffile

    from equiseg.data.ocelot import read_rgb

    values = (np.arange(48 * 40).reshape(48, 40) * 34).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "grey.png")
    tifffile.imwrite(tmp_path / "grey.tif", values)
    png, tif = read_rgb(tmp_path / "grey.png"), read_rgb(tmp_path / "grey.tif")
    np.testing.assert_array_equal(png, tif)
    np.testing.assert_array_equal(png[..., 1], np.round(values / 257).astype(np.uint8))
    assert png.dtype == np.uint8 and png.max() < 255  # not saturated


@pytest.mark.parametrize("debug", [False, True])
def test_a_bug_is_one_line_with_exit_1_and_its_traceback_only_with_debug(monkeypatch, capsys, debug):
    from equiseg import cli
    from equiseg.evaluation import model_table

    def broken(**_):
        raise RuntimeError("a planted bug")

    monkeypatch.setattr(model_table, "model_table", broken)
    monkeypatch.setattr("sys.argv", ["equiseg", *(["--debug"] if debug else []), "models"])
    if debug:
        with pytest.raises(RuntimeError, match="a planted bug"):
            cli.run()
        return
    with pytest.raises(SystemExit) as exited:
        cli.run()
    assert exited.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unexpected RuntimeError: a planted bug")
    assert "--debug" in lines[0]


# --- outputs: only equiseg's own files are ever replaced ------------------------------------------------------------


@pytest.fixture
def predict_setup(tmp_path):
    checkpoint = tmp_path / "tiny.ckpt"
    save_model(build_model("plain", width=4, depth=2), tiny_config(tmp_path), checkpoint)
    for name in ("a", "b"):
        Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(tmp_path / f"{name}.png")
    return checkpoint


def _predict(checkpoint, *images, out, extra=()):
    return runner.invoke(app, ["predict", "--model", str(checkpoint), *map(str, images), "--out", str(out),
                               "--no-probs", "--device", "cpu", *extra])


def test_a_prediction_run_again_replaces_only_its_own_files(tmp_path, predict_setup):
    out = tmp_path / "out"
    assert _predict(predict_setup, tmp_path / "a.png", out=out).exit_code == 0
    assert _predict(predict_setup, tmp_path / "b.png", out=out).exit_code == 0  # its own earlier output: replaced
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "b_cells.csv", "b_overlay.png", "cell_classification.json", "images.txt"]
    (out / "my_notes.txt").write_text("mine")
    result = _predict(predict_setup, tmp_path / "a.png", out=out)
    assert_one_line_refusal(result, str(out), "equiseg did not write", "my_notes.txt", "--force")
    assert (out / "b_cells.csv").is_file()  # the refused run changed nothing
    result = _predict(predict_setup, tmp_path / "a.png", out=out, extra=["--force"])
    assert result.exit_code == 0, result.output
    assert (out / "my_notes.txt").read_text() == "mine" and not (out / "b_cells.csv").exists()
    assert (out / "a_cells.csv").is_file() and not list(out.glob(".equiseg-staging-*"))


def test_predict_into_the_working_folder_or_a_folder_with_a_foreign_images_txt_touches_nothing(tmp_path, predict_setup,
                                                                                                monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    (work / "images.txt").write_text("my own list")
    monkeypatch.chdir(work)
    result = _predict(predict_setup, tmp_path / "a.png", out=".")
    assert_one_line_refusal(result, "equiseg did not write", "images.txt")
    assert sorted(p.name for p in work.iterdir()) == ["images.txt", "notes.txt"]
    result = _predict(predict_setup, tmp_path / "a.png", out=".", extra=["--force"])  # would write images.txt
    assert_one_line_refusal(result, "images.txt", "has the name of one of its outputs")
    assert (work / "images.txt").read_text() == "my own list" and (work / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in work.iterdir()) == ["images.txt", "notes.txt"]


def test_a_file_name_with_a_line_break_is_refused_not_written_into_images_txt(tmp_path, predict_setup):
    odd = tmp_path / "x\nimage_9\tevil.png"
    (tmp_path / "a.png").rename(odd)
    result = _predict(predict_setup, odd, out=tmp_path / "out")
    assert_one_line_refusal(result, "line break")
    assert not (tmp_path / "out").exists()


def test_export_never_overwrites_a_file_equiseg_did_not_write_and_cleans_a_killed_runs_partial(tmp_path,
                                                                                                predict_setup):
    mine = tmp_path / "model.pt"
    mine.write_text("my own model")
    result = runner.invoke(app, ["export", "--model", str(predict_setup), "--format", "torchscript",
                                 "--out", str(mine)])
    assert_one_line_refusal(result, str(mine), "equiseg did not write")
    assert mine.read_text() == "my own model"
    out = tmp_path / "exported.pt"
    stale = tmp_path / ".exported.pt.partial-999999999"  # a killed export's (no such process)
    stale.write_bytes(b"half")
    for _ in range(2):  # the second run replaces equiseg's own file
        result = runner.invoke(app, ["export", "--model", str(predict_setup), "--format", "torchscript",
                                     "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0 and not stale.exists()



# --- paths that would leave their folder ------------------------------------------------------------------------------


def _rewrite_ids(root, rename):
    import json

    meta = json.loads((root / "metadata.json").read_text())
    meta["sample_pairs"] = {rename.get(k, k): v for k, v in meta["sample_pairs"].items()}
    (root / "metadata.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("bad_id", ["../../outside", "/etc/passwd", ".hidden"])
def test_a_sample_id_that_is_not_a_plain_name_is_refused(tmp_path, bad_id):
    root = tiny_dataset_with_cells(tmp_path)
    first = next(iter(__import__("json").loads((root / "metadata.json").read_text())["sample_pairs"]))
    _rewrite_ids(root, {first: bad_id})
    result = runner.invoke(app, ["verify", "--data", str(root)])
    assert_one_line_refusal_or_problem(result, "metadata.json", "plain name")


def assert_one_line_refusal_or_problem(result, *words):
    """Verify reports problems on stdout (exit 1); a refusal is one line on stderr (exit 2)."""
    assert result.exit_code in (1, 2) and "Traceback" not in result.output, result.output
    assert all(word in result.output for word in words), result.output


def test_a_link_out_of_the_dataset_is_refused_without_showing_the_file(tmp_path):
    root = tiny_dataset_with_cells(tmp_path)
    secret = tmp_path / "secret.csv"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    csv = next((root / "annotations").rglob("*.csv"))
    csv.unlink()
    csv.symlink_to(secret)
    result = runner.invoke(app, ["verify", "--data", str(root)])
    assert_one_line_refusal_or_problem(result, csv.name, "outside the dataset folder")
    assert "root:x" not in result.output
    result = runner.invoke(app, ["export-gt", "--data", str(root), "--split", csv.parent.parent.name,
                                 "--out", str(tmp_path / "gt.json")])
    assert_one_line_refusal(result, csv.name, "outside the dataset folder")
    assert "root:x" not in result.output and not (tmp_path / "gt.json").exists()


@pytest.mark.parametrize("given", ["null", "has#hash", "~"])
def test_a_dataset_path_is_a_path_never_yaml(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EQUISEG_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["train", "--data", given, "--out", str(tmp_path / "run")])
    assert_one_line_refusal(result, given)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # no synthetic data instead


# --- images: sizes declared in the header, truncation, one conversion rule -------------------------------------------


def forged_tiff(path, height, width, tile=None, planar=False):
    """A TIFF of a few hundred bytes whose header declares ``height`` x ``width`` px: a 16 x 16
    zlib image written by tifffile, then its size tags (and the strip or tile size, one segment
    holding it all) rewritten in place. Nothing of the declared size is ever allocated here.
    """
    import struct

    import tifffile

    image = np.zeros((3, 16, 16) if planar else (16, 16, 3), np.uint8)
    tifffile.imwrite(path, image, photometric="rgb", compression="zlib", metadata=None,
                     tile=(16, 16) if tile else None, planarconfig="separate" if planar else None)
    sizes = {"ImageWidth": width, "ImageLength": height}
    sizes.update({"TileWidth": tile, "TileLength": tile} if tile else {"RowsPerStrip": height})
    with tifffile.TiffFile(path) as tiff:
        places = {name: tiff.pages[0].tags[name].valueoffset for name in sizes}
    with open(path, "r+b") as file:
        for name, value in sizes.items():
            file.seek(places[name])
            file.write(struct.pack("<I", value))
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path):
    return save_model(build_model("plain", width=4, depth=2), tiny_config(tmp_path), tmp_path / "tiny.ckpt")


@pytest.mark.parametrize("layout, words", [
    ("strip", ["strips of 100000x100000 px", "10,000,000,000 px"]),      # read a strip at a time: one strip
    ("tile", ["tiles of 65536x65536 px"]),                               # read a tile at a time: one tile
    ("planar", ["an image of 100000x100000 px"]),                        # a layout decoded whole
])
def test_a_tiff_that_declares_a_huge_image_is_refused_before_decoding(tmp_path, tiny_checkpoint, layout, words):
    bomb = forged_tiff(tmp_path / "bomb.tif", *((65536, 65536) if layout == "tile" else (100000, 100000)),
                       tile=65536 if layout == "tile" else None, planar=layout == "planar")
    assert bomb.stat().st_size < 1000
    result = runner.invoke(app, ["predict", "--model", str(tiny_checkpoint), str(bomb), "--out", str(tmp_path / "out")])
    assert_one_line_refusal(result, str(bomb), "decompression-bomb limit", *words)
    assert not (tmp_path / "out").exists()


def test_a_streamed_tiff_too_wide_for_its_bands_is_refused(tmp_path, tiny_checkpoint, monkeypatch):
    import tifffile

    wide = tmp_path / "wide.tif"
    tifffile.imwrite(wide, np.zeros((64, 96, 3), np.uint8), photometric="rgb", compression="zlib", tile=(16, 16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # limit 4,000 px: a 256-px tile is in, 64 rows x 96 are not
    result = runner.invoke(app, ["predict", "--model", str(tiny_checkpoint), str(wide), "--out", str(tmp_path / "out")])
    assert_one_line_refusal(result, str(wide), "width of 96 px", "64 rows", "decompression-bomb limit")
    assert not (tmp_path / "out").exists()


def _challenge_input(root, cell_stack, tissue_stack, entries=1):
    import json

    import tifffile

    from equiseg.data.ocelot import pair_record

    for kind, stack in (("cell_patches", cell_stack), ("tissue_patches", tissue_stack)):
        (root / "images" / kind).mkdir(parents=True)
        path = root / "images" / kind / "000.tif"
        if isinstance(stack, np.ndarray):
            tifffile.imwrite(path, stack, photometric="rgb" if stack.shape[-1] in (3, 4) else None)
        else:
            stack(path)
    record = pair_record("test", 0.2, 0.8, 0.5, 0.5, cell_size=64, tissue_size=64)
    (root / "metadata.json").write_text(json.dumps([record] * entries))
    return root


def _challenge(tmp_path, checkpoint, root):
    return runner.invoke(app, ["challenge", str(root), "--model", str(checkpoint), "--out", str(tmp_path / "out")])


def test_a_challenge_input_that_declares_huge_patches_is_refused(tmp_path, tiny_checkpoint):
    root = _challenge_input(tmp_path / "gc", lambda path: forged_tiff(path, 100000, 100000),
                            np.zeros((1, 64, 64, 3), np.uint8))
    cells = root / "images" / "cell_patches" / "000.tif"
    result = _challenge(tmp_path, tiny_checkpoint, root)
    assert_one_line_refusal(result, str(cells), "patches of 100000x100000 px", "decompression-bomb limit")
    assert not (tmp_path / "out").exists()


def test_a_challenge_input_with_an_empty_metadata_list_is_refused(tmp_path, tiny_checkpoint):
    stack = np.zeros((1, 64, 64, 3), np.uint8)
    root = _challenge_input(tmp_path / "gc", stack, stack, entries=0)
    result = _challenge(tmp_path, tiny_checkpoint, root)
    assert_one_line_refusal(result, str(root / "metadata.json"), "empty list", "no pairs")
    assert not (tmp_path / "out").exists()


def test_challenge_reads_a_16_bit_stack_by_the_rule_predict_reads_it(tmp_path, tiny_checkpoint):
    """Grey repeated, alpha dropped, 16-bit scaled by round(v / 257): `read_rgb`'s rule, for every reader."""
    import tifffile

    from equiseg.data.ocelot import GrandChallengeInput, read_rgb

    rng = np.random.default_rng(0)
    cells16 = rng.integers(0, 65536, (2, 64, 64, 3), dtype=np.uint16)
    tissue_grey = rng.integers(0, 256, (2, 64, 64), dtype=np.uint8)
    root = _challenge_input(tmp_path / "gc", cells16, tissue_grey, entries=2)
    data = GrandChallengeInput(root)
    for i in range(2):
        tifffile.imwrite(tmp_path / "one16.tif", cells16[i], photometric="rgb")
        tifffile.imwrite(tmp_path / "grey.tif", tissue_grey[i])
        np.testing.assert_array_equal(data[i].cell_image, read_rgb(tmp_path / "one16.tif"))
        np.testing.assert_array_equal(data[i].cell_image, np.round(cells16[i] / 257).astype(np.uint8))
        np.testing.assert_array_equal(data[i].tissue_image, read_rgb(tmp_path / "grey.tif"))
    result = _challenge(tmp_path, tiny_checkpoint, root)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "cell_classification.json").is_file()


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


@pytest.mark.parametrize("kind", ["png", "tif", "tif-tiles", "tif-strips"])
def test_a_truncated_image_is_one_line_naming_the_file(tmp_path, tiny_checkpoint, kind):
    import tifffile

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / f"cut.{kind[:3]}"
    if kind == "png":
        Image.fromarray(image).save(path)
    else:
        tifffile.imwrite(path, image, photometric="rgb", **{
            "tif": {}, "tif-tiles": {"compression": "zlib", "tile": (16, 16)},
            "tif-strips": {"compression": "zlib", "rowsperstrip": 8}}[kind])
    result = runner.invoke(app, ["predict", "--model", str(tiny_checkpoint), str(_cut(path)),
                                 "--out", str(tmp_path / "out")])
    assert_one_line_refusal(result, str(path))
    said = result.output.strip().split(str(path))[-1]  # the test's folder is named "truncated" too
    assert "truncated" in said and len(said) < 120 and not (tmp_path / "out").exists()


def test_a_truncated_challenge_stack_is_one_line_naming_the_file(tmp_path, tiny_checkpoint):
    stack = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    root = _challenge_input(tmp_path / "gc", stack, stack, entries=2)
    tissue = _cut(root / "images" / "tissue_patches" / "000.tif")
    result = _challenge(tmp_path, tiny_checkpoint, root)
    assert_one_line_refusal(result, str(tissue))
    assert "truncated" in result.output.split(str(tissue))[-1] and not (tmp_path / "out").exists()


# --- a killed synth ---------------------------------------------------------------------------------------------------


def test_a_killed_synth_leaves_no_dataset_and_the_rerun_starts_over(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "synthetic"
    kill = ("import os, sys; from equiseg.data.synthetic import generate_dataset; "
            "generate_dataset(sys.argv[1], {'train': 6}, size=32, seed=4, crowding=0, "
            "on_sample=lambda done, total: done == 2 and os.kill(os.getpid(), 9))")
    killed = subprocess.run([sys.executable, "-c", kill, str(out)], capture_output=True)
    assert killed.returncode == -9, killed.stderr
    staging = list(tmp_path.glob(".synthetic.partial-*"))
    assert not out.exists() and len(staging) == 1  # two pairs written, beside the destination
    assert runner.invoke(app, ["verify", "--data", str(out)]).exit_code != 0  # nothing there to call clean
    result = runner.invoke(app, ["synth", "--out", str(out), "--train", "6", "--val", "0", "--test", "0",
                                 "--size", "32", "--seed", "4", "--crowding", "0"])
    assert result.exit_code == 0, result.output
    assert not staging[0].exists() and sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]
    assert runner.invoke(app, ["verify", "--data", str(out)]).exit_code == 0


def test_an_interrupted_synth_leaves_nothing(tmp_path):
    from equiseg.data.synthetic import generate_dataset

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "synthetic", {"train": 3}, size=32, on_sample=interrupt)
    assert list(tmp_path.iterdir()) == []


# --- user mistakes are one line, never "unexpected" --------------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder that refuses new entries, as a read-only folder does (the tests may run as root, for
    whom chmod changes nothing): creating a file or folder anywhere inside it is a PermissionError.
    """
    folder = (tmp_path / "read-only").resolve()
    folder.mkdir()
    real_mkdir, real_open = os.mkdir, os.open

    def inside(path) -> bool:
        return Path(path).resolve().is_relative_to(folder) and not os.path.exists(path)

    def mkdir(path, *args, **kwargs):
        if inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    return folder


def _files(folder):
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["train", "challenge", "export"])
def test_an_output_path_of_the_wrong_kind_is_one_line(tmp_path, predict_setup, synthetic_small, command):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    match command:
        case "train":  # a run folder that is a file
            args, words = ["train", "--data", str(synthetic_small), "--out", str(mine)], [str(mine), "exists"]
        case "challenge":  # a folder for cell_classification.json that is a file: refused before reading the input
            args = ["challenge", str(tmp_path / "input"), "--model", str(predict_setup), "--out", str(mine)]
            words = [str(mine), "is not a folder"]
        case _:  # the file to export, given as a folder
            args, words = ["export", "--model", str(predict_setup), "--format", "torchscript", "--out", str(tmp_path)], \
                [str(tmp_path), "is a folder"]
    assert_one_line_refusal(runner.invoke(app, args), *words)
    assert mine.read_text() == "mine"


@pytest.mark.parametrize("command", ["train", "export"])
def test_a_read_only_output_folder_is_one_line_naming_the_path(tmp_path, predict_setup, synthetic_small, read_only,
                                                               command):
    if command == "train":
        out = read_only / "run"
        args = ["train", "--data", str(synthetic_small), "--out", str(out), "model.family=plain", "model.width=4",
                "model.depth=2", "data.crop_size=32", "train.loggers=[csv]"]
    else:
        out = read_only / "model.pt"
        args = ["export", "--model", str(predict_setup), "--format", "torchscript", "--out", str(out)]
    assert_one_line_refusal(runner.invoke(app, args), str(out), "Permission denied")
    assert list(read_only.iterdir()) == []


@pytest.mark.parametrize("options, words", [
    (["--tile", "0"], ["--tile 0", "at least 1 px"]),
    (["--tile", "32", "--overlap", "32"], ["--overlap 32 must be smaller than --tile 32"]),
    (["--tile", "32", "--overlap", "40"], ["--overlap 40", "--tile 32"]),
    (["--tile", "32", "--overlap", "-1"], ["--overlap -1", "negative"]),
])
@pytest.mark.parametrize("command", ["predict", "slide"])
def test_tiles_that_cannot_cover_an_image_are_one_line(tmp_path, predict_setup, command, options, words):
    image = tmp_path / "a.png"  # slide refuses the options before it opens the slide
    result = runner.invoke(app, [command, "--model", str(predict_setup), str(image), "--out", str(tmp_path / "out"),
                                 "--device", "cpu", *options])
    assert_one_line_refusal(result, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-0.25", "nan", "inf"])
def test_microns_per_pixel_that_are_no_positive_number_are_one_line(tmp_path, predict_setup, value):
    result = runner.invoke(app, ["slide", "--model", str(predict_setup), str(tmp_path / "a.png"), "--out",
                                 str(tmp_path / "out"), "--device", "cpu", "--mpp", value])
    assert_one_line_refusal(result, "--mpp must be positive", f"got {float(value)}")
    assert not (tmp_path / "out").exists()


def test_a_cell_mpp_that_is_no_positive_number_is_one_line(tmp_path, predict_setup):
    pytest.importorskip("openslide")
    from tests_support import write_pyramid

    slide = write_pyramid(tmp_path / "slide.tif", np.full((256, 256, 3), 230, np.uint8), 0.2)
    result = runner.invoke(app, ["slide", "--model", str(predict_setup), str(slide), "--out", str(tmp_path / "out"),
                                 "--device", "cpu", "--cell-mpp", "nan"])
    assert_one_line_refusal(result, "--cell-mpp must be positive", "got nan")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_whose_config_asks_for_a_model_too_large_is_refused_before_it_is_built(tmp_path, predict_setup):
    checkpoint = tmp_path / "huge.ckpt"
    config = tiny_config(tmp_path).to_dict()
    config["model"]["width"] = 10**9  # weights-only, yet building it would exhaust memory
    torch.save({"hyper_parameters": {"config": config}, "state_dict": {}}, checkpoint)
    for command in ("predict", "evaluate"):
        args = [command, "--model", str(checkpoint), *([str(tmp_path / "a.png")] if command == "predict" else []),
                "--out", str(tmp_path / "out")]
        assert_one_line_refusal(runner.invoke(app, args), str(checkpoint), "model.width=1000000000", "8192")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_whose_weights_do_not_match_its_config_is_one_line(tmp_path):
    checkpoint = save_model(build_model("plain", width=8, depth=2), tiny_config(tmp_path), tmp_path / "wrong.ckpt")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    result = runner.invoke(app, ["predict", "--model", str(checkpoint), str(tmp_path / "a.png"), "--out",
                                 str(tmp_path / "out")])
    assert_one_line_refusal(result, str(checkpoint), "the weights do not match",
                            "first mismatch: model.encoder.0.0.weight: (8, 3, 3, 3) in the file, (4, 3, 3, 3) in the model")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["another model", "weights of another model"])
def test_resuming_from_a_checkpoint_of_another_model_leaves_the_run_as_it_was(tmp_path, synthetic_small, case):
    run = tmp_path / "run"
    config = tiny_config(synthetic_small)
    run.mkdir()
    config.to_yaml(run / "config.yaml")
    (run / "data.txt").write_text(f"{synthetic_small}\n")
    (run / "checkpoints").mkdir()
    wider = build_model("plain", width=8, depth=2)
    # the last checkpoint of a run of width 8, or width 8's weights under this run's config
    saved_config = tiny_config(synthetic_small, model={"width": 8}) if case == "another model" else config
    save_model(wider, saved_config, run / "checkpoints" / "last.ckpt")
    before = _files(run)
    result = runner.invoke(app, ["train", "--out", str(run), "--resume"])
    words = (["another model", "model.width: 8 in the checkpoint, 4 in config.yaml"] if case == "another model"
             else ["the weights do not match"])
    assert_one_line_refusal(result, str(run / "checkpoints" / "last.ckpt"), *words)
    assert _files(run) == before  # config.yaml, data.txt and the checkpoint as they were, nothing added


def test_a_deeply_nested_or_malformed_score_file_is_one_line(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text('{"type": "Multiple points", "num_images": 1, "points": [], "version": {"major": 1, "minor": 0}}')
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 200_000 + "]" * 200_000)
    assert_one_line_refusal(runner.invoke(app, ["score", str(nested), str(gt)]), str(nested), "nested too deep")
    for text, words in (("{oops", ["cannot read JSON"]), ("[1, 2]", ["'points' list"]),
                        ('{"points": [], "num_images": "two"}', ["num_images", "'two'"]),
                        ('{"points": []}', ["needs 'num_images'"])):
        gt.write_text(text)
        assert_one_line_refusal(runner.invoke(app, ["score", str(gt), str(gt)]), str(gt), *words)


def test_a_malformed_yaml_config_is_one_line_naming_the_file_and_line(tmp_path, synthetic_small):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  family: plain\n  width: [4\n  depth: 2\n")
    result = runner.invoke(app, ["train", "--config", str(config), "--data", str(synthetic_small),
                                 "--out", str(tmp_path / "run")])
    assert_one_line_refusal(result, str(config), "not valid YAML at line 4", "flow sequence that starts on line 3")
    assert not (tmp_path / "run").exists()


def test_an_unknown_strategy_option_is_refused_before_the_run_folder(tmp_path, synthetic_small):
    result = runner.invoke(app, ["train", "--data", str(synthetic_small), "--out", str(tmp_path / "runs" / "run"),
                                 "--strategy", "nonsense", "model.family=plain", "model.width=4", "model.depth=2",
                                 "data.crop_size=32"])
    assert_one_line_refusal(result, "train.strategy='nonsense' (--strategy)")
    assert not (tmp_path / "runs").exists()


def test_tune_with_a_missing_dataset_or_text_bounds_is_one_line_and_writes_nothing(tmp_path):
    pytest.importorskip("optuna")
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    out = tmp_path / "search"
    result = runner.invoke(app, ["tune", "--space", str(space), "--data", str(tmp_path / "missing"), "--out", str(out),
                                 "--trials", "1"])
    assert_one_line_refusal(result, str(tmp_path / "missing"))
    assert not out.exists()  # no optuna.db
    space.write_text("train.lr: {low: small, high: 1.0e-2}\n")
    result = runner.invoke(app, ["tune", "--space", str(space), "--out", str(out)])
    assert_one_line_refusal(result, str(space), "train.lr.low must be a finite number", "'small'")
    assert not out.exists()


# --- a full disk: one line, exit 2, nothing partial left -------------------------------------------------------------


@pytest.fixture
def full_disk(monkeypatch):
    """A switch that makes the disk full from then on: Path.write_text makes the file and fails
    with ENOSPC, as on a full disk.
    """

    def write_text(self, *args, **kwargs):
        self.open("w").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    return lambda: monkeypatch.setattr(Path, "write_text", write_text)


def test_training_on_a_full_disk_is_one_line_and_leaves_no_run_folder(tmp_path, synthetic_small, full_disk):
    full_disk()
    result = runner.invoke(app, ["train", "--data", str(synthetic_small), "--out", str(tmp_path / "runs" / "run"),
                                 "model.family=plain", "model.width=4", "model.depth=2", "data.crop_size=32",
                                 "train.loggers=[csv]"])
    assert_one_line_refusal(result, str(tmp_path / "runs" / "run" / "config.yaml"), "No space left on device")
    assert not (tmp_path / "runs").exists()  # no empty config.yaml: the folder this call made is gone


def test_export_gt_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, full_disk):
    root = tiny_dataset_with_cells(tmp_path)
    out = tmp_path / "out"
    full_disk()
    result = runner.invoke(app, ["export-gt", "--data", str(root), "--out", str(out / "gt.json")])
    assert_one_line_refusal(result, str(out / "gt.json"), "No space left on device")
    assert list(out.iterdir()) == []  # no empty gt.json, no partial file


def test_challenge_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, predict_setup, synthetic_small, full_disk):
    from equiseg.data.ocelot import OcelotFolder, write_grand_challenge

    gc = write_grand_challenge(tmp_path / "gc", list(OcelotFolder(synthetic_small, "test")))
    out = tmp_path / "out"
    out.mkdir()
    full_disk()
    result = runner.invoke(app, ["challenge", str(gc), "--model", str(predict_setup), "--out", str(out),
                                 "--device", "cpu"])
    assert_one_line_refusal(result, str(out.resolve() / "cell_classification.json"), "No space left on device")
    assert list(out.iterdir()) == []
