import pytest
import torch

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

