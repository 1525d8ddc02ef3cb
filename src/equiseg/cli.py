"""The ``equiseg`` command. Heavy imports (torch, the models) happen inside each command."""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

if TYPE_CHECKING:  # the CLI imports equiseg inside each command, for its start-up time
    from equiseg.runtime import Runtime
    from equiseg.scale import Executor

_T = TypeVar("_T")

app = typer.Typer(
    help="Rotation-equivariant U-Nets for histopathology segmentation (OCELOT 2023).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring lines join into paragraphs that wrap at the terminal's width
)


# One vocabulary in every command (docs/reference/cli.md): --model for the model a command runs,
# --tissue-model beside it, --data for a dataset folder, --out for what it writes; positional
# arguments only for what is processed. The device options below mean the same everywhere.
DeviceOption = Annotated[str, typer.Option(
    "--device", help="Where models run: auto (this machine's GPU when PyTorch sees one, else the CPU), cpu, cuda or "
                     "cuda:N.")]
BatchOption = Annotated[int, typer.Option(
    "--batch", min=1, help="Tiles of one image per forward pass (an image within one tile goes through whole).")]
OptimizeOption = Annotated[bool, typer.Option(
    "--optimize/--no-optimize", help="Run the model optimized for inference (equivariant convs expanded once, batch "
                                     "norm folded into the convs, channels-last memory; the same function to float "
                                     "rounding) or as trained, for comparison.")]
PrecisionOption = Annotated[str, typer.Option(
    "--precision", help="Inference precision: 32 (float32), bf16 or 16 (autocast). Equivariance certificates are "
                        "always measured in float32 with TF32 off.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (progress stays on "
                                                         "stderr).")]
ModelOption = Annotated[Path | None, typer.Option(
    "--model", "-m", show_default=False,
    help="The model to run: a run folder (its best checkpoint) or a .ckpt file.")]
TissueModelOption = Annotated[Path | None, typer.Option(
    "--tissue-model", show_default=False,
    help="For a cell model trained with tissue context: the tissue model (run folder or checkpoint) that gives it; "
         "default: the one its config names.")]
DataOption = Annotated[Path | None, typer.Option("--data", show_default=False,
                                                 help="A dataset folder in the OCELOT Zenodo layout.")]
ProcessesOption = Annotated[int | None, typer.Option(
    "--processes", min=1, show_default=False,
    help="Processes to spread the work over with Lightning's DDP: one per GPU (cuda), or CPU processes.")]
TileOption = Annotated[int, typer.Option(help="Tile side in px at the model's resolution; larger images go through "
                                             "in overlapping tiles.")]
OverlapOption = Annotated[int, typer.Option(help="Overlap of neighbouring tiles, px.")]
ForceOption = Annotated[bool, typer.Option(
    "--force", help="Write into an output folder that also holds files equiseg did not write: only equiseg's own "
                    "earlier outputs there are replaced (those its .equiseg-outputs.json lists); the others are kept.")]
# the spellings of equiseg 0.1, accepted until 0.3 with a one-line notice (hidden from --help)
OldModelArgument = Annotated[Path | None, typer.Argument(hidden=True, show_default=False)]
OldFolderArgument = Annotated[Path | None, typer.Argument(hidden=True, show_default=False)]
OldCellModelOption = Annotated[Path | None, typer.Option("--cell-model", hidden=True)]
OldDevicesOption = Annotated[int | None, typer.Option("--devices", hidden=True)]
ProposalsOption = Annotated[Path | None, typer.Option(
    "--proposals", show_default=False,
    help="For stage 2 of a two-stage cell model (task nuclei): the cells run whose detected cells it segments "
         "and classifies; default: its config's window.proposals.")]


def _options(*specs: tuple[str, object, object]) -> list[inspect.Parameter]:
    """Keyword-only parameters (name, default, annotated option) that a decorator adds to a command."""
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=option)
            for name, default, option in specs]


def _resolved(annotation: object, names: dict[str, Any]) -> object:
    """An annotation as the object typer reads its option from; one naming a type imported only for
    the type checker (a parameter that another decorator fills) stays as written.
    """
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, names)
    except NameError:
        return annotation


def _injects(name: str, options: list[inspect.Parameter], make: Callable[..., Any]):
    """A decorator: the command gains ``options`` (the same in every command that has them) and is
    called with ``make(**their values)`` as its parameter ``name`` (a one-line error, exit 2, when
    ``make`` refuses them).
    """

    def decorate(command):
        kept = [p.replace(annotation=_resolved(p.annotation, command.__globals__))
                for key, p in inspect.signature(command).parameters.items() if key != name]

        @functools.wraps(command)
        def with_options(*args: Any, **kwargs: Any) -> Any:
            made = make(**{option.name: kwargs.pop(option.name) for option in options})
            return command(*args, **{name: made}, **kwargs)

        with_options.__signature__ = inspect.Signature([*kept, *options])  # pyright: ignore[reportAttributeAccessIssue]
        with_options.__annotations__ = {p.name: p.annotation for p in [*kept, *options]}
        return with_options

    return decorate


def _renamed(new: _T | None, old: _T | None, old_name: str, new_name: str) -> _T | None:
    """The value of an option given under its new name, or under its 0.1 name with a notice on stderr."""
    if old is None:
        return new
    if new is not None:
        raise _fail(f"{old_name} and {new_name} name the same thing: give {new_name} only")
    typer.echo(f"note: {old_name} is now {new_name} (the old spelling is accepted until equiseg 0.3)", err=True)
    return old


def _not_into_a_package(model: Path, instead: str) -> None:
    """Refuse a command that would write into ``model`` when it is a package (`equiseg package`): its files
    are listed with their sha256, and equiseg writes nothing beside them.
    """
    from equiseg.runs import is_package

    if is_package(model):
        shown = _unzipped.get(model, model)
        raise _fail(f"{shown} is a package (equiseg package), which equiseg never writes into: {instead}")


_unzipped: dict[Path, Path] = {}  # a zipped package's unpacked folder -> the zip (`_model`)


def _unzipped_package(path: Path) -> Path:
    """``path``, or for a zipped package (``equiseg package --zip``) its files unpacked into a temporary
    folder that goes when the command ends.
    """
    from equiseg.runs import is_zipped_package, unzip_package

    if not is_zipped_package(path):
        return path
    try:
        folder = unzip_package(path)
    except (ValueError, OSError) as error:
        raise _fail(str(error)) from None
    atexit.register(shutil.rmtree, folder.parent, True)
    _unzipped[folder] = path
    return folder


def _required(value: _T | None, name: str) -> _T:
    if value is None:
        raise _fail(f"missing option {name}")
    return value


def _model(model: Path | None, old: Path | None, old_name: str = "a positional model") -> Path:
    """``--model``, or the 0.1 spelling of the command (a positional RUN or ``--cell-model``) with a notice; a
    zipped package unpacked (`_unzipped_package`).
    """
    return _unzipped_package(_required(_renamed(model, old, old_name, "--model"), "--model"))


def _emit(as_json: bool, result: dict | list) -> bool:
    """Print ``result`` as JSON when asked; returns whether it did (then print nothing else)."""
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    return as_json


def _runtime(device: str, batch: int, precision: str, optimize: bool = True):
    """The Runtime of the device options, or a one-line error (exit 2)."""
    from equiseg.runtime import Runtime

    try:
        return Runtime.of(device, batch, precision, optimize)
    except ValueError as error:
        raise _fail(str(error)) from None


