"""A run folder, and the one object that knows its layout.

::

    runs/isotropic-small-20261127-101610/
      config.yaml             the resolved run config
      data.txt                the dataset folder it trained on (absolute path)
      data.sha256             what that dataset is (its files, their sizes, its labels): a run
                              whose dataset moved still counts as finished (Run.finished)
      resolution.yaml         that dataset's µm per pixel (cell and tissue patches): where equiseg slide runs the model
      synthetic.txt           only for the built-in synthetic data: its settings, then the warning given
      checkpoints/best.ckpt   lowest val/loss
      checkpoints/last.ckpt   the last finished epoch, or step (train.checkpoint_every_n_steps); resume starts here
      metrics.csv             epoch and step metrics (earlier attempts of a resumed run folded in)
      detect.yaml             detection settings chosen on the validation split (equiseg tune-detect);
                              every command that loads the run's model uses them
      detect-tuning.csv       every setting tune-detect tried, with its validation scores
      tensorboard/            TensorBoard events
      study.json              a study's evaluation of this run (a cache)
      cases.npz               a study's best and worst test image of this run, with probabilities
      eval-SPLIT/             what ``equiseg evaluate`` wrote

Training (`equiseg.training.fit.fit`) creates and fills it; every command that reads a
run (evaluate, predict, challenge, study, demo, the tissue context) goes through `Run`
and `load_model`. Checkpoints load with ``torch.load(weights_only=True)``: tensors and
builtin types only, no code runs from the file.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import pickle
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import yaml

from equiseg.config import Config, ConfigError, plain, read_yaml
from equiseg.data.ocelot import Resolution, read_metadata
from equiseg.files import written_whole


class _InRun:
    """A file or folder at a fixed place in a run folder, read as an attribute of a `Run`."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    def __get__(self, run: Run | None, owner: type) -> Path:
        return Path(*self.parts) if run is None else run.path.joinpath(*self.parts)


