"""Cells as points read off probability maps: smoothed peaks, their suppression, and the same
in blocks of a streamed map (bit for bit what the whole map gives).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from equiseg.config import DetectConfig


def detect_cells(probs: torch.Tensor, sigma: float = 8.0, min_distance: int = 15,
                 threshold: float = 0.5, per_class: bool = False) -> np.ndarray:
    """Cell points from one class-probability map.

    The foreground probability 1 - p(background) is smoothed with a Gaussian of ``sigma`` px;
    its local maxima above ``threshold`` are kept greedily from the highest down, dropping any
    within ``min_distance`` px of one already kept. Each point takes the cell class with the
    larger (smoothed) probability there, and that probability.

    ``per_class=True`` (the rule for centre targets) looks for the local maxima of each cell
    class's smoothed probability instead, each a candidate of its class scored by that
    probability; the greedy suppression then runs over the candidates of all classes together,
    so one cell seen by two class maps is reported once, by the stronger.

    The model is trained on disks of radius r around each cell (30 px by default), whose
    softmax saturates into plateaus; smoothing with ``sigma`` about r / 4 turns each disk
    into a single peak at its centre. The defaults suit r = 30 px.

    It is `peak_candidates` over the whole map, then `suppress_peaks`;
    `BlockDetector` gives the same points from a map that arrives in blocks.

    Args:
        probs: (C, H, W) softmax output, channel 0 background, 1 BC, 2 TC.
        sigma: smoothing in px (0 for none).
        min_distance: the least distance between two cells, px.
        threshold: the least smoothed foreground probability of a cell.

    Returns:
        (N, 4) float64 rows (x, y, class, probability), x = column, y = row, highest first.
    """
    if probs.ndim != 3 or probs.shape[0] < 2:
        raise ValueError(f"expected (C, H, W) probabilities with C >= 2, got {tuple(probs.shape)}")
    _, height, width = probs.shape
    candidates = peak_candidates(probs, (0, 0), (height, width), (0, height, 0, width), sigma, min_distance,
                                 threshold, per_class)
    return suppress_peaks(candidates, min_distance)


def find_cells(probs: torch.Tensor, settings: DetectConfig) -> np.ndarray:
    """`detect_cells` with a run's detection settings (``config.detect``)."""
    return detect_cells(probs, settings.sigma, settings.min_distance, settings.threshold, settings.per_class)


def detection_halo(sigma: float, min_distance: int) -> int:
    """The context in px that `peak_candidates` needs around a core, on each side inside
    the image: the blur's radius plus ``min_distance`` (the reach of the max filter).
    """
    return _blur_radius(sigma) + min_distance


def _block_edges(block: torch.Tensor, origin: tuple[int, int], image_size: tuple[int, int],
                 core: tuple[int, int, int, int], halo: int) -> tuple[bool, bool, bool, bool]:
    """Which sides of the block (top, bottom, left, right) are the image's edge, after checking that
    the block lies in the map and reaches ``halo`` px beyond the core on every other side.
    """
    if block.ndim != 3 or block.shape[0] < 2:
        raise ValueError(f"expected (C, h, w) probabilities with C >= 2, got {tuple(block.shape)}")
    _, h, w = block.shape
    (row, col), (height, width) = origin, image_size
    top, bottom, left, right = core
    if row < 0 or col < 0 or row + h > height or col + w > width:
        raise ValueError(f"a {h}x{w} block at {origin} lies outside the {height}x{width} map")
    edges = (row == 0, row + h == height, col == 0, col + w == width)
    margin = [0 if edge else halo for edge in edges]
    if top < row + margin[0] or bottom > row + h - margin[1] or left < col + margin[2] or right > col + w - margin[3]:
        raise ValueError(f"core {core} needs {halo} px of the block around it inside the image "
                         f"(a {h}x{w} block at {origin} of a {height}x{width} map)")
    return edges