# a command that runs a model gets the device options, and their Runtime as ``runtime``
_runs_a_model = _injects("runtime", _options(("device", "auto", DeviceOption), ("batch", 1, BatchOption),
                                             ("precision", "32", PrecisionOption), ("optimize", True, OptimizeOption)),
                         _runtime)


_debug = {"on": False}  # set by --debug (or EQUISEG_DEBUG=1) before a command runs


@app.callback()
def main(
    debug: Annotated[bool, typer.Option(
        "--debug", envvar="EQUISEG_DEBUG",
        help="Show the full traceback of an unexpected error (a bug) instead of one line.")] = False,
) -> None:
    """equiseg: build, train and compare rotation-equivariant U-Nets against a plain U-Net.

    Mistakes in what a command is given (a config key, a file, a device) are one line on stderr
    starting with "error:", exit status 2, and nothing written. Anything else is a bug: one line
    too, exit status 1, and `equiseg --debug COMMAND ...` shows its traceback.
    """
    _debug["on"] = debug


def run() -> None:
    """The ``equiseg`` program: `app`, with an unexpected exception turned into one line
    (exit 1) unless ``--debug`` asked for its traceback.
    """
    import sys

    try:
        app()
    except Exception as error:  # SystemExit and KeyboardInterrupt pass
        if _debug["on"]:
            raise
        typer.echo(f"error: unexpected {type(error).__name__}: {error} (a bug in equiseg or a case it does not "
                   "handle yet; `equiseg --debug ...` shows the traceback)", err=True)
        sys.exit(1)


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    depth: Annotated[int, typer.Option(help="U-Net depth (number of 2x2 poolings).")] = 4,
    size: Annotated[int, typer.Option(help="Image side for counting multiply-adds, in px.")] = 1024,
    probe_size: Annotated[int, typer.Option(help="Side of the random input used to measure equivariance error.")] = 32,
    angle_probe: Annotated[int, typer.Option(
        min=16, help="Side of the band-limited probe of the 45° and 22.5° errors (the disk compared is a quarter of "
                     "it across).")] = 128,
    seed: Annotated[int, typer.Option(help="Seed for weights and the probe input.")] = 0,
    reference_width: Annotated[int, typer.Option(
        min=1, help="Match each family's parameters to the plain U-Net of this width (64: the paper's).")] = 64,
    tissue: Annotated[Path | None, typer.Option(
        help="A real H&E image (e.g. ../shared/ocelot/gc_input/images/cell_patches/000.tif): also measure the 45° "
             "error on its smoothed centre.")] = None,
    pool: Annotated[str, typer.Option(
        help="How the U-Nets go down a level: max (2x2 max pooling) or blur (anti-aliased: a binomial low-pass at "
             "stride 2).")] = "max",
) -> None:
    """List the model families: parameters, multiply-adds, exact group, measured equivariance error.

    Rows: the pair of the paper (Liem, 2025; plain width 64, isotropic width 110), then each equivariant family
    at the width whose parameter count is closest to plain width --reference-width ("matched"). The error is max over the 8 elements g
    of D4 of max|f(T_g x) - T_g f(x)| / max|f(x)|, in eval mode with freshly initialised weights
    and a random input of probe-size px; float32 rounding leaves ~1e-6 where the model is exact.
    c8, c16 and d8 are steerable over C8, C16 and D8: exact on the pixel grid for the quarter turns
    (and flips) they hold; the 45° and 22.5° errors show how close each family gets to the other
    angles, beside the resampling floor.
    """
    from rich.console import Console

    from equiseg.evaluation.model_table import model_table

    image = None
    if tissue is not None:
        from equiseg.data.ocelot import DatasetError, read_rgb

        try:
            image = read_rgb(tissue)
        except (FileNotFoundError, OSError, ValueError, DatasetError) as error:
            raise _fail(f"{tissue}: {error}") from None
    with Console(stderr=True).status("building the models and measuring their equivariance error ..."):
        try:
            rows = model_table(depth=depth, size=size, probe_size=probe_size, seed=seed, angle_probe=angle_probe,
                               tissue=image, reference_width=reference_width, pool=pool)
        except ValueError as error:
            raise _fail(str(error)) from None
    if not _emit(as_json, rows):
        _print_models(rows, depth, size, pool, probe_size, reference_width, tissue=image is not None)


def _print_models(rows: list[dict], depth: int, size: int, pool: str, probe_size: int, reference_width: int,
                  tissue: bool) -> None:
    """The table of `equiseg models` with the notes that explain its columns."""
    header = f"{'family':<10} {'width':>5}  {'sized as':<8} {'params':>11} {'GMACs':>8}  {'exact for':<9} " \
             f"{'err own G':>9} {'err D4':>8} {'err 45°':>8} {'err 22.5°':>9}" + \
             (f" {'45° tissue':>10}" if tissue else "")
    typer.echo(f"U-Net families, depth {depth}, {pool} pooling; multiply-adds (GMACs) at {size}x{size} px")
    typer.echo(header)
    typer.echo("-" * len(header))
    for row in rows:
        own = "-" if row["error_own_group"] is None else f"{row['error_own_group']:.1e}"
        typer.echo(f"{row['family']:<10} {row['width']:>5}  {row['sized_as']:<8} {row['parameters']:>11,} "
                   f"{row['macs'] / 1e9:>8.1f}  {row['exact_group'] or '-':<9} {own:>9} {row['error_d4']:>8.1e} "
                   f"{row['error_45']:>8.1e} {row['error_22.5']:>9.1e}"
                   + (f" {row['error_45_tissue']:>10.1e}" if tissue else ""))
    typer.echo(f"paper: the widths of the paper (Liem, 2025); matched: the width whose parameter count is closest to "
               f"plain width {reference_width}.\n"
               f"err: max over g of max|f(T_g x) - T_g f(x)| / max|f(x)|, eval mode, random {probe_size}x{probe_size} "
               "input; float32 rounding gives ~1e-6 where exact.\n"
               "err 45°: ||R_-45 f(R_45 x) - f(x)|| / ||f(x) - mean|| of the logits on the central disk (a quarter of "
               "the side across) of band-limited noise, quintic-spline rotations (err 22.5°: the same at 22.5°); the "
               "identity network (resampling alone) scores "
               f"{rows[0]['floor_45']:.1e} at 45° and {rows[0]['floor_22.5']:.1e} at 22.5°"
               + (f" (on the tissue, smoothed by 1.5 px: {rows[0]['floor_45_tissue']:.1e})." if tissue else "."))