@dataclasses.dataclass(frozen=True)
class Run:
    """The run folder at ``path`` (see the module docstring for its layout)."""

    path: Path

    @classmethod
    def create(cls, runs: Path | str, name: str) -> Run:
        """A new, empty ``runs/<name>-<YYYYmmdd-HHMMSS>`` (a counter added when that exists).

        The folder is made here, atomically: two runs started in the same second get two folders.
        """
        stamp = time.strftime("%Y%m%d-%H%M%S")
        Path(runs).mkdir(parents=True, exist_ok=True)
        for k in range(1000):
            path = Path(runs) / (f"{name}-{stamp}" + (f"-{k}" if k else ""))
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return cls(path)
        raise FileExistsError(f"cannot find a free run folder under {runs}")

    @classmethod
    def of(cls, path: Path | str) -> Run:
        """The run of a run folder, of a checkpoint file in its ``checkpoints/``, or the package of a two-stage
        package's stage 1 (`PACKAGE_STAGE1`: the package records the resolution of both stages).
        """
        path = Path(path)
        if path.name == PACKAGE_STAGE1[0] and is_package(path.parent):
            return cls(path.parent)
        return cls(path if path.is_dir() or path.suffix != ".ckpt" else path.parent.parent)

    # the layout, one line a path (see the module docstring)
    config_file = _InRun("config.yaml")
    data_file = _InRun("data.txt")
    data_digest_file = _InRun("data.sha256")
    resolution_file = _InRun("resolution.yaml")
    synthetic_file = _InRun("synthetic.txt")
    checkpoints = _InRun("checkpoints")
    best = _InRun("checkpoints", "best.ckpt")      # lowest validation loss
    last = _InRun("checkpoints", "last.ckpt")      # the last finished epoch (or step)
    metrics = _InRun("metrics.csv")
    study_cache = _InRun("study.json")
    study_cases = _InRun("cases.npz")              # a study's best and worst test image, with probabilities
    detect_file = _InRun("detect.yaml")            # tuned detection settings, override the config's
    tuning_file = _InRun("detect-tuning.csv")

    def eval_dir(self, split: str) -> Path:
        """Where ``equiseg evaluate`` writes its output for ``split`` by default."""
        return self.path / f"eval-{split}"

    def config(self) -> Config:
        """The run's resolved config (``config.yaml``)."""
        return Config.from_yaml(self.config_file)

    def data_root(self) -> Path | None:
        """The dataset folder the run trained on, if recorded."""
        return Path(self.data_file.read_text().strip()) if self.data_file.is_file() else None

    def resolution(self) -> Resolution | None:
        """The µm per pixel of the data the run trained on: ``resolution.yaml``, or for runs made
        before it was recorded, the median of the dataset's ``metadata.json`` where that folder
        is still there; None when neither is.
        """
        if self.resolution_file.is_file():
            return Resolution(**{k: float(v) for k, v in read_yaml(self.resolution_file).items()})
        root = self.data_root()
        if root is not None and (root / "metadata.json").is_file():
            return Resolution.of(read_metadata(root / "metadata.json").values())
        return None

    def synthetic(self) -> str | None:
        """The settings of the built-in synthetic dataset the run trained on (``train=16 val=4 ...``);
        None for a run on a dataset folder.
        """
        if not self.synthetic_file.is_file():
            return None
        return self.synthetic_file.read_text().splitlines()[0].removeprefix("synthetic: ")

    def record_start(self, config: Config, root: Path, synthetic: tuple[str, str] | None = None) -> None:
        """Write what a training starts with: the config, the dataset folder and, for the built-in
        synthetic data, ``synthetic`` = (its settings on one line, the warning given).
        """
        texts = {self.config_file: yaml.safe_dump(config.to_dict(), sort_keys=False),
                 self.data_file: f"{Path(root).resolve()}\n", self.data_digest_file: f"{dataset_digest(root)}\n"}
        if (Path(root) / "metadata.json").is_file():
            resolution = Resolution.of(read_metadata(Path(root) / "metadata.json").values())
            texts[self.resolution_file] = yaml.safe_dump(resolution.to_dict(), sort_keys=False)
        if synthetic is not None:
            record, notice = synthetic
            texts[self.synthetic_file] = f"synthetic: {record}\n{notice}\n"
        for path, text in texts.items():  # each whole or not at all (a full disk leaves no empty config.yaml)
            with written_whole(path) as partial:
                partial.write_text(text)

    def resumable(self) -> Config:
        """The config to continue this run with (``config.yaml``), once ``last.ckpt`` is found to be a
        checkpoint of that config's model: a safe equiseg checkpoint (`load_model`) whose task,
        ``model`` section and tissue context are the config's.

        Raises:
            FileNotFoundError: no ``last.ckpt``.
            ValueError: ``last.ckpt`` is not a safe equiseg checkpoint, its weights do not match its
                config, or it is a checkpoint of another model (naming the first difference).
        """
        if not self.last.is_file():
            raise FileNotFoundError(f"{self.last}: no last checkpoint to resume from")
        _, trained = load_model(self.last)
        config = self.config()
        ours, theirs = _model_keys(config), _model_keys(trained)
        for key, value in theirs.items():
            if value != ours[key]:
                raise ValueError(f"{self.last}: a checkpoint of another model than the run's {self.config_file.name} "
                                 f"({key}: {value} in the checkpoint, {ours[key]} in {self.config_file.name}); "
                                 "--resume continues a run from its own last checkpoint")
        return config

    def finished(self, config: Config) -> bool:
        """Whether this folder holds a run of exactly ``config`` that trained all its epochs, or
        stopped early by its ``train.early_stopping`` rule.

        A run whose dataset folder has moved since (a study folder copied elsewhere, with its
        data inside it) is still a run of ``config`` when its ``data.root`` is the only
        difference and the dataset there is the one it trained on (`dataset_digest`).
        """
        if not self.last.is_file():
            return False
        state = torch.load(self.last, map_location="cpu", weights_only=True)
        epochs_done = state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"]
        stopped = any(key.startswith("EarlyStopping") and value.get("stopped_epoch", 0) > 0
                      for key, value in state.get("callbacks", {}).items())
        return ((epochs_done >= config.train.epochs or stopped)
                and self._same_run(Config.from_dict(state["hyper_parameters"]["config"]), config))

    def _same_run(self, trained: Config, config: Config) -> bool:
        """``trained`` (this run's config) is ``config``, up to where the same dataset now lies."""
        if trained == config:
            return True
        old, new = trained.data.root, config.data.root
        if old is None or new is None or not self.data_digest_file.is_file() or not Path(new).is_dir():
            return False
        moved = dataclasses.replace(trained, data=dataclasses.replace(trained.data, root=new))
        return moved == config and self.data_digest_file.read_text().strip() == dataset_digest(Path(new))

    def _validation(self) -> list[dict[str, str]]:
        """The rows of metrics.csv with a validation loss."""
        if not self.metrics.is_file():
            return []
        with self.metrics.open() as handle:
            return [r for r in csv.DictReader(handle) if r.get("val/loss")]

    def best_epoch(self) -> tuple[int, int] | None:
        """(the epoch of the best validation, the epochs trained), from metrics.csv; None without one. The best
        is the lowest val/loss, or the highest val/mf1 for a run whose config selects by it (``train.select``).
        """
        rows = self._validation()
        if not rows:
            return None
        by_mf1 = self.config_file.is_file() and self.config().train.select.value == "mf1" and "val/mf1" in rows[0]
        if by_mf1:
            best = max((r for r in rows if r.get("val/mf1") not in (None, "")), key=lambda r: float(r["val/mf1"]))
        else:
            best = min(rows, key=lambda r: float(r["val/loss"]))
        return int(best["epoch"]), max(int(r["epoch"]) for r in rows) + 1

    def best_validation(self) -> tuple[float, int] | None:
        """(the lowest val/loss, its epoch), from metrics.csv; None without one."""
        rows = self._validation()
        if not rows:
            return None
        best = min(rows, key=lambda r: float(r["val/loss"]))
        return float(best["val/loss"]), int(best["epoch"])


