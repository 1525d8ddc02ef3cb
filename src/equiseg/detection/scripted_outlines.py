"""Each instance's outline as a polygon, in TorchScript's subset and in the form ``torch.export`` (and so
ONNX) takes: the ``outlines`` output of a package's ``cells.pt`` and ``cells.onnx`` (issue 30).

The polygon is `instance_outlines`' ring: the filled contour at 0.5 of the instance's mask, whose vertices
are the midpoints between the centres of an inside pixel and a 4-neighbour outside it (one a crack in the
pixel grid), corners cut, pixels that touch only at a corner parted, holes ignored, closed, counter-clockwise
by its numbers. Here without a loop per instance or per vertex:

* every crack's successor along its boundary, walked with the inside on the right as drawn (y down): ahead
  and ahead-outside both inside: turn towards the outside; ahead inside only: straight on; else turn towards
  the inside (the inside 4-connected, so pixels touching at a corner are parted);
* each instance's outer ring is the cycle of cracks through the left crack of its first pixel in row-major
  order (nothing of the instance lies above or left of that pixel, so that crack is on the outer boundary;
  contourpy starts the ring there too, so the rings are equal vertex for vertex): the cycle is cut before
  that crack and every crack's distance to the cut found by pointer doubling (a fixed number
  of rounds: enough for any ring in an image of up to 2**26 cracks), which also tells the cracks of holes
  (they never reach a cut) from the ring's;
* the ring's cracks sorted by (instance, place along the ring), the first one repeated last.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

DOUBLINGS = 26  # rounds of pointer doubling: rings of up to 2**26 cracks
# the four directions to the outside neighbour (dy, dx), and the way along the boundary after each
# (the inside on the right as drawn, y down): up -> right, right -> down, down -> left, left -> up
DIRECTIONS = ((-1, 0), (0, 1), (1, 0), (0, -1))


class ScriptedOutlines(nn.Module):
    """(labels (H, W) int: k for the cell of row k - 1, 0 background; the number of cells N) -> (M, 3) float64 rows
    (row of the cell, x, y): each cell's closed ring in order, cells in their rows' order, vertices in
    continuous pixel coordinates (pixel (row i, column j) spans [j, j + 1) x [i, i + 1)); none for a cell
    without pixels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dy, self.dx = [d[0] for d in DIRECTIONS], [d[1] for d in DIRECTIONS]
        self.doublings = DOUBLINGS

    def forward(self, labels: torch.Tensor, count: int) -> torch.Tensor:
        height, width = labels.shape[0], labels.shape[1]
        padded = F.pad(labels.long()[None, None], [1, 1, 1, 1])[0, 0]
        size = height * width
        inner = padded[1:height + 1, 1:width + 1].reshape(-1)
        cracks: list[torch.Tensor] = []
        successors: list[torch.Tensor] = []
        for d in range(4):
            found, following = self._direction(padded, inner, d, height, width)
            cracks.append(found)
            successors.append(following)
        crack = torch.cat(cracks)  # crack ids d * size + pixel, in order
        follows = torch.cat(successors)
        # the compact index of every crack id (-1: no crack there)
        index = torch.full((4 * size,), -1, dtype=torch.int64).index_put((crack,), torch.arange(crack.shape[0]))
        following = index[follows]
        pixel = _modulo(crack, size)
        label = inner[pixel]
        first = torch.full((count + 1,), size, dtype=torch.int64).scatter_reduce(0, label, pixel, "amin",
                                                                                include_self=True)
        # each first pixel's left crack (d = 3; the one before its top crack): where contourpy starts the ring
        starts = index.index_select(0, 3 * size + first[1:].clamp(max=size - 1))
        starts = torch.where(first[1:] < size, starts, torch.full_like(starts, -1))
        return self._rings(crack, following, label, starts, count, height, width)

    def _direction(self, padded: torch.Tensor, inner: torch.Tensor, d: int, height: int,
                   width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cracks towards direction ``d`` (ids d * H W + pixel) and their successors' ids."""
        dy, dx = self.dy[d], self.dx[d]
        ty, tx = self.dy[(d + 1) % 4], self.dx[(d + 1) % 4]
        inside = inner > 0
        crack = torch.nonzero(inside & (_shifted(padded, dy, dx, height, width) != inner)).reshape(-1)
        ahead = _shifted(padded, ty, tx, height, width)[crack] == inner[crack]
        beyond = _shifted(padded, ty + dy, tx + dx, height, width)[crack] == inner[crack]
        columns = _modulo(crack, width)
        rows = _quotient(crack, width)
        size = height * width
        straight = (d * size + (rows + ty) * width + columns + tx)
        turn_out = ((d + 3) % 4) * size + (rows + ty + dy) * width + columns + tx + dx
        turn_in = ((d + 1) % 4) * size + crack
        following = torch.where(ahead & beyond, turn_out, torch.where(ahead, straight, turn_in))
        return d * size + crack, following

    def _rings(self, crack: torch.Tensor, following: torch.Tensor, label: torch.Tensor, starts: torch.Tensor,
               count: int, height: int, width: int) -> torch.Tensor:
        """The rings of ``starts``' cycles, sorted by (label, place along the ring), each closed."""
        m = crack.shape[0]
        marks = torch.where(starts >= 0, starts, torch.full_like(starts, m))  # cells without pixels: slot m
        is_start = torch.zeros(m + 1, dtype=torch.bool).index_put((marks,), torch.ones_like(marks, dtype=torch.bool))[:m]
        end = is_start[following]  # the crack before a start: the list's end
        pointer = torch.where(end, torch.arange(m), following)
        distance = torch.where(end, torch.zeros(m, dtype=torch.int64), torch.ones(m, dtype=torch.int64))
        for _ in range(self.doublings):
            distance = distance + distance[pointer]
            pointer = pointer[pointer]
        ring = end[pointer]
        length = distance[starts.clamp(min=0)] + 1  # each label's ring length (its start is farthest from its end)
        place = length[(label - 1).clamp(min=0)] - 1 - distance
        keep = torch.nonzero(ring).reshape(-1)
        closing = starts[starts >= 0]
        chosen = torch.cat([keep, closing])
        order_place = torch.cat([place[keep], length[label[closing] - 1]])
        key = label[chosen] * (4 * height * width + 2) + order_place
        order = torch.argsort(key)
        chosen = chosen[order]
        return self._vertices(crack[chosen], label[chosen], height, width)

    def _vertices(self, crack: torch.Tensor, label: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(row, x, y) of each crack: the midpoint between its pixel's centre and its outside neighbour's."""
        size = height * width
        d = _quotient(crack, size)
        pixel = _modulo(crack, size)
        x = _modulo(pixel, width).double() + 0.5 + torch.tensor(self.dx, dtype=torch.float64)[d] / 2
        y = _quotient(pixel, width).double() + 0.5 + torch.tensor(self.dy, dtype=torch.float64)[d] / 2
        return torch.stack([(label - 1).double(), x, y], 1)


def _shifted(padded: torch.Tensor, oy: int, ox: int, height: int, width: int) -> torch.Tensor:
    """The (H W,) labels of each pixel's neighbour at (oy, ox), from the labels padded by one pixel of 0."""
    return padded[1 + oy:1 + oy + height, 1 + ox:1 + ox + width].reshape(-1)


# divisions by a tensor of the divisor: ONNX's exporter takes no symbolic (size-dependent) scalar divisor
def _modulo(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.remainder(torch.full_like(x, n))


def _quotient(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.div(x, torch.full_like(x, n), rounding_mode="floor")
