"""Tissue context channels: alignment with the known block, the dataset's crops, augmentation."""

import numpy as np
import pytest
import torch
from torch import nn

from equiseg.config import Config, ConfigError
from equiseg.data.augment import Augment, AugmentConfig
from equiseg.data.context import ContextKind, cached, truth_context
from equiseg.data.datamodule import SegmentationDataset
from equiseg.data.ocelot import OcelotFolder, Sample, pair_record, parse_pair
from equiseg.data.synthetic import generate_dataset
from equiseg.data.targets import Task, tissue_class_mask, tissue_crop
from equiseg.evaluation.tissue_context import context_fn, model_context, run_context

SIZE = 256


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("context") / "ds", {"train": 10, "val": 1, "test": 1},
                            size=SIZE, seed=11)


def integer_block(sample):
    corners = sample.meta.cell_block(sample.cell_image.shape[:2], sample.tissue_mask.shape)
    assert all(float(c).is_integer() for c in corners)  # the synthetic world's blocks are whole pixels
    return tuple(int(c) for c in corners)


def test_truth_context_is_the_known_block_repeated_four_times(world):
    for sample in OcelotFolder(world, "train"):
        x0, y0, x1, y1 = integer_block(sample)
        assert (x1 - x0, y1 - y0) == (SIZE // 4, SIZE // 4)
        labels = tissue_class_mask(sample.tissue_mask)[y0:y1, x0:x1].repeat(4, axis=0).repeat(4, axis=1)
        context = truth_context(sample).numpy()
        assert context.shape == (2, SIZE, SIZE) and context.dtype == np.float32
        for k in (0, 1):
            np.testing.assert_array_equal(context[k], (labels == k).astype(np.float32))


def test_each_cell_reads_the_tissue_pixel_that_holds_it(world):
    """Cell point (x, y) lies in tissue pixel floor(x0 + (x + 0.5) / 4), floor(y0 + (y + 0.5) / 4)."""
    checked = 0
    for sample in OcelotFolder(world, "train"):
        x0, y0, _, _ = integer_block(sample)
        context, labels = truth_context(sample), tissue_class_mask(sample.tissue_mask)
        for x, y, _ in sample.cells:
            label = labels[int(np.floor(y0 + (y + 0.5) / 4)), int(np.floor(x0 + (x + 0.5) / 4))]
            assert context[:, y, x].tolist() == [float(label == 0), float(label == 1)]
            checked += 1
    assert checked >= 20


def hand_sample(mask, offset=(0.5, 0.5), cell=16):
    """A sample with a 16 px cell patch at ``offset`` of a tissue patch with ``mask``; ratio 1/4."""
    side = mask.shape[0]
    record = pair_record("test", 0.2, 0.8, *offset, cell_size=cell, tissue_size=side)
    return Sample(np.zeros((cell, cell, 3), np.uint8), np.zeros((side, side, 3), np.uint8), np.zeros((0, 3), int),
                  mask, parse_pair("001", record))


def test_unknown_tissue_and_outside_the_patch_give_all_zero_context():
    mask = np.ones((16, 16), np.uint8)
    mask[:, 8:] = 2
    mask[6:8, 6:8] = 255
    # centre at 0.5: block [6, 10) x [6, 10); unknown at tissue [6, 8)^2 -> cell rows/cols [0, 8)
    context = truth_context(hand_sample(mask))
    assert torch.equal(context[:, :8, :8], torch.zeros(2, 8, 8))
    assert torch.equal(context[0, 8:, :8], torch.ones(8, 8)) and torch.equal(context[1, :, 8:], torch.ones(16, 8))
    # centre at x = 1/16: block x [-1, 3): the first tissue column of the block lies outside
    edge = truth_context(hand_sample(np.ones((16, 16), np.uint8), offset=(1 / 16, 0.5)))
    assert torch.equal(edge[:, :, :4], torch.zeros(2, 16, 4)) and torch.equal(edge[0, :, 4:], torch.ones(16, 12))


class MaskModel(nn.Module):
    """A 'tissue model' that knows the answer: large logits for the true classes (unknown: a tie)."""

    def __init__(self, mask):
        super().__init__()
        labels = torch.from_numpy(tissue_class_mask(mask).astype(np.int64))
        self.register_buffer("logits", torch.stack([(labels == k).float() * 30 for k in (0, 1)])[None])
        self.weight = nn.Parameter(torch.zeros(()))  # a parameter, so inference finds the device

    def forward(self, image):
        return self.logits + 0 * self.weight


def test_model_context_crops_the_tissue_models_probabilities_bilinearly(world):
    sample = OcelotFolder(world, "test")[0]
    model = MaskModel(sample.tissue_mask)
    context = model_context(model, torch.rand(3, SIZE, SIZE), sample.meta, (SIZE, SIZE))
    block = torch.tensor([sample.meta.cell_block((SIZE, SIZE), (SIZE, SIZE))])
    expected = tissue_crop(model.logits.softmax(1), block, (SIZE, SIZE), mode="bilinear")[0]
    assert torch.equal(context, expected)
    # a perfect tissue model's context has the truth's class wherever the truth knows it
    truth = truth_context(sample)
    known = truth.sum(0) > 0
    agree = (context.argmax(0) == truth.argmax(0))[known].float().mean()
    assert agree > 0.97, float(agree)


def test_context_fn_and_run_context_choose_the_source(world, tmp_path):
    sample = OcelotFolder(world, "test")[0]
    assert context_fn(ContextKind.NONE) is None and context_fn(ContextKind.TRUTH) is truth_context
    with pytest.raises(ValueError, match="tissue model"):
        context_fn(ContextKind.MODEL)
    model = MaskModel(sample.tissue_mask)
    from_model = context_fn(ContextKind.MODEL, model)
    assert torch.equal(from_model(sample), model_context(model, torch.zeros(3, SIZE, SIZE), sample.meta, (SIZE, SIZE)))
    data = Config.from_dict({"data": {"context": "truth"}}).data
    assert run_context(data) is truth_context and run_context(data, evaluation=True) is truth_context
    evaluated = run_context(data, evaluation=True, tissue_model=model)  # a tissue model replaces the oracle
    assert torch.equal(evaluated(sample), from_model(sample))
    calls = []
    once = cached(lambda s: calls.append(s.meta.sample_id) or truth_context(s))
    assert torch.equal(once(sample), once(sample)) and len(calls) == 1


def test_config_checks_context():
    assert Config.from_dict({"data": {"context": "truth"}}).in_channels == 5
    assert Config().in_channels == 3
    with pytest.raises(ConfigError, match="tissue_model"):
        Config.from_dict({"data": {"context": "model"}})
    with pytest.raises(ConfigError, match="none, truth, model"):
        Config.from_dict({"data": {"context": "oracle"}})
    with pytest.raises(ConfigError, match="cell task"):
        Config.from_dict({"task": "tissue", "data": {"context": "truth"}})


def test_dataset_cuts_the_context_with_the_image(world):
    folder = OcelotFolder(world, "train")
    dataset = SegmentationDataset(folder, Task.CELLS, crop_size=48, context=truth_context)
    whole = SegmentationDataset(folder, Task.CELLS, context=truth_context)
    for k in range(len(folder)):
        item = whole[k]
        assert item["image"].shape == (5, SIZE, SIZE)
        assert torch.equal(item["image"][3:], truth_context(folder[k]))
        torch.manual_seed(k)
        top, left = int(torch.randint(0, SIZE - 47, ())), int(torch.randint(0, SIZE - 47, ()))
        torch.manual_seed(k)
        crop = dataset[k]
        assert torch.equal(crop["image"], item["image"][:, top:top + 48, left:left + 48])
        assert torch.equal(crop["target"], item["target"][top:top + 48, left:left + 48])
    with pytest.raises(ValueError, match="cell task"):
        SegmentationDataset(folder, Task.TISSUE, context=truth_context)


@pytest.mark.parametrize("config", [
    AugmentConfig.from_dict({"dihedral": {"p": 1.0}}),
    AugmentConfig.from_dict({"dihedral": {"p": 0.0}, "rotation": {"p": 1.0, "max_degrees": 40.0},
                             "elastic": {"p": 1.0}}),
    AugmentConfig.heavy(),
], ids=["dihedral", "rotation+elastic", "heavy"])
def test_context_channels_move_with_the_image_and_skip_the_colour_steps(config):
    torch.manual_seed(0)
    colour = torch.rand(4, 3, 40, 40)
    image = torch.cat([colour, colour[:, :2]], dim=1)  # context = a copy of two colour channels
    target = torch.randint(0, 3, (4, 40, 40))
    out, masks = Augment(config)(image, {"target": target}, generator=torch.Generator().manual_seed(1))
    geometry_only = AugmentConfig.from_dict({k: v for k, v in config.to_dict().items()
                                             if k in ("dihedral", "rotation", "elastic")})
    moved, moved_masks = Augment(geometry_only)(image, {"target": target}, generator=torch.Generator().manual_seed(1))
    # the context sees exactly the geometric steps (same draws), the colours also the photometric ones
    assert torch.equal(out[:, 3:], moved[:, 3:]) and torch.equal(masks["target"], moved_masks["target"])
    assert torch.equal(moved[:, 3:], moved[:, :2])
    if config == AugmentConfig.heavy():
        assert not torch.equal(out[:, :3], moved[:, :3])
