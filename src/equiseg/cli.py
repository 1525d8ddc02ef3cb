"""The ``equiseg`` command. Heavy imports (torch, the models) happen inside each command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Rotation-equivariant U-Nets for histopathology segmentation (OCELOT 2023).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """equiseg: build, train and compare rotation-equivariant U-Nets against a plain U-Net."""


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    depth: Annotated[int, typer.Option(help="U-Net depth (number of 2x2 poolings).")] = 4,
    size: Annotated[int, typer.Option(help="Image side for counting multiply-adds, in px.")] = 1024,
    probe_size: Annotated[int, typer.Option(help="Side of the random input used to measure equivariance error.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed for weights and the probe input.")] = 0,
) -> None:
    """List the model families: parameters, multiply-adds, exact group, measured equivariance error.

    Rows: the seed's pair (plain width 64, isotropic width 110), then each equivariant family
    at the width whose parameter count is closest to plain width 64 ("matched"). The error is max over the 8 elements g
    of D4 of max|f(T_g x) - T_g f(x)| / max|f(x)|, in eval mode with freshly initialised weights
    and a random input of probe-size px; float32 rounding leaves ~1e-6 where the model is exact.
    """
    from equiseg.models.summary import model_table

    from rich.console import Console

    with Console(stderr=True).status("building the models and measuring their equivariance error ..."):
        rows = model_table(depth=depth, size=size, probe_size=probe_size, seed=seed)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    header = f"{'family':<10} {'width':>5}  {'sized as':<8} {'params':>11} {'GMACs':>8}  {'exact for':<9} " \
             f"{'err own G':>9} {'err D4':>8}"
    typer.echo(f"U-Net families, depth {depth}; multiply-adds (GMACs) at {size}x{size} px")
    typer.echo(header)
    typer.echo("-" * len(header))
    for row in rows:
        own = "-" if row["error_own_group"] is None else f"{row['error_own_group']:.1e}"
        typer.echo(f"{row['family']:<10} {row['width']:>5}  {row['sized_as']:<8} {row['parameters']:>11,} "
                   f"{row['macs'] / 1e9:>8.1f}  {row['exact_group'] or '-':<9} {own:>9} {row['error_d4']:>8.1e}")
    typer.echo("matched: the width whose parameter count is closest to plain width 64.\n"
               f"err: max over g of max|f(T_g x) - T_g f(x)| / max|f(x)|, eval mode, random {probe_size}x{probe_size} "
               "input; float32 rounding gives ~1e-6 where exact.")


def _progress(description: str):
    """A rich progress bar on stderr, and a callback(done, total) that advances it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=False)
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to create; must not exist or be empty.")],
    train: Annotated[int, typer.Option(help="Training pairs.")] = 8,
    val: Annotated[int, typer.Option(help="Validation pairs.")] = 4,
    test: Annotated[int, typer.Option(help="Test pairs.")] = 4,
    size: Annotated[int, typer.Option(help="Side of the cell and tissue patches in px (multiple of 32).")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same bytes.")] = 0,
) -> None:
    """Write a synthetic H&E-like dataset in the OCELOT 2023 Zenodo layout.

    Each pair is one generated world seen twice: the tissue patch at ~0.8 µm/px and the cell
    patch at ~0.2 µm/px, the 4x view of the block of the tissue patch given by the offsets in
    metadata.json. Tumour cells (TC) are large, irregular and dark and cluster in cancer areas;
    background cells (BC) are small round lymphocytes and elongated fibroblasts at random
    orientations. Read it back with the same reader as the real data.
    """
    from equiseg.data.synthetic import generate_dataset

    counts = {"train": train, "val": val, "test": test}
    if any(n < 0 for n in counts.values()):
        raise typer.BadParameter("sample counts must be >= 0")
    progress, update = _progress("rendering pairs")
    try:
        with progress:
            generate_dataset(out_dir, counts, size=size, seed=seed, on_sample=update)
    except (ValueError, FileExistsError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {sum(counts.values())} pairs ({train} train, {val} val, {test} test) of {size}x{size} px "
               f"to {out_dir}")


@app.command()
def verify(
    data_dir: Annotated[Path, typer.Argument(help="A dataset folder in the OCELOT Zenodo layout.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the problems as JSON.")] = False,
) -> None:
    """Check a dataset and list every problem with the file (and line) that has it.

    Looks for missing and extra files, metadata ids without files, unreadable or truncated
    images, wrong sizes, CSV lines that are not 'x,y,class' with integers, points outside the
    image, unknown classes and mask values outside {1, 2, 255}. Exit status 0 only when clean.
    """
    from equiseg.data.verify import verify_dataset

    progress, update = _progress("checking pairs")
    with progress:
        problems = verify_dataset(data_dir, on_sample=update)
    if as_json:
        typer.echo(json.dumps([{"path": str(p.path), "line": p.line, "message": p.message} for p in problems],
                              indent=2))
    else:
        for problem in problems:
            typer.echo(str(problem))
        typer.echo(f"{data_dir}: {'clean' if not problems else f'{len(problems)} problem(s)'}", err=True)
    raise typer.Exit(1 if problems else 0)