LABEL_SUFFIXES = (".csv", ".json")  # files whose bytes go into a dataset's digest (labels, metadata: small)


def dataset_digest(root: Path | str) -> str:
    """What a dataset folder holds, as a SHA-256: every file's path within it and size, and the
    bytes of its label and metadata files (``.csv``, ``.json``), in path order.

    The same after the folder is copied or moved (no absolute paths, no times); different when
    a file is added, removed or resized, or any label changes. Images are taken by size, not
    read: a changed image of the same size goes unseen, which a compressed image almost never is.
    """
    root = Path(root)
    digest = hashlib.sha256()
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    for relative, path in files:
        digest.update(f"{relative}\0{path.stat().st_size}\0".encode())
        if path.suffix.lower() in LABEL_SUFFIXES:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def load_model(checkpoint: Path | str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config]:
    """The trained U-Net (eval mode, on ``device``) and its config from a checkpoint or a run folder.

    A run folder gives its best checkpoint. A checkpoint of a run folder whose detection
    settings were tuned (``detect.yaml``, see ``equiseg tune-detect``) gets those as
    ``config.detect``. Loading uses ``torch.load(weights_only=True)``: a
    file that needs more (a pickle asking for code) or holds no equiseg config is a
    ``ValueError`` naming it, never a retry without ``weights_only``.

    Args:
        checkpoint: a run folder or a ``.ckpt`` file.
        device: where the model goes (``"cpu"``, ``"cuda"``, a ``torch.device``).
    """
    path = Path(checkpoint)
    if is_package(path):
        return _load_package(path, device)
    if path.name == PACKAGE_STAGE1[0] and is_package(path.parent):  # a two-stage package's stage 1
        return _load_package(path.parent, device, PACKAGE_STAGE1)
    if path.is_dir():
        path = Run(path).best
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        stored, weights = state["hyper_parameters"]["config"], dict(state["state_dict"])
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError, ValueError) as error:
        # a pickle that asks for code, a file that is no checkpoint, or one of another program
        raise ValueError(f"{path}: not a safe equiseg checkpoint ({type(error).__name__})") from None
    try:  # the config's own checks: a model too large to build is refused before it is built
        config = Config.from_dict(stored)
    except ConfigError as error:
        raise ValueError(f"{path}: the checkpoint's config is refused: {error}") from None
    tuned = Run.of(path).detect_file if path.parent.name == "checkpoints" else None
    if tuned is not None and tuned.is_file():
        config = Config.from_dict({**config.to_dict(), "detect": read_yaml(tuned)})
    model = config.build_model()
    prefix = "model."
    model.load_state_dict(_matching(model, {k[len(prefix):]: v for k, v in weights.items()
                                            if isinstance(k, str) and k.startswith(prefix)}, path))
    return model.to(device).eval(), config


