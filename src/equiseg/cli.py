"""The ``equiseg`` command. Heavy imports (torch, the models) happen inside each command."""

from __future__ import annotations

import json
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