def peak_candidates(block: torch.Tensor, origin: tuple[int, int], image_size: tuple[int, int],
                    core: tuple[int, int, int, int], sigma: float = 8.0, min_distance: int = 15,
                    threshold: float = 0.5, per_class: bool = False) -> np.ndarray:
    """The candidate cells of `detect_cells` in the core of one block of a probability map.

    A candidate is a pixel whose smoothed foreground f = 1 - p(background) is above
    ``threshold`` and is the maximum of its (2 min_distance + 1)² window. The blur's replicate
    padding and the max filter's -inf padding are applied only where the block meets the
    image's edge; on every other side the block must reach ``detection_halo(sigma,
    min_distance)`` px beyond the core. Then every value a core pixel depends on lies in the
    block, and the candidates are, bit for bit, those that the whole map has in the core.

    Args:
        block: (C, h, w) probabilities (C >= 2, channel 0 background): rows origin[0] ..
            origin[0] + h - 1 and columns origin[1] .. origin[1] + w - 1 of the map.
        origin: (row, column) of the block's first pixel in the map.
        image_size: (H, W) of the whole map.
        core: (top, bottom, left, right): the rows top .. bottom - 1 and columns left .. right - 1 wanted.
        sigma, min_distance, threshold, per_class: as in `detect_cells`.

    Returns:
        (N, 5) float64 rows (x, y, f, class, class probability) in row-major order: image px
        (x = column, y = row), the smoothed foreground, the cell class (1 .. C-1) with the larger
        smoothed probability there, and that probability (not clipped). With ``per_class`` the
        rows of class 1 come first, then class 2 ..., and f is the class's smoothed probability.

    Raises:
        ValueError: the block lies outside the map, or lacks the halo around the core.
    """
    edges = _block_edges(block, origin, image_size, core, detection_halo(sigma, min_distance))
    (row, col), (top, bottom, left, right) = origin, core
    if top >= bottom or left >= right:
        return np.zeros((0, 5))
    probs = block.detach().float()[None]
    radius = _blur_radius(sigma)
    if radius:
        probs = _gaussian_blur(probs, sigma, edges)
    # the blurred block lost `radius` px on each side that is not the image's edge
    y0, x0 = row + (0 if edges[0] else radius), col + (0 if edges[2] else radius)
    window = 2 * min_distance + 1

    def maxima(score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block coordinates (ys, xs) of the core's local maxima of ``score`` above the threshold."""
        peaks = (score == _max_filter(score, window)) & (score > threshold)
        ys, xs = torch.nonzero(peaks[top - y0:bottom - y0, left - x0:right - x0], as_tuple=True)
        return ys + (top - y0), xs + (left - x0)

    if per_class:
        rows = []
        for c in range(1, probs.shape[1]):
            ys, xs = maxima(probs[0, c])
            score = probs[0, c, ys, xs].double()
            rows.append(torch.stack([(xs + x0).double(), (ys + y0).double(), score,
                                     torch.full_like(score, c), score], 1))
        return torch.cat(rows).numpy()
    foreground = 1 - probs[0, 0]
    ys, xs = maxima(foreground)
    best, cls = probs[0, 1:, ys, xs].max(dim=0)  # (C-1, N) -> (N,)
    return torch.stack([(xs + x0).double(), (ys + y0).double(), foreground[ys, xs].double(), (cls + 1).double(),
                        best.double()], 1).numpy()


def suppress_peaks(candidates: np.ndarray, min_distance: int) -> np.ndarray:
    """The cells of `detect_cells` from all candidates of one image (`peak_candidates`).

    Candidates are visited by descending smoothed foreground, ties by row, then column, then
    class (the order in which `detect_cells` has always met them), whatever order they come in; each
    is kept unless it lies closer than ``min_distance`` px to one kept before it.

    Args:
        candidates: (N, 5) rows (x, y, f, class, class probability).
        min_distance: the least distance between two cells, px.

    Returns:
        (M, 4) float64 rows (x, y, class, probability clipped to [0, 1]), in the order kept
        (highest first).
    """
    candidates = np.asarray(candidates, dtype=np.float64).reshape(-1, 5)
    if not len(candidates):
        return np.zeros((0, 4))
    order = np.lexsort((candidates[:, 3], candidates[:, 0], candidates[:, 1], -candidates[:, 2]))
    # A k-d tree is asked only about the points kept (a few thousand at most), not about every
    # candidate: a flat plateau of a saturated softmax makes every one of its pixels a
    # candidate, each with hundreds of neighbours.
    from scipy.spatial import cKDTree  # pyright: ignore[reportAttributeAccessIssue]  # from a compiled module

    points = candidates[:, :2]
    tree = cKDTree(points)
    suppressed = np.zeros(len(points), bool)
    kept: list[int] = []
    for i in order:
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed[tree.query_ball_point(points[i], r=min_distance - 1e-9)] = True
    cells = candidates[kept]
    return np.stack([cells[:, 0], cells[:, 1], cells[:, 3], cells[:, 4].clip(0, 1)], axis=1)


class BlockDetector:
    """`detect_cells` over a map that arrives a block at a time, row-major.

    The blocks tile the map in block rows: the blocks of one row share its rows and follow one
    another left to right (as `stream_blocks` yields them).
    Each `add` finds the candidates (`peak_candidates`) of the block's region moved
    up and left by the halo h = ``detection_halo(sigma, min_distance)`` (to the map's edge for
    the last block row and column), whose context ends at the block's bottom and right: these
    cores tile the map. Each core is searched in parts of at most ``chunk`` x ``chunk`` px, each
    with its halo, which bounds the blur's and the max filter's memory. `points`
    suppresses over all candidates. The points equal ``detect_cells`` on the whole map, bit for
    bit.

    Memory: the last 2h rows of the map above the current block row (C x 2h x W float32, and
    as much for the next block row's), the last 2h columns left of the current block (C x
    block height x 2h), one block with that context, one part's blur ((chunk + 2h)² x C
    float32, a few times), and the candidates; independent of the map's height, and of its
    width but for the 2h rows.
    """

    def __init__(self, height: int, width: int, sigma: float = 8.0, min_distance: int = 15,
                 threshold: float = 0.5, chunk: int = 1024, per_class: bool = False) -> None:
        self.height, self.width = height, width
        self.sigma, self.min_distance, self.threshold, self.per_class = sigma, min_distance, threshold, per_class
        self.chunk = chunk
        self.halo = detection_halo(sigma, min_distance)
        self._top = self._bottom = 0  # the current block row's rows; 0, 0 before the first block
        self._left = width            # where its next block starts (width: a new block row is due)
        self._above: torch.Tensor | None = None  # (C, n, W): the rows just above self._top, n <= 2h
        self._next_above: torch.Tensor | None = None  # the same for the next block row, filled block by block
        self._beside: torch.Tensor | None = None  # (C, bottom - top, m): the columns just left of self._left
        self._candidates: list[np.ndarray] = []

    def add(self, top: int, left: int, block: torch.Tensor) -> None:
        """The map's next block: (C, h, w) probabilities of rows top .. top + h - 1 and columns
        left .. left + w - 1, as `detect_cells` would take them.

        Raises:
            ValueError: the block is not the next one (row-major) of a tiling of the map.
        """
        block = block.detach().float()
        _, h, w = block.shape if block.ndim == 3 else (0, 0, 0)
        new_row = self._left == self.width
        # a new block row starts below the last one, at most to the map's bottom; a block of the
        # current row continues it, with its rows
        origin = (self._bottom, 0) if new_row else (self._top, self._left)
        fits = h <= self.height - self._bottom if new_row else h == self._bottom - self._top
        if block.ndim != 3 or (top, left) != origin or not fits or h < 1 or w < 1 or left + w > self.width:
            raise ValueError(f"a {tuple(block.shape)} block at ({top}, {left}) is not the next block of the "
                             f"{self.height}x{self.width} map (rows {self._top}..{self._bottom - 1} so far, "
                             f"next column {self._left})")
        context = 2 * self.halo
        if new_row:
            self._top, self._bottom = top, top + h
            self._above = self._next_above
            self._next_above = torch.zeros(block.shape[0], min(context, self._bottom), self.width)
            self._beside = block[:, :, :0]
        assert self._beside is not None and self._next_above is not None  # set by the first block (a new row)
        # the block with the final rows above it and columns left of it: rows first .. bottom - 1,
        # columns left - m .. left + w - 1
        above = self._above if self._above is not None else block[:, :0, :0].new_zeros(block.shape[0], 0, self.width)
        first, m = top - above.shape[1], self._beside.shape[2]
        whole = torch.cat([above[:, :, left - m:left + w], torch.cat([self._beside, block], 2)], 1)
        bottom, right = top + h, left + w
        core_bottom = self.height if bottom == self.height else max(0, bottom - self.halo)
        core_right = self.width if right == self.width else max(0, right - self.halo)
        core_top, core_left = max(0, top - self.halo), max(0, left - self.halo)
        for part_top in range(core_top, core_bottom, self.chunk):
            for part_left in range(core_left, core_right, self.chunk):
                part = (part_top, min(core_bottom, part_top + self.chunk), part_left,
                        min(core_right, part_left + self.chunk))
                # the halo around the part, cut at the map's edge (the core's bottom and right
                # are the block's less the halo, or the map's edge)
                y0, y1 = max(0, part[0] - self.halo), min(bottom, part[1] + self.halo)
                x0, x1 = max(0, part[2] - self.halo), min(right, part[3] + self.halo)
                self._candidates.append(peak_candidates(
                    whole[:, y0 - first:y1 - first, x0 - (left - m):x1 - (left - m)], (y0, x0),
                    (self.height, self.width), part, self.sigma, self.min_distance, self.threshold,
                    self.per_class))
        rows = self._next_above.shape[1]
        self._next_above[:, :, left:right] = whole[:, whole.shape[1] - rows:, m:]
        # a copy, so that the block handed in is not held by its last columns
        self._beside = whole[:, whole.shape[1] - h:, max(0, whole.shape[2] - context):].clone()
        self._left = right

    def state_dict(self) -> dict:
        """What the detector holds after the blocks added so far (tensors and ints: ``torch.save``
        writes it and ``torch.load(weights_only=True)`` reads it), for `load_state_dict`.
        """
        return {"rows": (self._top, self._bottom, self._left), "above": self._above, "next_above": self._next_above,
                "beside": self._beside,
                "candidates": torch.from_numpy(np.concatenate(self._candidates) if self._candidates
                                               else np.zeros((0, 5)))}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict` of a detector of the same map and settings."""
        self._top, self._bottom, self._left = state["rows"]
        self._above, self._next_above, self._beside = state["above"], state["next_above"], state["beside"]
        self._candidates = [state["candidates"].numpy()]

    def candidates(self) -> np.ndarray:
        """All candidates (`peak_candidates` rows), once every block is in: what
        `points` suppresses. Those of a stripe of a wider map that lie at least the halo
        from the stripe's inner edges are the wider map's there.
        """
        if self._bottom != self.height or self._left != self.width:
            raise ValueError(f"blocks up to row {self._bottom} and column {self._left} of the "
                             f"{self.height}x{self.width} map were added")
        return np.concatenate(self._candidates) if self._candidates else np.zeros((0, 5))

    def points(self) -> np.ndarray:
        """The cells, once every block is in: as `detect_cells` returns them."""
        return suppress_peaks(self.candidates(), self.min_distance)


def _blur_radius(sigma: float) -> int:
    return max(1, int(3 * sigma + 0.5)) if sigma > 0 else 0


def _gaussian_blur(x: torch.Tensor, sigma: float,
                   edges: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> torch.Tensor:
    """Separable Gaussian blur of (1, C, h, w), rows first; replicate padding on the sides that
    ``edges`` (top, bottom, left, right) mark as the image's edge, and each other side loses
    the radius (a valid convolution there, so a block's blur equals the whole map's).
    """
    radius = _blur_radius(sigma)
    kernel = _gaussian_kernel(sigma).to(x.dtype)
    top, bottom, left, right = (radius if edge else 0 for edge in edges)
    x = _valid_correlation(F.pad(x, (left, right, 0, 0), mode="replicate"), kernel, -1)
    return _valid_correlation(F.pad(x, (0, 0, top, bottom), mode="replicate"), kernel, -2)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """The blur's 1-D kernel, float32, normalised: 2 `_blur_radius` + 1 taps (sigma > 0)."""
    radius = _blur_radius(sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _valid_correlation(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over k of kernel[k] * x shifted by k along ``dim``, where the kernel fits ('valid'): each
    pixel adds its terms in kernel order, starting from the first. A depthwise ``F.conv2d`` with a
    1-D kernel computes the same sums and on the CPU runs its channels one by one, about 20x slower
    (benchmarks/predict_profile.py).
    """
    n, length = kernel.numel(), x.shape[dim]
    out = x.narrow(dim, 0, length - n + 1) * kernel[0]
    for k in range(1, n):
        out.add_(x.narrow(dim, k, length - n + 1), alpha=float(kernel[k]))
    return out


def _max_filter(score: torch.Tensor, window: int) -> torch.Tensor:
    """The maximum of each pixel's ``window`` x ``window`` neighbourhood of (h, w) ``score`` (-inf
    beyond its edges): column maxima, then row maxima of those, each a running maximum by doubling
    (spans 1, 2, 4, .. then one last overlapping pair). A maximum does not depend on the order it is
    taken in, so this equals the square filter exactly, at about 2 log2(window) whole-map comparisons
    instead of window² per pixel.
    """
    return _running_max(_running_max(score, window, 0), window, 1)


def _running_max(x: torch.Tensor, window: int, dim: int) -> torch.Tensor:
    """Along ``dim``, the maximum over the odd ``window`` centred on each element (-inf beyond the ends)."""
    half, length = window // 2, x.shape[dim]
    pad = [half, half, 0, 0] if dim == 1 else [0, 0, half, half]  # (TorchScript compiles it: detection.scripted)
    padded = F.pad(x, pad, value=float("-inf"))
    span, running = 1, padded  # running[i]: the maximum of padded[i .. i + span - 1]
    while 2 * span <= window:
        n = running.shape[dim] - span
        running = torch.maximum(running.narrow(dim, 0, n), running.narrow(dim, span, n))
        span *= 2
    # window = span + rest: the maximum of two spans that overlap (or meet) covers it
    return torch.maximum(running.narrow(dim, 0, length), running.narrow(dim, window - span, length))
