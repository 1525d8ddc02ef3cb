import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def regular_features(fields: int, group, size=(12, 12), batch=2):
    """Random folded regular features (B, fields*|G|, H, W)."""
    return torch.randn(batch, fields * group.order, *size)