PACKAGE_FILES = ("rdf.yaml", "equiseg.json")  # a folder holding both is a package (equiseg package)
PACKAGE_MODEL = ("config.yaml", "weights.safetensors")  # the model a package names (stage 2 of a two-stage one)
PACKAGE_STAGE1 = ("proposals.yaml", "proposals.safetensors")  # a two-stage package's stage 1: its proposals


def is_package(path: Path | str) -> bool:
    """Whether ``path`` is a folder written by ``equiseg package``."""
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in PACKAGE_FILES)


ZIPPED_PACKAGE_LIMIT = 4 << 30  # bytes: a zipped package that unpacks to more is refused (a package is MBs)


def is_zipped_package(path: Path | str) -> bool:
    """Whether ``path`` is a zip file (``equiseg package --zip``) with a package's files at its top."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return all(name in archive.namelist() for name in PACKAGE_FILES)


def unzip_package(path: Path | str) -> Path:
    """A zipped package (`is_zipped_package`) unpacked into a new folder of the system's temporary folder
    (named after the zip, under an ``equiseg-package-`` folder; the caller removes it); its path. Loading
    it checks its files (`check_package`). Nothing is written beside the zip; members are written as plain
    files, whatever links the zip describes.

    Raises:
        ValueError: a member that is not a plain file at the zip's top (a folder, ``..``, an absolute
            path), or more than `ZIPPED_PACKAGE_LIMIT` bytes unpacked; then nothing is left behind.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        for member in members:
            name = member.filename
            if member.is_dir() or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"{path}: holds {name!r}, not a file at its top: not a zip that equiseg package wrote")
        if sum(member.file_size for member in members) > ZIPPED_PACKAGE_LIMIT:
            raise ValueError(f"{path}: unpacks to more than {ZIPPED_PACKAGE_LIMIT >> 30} GiB: not an equiseg package")
        folder = Path(tempfile.mkdtemp(prefix="equiseg-package-")) / path.stem
        try:
            folder.mkdir()
            for member in members:
                with archive.open(member) as source, open(folder / member.filename, "wb") as target:
                    shutil.copyfileobj(source, target)
        except BaseException:
            shutil.rmtree(folder.parent, ignore_errors=True)
            raise
    return folder


def check_package(folder: Path | str) -> dict:
    """A package's own description (``equiseg.json``), once its ``rdf.yaml`` is found to be a BioImage
    Model Zoo model description of format 0.5 and every file that it or ``equiseg.json`` lists is there,
    inside the folder, with the sha256 they give.

    Raises:
        ValueError: another format, a file changed or listed outside the folder (one line naming the file).
        FileNotFoundError: a listed file is missing (one line naming it).
    """
    folder = Path(folder)
    rdf_path = folder / "rdf.yaml"
    try:
        rdf = yaml.safe_load(rdf_path.read_text())
        described = json.loads((folder / "equiseg.json").read_text())
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{folder}: the package's description is unreadable ({type(error).__name__})") from None
    version = str(rdf.get("format_version", "")) if isinstance(rdf, dict) else ""
    if not isinstance(rdf, dict) or rdf.get("type") != "model" or not version.startswith("0.5."):
        raise ValueError(f"{rdf_path}: not a BioImage Model Zoo model description of format 0.5 (format "
                         f"{version or 'unknown'}); equiseg reads the packages it writes")
    for name, digest in [*_rdf_files(rdf), *dict(described.get("sha256", {})).items()]:
        path = folder / str(name)
        if Path(str(name)).name != str(name):
            raise ValueError(f"{rdf_path}: lists {name!r}, which is not a file of the package's own folder")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the package (its description lists it)")
        if digest is not None and file_sha256(path) != digest:
            raise ValueError(f"{path}: not the file that was packaged (its sha256 differs from the description's)")
    return described


