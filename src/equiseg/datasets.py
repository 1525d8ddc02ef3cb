"""The dataset a run trains on: a folder, or the built-in synthetic data generated on first use.

A config names its data by ``data.root`` (a folder in the OCELOT Zenodo layout) or, without
one, by ``data.synthetic`` (the settings of the built-in generator, `equiseg.data.synthetic`).
Training, evaluation, studies and searches all find the folder through `data_root`, so a
Python user of the library gets the same fallback as the command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from equiseg.config import Config, SyntheticConfig
from equiseg.data.synthetic import generate_dataset

REQUIRE_REAL = ("this config is meant for real OCELOT data (data.require_real=true): pass --data DIR, or "
                "data.require_real=false to train on the built-in synthetic data anyway")


def cache_dir() -> Path:
    """Where generated data lives: $EQUISEG_CACHE, else ~/.cache/equiseg."""
    return Path(os.environ.get("EQUISEG_CACHE", Path.home() / ".cache" / "equiseg"))


def generate_synthetic(root: Path, spec: SyntheticConfig) -> Path:
    """The synthetic dataset ``spec`` at ``root``, generated unless a complete one is there.

    `generate_dataset` writes it beside ``root`` and renames it into place, so ``root`` only ever
    holds a whole dataset; an interrupted generation is never reused (the next one starts over),
    and of two processes generating the same dataset at once, the second to finish uses the first's.
    """
    if (root / "metadata.json").is_file():
        return root
    if root.exists():
        shutil.rmtree(root)  # an incomplete dataset that an older equiseg left, writing in place
    try:
        generate_dataset(root, {"train": spec.train, "val": spec.val, "test": spec.test}, size=spec.size,
                         seed=spec.seed, crowding=spec.crowding, rotated=spec.rotated)
    except FileExistsError:
        if not (root / "metadata.json").is_file():
            raise
    return root


def synthetic_root(spec: SyntheticConfig) -> Path:
    """The built-in synthetic dataset for ``spec`` in the cache folder, generated on first use."""
    fields: dict[str, float] = {"train": spec.train, "val": spec.val, "test": spec.test, "size": spec.size,
                                "seed": spec.seed}
    if spec.crowding:  # the sparse world keeps the cache folders it always had
        fields["crowding"] = spec.crowding
    if spec.rotated:
        fields["rotated"] = True
    key = json.dumps(fields, sort_keys=True)
    return generate_synthetic(cache_dir() / "synthetic" / hashlib.sha1(key.encode()).hexdigest()[:12], spec)


def data_root(config: Config) -> Path:
    """The dataset folder of a run: ``config.data.root`` or the built-in synthetic data."""
    return Path(config.data.root) if config.data.root else synthetic_root(config.data.synthetic)


def synthetic_record(spec: SyntheticConfig) -> str:
    """The settings of a built-in synthetic dataset on one line: ``train=16 val=4 test=4 size=512 seed=0 crowding=1``."""
    return (f"train={spec.train} val={spec.val} test={spec.test} size={spec.size} seed={spec.seed} "
            f"crowding={spec.crowding:g}" + (" rotated" if spec.rotated else ""))


def synthetic_notice(spec: SyntheticConfig) -> str:
    """The warning a training on the built-in synthetic data starts with."""
    world = "crowded" if spec.crowding == 1 else "sparse" if spec.crowding == 0 else f"crowding {spec.crowding:g}"
    world += ", crops at random angles" if spec.rotated else ""
    return (f"no data.root: training on the built-in SYNTHETIC dataset ({spec.train} train images of "
            f"{spec.size} px, seed {spec.seed}, {world}), not OCELOT; pass --data DIR for real data")
