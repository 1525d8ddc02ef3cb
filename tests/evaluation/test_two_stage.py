"""The two-stage cell model on an image: proposals from stage 1, each cell's nucleus and class from stage 2,
pasted into one label image whose instances move with the image under the group, one class per instance.
"""

import numpy as np
import torch

from equiseg.config import Config
from equiseg.detection.instances import instance_outlines
from equiseg.groups import D4
from equiseg.inference.cell_instances import (
    instances_in_tiles,
    paste_instances,
    two_stage_instances,
    window_predictions,
)
from equiseg.models import ConvFamily
from equiseg.models.window import CellWindowNet

SIDE = 17


def configs():
    stage1 = Config.from_dict({"model": {"family": "p4m", "width": 1, "depth": 2},
                               "detect": {"sigma": 1.0, "min_distance": 4, "threshold": 0.0, "peaks": "per-class"}})
    stage2 = Config.from_dict({"task": "nuclei", "model": {"family": "p4m", "width": 1, "depth": 2},
                               "window": {"side_px": SIDE}})
    return stage1, stage2


def warm(model, x):
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def by_centre(result):
    """Each instance as (centre, class) -> its pixels, so that two results compare whatever their numbering."""
    out = {}
    for k, (x, y, cls, _) in enumerate(result.cells.tolist(), start=1):
        out[(int(x), int(y), int(cls))] = frozenset(zip(*np.nonzero(result.labels == k)))
    return out


def moved(instances, g, side):
    """The instances of ``by_centre`` moved by g (a flip of x, then quarter turns counter-clockwise as shown)."""
    grid = np.arange(side * side).reshape(side, side)
    turned = D4.act_on_image(g, torch.from_numpy(grid)).numpy()
    where = {int(v): (int(r), int(c)) for (r, c), v in np.ndenumerate(turned)}
    row_col = {(r, c): where[int(grid[r, c])] for r in range(side) for c in range(side)}
    return {(row_col[(y, x)][1], row_col[(y, x)][0], cls): frozenset(row_col[p] for p in pixels)
            for (x, y, cls), pixels in instances.items()}


def test_instances_move_with_the_image_under_the_group():
    torch.manual_seed(3)
    stage1_config, stage2_config = configs()
    image = torch.rand(3, 48, 48)
    stage1 = warm(stage1_config.build_model(), image[None])
    stage2 = warm(stage2_config.build_model(), torch.rand(4, 3, SIDE, SIDE))
    masks, _ = window_predictions(stage2, image, np.array([[24, 24]]), SIDE)
    cut = float(np.median(masks))  # a threshold that cuts through the nuclei, so their shapes count
    result = two_stage_instances(stage1, stage1_config, stage2, stage2_config, image, threshold=cut)
    reference = by_centre(result)
    sizes = sorted(len(p) for p in reference.values())
    assert len(reference) > 5 and sizes[-1] > 10 and len(set(sizes)) > 3  # cells with outlines of several sizes
    for g in D4.elements:
        turned = two_stage_instances(stage1, stage1_config, stage2, stage2_config, D4.act_on_image(g, image),
                                     threshold=cut)
        assert by_centre(turned) == moved(reference, g, 48), g


def test_a_plain_stage_two_breaks_the_symmetry_so_the_test_can_fail():
    torch.manual_seed(3)
    stage1_config, stage2_config = configs()
    stage2_config = Config.from_dict({**stage2_config.to_dict(), "model": {"family": "plain", "width": 4, "depth": 2}})
    image = torch.rand(3, 48, 48)
    stage1 = warm(stage1_config.build_model(), image[None])
    stage2 = warm(stage2_config.build_model(), torch.rand(4, 3, SIDE, SIDE))
    masks, _ = window_predictions(stage2, image, np.array([[24, 24]]), SIDE)
    cut = float(np.median(masks))  # a threshold that cuts through the nuclei, so their shapes count
    reference = by_centre(two_stage_instances(stage1, stage1_config, stage2, stage2_config, image, threshold=cut))
    g = D4.elements[1]
    turned = two_stage_instances(stage1, stage1_config, stage2, stage2_config, D4.act_on_image(g, image), threshold=cut)
    assert by_centre(turned) != moved(reference, g, 48)