def _rdf_files(rdf: dict) -> list[tuple[str, str | None]]:
    """(name, sha256) of every file an rdf.yaml names with a digest: test and sample tensors, weights."""
    entries = [t.get(key) for t in (*rdf.get("inputs", []), *rdf.get("outputs", []))
               for key in ("test_tensor", "sample_tensor")]
    entries += list(dict(rdf.get("weights", {})).values())
    return [(e["source"], e.get("sha256")) for e in entries if isinstance(e, dict) and "source" in e]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_package(folder: Path, device: str | torch.device,
                  files: tuple[str, str] = PACKAGE_MODEL) -> tuple[torch.nn.Module, Config]:
    """`load_model` of a package: checked (`check_package`), its config, its safetensors weights (``files``:
    the model it names, or a two-stage package's stage 1, `PACKAGE_STAGE1`). Stage 2 of a two-stage package
    gets the package's stage 1 as its ``window.proposals``.
    """
    check_package(folder)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ValueError(f"{folder}: reading a package needs safetensors: pip install 'equiseg[package]'") from None
    config_file, weights = folder / files[0], folder / files[1]
    try:
        data = read_yaml(config_file)
        if data.get("task") == "nuclei" and (folder / PACKAGE_STAGE1[0]).is_file():
            data = {**data, "window": {**data.get("window", {}), "proposals": str(folder / PACKAGE_STAGE1[0])}}
        config = Config.from_dict(data)
    except ConfigError as error:
        raise ValueError(f"{config_file}: the package's config is refused: {error}") from None
    model = config.build_model()
    model.load_state_dict(_matching(model, load_file(str(weights)), weights))
    return model.to(device).eval(), config


def _matching(model: torch.nn.Module, weights: dict, path: Path) -> dict:
    """``weights``, once each is found to be a tensor of the shape ``model`` has under its name, and
    every one of ``model``'s is there; else a one-line ValueError naming ``path`` and the first
    name that does not match (in the model's order, then the file's).
    """
    expected = model.state_dict()
    for key, tensor in expected.items():
        given = weights.get(key)
        if given is None:
            reason = "missing in the file"
        elif not isinstance(given, torch.Tensor) or given.shape != tensor.shape:
            shape = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
            reason = f"{shape} in the file, {tuple(tensor.shape)} in the model"
        else:
            continue
        raise ValueError(f"{path}: the weights do not match the checkpoint's config (first mismatch: model.{key}: "
                         f"{reason})")
    extra = [key for key in weights if key not in expected]
    if extra:
        raise ValueError(f"{path}: the weights do not match the checkpoint's config (first mismatch: model.{extra[0]}: "
                         "in the file, not in the model)")
    return weights


def _model_keys(config: Config) -> dict[str, object]:
    """What decides which network a config trains, by config key."""
    return {"task": config.task.value, **{f"model.{key}": value for key, value in plain(config.model).items()},
            "data.context": config.data.context.value}


def save_model(model: torch.nn.Module, config: Config, path: Path | str) -> Path:
    """A checkpoint of ``model`` (built from ``config``) that `load_model` reads: the weights and
    the config, as training writes them (without the optimiser state).
    """
    path = Path(path)
    torch.save({"hyper_parameters": {"config": config.to_dict()},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def proposal_run(model: Path | str, config: Config, proposals: Path | str | None) -> Path:
    """The stage-1 run (or checkpoint) of a two-stage cell model whose stage 2 is ``model``: ``proposals``,
    else its config's ``window.proposals``; a one-line ValueError when neither names one.
    """
    source = proposals if proposals is not None else config.window.proposals
    if not source:
        raise ValueError(f"{model} is stage 2 of a two-stage cell model (task nuclei): name the cells run that "
                         "proposes its cells (--proposals RUN, or window.proposals in its config)")
    return Path(source)


def check_proposer(config: Config) -> None:
    """Refuse, in one line, a stage 1 of a two-stage cell model that is not a ``cells`` model."""
    if config.task.value != "cells":
        raise ValueError(f"the proposals must come from a cells model, not a {config.task.value} model")
