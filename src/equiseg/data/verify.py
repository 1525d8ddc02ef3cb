"""``equiseg verify``: check a Zenodo-layout dataset and list every problem with its file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from equiseg.data.ocelot import (
    INSTANCE_SUFFIXES,
    DatasetError,
    PairMeta,
    Split,
    checked_pair_paths,
    parse_cells,
    read_image,
    read_instances,
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
    cell image; where a sample has an instance label image (``annotations/SPLIT/cell_instances/``, see
    `equiseg.data.ocelot`), it decodes, has the cell image's size, every labelled cell contains its point
    (label k the CSV's k-th row) and every point lies in its labelled cell, one problem per label or point
    (`instance_problems`); a dataset without instance files (OCELOT) gets none of these checks.
    ``on_sample(done, total)`` reports progress.

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
        problems.extend(_extra_instance_files(root / "annotations" / split / "cell_instances", ids))
    todo = sorted((meta.subset, sid) for sid, meta in metadata.items() if meta.subset in SPLIT_NAMES)
    for done, (split, sample_id) in enumerate(todo, start=1):
        problems.extend(_verify_sample(root, split, metadata[sample_id], notes))
        if on_sample is not None:
            on_sample(done, len(todo))
    return problems


def _extra_instance_files(directory: Path, ids: set[str]) -> list[DatasetError]:
    """Files of an (optional) instance folder without a sample, of another type, or a second one of a sample."""
    if not directory.is_dir():
        return []
    problems, seen = [], set()
    for path in sorted(directory.iterdir()):
        if path.suffix not in INSTANCE_SUFFIXES:
            problems.append(DatasetError(path, f"extra file: expected only {', '.join(INSTANCE_SUFFIXES)} here"))
        elif path.stem not in ids:
            problems.append(DatasetError(path, f"extra file: no sample {path.stem!r} of this split in metadata.json"))
        elif path.stem in seen:
            problems.append(DatasetError(path, "extra file: this sample has another instance label image here, "
                                               f"which is read first ({', '.join(INSTANCE_SUFFIXES)} in this order)"))
        seen.add(path.stem)
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
    cells, cell_problems = parse_cells(paths["cells"], shapes.get("cell_image"))
    problems.extend(cell_problems)
    if "cell_instances" in paths:
        try:
            labels = read_instances(paths["cell_instances"], shapes.get("cell_image"))
        except DatasetError as error:
            problems.append(error)
        else:
            if not cell_problems:  # with bad CSV lines, row k is no longer label k: those lines come first
                problems.extend(instance_problems(paths["cell_instances"], labels, cells))
    return problems


def instance_problems(path: Path, labels: np.ndarray, cells: np.ndarray) -> list[DatasetError]:
    """One problem per label without its point and per point outside its own label: label k belongs to row
    k (1-based) of ``cells`` (N, 3) rows (x, y, class), points inside ``labels`` (H, W).
    """
    problems = []
    present = np.unique(labels)
    present = present[present > 0]
    for label in present[present > len(cells)]:
        problems.append(DatasetError(path, f"label {label} has no point: the CSV has {len(cells)} cells"))
    height, width = labels.shape
    inside = (cells[:, 0] >= 0) & (cells[:, 0] < width) & (cells[:, 1] >= 0) & (cells[:, 1] < height)
    at_points = np.where(inside, labels[np.where(inside, cells[:, 1], 0), np.where(inside, cells[:, 0], 0)], -1)
    for k, ((x, y, _), found) in enumerate(zip(cells, at_points), start=1):
        if found == k:
            continue
        where = {0: "the background", -1: "outside the label image"}.get(int(found), f"label {found}")
        if k in present:
            problems.append(DatasetError(path, f"label {k} does not contain its point ({x}, {y}) (CSV row {k}), "
                                               f"which lies in {where}"))
        else:
            problems.append(DatasetError(path, f"point ({x}, {y}) (CSV row {k}) has no label {k}: it lies in {where}"))
    return problems
