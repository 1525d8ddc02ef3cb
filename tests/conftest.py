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


def tiny_config(root, **sections):
    from equiseg.config import Config

    data = {"model": {"family": "plain", "width": 4, "depth": 2},
            "data": {"root": str(root), "crop_size": 32, "batch_size": 2},
            "train": {"epochs": 1, "lr": 1e-2, "loggers": ["csv"], "accelerator": "cpu"},
            "detect": {"sigma": 2.0, "min_distance": 4}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return Config.from_dict(data)