def _progress(description: str):
    """A rich progress bar on stderr, and a callback(done, total) that advances it."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True)
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command()
def synth(
    out: Annotated[Path | None, typer.Option("--out", "-o", show_default=False,
                                             help="Folder to create; must not exist or be empty.")] = None,
    old_out: OldFolderArgument = None,
    train: Annotated[int, typer.Option(help="Training pairs.")] = 8,
    val: Annotated[int, typer.Option(help="Validation pairs.")] = 4,
    test: Annotated[int, typer.Option(help="Test pairs.")] = 4,
    size: Annotated[int, typer.Option(help="Side of the cell and tissue patches in px (multiple of 32).")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same bytes.")] = 0,
    crowding: Annotated[float, typer.Option(
        min=0, max=1, help="0: the sparse world (about 14 cells per 512 px patch); 1: crowded tissue, tumour nests "
                           "of touching nuclei 50-65 px apart and dense lymphocyte clusters (about 50-400 cells per "
                           "1024 px patch).")] = 1.0,
    rotated: Annotated[bool, typer.Option(
        "--rotated", help="Make every pair a crop at a random angle: cells cut by the crop border at every "
                          "orientation, bare glass in the corners (the tissue patch turned alike).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Write a synthetic H&E-like dataset in the OCELOT 2023 Zenodo layout.

    Each pair is one generated world seen twice: the tissue patch at ~0.8 µm/px and the cell
    patch at ~0.2 µm/px, the 4x view of the block of the tissue patch given by the offsets in
    metadata.json. Tumour cells (TC) are large, irregular and dark and cluster in cancer areas;
    background cells (BC) are small round lymphocytes and elongated fibroblasts at random
    orientations. Read it back with the same reader as the real data.
    """
    from equiseg.data.synthetic import generate_dataset

    out = _required(_renamed(out, old_out, "a positional output folder", "--out"), "--out")
    counts = {"train": train, "val": val, "test": test}
    if any(n < 0 for n in counts.values()):
        raise typer.BadParameter("sample counts must be >= 0")
    progress, update = _progress("rendering pairs")
    try:
        with progress:
            generate_dataset(out, counts, size=size, seed=seed, on_sample=update, crowding=crowding, rotated=rotated)
    except (ValueError, FileExistsError) as error:
        raise _fail(str(error)) from None
    if not _emit(as_json, {"data": str(out), "pairs": counts, "size": size, "seed": seed, "crowding": crowding,
                           "rotated": rotated}):
        typer.echo(f"wrote {sum(counts.values())} pairs ({train} train, {val} val, {test} test) of {size}x{size} px "
                   f"to {out}")


@app.command()
def verify(
    data: DataOption = None,
    old_data: OldFolderArgument = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the problems and notes as JSON.")] = False,
) -> None:
    """Check a dataset and list every problem with the file (and line) that has it.

    Looks for missing and extra files, metadata ids without files, unreadable or truncated
    images, wrong sizes, CSV lines that are not 'x,y,class' with integers, points outside the
    image, unknown classes and mask values outside {1, 2, 255}. Exit status 0 only when clean.

    Images that are not 8-bit RGB are read by one rule everywhere (grey repeated into R, G
    and B; alpha dropped, not blended; 16-bit scaled by round(v / 257)): each such image is
    listed as a note ("note: FILE: read as RGB by rule: ..."), which does not make the dataset
    unclean.
    """
    from equiseg.data.verify import verify_dataset

    data = _required(_renamed(data, old_data, "a positional dataset folder", "--data"), "--data")
    progress, update = _progress("checking pairs")
    notes: list = []
    with progress:
        problems = verify_dataset(data, on_sample=update, notes=notes)
    if as_json:
        typer.echo(json.dumps([{"path": str(p.path), "line": p.line, "message": p.message, "kind": kind}
                               for kind, found in (("problem", problems), ("note", notes)) for p in found],
                              indent=2))
    else:
        for problem in problems:
            typer.echo(str(problem))
        for note in notes:
            typer.echo(f"note: {note}")
        noted = f" ({len(notes)} image(s) converted, see the notes)" if notes else ""
        typer.echo(f"{data}: {'clean' if not problems else f'{len(problems)} problem(s)'}{noted}", err=True)
    raise typer.Exit(1 if problems else 0)


def _train_overrides(ctx: typer.Context, data: Path | None, processes: int | None, strategy: str | None,
                     resume: bool, out: Path | None, old_runs: Path | None) -> tuple[list[str], Path | None]:
    """The KEY=VALUE overrides of ``train``'s options, and the run folder of 0.1's ``--resume RUN``."""
    from equiseg.config import path_override

    if old_runs is not None:
        typer.echo("note: --runs DIR is now --out RUN_DIR, the run folder itself (the old spelling is accepted "
                   "until equiseg 0.3)", err=True)
    overrides = list(ctx.args)
    if resume and out is None and len(overrides) == 1 and "=" not in overrides[0]:
        typer.echo("note: --resume RUN is now --resume --out RUN (the old spelling is accepted until equiseg 0.3)",
                   err=True)
        return [], Path(overrides[0])
    loose = [word for word in overrides if "=" not in word]
    if loose:
        raise _fail(f"{loose[0]!r} is not an option nor a KEY=VALUE override")
    overrides += [path_override("data.root", data)] if data is not None else []
    overrides += [f"train.devices={processes}"] if processes is not None else []
    overrides += [f"train.strategy={strategy}"] if strategy is not None else []
    return overrides, out


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: Annotated[str | None, typer.Option(
        "--config", "-c", show_default=False,
        help="A run config: a preset name (see `equiseg presets`), e.g. isotropic-small, or a YAML file.")] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", show_default=False,
        help="Dataset folder (Zenodo layout); default: the config's, else the built-in synthetic data.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False,
        help="The run folder to create (default: runs/NAME-DATE); with --resume, the run to continue.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the interrupted run in --out from its last checkpoint, with its stored "
                         "config.")] = False,
    processes: ProcessesOption = None,
    strategy: Annotated[str | None, typer.Option(help="Lightning strategy, e.g. ddp (overrides train.strategy).")
                        ] = None,
    as_json: JsonOption = False,
    old_runs: Annotated[Path | None, typer.Option("--runs", hidden=True)] = None,
    old_devices: OldDevicesOption = None,
) -> None:
    """Train a U-Net. Extra arguments KEY=VALUE override the config, e.g. train.epochs=5 model.family=p4m.

    The run folder gets config.yaml, checkpoints/best.ckpt (lowest val/loss) and last.ckpt, metrics.csv
    and TensorBoard events (tensorboard --logdir runs). A tissue model: task=tissue (e.g. -c tissue-small).
    A cell model with tissue context: data.context=model data.tissue_model=TISSUE_RUN (or data.context=truth).
    Without a dataset (--data or data.root) it trains on the built-in synthetic data and says
    so; the *-paper presets refuse that unless data.require_real=false.
    On a GPU: train.precision=bf16-mixed for mixed precision, train.compile=reduce-overhead to
    run the U-Net through torch.compile with CUDA graphs (modes: none, default, reduce-overhead,
    max-autotune; the first steps compile).
    """
    from equiseg.config import ConfigError
    from equiseg.data.ocelot import DatasetError
    from equiseg.presets import load_config
    from equiseg.runs import Run
    from equiseg.training.fit import fit

    processes = _renamed(processes, old_devices, "--devices", "--processes")
    overrides, out = _train_overrides(ctx, data, processes, strategy, resume, out, old_runs)
    try:
        if resume:
            if out is None:
                raise _fail("--resume continues the run in --out: give --out RUN_DIR")
            if overrides or config is not None:
                raise _fail("--resume continues a run with its stored config: give no --config or overrides")
            run_dir = fit(None, resume=out)
        else:
            run_dir = fit(load_config(config, overrides), runs=old_runs or "runs", run_dir=out)
    except (ConfigError, DatasetError, ValueError, OSError) as error:  # OSError: a folder or file it cannot write
        raise _fail(str(error)) from None
    synthetic = Run(run_dir).synthetic()
    if _emit(as_json, {"run": str(run_dir), "synthetic": synthetic}):
        return
    typer.echo(f"run folder: {run_dir}")
    if synthetic is not None:
        typer.echo(f"trained on synthetic data ({synthetic}), not OCELOT: pass --data DIR to train on real data")


