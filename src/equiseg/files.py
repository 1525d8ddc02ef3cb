"""Outputs written whole or not at all: a file or a folder is made beside its destination and
moved into place only when complete, so a crash never leaves half of one where a reader looks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def written_whole(dest: Path | str) -> Iterator[Path]:
    """A partial file ``.NAME.partial-PID`` beside ``dest`` to write, renamed over ``dest`` when the
    block completes (one atomic step on a local file system) and removed if it fails: ``dest``
    holds a whole file or what it held before. The one-file twin of `replaced_whole`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        yield partial
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_whole(dest: Path | str, marker: str) -> Iterator[Path]:
    """A temporary folder beside ``dest`` for a command's outputs, which becomes ``dest`` only
    when the block completes: an earlier output there is replaced whole, never mixed with the
    new one, and a failure leaves ``dest`` as it was.

    A ``dest`` that holds files but no ``marker`` (a glob naming the command's own output, such
    as ``images.txt``) belongs to someone else and is refused with a ``ValueError``.
    """
    dest = Path(dest).resolve()  # "." has no name to put a sibling beside
    if dest.is_dir() and any(dest.iterdir()) and not any(dest.glob(marker)):
        raise ValueError(f"{dest}: exists and holds other files; give a new or empty output folder")
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest}: exists and is not a folder")
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    partial.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
