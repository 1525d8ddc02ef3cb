"""The tissue-context model: tissue model -> crop -> cell model, exact for the pair transformed together."""

import pytest
import torch

from equiseg import build_model
from equiseg.data.targets import tissue_crop
from equiseg.evaluation.tissue_context import TissueContextNet, transform_block
from equiseg.groups import C4, D4


@pytest.mark.parametrize("g", D4.elements, ids=str)
def test_transformed_block_crops_the_transformed_content(g):
    tissue = torch.rand(1, 2, 40, 40)
    block = (8.0, 12.0, 24.0, 28.0)
    crop = tissue_crop(tissue, torch.tensor([block]), (16, 16), mode="nearest")
    moved = transform_block(block, g, 40, 40)
    crop_of_moved = tissue_crop(D4.act_on_image(g, tissue), torch.tensor([moved]), (16, 16), mode="nearest")
    assert torch.equal(crop_of_moved, D4.act_on_image(g, crop))


@pytest.mark.parametrize("cell_family, tissue_family, group",
                         [("p4m", "isotropic", D4), ("isotropic", "isotropic", D4), ("p4", "p4", C4)])
def test_combined_model_is_exactly_equivariant_end_to_end(cell_family, tissue_family, group):
    torch.manual_seed(0)
    tissue_model = build_model(tissue_family, 2, depth=2, num_classes=2)
    cell_model = build_model(cell_family, 2, depth=2, in_channels=5)
    net = TissueContextNet(tissue_model, cell_model).eval()
    cell, tissue = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    block = (16.0, 24.0, 32.0, 40.0)  # the 4x ratio: a 16 px block for a 64 px cell patch
    with torch.no_grad():
        reference = net(cell, tissue, torch.tensor([block]))
        for g in group.elements:
            moved = transform_block(block, g, 64, 64)
            out = net(group.act_on_image(g, cell), group.act_on_image(g, tissue), torch.tensor([moved]))
            error = (out - group.act_on_image(g, reference)).abs().max() / reference.abs().max()
            assert error < 1e-5, (str(g), float(error))


def test_context_changes_the_cell_prediction():
    torch.manual_seed(0)
    net = TissueContextNet(build_model("plain", 2, depth=1, num_classes=2),
                           build_model("plain", 2, depth=1, in_channels=5)).eval()
    cell = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        a = net(cell, torch.rand(1, 3, 16, 16), torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
        b = net(cell, torch.rand(1, 3, 16, 16), torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    assert not torch.allclose(a, b)