@app.command()
def presets(as_json: JsonOption = False) -> None:
    """List the packaged presets (for -c of train, study and tune) with their one-line descriptions."""
    from equiseg.presets import list_presets

    found = list_presets()
    if _emit(as_json, [{"name": p.name, "description": p.description, "path": str(p.path)} for p in found]):
        return
    width = max(len(p.name) for p in found)
    for preset in found:
        typer.echo(f"{preset.name:<{width}}  {preset.description}")


@app.command()
@_runs_a_model
def evaluate(
    model: ModelOption = None,
    old_model: OldModelArgument = None,
    data: Annotated[Path | None, typer.Option(
        "--data", show_default=False, help="Dataset folder; default: the one the run trained on.")] = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    out: Annotated[Path | None, typer.Option("--out", "-o", show_default=False,
                                             help="Output folder; default: RUN/eval-SPLIT.")] = None,
    tissue_model: TissueModelOption = None,
    oracle_context: Annotated[bool, typer.Option(
        help="For a cell model with tissue context: feed it the ground-truth tissue mask instead (an upper bound; "
             "the output says oracle).")] = False,
    proposals: ProposalsOption = None,
    force: ForceOption = False,
    runtime: Runtime | None = None,  # from the device options (_runs_a_model)
    as_json: JsonOption = False,
) -> None:
    """Score a trained model on a split: loss, Dice, IoU, mIoU and the OCELOT detection score (mF1).

    A two-stage cell model (its stage 2, with --proposals naming stage 1) is scored as instances on a
    dataset with instance labels: panoptic quality per class and averaged (PQ, matching at IoU > 0.5),
    AJI, and the mF1 of the instances' centroids.

    A cell model trained with tissue context gets the tissue model's probabilities (as in the
    challenge), or the ground-truth mask with --oracle-context (labelled oracle in the table and
    the JSON); one trained with data.context=truth and no tissue model needs one of the two.
    mF1 follows today's official scorer (descending probability). Writes scores-SPLIT.json and
    cell_classification.json (the official prediction format, image_i = i-th sample id of the
    split in sorted order) and prints a table.
    """
    from equiseg.data.ocelot import DatasetError
    from equiseg.evaluation.evaluate import evaluate_run, write_evaluation
    from equiseg.files import check_outputs
    from equiseg.runs import Run

    model = _model(model, old_model)
    if out is None:
        _not_into_a_package(model, "give --out for the evaluation's files")
    try:
        check_outputs(out or Run.of(model).eval_dir(split), force)
        progress, update = _progress(f"evaluating on {split} ({runtime})")
        with progress:
            result, cfg = evaluate_run(model, split, data=data, tissue_model=tissue_model,
                                       oracle_context=oracle_context, runtime=runtime, on_image=update,
                                       proposals=proposals)
        paths = write_evaluation(result, out or Run.of(model).eval_dir(split), split, force)
    except (DatasetError, FileNotFoundError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    if _emit(as_json, {"model": str(model), "name": cfg.name, "family": cfg.model.family.value,
                       "width": cfg.model.width, "split": split, "images": len(result.ids),
                       "context": result.context.value, "scores": result.scores,
                       "files": {key: str(path) for key, path in paths.items()}}):
        return
    typer.echo(f"{cfg.name} ({cfg.model.family.value}, width {cfg.model.width}) on {split}: {len(result.ids)} images")
    _echo_scores(result, split)
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@app.command("tune-detect")
@_runs_a_model
def tune_detect(
    model: ModelOption = None,
    old_model: OldModelArgument = None,
    split: Annotated[str, typer.Option(help="The split to tune on (never the test split you report).")] = "val",
    data: Annotated[Path | None, typer.Option(
        "--data", help="The dataset to tune on (OCELOT layout); default: the one the model trained on.",
        show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Where the two files go; default: the run folder (needed for a package).",
        show_default=False)] = None,
    runtime: Runtime | None = None,  # from the device options (_runs_a_model)
    as_json: JsonOption = False,
) -> None:
    """Choose a cell model's detection settings (detect.peaks, sigma, min_distance, threshold) on the validation split.

    Runs the model once over the split, keeps its probability maps and scores a grid of 210
    settings on them by the OCELOT rules (no retraining). The best by mF1 goes into
    RUN/detect.yaml, which every later evaluate, predict, challenge and study of the run uses;
    RUN/detect-tuning.csv lists all settings with their scores. A package (equiseg package) is
    never written into: tune it with --out DIR, which gets both files (to use the settings, copy
    detect.yaml into the run folder the package came from and package it again).
    """
    from dataclasses import asdict

    from equiseg.data.ocelot import DatasetError
    from equiseg.evaluation.tune_detect import DETECT_FILE, TUNING_FILE, tune_detection
    from equiseg.runs import Run

    model = _model(model, old_model)
    try:
        progress, update = _progress(f"probability maps of {split} ({runtime})")
        with progress:
            chosen, rows = tune_detection(model, split, runtime, on_image=update, data=data, out=out)
    except (DatasetError, FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    folder = Run.of(model).path if out is None else out
    if _emit(as_json, {"model": str(model), "split": split, "chosen": asdict(chosen),
                       "best_mf1": max(row["mf1"] for row in rows), "settings_tried": len(rows),
                       "files": {"detect": str(folder / DETECT_FILE), "tuning": str(folder / TUNING_FILE)}}):
        return
    ranked = sorted(rows, key=lambda row: -row["mf1"])[:5]
    typer.echo(f"{'peaks':<10} {'sigma':>5} {'min_dist':>8} {'thresh':>6} {'mF1':>7} {'prec':>6} {'recall':>6}")
    for row in ranked:
        typer.echo(f"{row['peaks']:<10} {row['sigma']:>5g} {row['min_distance']:>8} {row['threshold']:>6g} "
                   f"{row['mf1']:>7.4f} {row['precision']:>6.3f} {row['recall']:>6.3f}")
    typer.echo(f"chosen: detect.peaks={chosen.peaks} detect.sigma={chosen.sigma:g} "
               f"detect.min_distance={chosen.min_distance} detect.threshold={chosen.threshold:g}")
    typer.echo(f"wrote {folder / DETECT_FILE} and {folder / TUNING_FILE}")


@app.command("export")
def export_(
    model: ModelOption = None,
    old_model: OldModelArgument = None,
    format: Annotated[str, typer.Option("--format", help="onnx, torchscript or pt2.")] = "onnx",
    out: Annotated[Path, typer.Option("--out", "-o", help="The file to write.")] = Path("model.onnx"),
    as_json: JsonOption = False,
) -> None:
    """Write a trained model as one standard file that runs without equiseg.

    The file holds the model optimized for inference (equivariant convs expanded, batch norm
    folded). Input "image": float32 (N, C, H, W), H and W multiples of 2**depth, RGB as
    uint8 / 255 (plus 2 tissue-context channels for context models); output "logits"
    (N, classes, H, W). The same description travels in the file (ONNX metadata, or the
    extra file equiseg.json). onnx needs the export extra: pip install 'equiseg[export]'.
    """
    from equiseg.export import ExportFormat, export_model

    model = _model(model, old_model)
    try:
        fmt = ExportFormat(format)
    except ValueError:
        raise _fail(f"--format {format!r}: use onnx, torchscript or pt2") from None
    try:
        path = export_model(model, fmt, out)
    except (ValueError, OSError) as error:
        raise _fail(str(error)) from None
    if _emit(as_json, {"model": str(model), "format": fmt.value, "file": str(path)}):
        return
    typer.echo(f"wrote {path}")
    if fmt is ExportFormat.ONNX:
        typer.echo("run it without equiseg:\n"
                   "  import onnxruntime, numpy as np\n"
                   f"  session = onnxruntime.InferenceSession('{path}')\n"
                   "  logits = session.run(None, {'image': rgb[None].transpose(0, 3, 1, 2).astype(np.float32) / 255})[0]")


@app.command("package")
def package(
    model: ModelOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="The package folder to write.")] = Path("package"),
    as_zip: Annotated[bool, typer.Option("--zip", help="Also write OUT.zip beside the folder.")] = False,
    hub_folder: Annotated[bool, typer.Option(
        "--hub-folder", help="Also lay the folder out as a Hugging Face Hub model repository (.gitattributes "
                             "for Git LFS, config.json), ready to push; nothing is pushed.")] = False,
    proposals: ProposalsOption = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Write a trained cells model as a package that other tools load without equiseg.

    One folder: the weights (safetensors) and config; probabilities.pt (TorchScript: a uint8 RGB tile
    in, probabilities out); cells.pt (TorchScript with the run's detection inside: probabilities and
    cells x, y, class, probability out; only torch needed to run it); cells.onnx (the same for onnxruntime,
    neither torch nor equiseg needed); rdf.yaml (a BioImage Model Zoo
    description, format 0.5, with test tensors and a sha256 for every file); README.md (a model card
    with Hugging Face front matter); equiseg.json (resolution, classes, halo, the group the model is exact
    for and its measured equivariance). Needs the package extra: pip install 'equiseg[package]'.
    Every command that runs a model takes the folder or the zip as --model. A two-stage cell model
    (--model its stage 2, --proposals its stage 1) is packaged whole: cells.pt and cells.onnx hold both
    stages; an instance model's (one-stage or two-stage) also give the instance label image and each
    cell's outline; probabilities.pt is stage 1's.
    """
    from equiseg.package import package_run

    model = _required(model, "--model")
    try:
        path = package_run(model, out, as_zip=as_zip, force=force, hub=hub_folder, proposals=proposals)
    except ImportError as error:
        raise _fail(f"{error.name or error}: install the package extra: pip install 'equiseg[package]'") from None
    except (ValueError, OSError) as error:
        raise _fail(str(error)) from None
    if _emit(as_json, {"model": str(model), "package": str(path)}):
        return
    described = json.loads((Path(out) / "equiseg.json").read_text())
    context = described.get("tissue_context") is not None
    outputs = "probabilities, cells, labels, outlines" if described.get("instances") else "probabilities, cells"
    extra = ", 'context': context" if context else ""
    typer.echo(f"wrote {path}\nrun it without equiseg:\n"
               "  import torch\n"
               f"  model = torch.jit.load('{Path(out) / 'cells.pt'}')\n"
               f"  {outputs} = model(tile{', context' if context else ''})  # tile: (1, 3, H, W) uint8 RGB"
               + ("; context: (1, 2, H, W) float32 tissue probabilities\n" if context else "\n")
               + "or with onnxruntime alone:\n"
               "  import onnxruntime\n"
               f"  session = onnxruntime.InferenceSession('{Path(out) / 'cells.onnx'}')\n"
               f"  {outputs} = session.run(None, {{'image': tile{extra}}})  # numpy arrays, the same")


def _echo_scores(result, split: str) -> None:
    """The table of an `Evaluation`, with where its context came from and why the official points
    file was skipped, if it was.
    """
    from equiseg.evaluation.evaluate import SCORE_ROWS

    if result.context_line:
        typer.echo(f"  {result.context_line}")
    for key, label in SCORE_ROWS:
        if key in result.scores:
            typer.echo(f"  {label:<16} {result.scores[key]:.4f}" if key != "mf1" else
                       f"  {label:<16} {round(result.scores[key], 5)} (official rule: 4-decimal F1s averaged)")
    if result.json_refusal():
        typer.echo(f"  {result.json_refusal()}; the cells are in cells-{split}.csv")


@app.command()
def score(
    pred: Annotated[Path, typer.Argument(help="Predictions: cell_classification.json (official format).")],
    gt: Annotated[Path, typer.Argument(help="Ground truth in the same format, with num_images.")],
    order: Annotated[str, typer.Option(
        help="'official': predictions take ground truth in descending probability, as the challenge's scorer does "
             "since 2023-07-28; 'pre-july-2023': in file order, as it did before (for comparing old figures).")
    ] = "official",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (rounded and unrounded scores).")] = False,
) -> None:
    """Score a prediction file against a ground-truth file by the OCELOT 2023 rules (mF1, 15 px).

    Reproduces the official scorer (lunit-io/ocelot23algo, evaluation/eval.py, commit fb1f722):
    precision, recall and F1 per class rounded to 4 decimals, mF1 the mean of the two rounded F1.
    """
    from equiseg.detection import (
        MatchOrder,
        PointsFormatError,
        detection_scores,
        read_num_images,
        read_points_json,
    )

    try:
        match_order = MatchOrder(order)
        n = read_num_images(gt)
        scores = detection_scores(read_points_json(pred, n), read_points_json(gt, n), order=match_order)
    except (PointsFormatError, OSError, ValueError) as error:
        raise _fail(str(error)) from None
    if _emit(as_json, {"order": match_order.value, **scores}):
        return
    for name in ("BC", "TC"):
        typer.echo(f"{name}: precision {scores[f'precision/{name}']:.4f}  recall {scores[f'recall/{name}']:.4f}  "
                   f"F1 {scores[f'f1/{name}']:.4f}  (TP {scores[f'tp/{name}']}, FP {scores[f'fp/{name}']}, "
                   f"GT {scores[f'gt/{name}']})")
    rule = "" if match_order is MatchOrder.OFFICIAL else f" (order {match_order.value}, not today's official rule)"
    typer.echo(f"mF1: {scores['mf1']:.5g}{rule}")


@app.command("export-gt")
def export_gt(
    data: DataOption = None,
    old_data: OldFolderArgument = None,
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    out: Annotated[Path | None, typer.Option("--out", "-o", show_default=False,
                                             help="Output file; default: cell_gt_SPLIT.json.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Write a split's cell annotations as an official ground-truth file (with num_images)."""
    from equiseg.data.ocelot import DatasetError
    from equiseg.detection.points_json import write_ground_truth

    data = _required(_renamed(data, old_data, "a positional dataset folder", "--data"), "--data")
    try:
        path, cells = write_ground_truth(data, split, out)
    except (DatasetError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    if not _emit(as_json, {"file": str(path), "split": split, "images": len(cells),
                           "cells": sum(len(c) for c in cells)}):
        typer.echo(f"wrote {path}: {sum(len(c) for c in cells)} cells in {len(cells)} images")


@app.command()
@_runs_a_model
def predict(
    images: Annotated[list[Path], typer.Argument(help="JPEG, PNG or TIFF images of any size.", show_default=False)],
    model: ModelOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("predictions"),
    tile: TileOption = 1024,
    overlap: OverlapOption = 128,
    no_probs: Annotated[bool, typer.Option("--no-probs", help="Write no probability maps (.npy, .png).")] = False,
    proposals: ProposalsOption = None,
    force: ForceOption = False,
    runtime: Runtime | None = None,  # from the device options (_runs_a_model)
    as_json: JsonOption = False,
) -> None:
    """Predict images: probability maps (.npy and .png), an overlay, and the cells (CSV and official JSON).

    Images stream through in blocks of tiles: memory stays bounded by about one block whatever
    the image's size (plus thin overlap strips across its width), and pictures of images over
    4096 px are scaled down. The official JSON
    (image_i = the i-th image given, listed in images.txt) is written only when every image fits
    it (no side over 1024 px: its coordinates are 0..1023), else one line says why; the cells of
    any image are in its _cells.csv, never moved.

    With stage 2 of a two-stage cell model (and --proposals naming its stage 1) the cells are
    instances: each image also gets _instances.tif (the nucleus label image, label k = row k of the
    CSV), _cells.geojson (QuPath polygon detections with measurements), and its CSV the area,
    perimeter, solidity and eccentricity of each nucleus; the overlay draws the outlines.
    """
    from equiseg.inference.predict import predict_run

    if model is None and len(images) > 1:  # 0.1's `predict CHECKPOINT IMAGE...`
        model = _model(None, images[0])
        images = images[1:]
    model = _model(model, None)
    try:
        progress, update = _progress("predicting")
        with progress:
            result = predict_run(model, images, out, tile=tile, overlap=overlap, on_image=update,
                                 probs=not no_probs, runtime=runtime, force=force, proposals=proposals)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    if _emit(as_json, {"model": str(model), "out": str(out),
                       "images": [{"image": str(image.path), "cells": len(image.points)} for image in result.images],
                       "official_json": str(result.json_path) if result.json_path else None,
                       "notes": result.notes()}):
        return
    written = f" ({result.json_path.name})" if result.json_path is not None else ""
    typer.echo(f"wrote predictions for {len(images)} image(s) to {out}{written}: "
               f"{sum(result.cell_counts)} cell(s)")
    for line in result.notes():
        typer.echo(line)


@app.command("synth-slide")
def synth_slide(
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False,
        help="The slide file to write (.tif); its true cells go beside it (NAME.cells.csv), and their "
             "nucleus instance labels (NAME.instances.tif).")] = None,
    old_out: OldFolderArgument = None,
    size: Annotated[int, typer.Option(help="Side of the square slide in level-0 px (a multiple of 16, 1024 to "
                                           "131072).")] = 12000,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same bytes.")] = 0,
    crowding: Annotated[float, typer.Option(
        help="0: the sparse world; 1: crowded tissue (tumour nests of touching cells, dense lymphocytes).")] = 1.0,
    mpp: Annotated[float, typer.Option(help="Microns per level-0 pixel (default: the synthetic patches' cell "
                                            "resolution, so a model trained on `equiseg synth` data runs unresampled).")]
    = 0.2,
    as_json: JsonOption = False,
) -> None:
    """Write a synthetic whole slide: a pyramidal tiled TIFF that OpenSlide opens, with its true cells.

    One procedural world (the one `equiseg synth` draws patches from) over a tissue section
    on glass, rendered at level 0 block by block (memory stays well below the slide's size),
    lower levels 4x smaller each, microns per pixel in the resolution tags. For trying
    `equiseg slide` and for tests; NAME.cells.csv holds every nucleus centre (x, y in level-0
    px, class 1 BC / 2 TC), NAME.instances.tif their nucleus instance labels (a tiled uint32 TIFF
    of level 0's size: 0 background, k the cell of the CSV's k-th data row).
    """
    from equiseg.data.synthetic.slide import check_arguments, write_synthetic_slide

    out = _required(_renamed(out, old_out, "a positional slide file", "--out"), "--out")
    try:
        check_arguments(size, seed, crowding, mpp)
        if out.is_dir():
            raise ValueError(f"{out} is a folder; give the slide file to write")
        progress, update = _progress("rendering")
        with progress:
            slide = write_synthetic_slide(out, size=size, seed=seed, crowding=crowding, mpp=mpp, on_progress=update)
    except (ValueError, OSError) as error:
        raise _fail(str(error)) from None
    if _emit(as_json, {"slide": str(slide.path), "levels": [list(level) for level in slide.levels], "mpp": slide.mpp,
                       "cells_file": str(slide.cells_path), "cells": len(slide.cells),
                       "instances_file": str(slide.instances_path)}):
        return
    levels = ", ".join(f"{w}x{h}" for w, h in slide.levels)
    instances = slide.instances_path.name if slide.instances_path else "no instance labels"
    typer.echo(f"wrote {slide.path} (levels {levels}; {slide.mpp:g} µm/px), {slide.cells_path.name}: "
               f"{len(slide.cells)} cells, and {instances}")


