"""Windows centred on cells (stage 2 of the two-stage cell model): where they are cut, what they hold
beyond the image, their targets, jitter, and the refusal of data without instance labels.
"""

import shutil

import numpy as np
import pytest
import torch

from equiseg.data.ocelot import OcelotFolder
from equiseg.data.synthetic import generate_dataset
from equiseg.data.targets import IGNORE_INDEX
from equiseg.data.windows import OUTSIDE, WindowDataset, nucleus_target, padded, window_at


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    root = tmp_path_factory.mktemp("crowded") / "ds"
    return generate_dataset(root, {"train": 2, "val": 1, "test": 1}, size=128, seed=5, crowding=1.0)


def test_a_window_is_centred_on_its_pixel_and_mirrors_beyond_the_edge():
    image = np.arange(5 * 6).reshape(5, 6)
    pad = padded(image, 3)
    window = window_at(pad, x=0, y=1, side=5, margin=3)
    assert window[2, 2] == image[1, 0]  # the centre pixel is the cell's
    # beyond the left edge the image is its mirror image without repeating the edge column
    assert window[2, 1] == image[1, 1] and window[2, 0] == image[1, 2]
    assert window[0, 2] == image[1, 0] and window[1, 2] == image[0, 0]  # row -1 is row 1
    labels = window_at(padded(image, 3, OUTSIDE), x=0, y=1, side=5, margin=3)
    assert labels[2, 0] == OUTSIDE and labels[2, 2] == image[1, 0]


def test_the_nucleus_target_marks_the_cell_and_ignores_beyond_the_image():
    labels = np.array([[OUTSIDE, 0, 3], [2, 3, 3]])
    assert nucleus_target(labels, 3).tolist() == [[IGNORE_INDEX, 0, 1], [0, 1, 1]]


def test_each_labelled_cell_is_an_item_centred_on_its_nucleus(crowded):
    folder = OcelotFolder(crowded, "train")
    dataset = WindowDataset(folder, side=17)
    cells = [folder[i].cells for i in range(len(folder))]
    assert len(dataset) == sum(len(c) for c in cells) > 3
    first = folder[0]
    for row in (0, len(cells[0]) - 1):
        item = dataset[row]
        x, y, cls = cells[0][row]
        assert item["target"][8, 8] == 1  # every point's pixel is its own nucleus's
        assert item["cell_class"] == cls - 1
        expected = torch.from_numpy(first.cell_image[y, x].astype(np.float32) / 255)
        assert torch.allclose(item["image"][:, 8, 8], expected)
        assert item["image"].shape == (3, 17, 17)


def test_jitter_is_a_function_of_the_draw_and_stays_within_bounds(crowded):
    dataset = WindowDataset(OcelotFolder(crowded, "train"), side=17, jitter=3)
    centred = WindowDataset(OcelotFolder(crowded, "train"), side=17)
    a, b = dataset[(4, 123)], dataset[(4, 123)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    assert torch.equal(dataset[4]["image"], centred[4]["image"])  # asked by bare index: no jitter
    seen = set()
    for draw in range(40):
        target = dataset[(4, draw)]["target"]
        nucleus = centred[4]["target"]
        # the jittered window is the centred one moved by (dy, dx) in [-3, 3]^2: find the shift
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                inner = nucleus[3 + dy:14 + dy, 3 + dx:14 + dx]
                if torch.equal(target[3:14, 3:14], inner):
                    seen.add((dy, dx))
                    break
    assert len(seen) > 5  # several different shifts, each a whole number of px within the jitter


def test_data_without_instance_labels_is_refused_naming_the_sample(crowded, tmp_path):
    copy = tmp_path / "points-only"
    shutil.copytree(crowded, copy)
    shutil.rmtree(copy / "annotations" / "train" / "cell_instances")
    with pytest.raises(ValueError, match=r"sample 001: no instance labels"):
        WindowDataset(OcelotFolder(copy, "train"), side=17)


def test_context_channels_are_cut_with_the_window(crowded):
    def where(sample):  # channel 0: the column, channel 1: the row (over 1000, to fit float16 well)
        h, w = sample.cell_image.shape[:2]
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        return torch.stack([cols, rows]).float() / 1000

    folder = OcelotFolder(crowded, "train")
    dataset = WindowDataset(folder, side=17, context=where)
    x, y, _ = folder[0].cells[1]
    item = dataset[1]
    assert item["image"].shape == (5, 17, 17)
    assert torch.allclose(item["image"][3:, 8, 8], torch.tensor([x, y]) / 1000, atol=1e-3)
    assert torch.allclose(item["image"][3, 8, 9] - item["image"][3, 8, 8], torch.tensor(0.001), atol=2e-4)