def test_pasting_gives_each_pixel_to_the_most_certain_window_and_each_cell_its_centre():
    masks = np.zeros((2, 5, 5), np.float32)
    masks[0, :, :] = 0.6  # cell 1 at (2, 2): its whole window
    masks[1, :, :] = 0.8  # cell 2 at (5, 2): more certain where the windows meet
    masks[1, 2, 0] = 0.55  # ... but cell 1 at pixel (x=3, y=2) is more certain there
    labels = paste_instances(masks, np.array([[2, 2], [5, 2]]), (5, 8), classes=np.array([1, 2]),
                             scores=np.array([0.9, 0.9]))
    assert labels[2, 2] == 1 and labels[2, 5] == 2
    assert labels[2, 3] == 1  # 0.6 > 0.55
    assert labels[2, 4] == 2 and labels[0, 0] == 1 and labels[0, 7] == 2
    # equal certainty: the higher score wins; then the higher class
    equal = np.full((2, 5, 5), 0.7, np.float32)
    labels = paste_instances(equal, np.array([[2, 2], [5, 2]]), (5, 8), np.array([1, 2]), np.array([0.5, 0.9]))
    assert labels[2, 3] == 2
    labels = paste_instances(equal, np.array([[2, 2], [5, 2]]), (5, 8), np.array([2, 1]), np.array([0.9, 0.9]))
    assert labels[2, 3] == 1


def test_a_cell_below_the_threshold_still_owns_its_centre():
    masks = np.full((1, 5, 5), 0.1, np.float32)
    labels = paste_instances(masks, np.array([[1, 1]]), (4, 4), np.array([1]), np.array([0.5]))
    assert labels.sum() == 1 and labels[1, 1] == 1


def test_window_predictions_are_one_per_cell_and_sum_to_one():
    net = CellWindowNet(ConvFamily.P4, 1, depth=2).eval()
    masks, classes = window_predictions(net, torch.rand(3, 20, 30), np.array([[0, 0, 1, 0.5], [29, 19, 2, 0.5]]), SIDE)
    assert masks.shape == (2, SIDE, SIDE) and classes.shape == (2, 2)
    assert np.allclose(classes.sum(1), 1) and ((masks >= 0) & (masks <= 1)).all()
    empty = window_predictions(net, torch.rand(3, 20, 30), np.zeros((0, 4)), SIDE)
    assert empty[0].shape == (0, SIDE, SIDE) and empty[1].shape == (0, 2)



def test_tiles_report_each_cell_once_and_whole_as_the_whole_image_does():
    rng = np.random.default_rng(0)
    height, width, count = 100, 90, 60
    cells = np.column_stack([rng.integers(0, width, count), rng.integers(0, height, count),
                             rng.integers(1, 3, count), rng.random(count)]).astype(np.float64)
    cells[5, :2] = cells[4, :2]  # two proposals on one pixel
    masks = rng.random((count, SIDE, SIDE)).astype(np.float32)
    class_probs = rng.dirichlet([1, 1], count).astype(np.float32)
    by_centre = {}
    for k, (x, y) in enumerate(cells[:, :2].astype(int).tolist()):
        by_centre.setdefault((x, y), []).append(k)

    def windows(centres):
        rows = [by_centre[(x, y)].pop(0) for x, y in centres.tolist()]
        for (x, y), k in zip(centres.tolist(), rows):
            by_centre[(x, y)].append(k)  # asked for again by the next tile
        return masks[rows], class_probs[rows]

    whole = paste_instances(masks, cells, (height, width), class_probs.argmax(1) + 1, cells[:, 3])
    pieced = np.zeros_like(whole)
    reported = []
    for part in instances_in_tiles(cells, (height, width), SIDE, windows, tile=32):
        h, w = part.labels.shape
        region = pieced[part.top:part.top + h, part.left:part.left + w]
        for i, row in enumerate(part.rows.tolist()):
            region[part.labels == i + 1] = row + 1
            reported.append(row)
    assert sorted(reported) == list(range(count))  # each cell once
    assert np.array_equal(pieced, whole)