SlideTissueOption = Annotated[Path | None, typer.Option(
    "--tissue-model", show_default=False,
    help="A tissue model: its cancer areas go into STEM.tissue.geojson, and a cell model trained with tissue context "
         "takes its context from it (default: the one the cell model's config names).")]
CellMppOption = Annotated[float | None, typer.Option(
    help="Run the cell model at this resolution (µm/px) instead of its training data's (recorded in its run folder).")]


def _slide_progress():
    """The progress bar of ``slide``, the callback that names its stages, and one that prints each
    finished slide.
    """
    progress, _ = _progress("slides")

    def step(stage: str, done: int, total: int) -> None:
        progress.update(progress.task_ids[0], description=f"{stage}", completed=done, total=total)

    def finished(done: int, total: int, result) -> None:
        counts = result.summary["cells"]
        progress.console.print(f"{result.slide.name}: {sum(counts.values())} cells "
                               f"({', '.join(f'{k} {v}' for k, v in counts.items())}), "
                               f"{result.summary['tissue_mm2']:.2f} mm² of tissue")

    return progress, step, finished


@app.command()
@_runs_a_model
def slide(
    slides: Annotated[list[Path], typer.Argument(help="Whole-slide images (SVS, NDPI, MRXS, SCN, tiled TIFF, ... "
                                                      "anything OpenSlide opens).", show_default=False)],
    model: ModelOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: STEM.cells.geojson, .cells.csv, "
                                      ".thumbnail.png, .summary.json (and .tissue.geojson) per slide.")] = Path("slides"),
    tissue_model: SlideTissueOption = None,
    region: Annotated[str | None, typer.Option(help="Only this box, x,y,w,h in level-0 pixels.")] = None,
    mpp: Annotated[float | None, typer.Option(help="Microns per level-0 pixel, for a slide whose file does not say "
                                                   "(or says wrong).")] = None,
    cell_mpp: CellMppOption = None,
    proposals: ProposalsOption = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the interrupted work in --out: skip slides whose outputs are complete and "
                         "continue an interrupted one from its last saved block row.")] = False,
    tile: TileOption = 1024,
    overlap: OverlapOption = 128,
    processes: ProcessesOption = None,
    nodes: Annotated[int, typer.Option(
        min=1, help="Machines for --processes (run the same command on each, with MASTER_ADDR, MASTER_PORT and "
                    "NODE_RANK set; the output folder shared).")] = 1,
    runtime: Runtime | None = None,  # from the device options (_runs_a_model)
    as_json: JsonOption = False,
    old_cell_model: OldCellModelOption = None,
    old_devices: OldDevicesOption = None,
) -> None:
    """Find and classify the cells on whole slides, as files to open in QuPath.

    Each slide is read with OpenSlide (`pip install 'equiseg[slide]'`) at the resolution the model trained
    at (resampled from the best pyramid level); glass is found on a low-resolution read and skipped; the model
    runs over the tissue in overlapping tiles, blended and read for cells as `equiseg predict` does, in memory
    bounded by a block of tiles, not by the slide. Coordinates are level-0 pixels. To review: open the slide
    in QuPath and drag STEM.cells.geojson (and STEM.tissue.geojson) onto it. A two-stage cell model (--model
    its stage 2, --proposals its stage 1) gives each cell its nucleus's outline (Polygon detections),
    measured in the CSV; a nucleus cut by a tile's edge is reported once, whole.
    """
    from equiseg.slide import check_slides, load_slide_models, parse_region

    model = _model(model, old_cell_model, "--cell-model")
    processes = _renamed(processes, old_devices, "--devices", "--processes") or 1
    assert runtime is not None  # _runs_a_model gives it
    slides = _slide_files(slides)
    try:
        box = parse_region(region) if region is not None else None
        check_slides(slides, out, resume, box, mpp, tile, overlap)
        cells, tissue = load_slide_models(model, tissue_model, runtime.device, cell_mpp, proposals)
        _note_points_only(model, cells)
        options = {"region": box, "mpp": mpp, "tile": tile, "overlap": overlap, "resume": resume}
        summaries = _analyse_slides(slides, cells, tissue, out, processes * nodes, (processes, nodes), runtime, options)
    except (FileNotFoundError, ModuleNotFoundError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    if summaries is None or _emit(as_json, {"model": str(model), "out": str(out), "slides": [
            {"slide": str(path), **summary} for path, summary in zip(slides, summaries)]}):
        return
    workers = f" with {processes * nodes} processes" if processes * nodes > 1 else ""
    typer.echo(f"wrote {len(slides)} slide(s) to {out}{workers}: {sum(sum(s['cells'].values()) for s in summaries)} "
               "cell(s)")


def _note_points_only(model: Path, cells) -> None:
    """A note on stderr where a one-stage instance model runs on slides: its cells come out as points."""
    if cells.config.data.nuclei and cells.stage2 is None:
        typer.echo(f"note: {model} is a one-stage instance model (data.nuclei): on slides its cells are points; "
                   "nuclei as outlines on slides come from a two-stage model (--model STAGE2 --proposals RUN)", err=True)


def _slide_files(slides: list[Path]) -> list[Path]:
    """``slides``, all files (else one line, exit 2), less the nucleus label images that synth-slide writes
    beside its slides (a ``*.tif`` glob picks them up), each left out with a note on stderr.
    """
    from equiseg.slide.analyse import INSTANCE_LABELS_SUFFIX

    missing = [str(p) for p in slides if not p.is_file()]
    if missing:
        raise _fail(f"no such file(s): {', '.join(missing)}")
    kept = [p for p in slides if not p.name.endswith(INSTANCE_LABELS_SUFFIX)]
    for path in slides:
        if path not in kept:
            typer.echo(f"note: left out {path.name}: the nucleus instance labels synth-slide writes beside a slide",
                       err=True)
    if not kept:
        raise _fail("no slides left: the files given are all nucleus instance labels (*.instances.tif)")
    return kept


def _analyse_slides(slides: list[Path], cells, tissue, out: Path, workers: int, layout: tuple[int, int], runtime,
                    options: dict) -> list[dict] | None:
    """Each slide's summary, analysed here with a progress bar or by DDP processes (``layout``:
    processes, nodes); None in a DDP process other than the first, which prints nothing.
    """
    from equiseg.slide import analyse_slides, analyse_slides_distributed

    if workers > 1:
        rank, _ = analyse_slides_distributed(slides, cells, out, tissue, *layout, runtime, **options)
        if rank != 0:
            return None
        summaries = [json.loads((out / f"{p.stem}.summary.json").read_text()) for p in slides]
        for path, summary in zip(slides, summaries):
            typer.echo(f"{path.name}: {sum(summary['cells'].values())} cells", err=True)
        return summaries
    progress, step, finished = _slide_progress()
    with progress:
        results = analyse_slides(slides, cells, out, tissue, on_slide=finished, runtime=runtime, progress=step,
                                 **options)
    return [result.summary for result in results]


@app.command()
@_runs_a_model
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the data, runs and report.")] = Path("demo"),
    epochs: Annotated[int | None, typer.Option(help="Override the presets' epochs (for a quicker look).")] = None,
    runtime: Runtime | None = None,  # from the device options (_runs_a_model)
    as_json: JsonOption = False,
) -> None:
    """The paper's comparison (Liem, 2025), small: synthetic data, isotropic vs plain U-Net at matched parameters.

    Trains the presets isotropic-small and plain-small (see `equiseg presets`), evaluates
    both on the test split and writes OUT/report: a results table (loss, Dice, mIoU, mF1),
    loss curves, and the best and worst test images of each model beside the ground truth.
    Finished runs in OUT/runs are reused.
    """
    from equiseg.demo import run_demo

    report = run_demo(out, epochs=epochs, say=(lambda line: typer.echo(line, err=True)) if as_json else typer.echo,
                      runtime=runtime)
    _emit(as_json, {"out": str(out), "report": str(report)})


