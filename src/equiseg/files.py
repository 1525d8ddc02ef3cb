"""Outputs written whole or not at all, and only over what equiseg wrote.

A file is made beside its destination and moved into place when complete (`written_whole`), so a
crash never leaves half of one where a reader looks; the partial files of a killed process are
removed by the next writer of the same file. A folder a command writes into (`owned_outputs`) or
a file it writes into a user's folder (`owned_file`) is recorded in that folder's manifest,
``.equiseg-outputs.json``: a later run replaces only the files listed there, and a folder or file
that holds anything equiseg did not write is refused (with ``force``, equiseg's own files are
replaced and the others left exactly as they were). Nothing a user wrote is ever deleted or
overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

MANIFEST = ".equiseg-outputs.json"
STAGING = ".equiseg-staging-"  # + PID: a command's outputs before they move into their folder


class ForeignFileError(ValueError):
    """An output would replace, or share a folder with, files that equiseg did not write."""


class OutputError(OSError):
    """An output that cannot be written (a full disk, a read-only folder, a file where its folder
    should be); the message names it in one line.
    """


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def alive(pid: str) -> bool:
    """Whether a process with this id runs here (the partial files of a living writer are left alone)."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def remove_stale(folder: Path, pattern: str) -> list[Path]:
    """Remove what killed processes left in ``folder`` under ``pattern`` (a glob whose matches end in
    ``-PID``): files and folders of processes that no longer run. Returns them.
    """
    stale = [p for p in folder.glob(pattern) if not alive(p.name.rsplit("-", 1)[-1])]
    for path in stale:
        _remove(path)
    return stale