# --- the two stages as TorchScript and ONNX (issue 30's package) ---------------------------------------------------


def test_scripted_pasting_follows_paste_instances_through_ties():
    """Quantised masks (equal p in many windows), equal scores, both classes tied, two proposals on one pixel and
    windows over the edges: the same labels and classes as `paste_instances` (the rule's every tie-break counts).
    """
    from equiseg.export import quiet_jit
    from equiseg.inference.scripted_windows import ScriptedWindows

    rng = np.random.default_rng(4)
    height, width, count = 40, 36, 50
    cells = np.column_stack([rng.integers(0, width, count), rng.integers(0, height, count),
                             rng.integers(1, 3, count), rng.integers(0, 3, count) / 2]).astype(np.float64)
    cells[7, :2] = cells[6, :2]
    masks = (rng.integers(0, 5, (count, SIDE, SIDE)) / 4).astype(np.float32)
    class_probs = rng.dirichlet([1, 1], count).astype(np.float32)
    class_probs[:10] = 0.5  # tied classes: the first (BC), as argmax takes it
    expected_classes = class_probs.argmax(1) + 1
    expected = paste_instances(masks, cells, (height, width), expected_classes, cells[:, 3])
    assert len(np.unique(expected)) > 20
    with quiet_jit():
        net = torch.jit.trace(CellWindowNet(ConvFamily.P4, 1, depth=2).eval(), torch.rand(2, 3, SIDE, SIDE),
                              check_trace=False)  # the window net's use here: its class count
        paster = torch.jit.script(ScriptedWindows(net, SIDE, 2))
    labels, found = paster.place(torch.from_numpy(masks), torch.from_numpy(class_probs), torch.from_numpy(cells),
                                 height, width)
    np.testing.assert_array_equal(labels.numpy(), expected)
    np.testing.assert_array_equal(found.numpy()[:, 2], expected_classes)
    np.testing.assert_array_equal(found.numpy()[:, 3], class_probs.max(1))


def test_the_two_stages_in_torchscript_give_two_stage_instances(tmp_path):
    """One file, on a tile of many cells and on one smaller than the windows (17 px: mirrored again and again),
    as `two_stage_instances` gives them (the ONNX file: tests/test_package.py).
    """
    from equiseg.export import scripted_two_stage_model

    torch.manual_seed(3)
    stage1_config, stage2_config = configs()
    stage1_config = Config.from_dict({**stage1_config.to_dict(), "detect": {"min_distance": 10, "threshold": 0.0}})
    images = [(torch.rand(3, *shape) * 255).to(torch.uint8) for shape in ((96, 120), (8, 12))]
    stage1 = warm(stage1_config.build_model(), images[0][None] / 255)
    stage2 = warm(stage2_config.build_model(), torch.rand(4, 3, SIDE, SIDE))
    median = float(np.median(window_predictions(stage2, images[0] / 255, np.array([[4, 4]]), SIDE)[0]))
    with torch.no_grad():  # p(nucleus) about 0.5 at the median: nuclei with shapes, windows that overlap
        stage2.mask_head.bias -= float(np.log(median / (1 - median)))
    torch.jit.save(scripted_two_stage_model(stage1, stage1_config, stage2, stage2_config), str(tmp_path / "m.pt"))
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    for image, least in zip(images, (8, 1)):
        expected = two_stage_instances(stage1, stage1_config, stage2, stage2_config, image / 255)
        assert len(expected.cells) >= least and (expected.labels > 0).sum() > 3 * len(expected.cells)
        _, cells, labels, outlines = scripted(image[None])
        np.testing.assert_array_equal(labels.numpy(), expected.labels)
        np.testing.assert_array_equal(cells.numpy(), expected.cells)
        for k, ring in enumerate(instance_outlines(expected.labels, len(expected.cells))):
            np.testing.assert_array_equal(outlines.numpy()[outlines.numpy()[:, 0] == k, 1:], ring)