ExecutorOption = Annotated[str, typer.Option(
    "--executor", help="Where the runs go: local (one after another in this process) or ray (Ray tasks on this "
                       "machine's cores and GPUs, or on a cluster with --address; pip install 'equiseg[scale]').")]
AddressOption = Annotated[str | None, typer.Option(
    "--address", help="A running Ray cluster: auto, or HOST:PORT (default: start one on this machine for the call).")]
CpusOption = Annotated[float, typer.Option("--cpus-per-run", help="CPUs Ray gives each run (its torch threads).")]
GpusOption = Annotated[float, typer.Option("--gpus-per-run", help="GPUs Ray gives each run (0.5: two share one).")]


def _executor(executor: str, address: str | None, cpus_per_run: float, gpus_per_run: float):
    """The executor of the --executor options, or a one-line error (exit 2)."""
    from equiseg.scale import executor as make

    try:
        return make(executor, address, cpus_per_run, gpus_per_run)
    except (ValueError, ModuleNotFoundError) as error:
        raise _fail(str(error)) from None


# a command that runs independent jobs gets the executor options, and its Executor as ``jobs``
_runs_jobs = _injects("jobs", _options(("executor", "local", ExecutorOption), ("address", None, AddressOption),
                                       ("cpus_per_run", 1.0, CpusOption), ("gpus_per_run", 0.0, GpusOption)),
                      _executor)


