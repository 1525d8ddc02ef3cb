"""Outlines inside a package's files (`ScriptedOutlines`): `instance_outlines`' rings vertex for vertex, from a
label image alone (in ONNX Runtime: the instance models' files, tests/evaluation/test_scripted_instances.py and
tests/test_package.py).
"""

import numpy as np
import torch
from scipy import ndimage

from equiseg.detection.instances import instance_outlines
from equiseg.detection.scripted_outlines import ScriptedOutlines
from equiseg.export import quiet_jit


def rings(outlines, count):
    return [outlines[outlines[:, 0] == k, 1:] for k in range(count)]


def scripted():
    with quiet_jit():
        return torch.jit.script(ScriptedOutlines())


def test_a_pixel_is_a_diamond_and_a_cell_without_pixels_has_no_ring():
    labels = np.zeros((3, 4), np.int32)
    labels[1, 2] = 2  # cell 1 (label 1) lost every pixel
    outlines = scripted()(torch.from_numpy(labels), 2).numpy()
    assert outlines[:, 0].tolist() == [1.0] * 5
    np.testing.assert_array_equal(outlines[:, 1:], [[2, 1.5], [2.5, 1], [3, 1.5], [2.5, 2], [2, 1.5]])


def test_the_rings_are_instance_outlines_rings_through_holes_corners_and_neighbours():
    """Blobs of three labels side by side, with holes, other labels inside and pixels that touch only at a
    corner; every 4-connected instance (as instances are once settled) gets contourpy's ring exactly.
    """
    run = scripted()
    rng = np.random.default_rng(1)
    compared = holed = cornered = 0
    for _ in range(400):
        height, width = rng.integers(5, 30, 2)
        labels = np.zeros((height, width), np.int32)
        for k in (1, 2, 3):
            seeds = rng.random((height, width)) < 0.05
            blob = ndimage.binary_dilation(seeds, iterations=int(rng.integers(1, 4))) & (rng.random((height, width)) < 0.9)
            labels[blob] = k
        outlines = rings(run(torch.from_numpy(labels), 3).numpy(), 3)
        expected = instance_outlines(labels, 3)
        for k in (1, 2, 3):
            if ndimage.label(labels == k)[1] != 1:
                continue
            compared += 1
            holed += ndimage.label(labels != k)[1] > 1
            mine = labels == k  # a 2x2 block with this instance on one diagonal only: its pixels touch at a corner
            a, b, c, d = mine[:-1, :-1], mine[:-1, 1:], mine[1:, :-1], mine[1:, 1:]
            cornered += bool(((a & d & ~b & ~c) | (b & c & ~a & ~d)).any())
            np.testing.assert_array_equal(outlines[k - 1], expected[k - 1])
    assert compared > 40 and holed > 10 and cornered > 5
