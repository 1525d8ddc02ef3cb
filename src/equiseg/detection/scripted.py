"""Cell detection as a module that TorchScript compiles, so that a model file can carry its own
detection and run where equiseg is not installed (issue 30's package, QuPath through DJL, C++).

`ScriptedDetector` is `detect_cells` in TorchScript's subset: the same blur and max filter (the
functions of `peaks`, compiled), the same candidates and the same greedy suppression (by descending
smoothed probability, ties by row, column, class; a candidate closer than ``min_distance`` px to one
kept before it is dropped). Its cells equal `detect_cells`' bit for bit (tested, also after
``torch.jit.script`` and a save and load).

`ExportedDetector` is the same detection in the form that ``torch.export`` (and so ONNX) takes: the blur
without in-place sums, the suppression as one ``torch.while_loop`` over the ordered candidates (an ONNX
``Loop``), the order by sorts that become ONNX ``TopK`` (which the ONNX standard makes stable: equal values
keep their index order). Positions and classes equal `detect_cells`' (tested with ties, in onnxruntime);
probabilities to float32 rounding (the blur's multiply-adds are not fused).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from equiseg.data.targets import DEFAULT_RADIUS
from equiseg.detection.instances import NUCLEUS_THRESHOLD
from equiseg.detection.peaks import _blur_radius, _gaussian_kernel, _max_filter, _valid_correlation


class ScriptedDetector(nn.Module):
    """(C, H, W) probabilities (channel 0 background) -> (N, 4) float64 cells (x, y, class, probability
    clipped to [0, 1]), highest first: `detect_cells` with these settings.
    """

    def __init__(self, sigma: float, min_distance: int, threshold: float, per_class: bool) -> None:
        super().__init__()
        self.radius = _blur_radius(sigma)
        self.kernel = _gaussian_kernel(sigma) if self.radius else torch.ones(1)  # the blur's taps (saved with the module)
        self.min_distance, self.threshold, self.per_class = int(min_distance), threshold, per_class

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        x = probs.float().unsqueeze(0)
        if self.radius > 0:
            x = self._correlate(F.pad(x, [self.radius, self.radius, 0, 0], mode="replicate"), 3)
            x = self._correlate(F.pad(x, [0, 0, self.radius, self.radius], mode="replicate"), 2)
        blurred = x[0]
        if self.per_class:
            rows = [self._class_candidates(blurred, c) for c in range(1, blurred.shape[0])]
            candidates = torch.cat(rows) if len(rows) else torch.zeros(0, 5, dtype=torch.float64)
        else:
            foreground = 1 - blurred[0]
            ys, xs = self._maxima(foreground)
            best, cls = blurred[1:, ys, xs].max(dim=0)
            candidates = torch.stack([xs.double(), ys.double(), foreground[ys, xs].double(), (cls + 1).double(),
                                      best.double()], 1)
        return self._suppress(candidates, blurred.shape[1], blurred.shape[2])

    def _correlate(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return _valid_correlation(x, self.kernel, dim)

    def _order(self, candidates: torch.Tensor) -> torch.Tensor:
        """The candidates' order of suppression: keys from the last to the first, each sort stable."""
        order = torch.arange(candidates.shape[0])
        for key, descending in ((3, False), (0, False), (1, False), (2, True)):
            order = order[self._sort(candidates[order, key], descending)]
        return order

    def _sort(self, values: torch.Tensor, descending: bool) -> torch.Tensor:
        """The indices that sort ``values``, equal values in their order."""
        return torch.sort(values, stable=True, descending=descending)[1]

    def _maxima(self, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        peaks = (score == _max_filter(score, 2 * self.min_distance + 1)) & (score > self.threshold)
        found = torch.nonzero(peaks)
        return found[:, 0], found[:, 1]

    def _class_candidates(self, blurred: torch.Tensor, c: int) -> torch.Tensor:
        ys, xs = self._maxima(blurred[c])
        score = blurred[c, ys, xs].double()
        return torch.stack([xs.double(), ys.double(), score, torch.full_like(score, float(c)), score], 1)

    def _suppress(self, candidates: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """`suppress_peaks`: keys from the last to the first, each sort stable; then each candidate, in that
        order, is kept unless a cell kept before it marked its pixel (a kept cell marks every pixel closer
        than ``min_distance``: the same test as the distance to each kept cell, for integer positions, at
        one look-up a candidate however many there are).
        """
        ordered = candidates[self._order(candidates)]
        reach, disk = self._disk()
        if reach < 0:
            return self._cells(ordered)
        marked = torch.zeros(height + 2 * reach, width + 2 * reach, dtype=torch.bool)
        xs: list[int] = ordered[:, 0].long().tolist()
        ys: list[int] = ordered[:, 1].long().tolist()
        kept: list[int] = []
        for i in range(len(xs)):
            x, y = xs[i], ys[i]
            if bool(marked[y + reach, x + reach]):
                continue
            kept.append(i)
            window = marked[y:y + 2 * reach + 1, x:x + 2 * reach + 1]
            window.logical_or_(disk)
        return self._cells(ordered[torch.tensor(kept, dtype=torch.long)] if len(kept) else ordered[:0])

    def _disk(self) -> tuple[int, torch.Tensor]:
        """(reach, disk): the farthest offset closer than ``min_distance`` (-1: none), and the (2 reach + 1)²
        offsets closer than it, which a kept cell marks.
        """
        reach = self.min_distance - 1
        offsets = torch.arange(-max(reach, 0), max(reach, 0) + 1)
        return reach, (offsets[:, None] ** 2 + offsets[None, :] ** 2) < self.min_distance * self.min_distance

    def _cells(self, cells: torch.Tensor) -> torch.Tensor:
        return torch.stack([cells[:, 0], cells[:, 1], cells[:, 3], cells[:, 4].clamp(0, 1)], 1)


class ExportedDetector(ScriptedDetector):
    """`ScriptedDetector` as ``torch.export`` takes it (and ``torch.onnx.export(..., dynamo=True)`` after it):
    the same candidates in the same order, suppressed in one ``torch.while_loop`` that carries the marked
    raster (an ONNX ``Loop``: its cost grows with the candidates times the tile's area, about 0.2 s for a
    thousand candidates on a 1024² tile in onnxruntime on 2 cores).
    """

    def __init__(self, sigma: float, min_distance: int, threshold: float, per_class: bool) -> None:
        super().__init__(sigma, min_distance, threshold, per_class)
        self.taps = [float(v) for v in self.kernel] if self.radius else []  # constants of the graph

    def _correlate(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """`_valid_correlation`'s sums in its order, without in-place additions (rounded once more each:
        a multiply, then an add, where the eager one fuses them).
        """
        n, length = len(self.taps), x.shape[dim]
        out = x.narrow(dim, 0, length - n + 1) * self.taps[0]
        for k in range(1, n):
            out = out + x.narrow(dim, k, length - n + 1) * self.taps[k]
        return out

    def _sort(self, values: torch.Tensor, descending: bool) -> torch.Tensor:
        if not torch.compiler.is_exporting():
            return super()._sort(values, descending)
        # exported: aten.sort, an ONNX TopK (stable by the standard); any stable= argument selects
        # aten.sort.stable, which the exporter does not translate
        return torch.sort(values, descending=descending)[1]

    def _suppress(self, candidates: torch.Tensor, height: int, width: int) -> torch.Tensor:
        ordered = candidates[self._order(candidates)]
        reach, disk = self._disk()
        if reach < 0:
            return self._cells(ordered)
        span = width + 2 * reach  # the marked raster, flat: (height + 2 reach) rows of span
        rows, columns = torch.nonzero(disk, as_tuple=True)
        spots = rows * span + columns  # the disk's pixels from its corner
        corners = ordered[:, 1].long() * span + ordered[:, 0].long()  # each candidate's disk's corner
        centre, count = reach * span + reach, torch.tensor(ordered.shape[0])

        def more(i: torch.Tensor, marked: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
            return i < count

        def step(i: torch.Tensor, marked: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, ...]:
            one = i.reshape(1)  # tensors all through: a loop variable read as a number does not export
            corner = corners.index_select(0, one)
            free = ~marked.index_select(0, corner + centre)
            disk_pixels = corner + spots
            marked = marked.index_put((disk_pixels,), marked.index_select(0, disk_pixels) | free)
            return i + 1, marked, kept.index_put((one,), free)

        marked = torch.zeros((height + 2 * reach) * span, dtype=torch.bool)
        kept = torch.zeros(ordered.shape[0], dtype=torch.bool)
        _, _, kept = torch.while_loop(more, step, (torch.tensor(0), marked, kept))
        return self._cells(ordered[kept])


class ScriptedInstances(nn.Module):
    """`grow_instances` and `instance_classes` in TorchScript's subset.

    (p(nucleus) (H, W), class probabilities (C, H, W), cells (N, 4) float64 rows x, y, class, probability on
    whole pixels) -> (labels (H, W) int32: k for row k - 1, 0 background; cells with each instance's class
    and that class's share of its mean cell-class probabilities). The same labels as `grow_instances`
    (tested, ties included), vectorised:

    * the 8-connected foreground components by hooking and compressing pixel numbers (`_grown`);
    * each pixel's winner among the centres within ``max_radius`` in its component, the least
      (squared distance, -score, -class, row): one scatter of each key over the disk offsets of every
      centre, keeping only the entries equal to the best so far (`grow_instances`' tie rule);
    * every centre's own pixel by the same rule, then each instance's 4-connected piece holding its
      centre (`_grown` within equal labels).
    """

    def __init__(self, threshold: float = NUCLEUS_THRESHOLD, max_radius: float = DEFAULT_RADIUS) -> None:
        super().__init__()
        self.threshold, self.limit = threshold, max_radius * max_radius
        reach = int(max_radius)
        offsets = torch.arange(-reach, reach + 1)
        dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
        inside = (dy * dy + dx * dx) <= self.limit
        self.dy, self.dx = dy[inside].reshape(-1), dx[inside].reshape(-1)  # the disk's offsets, row-major

    def forward(self, nucleus: torch.Tensor, classes: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = nucleus.shape[0], nucleus.shape[1]
        foreground = nucleus >= self.threshold
        components = self._grow(foreground, torch.ones_like(foreground), 8)
        x, y = cells[:, 0].long(), cells[:, 1].long()
        labels = self._nearest(components, x, y, cells, height, width)
        labels = self._own_centres(labels, x, y, cells, width)
        labels = self._centre_pieces(labels, x, y, width)
        return labels.to(torch.int32), self._classes(labels, classes, cells)

    def _grow(self, mask: torch.Tensor, within: torch.Tensor, connectivity: int) -> torch.Tensor:
        return _grown(mask, within, connectivity)

    def _nearest(self, components: torch.Tensor, x: torch.Tensor, y: torch.Tensor, cells: torch.Tensor,
                 height: int, width: int) -> torch.Tensor:
        rows = y[:, None] + self.dy[None, :]
        cols = x[:, None] + self.dx[None, :]
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        flat = (rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1))
        centre = components.reshape(-1)[y * width + x]
        valid = inside & (components.reshape(-1)[flat] == centre[:, None]) & (centre[:, None] > 0)
        n = cells.shape[0]
        d2 = (self.dy * self.dy + self.dx * self.dx).double()[None, :].expand(n, -1)
        keys = [d2, -cells[:, 3:4].expand(-1, d2.shape[1]), -cells[:, 2:3].expand(-1, d2.shape[1]),
                torch.arange(n, dtype=torch.float64)[:, None].expand(-1, d2.shape[1])]
        return _winners(flat[valid], [key[valid] for key in keys], height * width).reshape(height, width)

    def _own_centres(self, labels: torch.Tensor, x: torch.Tensor, y: torch.Tensor, cells: torch.Tensor,
                     width: int) -> torch.Tensor:
        n = cells.shape[0]
        pixel = y * width + x
        keys = [-cells[:, 3], -cells[:, 2], torch.arange(n, dtype=torch.float64)]
        owners = _winners(pixel, keys, labels.numel())
        flat = labels.reshape(-1).clone()
        mine = owners > 0
        flat[mine] = owners[mine]
        return flat.reshape(labels.shape)

    def _centre_pieces(self, labels: torch.Tensor, x: torch.Tensor, y: torch.Tensor, width: int) -> torch.Tensor:
        pieces = self._grow(labels > 0, labels, 4)
        n = x.shape[0]
        centre = y * width + x
        own = labels.reshape(-1)[centre] == torch.arange(1, n + 1)
        piece_of = torch.full((n + 1,), -1, dtype=torch.int64)
        piece_of[1:] = torch.where(own, pieces.reshape(-1)[centre], torch.full_like(pieces.reshape(-1)[centre], -1))
        keep = pieces == piece_of[labels]
        return torch.where(keep & (labels > 0), labels, torch.zeros_like(labels))

    def _classes(self, labels: torch.Tensor, classes: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        n = cells.shape[0]
        flat = labels.reshape(-1)
        counts = torch.zeros(n + 1, dtype=torch.float64).index_add_(0, flat, torch.ones(flat.shape[0], dtype=torch.float64))
        sums = [torch.zeros(n + 1, dtype=torch.float64).index_add_(0, flat, classes[c].reshape(-1).double())
                for c in range(1, classes.shape[0])]
        means = torch.stack(sums)[:, 1:] / counts[1:]  # (C - 1, n)
        flipped = torch.flip(means, [0])
        index = means.shape[0] - 1 - torch.argmax(flipped, dim=0)  # the last maximum: ties to the higher class
        best = means.gather(0, index[None, :])[0]
        total = means.sum(0)
        share = torch.where(total > 0, best / total, torch.full_like(best, 1.0 / means.shape[0]))
        out = cells.clone()
        found = counts[1:] > 0
        out[:, 2] = torch.where(found, (index + 1).double(), cells[:, 2])
        out[:, 3] = torch.where(found, share, cells[:, 3])
        return out


def _winners(pixels: torch.Tensor, keys: list[torch.Tensor], size: int) -> torch.Tensor:
    """For each of ``size`` pixels, 1 + the last key (a row) of the entry with the least keys, compared in
    order (each key's minimum among the entries still tied); 0 where no entry falls.
    """
    alive = torch.ones_like(pixels, dtype=torch.bool)
    for key in keys:
        best = torch.full((size,), float("inf"), dtype=torch.float64)
        best = best.scatter_reduce(0, pixels[alive], key[alive], "amin", include_self=True)
        alive = alive & (key == best[pixels])
    winner = torch.zeros(size, dtype=torch.int64)
    winner[pixels[alive]] = keys[-1][alive].long() + 1
    return winner


def _grown(mask: torch.Tensor, within: torch.Tensor, connectivity: int) -> torch.Tensor:
    """Each pixel of ``mask`` numbered alike with the other pixels of its connected piece (``connectivity``
    8 or 4; pixels join only where ``within`` is equal), by a number no other piece has (one of its pixels'
    1-based row-major numbers); 0 off the mask. Hook and compress: each piece's number is hooked to the
    largest number next to it (a scatter of maxima over the numbers, as parents), the parents followed to
    their roots, until nothing changes: a few rounds, not one per pixel of a piece's length.
    """
    height, width = mask.shape[0], mask.shape[1]
    key = within.double()
    keyed = F.pad(key[None, None], [1, 1, 1, 1], value=float("nan"))[0, 0]
    joins = [(dy, dx, (keyed[1 + dy:1 + dy + height, 1 + dx:1 + dx + width] == key) & mask)
             for dy, dx in _neighbours(connectivity)]
    labels = torch.where(mask, torch.arange(1, height * width + 1).reshape(height, width), torch.zeros(height, width,
                                                                                                      dtype=torch.int64))
    on = mask.reshape(-1)
    changed = True
    while changed:
        padded = F.pad(labels[None, None], [1, 1, 1, 1])[0, 0]
        near = labels
        for dy, dx, join in joins:
            near = torch.where(join, torch.maximum(near, padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]), near)
        parent = torch.arange(0, height * width + 1).scatter_reduce(0, labels.reshape(-1)[on], near.reshape(-1)[on],
                                                                     "amax", include_self=True)
        root = parent[parent]
        while bool((root != parent).any()):
            parent = root
            root = parent[parent]
        grown = parent[labels]
        changed = bool((grown != labels).any())
        labels = grown
    return labels


def _neighbours(connectivity: int) -> list[tuple[int, int]]:
    four = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    return four if connectivity == 4 else four + [(-1, -1), (-1, 1), (1, -1), (1, 1)]


class ExportedInstances(ScriptedInstances):
    """`ScriptedInstances` as ``torch.export`` (and ONNX) takes it: the rounds of hooking one
    ``torch.while_loop`` (an ONNX ``Loop``), the parents followed to their roots by a fixed number of
    doublings (enough for any chain in an image of up to 2**24 pixels).
    """

    def _grow(self, mask: torch.Tensor, within: torch.Tensor, connectivity: int) -> torch.Tensor:
        height, width = mask.shape[0], mask.shape[1]
        key = within.double()
        keyed = F.pad(key[None, None], [1, 1, 1, 1], value=float("nan"))[0, 0]
        joins = [(dy, dx, (keyed[1 + dy:1 + dy + height, 1 + dx:1 + dx + width] == key) & mask)
                 for dy, dx in _neighbours(connectivity)]
        numbers = torch.arange(1, height * width + 1).reshape(height, width)
        labels = torch.where(mask, numbers, torch.zeros_like(numbers))
        flat_mask = mask.reshape(-1)
        parents = torch.arange(0, height * width + 1)

        def more(labels: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
            return changed.clone()  # a loop condition may not be its input itself

        def step(labels: torch.Tensor, changed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            padded = F.pad(labels[None, None], [1, 1, 1, 1])[0, 0]
            near = labels
            for dy, dx, join in joins:
                near = torch.where(join, torch.maximum(near, padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]),
                                   near)
            hooked = torch.where(flat_mask, near.reshape(-1), torch.zeros_like(near.reshape(-1)))
            parent = parents.scatter_reduce(0, labels.reshape(-1), hooked, "amax", include_self=True)
            for _ in range(25):  # doublings: every chain of up to 2**24 parents reaches its root
                parent = parent.gather(0, parent)
            grown = parent.gather(0, labels.reshape(-1)).reshape(height, width)
            return grown, (grown != labels).any()

        labels, _ = torch.while_loop(more, step, (labels, torch.tensor(True)))
        return labels