@app.command()
@_runs_a_model
@_runs_jobs
def study(
    config: Annotated[str, typer.Option("--config", "-c", help="A study preset (e.g. study-small; see `equiseg "
                                                               "presets`) or a study config file (YAML).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", show_default=False,
                                             help="Study folder; default: studies/NAME.")] = None,
    jobs: Executor | None = None,  # from the executor options (_runs_jobs)
    runtime: Runtime | None = None,  # from the device options (_runs_a_model)
    as_json: JsonOption = False,
) -> None:
    """Run a study: variants x training sets x seeds, then one report (HTML and Markdown).

    Every trained model is scored on the test split (loss, Dice, mIoU, mF1), against the
    study's baseline with paired bootstrap intervals, on the test images turned by every
    element of D4 and by 15, 30 and 45 degrees, for its measured equivariance error, and
    (plain variants) with D4 test-time augmentation. Finished runs and evaluations in --out
    are reused, so an interrupted study resumes where it stopped, under either executor.
    """
    from equiseg.config import ConfigError
    from equiseg.data.ocelot import DatasetError
    from equiseg.study import StudyConfig, run_study

    try:
        spec = StudyConfig.from_yaml(config)
        folder = out or Path("studies") / spec.name
        report = run_study(spec, folder, say=(lambda line: typer.echo(line, err=True)) if as_json else typer.echo,
                           runtime=runtime, executor=jobs)
    except (ConfigError, DatasetError, FileNotFoundError) as error:
        raise _fail(str(error)) from None
    if not _emit(as_json, {"study": spec.name, "out": str(folder), "report": str(report)}):
        typer.echo(f"report: {report}")


