from pathlib import Path

import numpy as np
import pytest

from equiseg.data.ocelot import pair_record, write_metadata, write_pair

SHARED = Path(__file__).resolve().parents[3] / "shared" / "ocelot"


def write_tiny_dataset(root: Path, size: int = 64, per_split: dict | None = None, seed: int = 0) -> Path:
    """A hand-made Zenodo-layout folder: flat-colour images, a few cells, a half-cancer mask."""
    per_split = per_split or {"train": 2, "val": 1, "test": 1}
    rng = np.random.default_rng(seed)
    pairs, k = {}, 0
    for split, count in per_split.items():
        for _ in range(count):
            k += 1
            sid = f"{k:03d}"
            cell = np.full((size, size, 3), 200, np.uint8)
            tissue = np.full((size, size, 3), 180, np.uint8)
            mask = np.ones((size, size), np.uint8)
            mask[:, size // 2:] = 2
            mask[:2, :2] = 255
            cells = np.array([[int(rng.integers(size)), int(rng.integers(size)), 1 + int(rng.integers(2))]
                              for _ in range(3)])
            write_pair(root, split, sid, cell, tissue, cells if k != 2 else cells[:0], mask)
            pairs[sid] = pair_record(split, 0.2, 0.8, 0.5, 0.5, cell_size=size, tissue_size=size)
    write_metadata(root, pairs)
    return root


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_tiny_dataset(tmp_path / "ds")


@pytest.fixture
def real_metadata():
    path = SHARED / "metadata_v1.0.1.json"
    if not path.is_file():
        pytest.skip("the real OCELOT metadata is not in ../shared/ocelot")
    return path


@pytest.fixture
def gc_input():
    path = SHARED / "gc_input"
    if not path.is_dir():
        pytest.skip("the real Grand Challenge input is not in ../shared/ocelot")
    return path
