"""``equiseg verify``: check a Zenodo-layout dataset and list every problem with its file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from equiseg.data.ocelot import (
    DatasetError,
    PairMeta,
    Split,
    checked_pair_paths,
    parse_cells,
    read_image,
    read_metadata,
    read_tissue_mask,
    rgb_conversion,
)

_KINDS = {  # file kind -> (folder under the root, suffix)
    "cell_image": ("images/{split}/cell", ".jpg"),
    "tissue_image": ("images/{split}/tissue", ".jpg"),
    "cells": ("annotations/{split}/cell", ".csv"),
    "tissue_mask": ("annotations/{split}/tissue", ".png"),
}

SPLIT_NAMES = tuple(split.value for split in Split)  # as metadata.json and the folders name them


def verify_dataset(root: Path | str, on_sample: Callable[[int, int], None] | None = None,
                   notes: list[DatasetError] | None = None) -> list[DatasetError]:
    """Every problem in the dataset at ``root``, in a stable order; an empty list means clean.

    Checks: metadata.json parses with ``sample_pairs``; every pair's subset is a known split;
    every id in the metadata has its four files and every file has an id (no missing, no
    extra); images decode fully (truncation is caught), are RGB and have the size the metadata
    implies; masks have one channel, the tissue image's size and values in {1, 2, 255}; every
    CSV line is ``x,y,class`` with integers, the class is 1 or 2 and the point lies inside the
    cell image. ``on_sample(done, total)`` reports progress.

    Images that are not 8-bit RGB are read by one documented rule
    (`read_rgb`: grey repeated, alpha dropped, 16-bit scaled by
    round(v / 257)); they are not problems, but each is appended to ``notes`` (when given) with
    what the rule does to it.
    """
    root = Path(root)
    if not root.is_dir():
        return [DatasetError(root, "no such dataset folder")]
    try:
        metadata = read_metadata(root / "metadata.json")
    except DatasetError as error:
        return [error]
    problems: list[DatasetError] = []
    for sample_id, meta in sorted(metadata.items()):
        if meta.subset not in SPLIT_NAMES:
            problems.append(DatasetError(root / "metadata.json",
                                         f"sample {sample_id}: subset {meta.subset!r} is not one of {SPLIT_NAMES}"))
    for split in SPLIT_NAMES:
        ids = {sid for sid, meta in metadata.items() if meta.subset == split}
        for folder, suffix in _KINDS.values():
            directory = root / folder.format(split=split)
            if not directory.is_dir():
                if ids:
                    problems.append(DatasetError(directory, f"missing folder ({len(ids)} {split} samples expected)"))
                continue
            for path in sorted(directory.iterdir()):
                if path.suffix != suffix or path.stem not in ids:
                    problems.append(DatasetError(path, f"extra file: no {split} sample {path.stem!r} "
                                                       f"in metadata.json" if path.suffix == suffix else
                                                       f"extra file: expected only *{suffix} here"))
    todo = sorted((meta.subset, sid) for sid, meta in metadata.items() if meta.subset in SPLIT_NAMES)
    for done, (split, sample_id) in enumerate(todo, start=1):
        problems.extend(_verify_sample(root, split, metadata[sample_id], notes))
        if on_sample is not None:
            on_sample(done, len(todo))
    return problems


def _verify_sample(root: Path, split: str, meta: PairMeta, notes: list[DatasetError] | None) -> list[DatasetError]:
    try:
        paths = checked_pair_paths(root, split, meta.sample_id)
    except DatasetError as error:
        return [error]
    problems = []
    shapes = {}  # the size the metadata implies, else the size the image has
    for kind, size in (("cell_image", meta.cell_size), ("tissue_image", meta.tissue_size)):
        expected = None if size is None else (size, size)
        try:
            shapes[kind] = read_image(paths[kind], expected).shape[:2]
            if notes is not None and (conversion := rgb_conversion(paths[kind])):
                notes.append(DatasetError(paths[kind], f"read as RGB by rule: {conversion}"))
        except DatasetError as error:
            problems.append(error)
            shapes[kind] = expected
    try:
        read_tissue_mask(paths["tissue_mask"], shapes.get("tissue_image"))
    except DatasetError as error:
        problems.append(error)
    problems.extend(parse_cells(paths["cells"], shapes.get("cell_image"))[1])
    return problems