@app.command("plan")
def plan_(
    pilot: Annotated[Path, typer.Option("--pilot", help="A finished study: its results.json, or the folder that "
                                                        "holds it.", show_default=False)],
    target: Annotated[float, typer.Option("--target", min=0.001, max=1.0,
                                          help="The mF1 difference to resolve (and the half-width to reach).")] = 0.05,
    power: Annotated[float, typer.Option("--power", min=0.5, max=0.999,
                                         help="The chance to resolve a true difference of --target.")] = 0.8,
    comparisons: Annotated[int | None, typer.Option(
        "--comparisons", min=1, show_default=False,
        help="Comparisons the planned study makes (Holm corrects over them); default: the pilot's.")] = None,
    images: Annotated[list[int] | None, typer.Option(
        "--images", min=1, show_default=False,
        help="Test images to plan for (repeat the option); default: the pilot's, twice and four times.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Plan a study from a pilot: how many seeds a stated precision needs.

    Reads the pilot's paired comparisons against its baseline, takes their variance components (per
    seed and per test image: Var(difference) = σ seed² / seeds + σ image² / images, the medians over the
    comparisons) and gives, for each number of test images, the fewest seeds whose calibrated interval
    has a half-width of --target, and those that resolve a true difference of --target with --power,
    after Holm's correction over --comparisons (its strictest step).
    """
    from equiseg.report.results import ResultFormatError, StudyResult, from_json
    from equiseg.report.study_report import baseline_comparisons, plan_rows

    path = pilot / "results.json" if pilot.is_dir() else pilot
    try:
        result = from_json(StudyResult, path.read_text())
    except (OSError, ResultFormatError) as error:
        raise _fail(f"{path}: not a study's results.json ({error})") from None
    paired = baseline_comparisons(result)
    if not paired:
        raise _fail(f"{path}: the study has no baseline to compare with, so no variance of a difference to plan from")
    rows = plan_rows(result, paired, target, power, comparisons, tuple(images or ()))
    if _emit(as_json, rows):
        return
    first = rows[0]
    typer.echo(f"{result.study}: σ seed {first['sigma_seed']:.3f}, σ image {first['sigma_image']:.3f} (mF1, median over "
               f"{len(paired)} comparisons; {len(result.seeds)} seeds, {result.test_images} test images); "
               f"Holm over {first['comparisons']} comparisons")
    typer.echo(f"{'test images':>11}  {'seeds for ± ' + format(target, 'g'):>16}  {'seeds for ' + format(power, '.0%') + ' power':>18}")
    for row in rows:
        typer.echo(f"{row['test_images']:>11}  {row['seeds_for_half_width'] or '> 1000':>16}  "
                   f"{row['seeds_for_power'] or '> 1000':>18}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_runs_jobs
def tune(
    ctx: typer.Context,
    space: Annotated[Path, typer.Option(help="Search space (YAML): config keys to ranges {low, high[, log][, int]} "
                                             "or lists of choices.")],
    config: Annotated[str | None, typer.Option("--config", "-c", show_default=False,
                                               help="The base run config: a preset name or a YAML file.")] = None,
    data: Annotated[Path | None, typer.Option("--data", show_default=False,
                                              help="Dataset folder (Zenodo layout); default: the config's.")] = None,
    trials: Annotated[int, typer.Option(min=1, help="Trials to finish (a search in --out continues up to it).")] = 20,
    metric: Annotated[str, typer.Option(help="val/loss (minimised) or val/mF1 (maximised; pruning still follows "
                                             "the validation loss).")] = "val/loss",
    out: Annotated[Path | None, typer.Option("--out", "-o", show_default=False,
                                             help="Search folder; default: tune/NAME.")] = None,
    jobs: Executor | None = None,  # from the executor options (_runs_jobs)
    as_json: JsonOption = False,
) -> None:
    """Search hyper-parameters with Optuna (TPE proposals, poor trials stopped early), here or on Ray.

    Each trial trains the base config (extra KEY=VALUE arguments override it) with the values
    Optuna proposes for the keys of --space. Writes OUT/best.yaml (ready for `equiseg train
    -c`), OUT/trials.csv, OUT/history.png and OUT/importance.png. Interrupted, the same command
    continues: the local search keeps its trials in OUT/optuna.db, Ray Tune in OUT/ray.
    Needs `pip install 'equiseg[scale]'` (Ray and Optuna).
    """
    from equiseg.config import ConfigError, path_override
    from equiseg.data.ocelot import DatasetError
    from equiseg.presets import load_config
    from equiseg.scale import require
    from equiseg.tune import Metric, read_space
    from equiseg.tune import tune as run_tune

    overrides = list(ctx.args) + ([path_override("data.root", data)] if data is not None else [])
    try:
        require("optuna")
        chosen = Metric(metric) if metric in {m.value for m in Metric} else None
        if chosen is None:
            raise ValueError(f"--metric {metric!r}: use {' or '.join(m.value for m in Metric)}")
        base = load_config(config, overrides)
        result = run_tune(base, read_space(space), trials, out or Path("tune") / base.name, chosen, jobs,
                          say=(lambda line: typer.echo(line, err=True)) if as_json else typer.echo)
    except (ConfigError, DatasetError, FileNotFoundError, ModuleNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None
    if not _emit(as_json, {"best_config": str(result.best_config), "best_values": result.best_values,
                           "best_value": result.best_value, "trials": len(result.trials)}):
        typer.echo(f"best config: {result.best_config} (equiseg train -c {result.best_config})")


@app.command()
@_runs_a_model
def challenge(
    input_dir: Annotated[Path, typer.Argument(
        help="Grand Challenge input: images/{cell,tissue}_patches/*.tif, metadata.json.", show_default=False)],
    old_output: OldFolderArgument = None,
    model: ModelOption = None,
    tissue_model: TissueModelOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", show_default=False,
                                             help="Where cell_classification.json goes.")] = None,
    runtime: Runtime | None = None,  # from the device options (_runs_a_model)
    as_json: JsonOption = False,
    old_cell_model: OldCellModelOption = None,
) -> None:
    """Run a trained cell model as an OCELOT challenge algorithm on a Grand Challenge input folder.

    A cell model trained with tissue context gets the tissue model's probabilities over its
    patch's block of the tissue patch (located from metadata.json) as extra input.
    Writes cell_classification.json in the official format, image_i = pair_id i.
    """
    from equiseg.challenge import run_challenge
    from equiseg.data.ocelot import DatasetError

    model = _model(model, old_cell_model, "--cell-model")
    out = _required(_renamed(out, old_output, "a positional output folder", "--out"), "--out")
    try:
        progress, update = _progress(f"predicting pairs ({runtime})")
        with progress:
            path = run_challenge(input_dir, out, model, tissue_model, on_pair=update, runtime=runtime)
    except (DatasetError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    if not _emit(as_json, {"model": str(model), "file": str(path)}):
        typer.echo(f"wrote {path}")


if __name__ == "__main__":
    run()
