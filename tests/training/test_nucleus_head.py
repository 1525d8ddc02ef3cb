"""One-stage instances (#28): the cell U-Net with a nucleus output (``data.nuclei``): its config, its
nucleus target, its training into a run folder that loads back as a 4-channel U-Net, the refusal of
points-only data before any output, and its exported file's card.
"""

import shutil

import numpy as np
import pytest
import torch

from equiseg.config import Config, ConfigError
from equiseg.data.datamodule import SegmentationDataset, nucleus_mask
from equiseg.data.ocelot import OcelotFolder
from equiseg.data.synthetic import generate_dataset
from equiseg.data.targets import Task
from equiseg.evaluation.equivariance import GroupTTA, certificate
from equiseg.export import model_card
from equiseg.groups import C4, D4
from equiseg.models import UNet, probabilities
from equiseg.runs import load_model
from equiseg.training.fit import fit
from equiseg.training.module import SegmentationModule
from tests_support import tiny_config


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    root = tmp_path_factory.mktemp("crowded") / "ds"
    return generate_dataset(root, {"train": 2, "val": 1, "test": 1}, size=128, seed=5, crowding=1.0)


def nuclei_config(root, **data):
    return tiny_config(root, model={"family": "p4", "width": 1}, data={"nuclei": True, **data})


def test_the_config_builds_a_four_channel_cell_unet_and_refuses_other_tasks():
    config = nuclei_config("x")
    model = config.build_model()
    assert (config.class_channels, config.out_channels) == (3, 4)
    assert isinstance(model, UNet) and (model.class_channels, model.out_channels) == (3, 4)
    plain = tiny_config("x")
    assert plain.out_channels == 3 and plain.build_model().out_channels == 3
    for task in ("tissue", "nuclei"):
        with pytest.raises(ValueError, match=f"data.nuclei is for task cells .*not task {task}$") as error:
            Config.from_dict({**config.to_dict(), "task": task})
        assert "\n" not in str(error.value)


def test_the_dataset_gives_the_nucleus_foreground_in_the_targets_crop(crowded):
    folder = OcelotFolder(crowded, "train")
    sample = folder[0]
    assert sample.instances is not None
    truth = sample.instances > 0
    whole = SegmentationDataset(folder, Task.CELLS, nuclei=True)[0]
    assert torch.equal(whole["nuclei"], torch.from_numpy(truth.astype(np.int64)))
    np.testing.assert_array_equal(nucleus_mask(sample), truth)
    cropped = SegmentationDataset(folder, Task.CELLS, crop_size=32, nuclei=True)
    without = SegmentationDataset(folder, Task.CELLS, crop_size=32)
    for draw in (3, 11):
        item, bare = cropped[(0, draw)], without[(0, draw)]
        assert "nuclei" not in bare and torch.equal(item["target"], bare["target"])  # the same crop
        image = (item["image"].permute(1, 2, 0).numpy() * 255).round()
        top, left = next((r, c) for r in range(97) for c in range(97)
                         if np.array_equal(sample.cell_image[r:r + 32, c:c + 32], image))
        assert torch.equal(item["nuclei"], torch.from_numpy(truth[top:top + 32, left:left + 32].astype(np.int64)))


def test_a_tiny_run_with_a_nucleus_output_writes_a_four_channel_unet(crowded, tmp_path):
    run_dir = fit(nuclei_config(crowded, augment="heavy"), run_dir=tmp_path / "run", progress=False)
    model, config = load_model(run_dir)
    assert config.data.nuclei and isinstance(model, UNet)
    assert (model.class_channels, model.out_channels) == (3, 4) and model.head.out_channels == 4
    metrics = (run_dir / "metrics.csv").read_text()
    assert "val/nucleus_dice" in metrics and "val/dice_mean" in metrics
    with torch.no_grad():
        probs = model.probabilities(model(torch.rand(1, 3, 32, 32)))
    torch.testing.assert_close(probs[:, :3].sum(1), torch.ones(1, 32, 32))
    card = model_card(config, run_dir)
    assert card["nucleus_channel"] == 3 and "channel 3 is a nucleus logit" in card["output"]
    assert "nucleus_channel" not in model_card(tiny_config(crowded), run_dir)


def test_points_only_data_is_refused_in_one_line_before_any_output(crowded, tmp_path):
    copy = tmp_path / "points-only"
    shutil.copytree(crowded, copy)
    shutil.rmtree(copy / "annotations" / "train" / "cell_instances")
    first = sorted(OcelotFolder(copy, "train", labels=False).ids)[0]
    with pytest.raises(ConfigError, match=r"data.nuclei trains on nucleus instance labels, and 2 train sample\(s\) "
                                          rf"have none \(the first: annotations/train/cell_instances/{first}.png\)"
                       ) as error:
        fit(nuclei_config(copy), run_dir=tmp_path / "run", progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_the_loss_adds_the_nucleus_dice_and_bce_to_the_class_loss():
    module = SegmentationModule(nuclei_config("x").to_dict())
    logits = torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    nuclei = torch.randint(0, 2, (2, 8, 8))
    nuclei[0, 0, 0] = 255  # moved out of the image by augmentation: ignored
    batch = {"target": target, "nuclei": nuclei}
    two = torch.cat([torch.zeros_like(logits[:, 3:]), logits[:, 3:]], dim=1)
    assert module.nucleus_loss is not None
    expected = module.loss(logits[:, :3], target) + module.nucleus_loss(two, nuclei)
    torch.testing.assert_close(module._loss(logits, batch), expected)
    # without data.nuclei: the class loss over all the logits, as before
    plain = SegmentationModule(tiny_config("x").to_dict())
    assert plain.nucleus_loss is None and torch.equal(plain._loss(logits[:, :3], batch), plain.loss(logits[:, :3], target))


def test_tta_and_the_certificate_read_the_nucleus_channel_as_a_sigmoid():
    torch.manual_seed(0)
    model = nuclei_config("x").build_model().eval()
    x = torch.rand(1, 3, 16, 16)
    tta = GroupTTA(model, D4)
    assert tta.class_channels == 3
    with torch.no_grad():
        averaged = probabilities(tta(x), tta.class_channels)
        by_hand = torch.stack([D4.act_on_image(D4.inverse(g), model.probabilities(model(D4.act_on_image(g, x))))
                               for g in D4.elements]).mean(0)
    torch.testing.assert_close(averaged, by_hand, rtol=0, atol=1e-5)
    assert certificate(model, [x[0]], C4, angles=())["group"] <= 1e-5  # p4: the quarter turns, nucleus too
