import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one worker per core: torch's own threads on top would only contend for the same cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

from equiseg.data.synthetic import generate_dataset


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def regular_features(fields: int, group, size=(12, 12), batch=2):
    """Random folded regular features (B, fields*|G|, H, W)."""
    return torch.randn(batch, fields * group.order, *size)


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """A tiny synthetic dataset (64 px patches) shared by the training tests."""
    root = tmp_path_factory.mktemp("synthetic") / "ds"
    return generate_dataset(root, {"train": 4, "val": 2, "test": 2}, size=64, seed=3)