def _remove(path: Path) -> None:
    """Remove a file, a link or a folder with what it holds; nothing if it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def written_whole(dest: Path | str) -> Iterator[Path]:
    """A partial file ``.NAME.partial-PID`` beside ``dest`` to write, renamed over ``dest`` when the
    block completes (one atomic step on a local file system) and removed if it fails: ``dest``
    holds a whole file or what it held before. Partial files of ``dest`` that killed processes
    left are removed first.

    Raises:
        OutputError: ``dest`` cannot be written (its folder cannot be made, a full disk, no
            permission), naming it; nothing of it is left.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{dest.parent}: cannot make the folder of {dest.name} ({_reason(error)})") from error
    remove_stale(dest.parent, f".{_glob_literal(dest.name)}.partial-*")
    partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        partial.touch()  # a folder that refuses files refuses here, before the writer's work
        yield partial
        partial.replace(dest)
    except OSError as error:
        # a failed write of this file (full disk, no permission) names the file; an error of
        # anything else the block touched (an input it read) is left as it is
        if isinstance(error, OutputError) or error.filename not in (None, str(partial), str(dest)):
            raise
        raise OutputError(f"{dest}: cannot write it ({_reason(error)})") from error
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def written_whole_folder(dest: Path | str) -> Iterator[Path]:
    """`written_whole` for a folder: a staging folder ``.NAME.partial-PID`` beside ``dest`` to fill,
    renamed to ``dest`` when the block completes (one atomic step; an empty folder at ``dest`` is
    replaced) and removed if it fails, so ``dest`` only ever holds a whole folder. Staging folders
    of ``dest`` that killed processes left are removed first.

    Raises:
        FileExistsError: ``dest`` holds something when the block completes (another writer
            finished first); the staged folder is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest.parent, f".{_glob_literal(dest.name)}.partial-*")
    staging = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        try:
            os.replace(staging, dest)  # POSIX rename: replaces an empty folder, never a full one
        except OSError:
            if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
                raise
            raise FileExistsError(f"{dest} exists and is not an empty folder (written meanwhile)") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def owned(folder: Path) -> set[str]:
    """The names in ``folder`` that equiseg wrote (its manifest; empty without one)."""
    try:
        names = json.loads((folder / MANIFEST).read_text())["files"]
    except (FileNotFoundError, NotADirectoryError):
        return set()
    except (ValueError, KeyError, TypeError) as error:
        raise ForeignFileError(f"{folder / MANIFEST}: not equiseg's list of its outputs ({error})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and _plain_name(n) for n in names):
        raise ForeignFileError(f"{folder / MANIFEST}: not equiseg's list of its outputs")
    return set(names)


def foreign(folder: Path) -> list[str]:
    """The entries of ``folder`` that equiseg did not write, sorted (its staging folders excluded)."""
    if not folder.is_dir():
        return []
    ours = owned(folder) | {MANIFEST}
    return sorted(p.name for p in folder.iterdir() if p.name not in ours and not p.name.startswith(STAGING))


def check_outputs(folder: Path | str, force: bool = False) -> list[str]:
    """Refuse an output folder that `owned_outputs` would refuse, before the work that fills it;
    returns the foreign entries that ``force`` keeps.

    Raises:
        ForeignFileError: ``folder`` is a file, or holds what equiseg did not write (without ``force``).
    """
    folder = Path(folder).resolve()
    if folder.exists() and not folder.is_dir():
        raise ForeignFileError(f"{folder}: exists and is not a folder")
    others = foreign(folder)
    if others and not force:
        raise ForeignFileError(f"{folder}: holds files equiseg did not write ({_some(others)}): give a new or empty "
                               "folder, or --force to replace only equiseg's own files there")
    return others


@contextlib.contextmanager
def owned_outputs(folder: Path | str, force: bool = False) -> Iterator[Path]:
    """A staging folder for a command's outputs, which replace equiseg's earlier outputs in
    ``folder`` when the block completes.

    ``folder`` may be new, empty, or hold equiseg's own outputs (those its manifest lists); one
    holding anything else is refused with a `ForeignFileError` before any work, unless ``force``:
    then equiseg's own files there are replaced and the others kept as they are (an output whose
    name a foreign file has is still refused). Outputs of the earlier run that this run does not
    write again are removed; the manifest lists every equiseg file in the folder at every moment,
    so a run killed half way leaves files that the next run recognises. A failure leaves the
    folder's files as they were (a folder the call made is removed again).
    """
    folder = Path(folder).resolve()
    others = check_outputs(folder, force)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale(folder, f"{STAGING}*")
    staging = folder / f"{STAGING}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        _move_in(staging, folder, set(others))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made and not any(folder.iterdir()):
            folder.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def owned_file(dest: Path | str, force: bool = False) -> Iterator[Path]:
    """`written_whole` for a file a command writes into a user's folder (``--out FILE``), recorded in
    that folder's manifest. An existing ``dest`` that equiseg did not write is refused with a
    `ForeignFileError` (``force`` does not change that: a user's file is never overwritten).
    """
    dest = check_file(dest)
    with written_whole(dest) as partial:
        yield partial
        with _locked(dest.parent):  # processes writing into one folder (slides over DDP) add to one list
            _write_manifest(dest.parent, owned(dest.parent) | {dest.name})


def check_file(dest: Path | str) -> Path:
    """Refuse a file that `owned_file` would refuse, before the work that makes it; returns it resolved.

    Raises:
        ForeignFileError: ``dest`` is a folder, or a file equiseg did not write, or a file stands
            where one of its folders should be.
    """
    dest = Path(dest).resolve()
    if dest.is_dir():
        raise ForeignFileError(f"{dest}: is a folder; give the file to write")
    if dest.exists() and dest.name not in owned(dest.parent):
        raise ForeignFileError(f"{dest}: exists and equiseg did not write it; give another file name")
    lowest = next(folder for folder in dest.parents if folder.exists())
    if not lowest.is_dir():
        raise ForeignFileError(f"{lowest}: exists and is not a folder, so {dest.name} cannot be written in it")
    return dest


def _move_in(staging: Path, folder: Path, others: set[str]) -> None:
    """Move the staged outputs into ``folder`` over equiseg's earlier ones and remove those not
    written again, the manifest first widened to both and last narrowed to the new ones.
    """
    new = {p.name for p in staging.iterdir()}
    clash = sorted(new & others)
    if clash:
        raise ForeignFileError(f"{folder / clash[0]}: a file equiseg did not write has the name of one of its "
                               "outputs; move it, or choose another folder")
    before = owned(folder)
    _write_manifest(folder, before | new)
    for name in sorted(new):
        if (folder / name).is_dir() and not (folder / name).is_symlink():
            shutil.rmtree(folder / name)  # os.replace does not replace a folder that holds files
        os.replace(staging / name, folder / name)
    for name in sorted(before - new):
        _remove(folder / name)
    _write_manifest(folder, new)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (flock on the folder itself, where the system has it)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one writer at a time is the user's to ensure
        yield
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _write_manifest(folder: Path, names: set[str]) -> None:
    with written_whole(folder / MANIFEST) as partial:
        partial.write_text(json.dumps({"written_by": "equiseg", "files": sorted(names)}, indent=1) + "\n")


def _plain_name(name: str) -> bool:
    """A name of an entry of the folder itself: no separator, not ``.`` or ``..``."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _glob_literal(name: str) -> str:
    """``name`` with glob's special characters escaped."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _some(names: list[str], shown: int = 3) -> str:
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
