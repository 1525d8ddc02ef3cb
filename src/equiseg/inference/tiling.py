"""Probability maps from a trained model, whole or in overlapping tiles, batched on any device."""

from __future__ import annotations

import itertools
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from equiseg.models.optimize import optimize_for_inference
from equiseg.models.unet import model_class_channels, probabilities
from equiseg.runtime import Runtime

WindowReader = Callable[[int, int, int, int], torch.Tensor]  # (top, left, height, width) -> (C, h, w) float


TILE_MULTIPLE = 16  # px: window sides are rounded up to this (2**depth of the presets' U-Nets: no padding inside)


def tile_layout(length: int, tile: int, overlap: int) -> tuple[int, list[int]]:
    """The side and starts of the windows along one axis of ``length`` px: one window of the whole
    length when it fits in ``tile``; else the fewest windows n of at most ``tile`` px that overlap by at
    least ``overlap`` (n = ceil((length - overlap) / (tile - overlap))), all of one side, the least
    that lets n of them cover the length with that overlap (rounded up to `TILE_MULTIPLE`, never over
    ``tile``), and spread evenly from 0 to the end. So no window is mostly overlap: 4096 px in 1024 px
    windows overlapping by 128 are 5 of 928 px (1.13x the length computed), not 5 of 1024 with the
    last pushed back over its neighbour (1.25x).
    """
    if length <= tile:
        return length, [0]
    n = -(-(length - overlap) // (tile - overlap))
    side = -(-(length + (n - 1) * overlap) // n)
    side = min(tile, -(-side // TILE_MULTIPLE) * TILE_MULTIPLE)
    # consecutive starts differ by at most ceil((length - side) / (n - 1)) <= side - overlap
    return side, [(i * (length - side)) // (n - 1) for i in range(n)]


def check_tiling(tile: int | None, overlap: int) -> None:
    """Refuse windows that cannot cover an image: a ``tile`` (None: whole images) of at least 1 px,
    an ``overlap`` of at least 0 px and smaller than the tile.

    Raises:
        ValueError: naming the options (``--tile``, ``--overlap``) as the commands call them.
    """
    if tile is not None and tile < 1:
        raise ValueError(f"--tile {tile}: a tile must be at least 1 px")
    if overlap < 0:
        raise ValueError(f"--overlap {overlap}: an overlap cannot be negative")
    if tile is not None and overlap >= tile:
        raise ValueError(f"--overlap {overlap} must be smaller than --tile {tile}")


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """The windows (top, left, h, w) that cover an H x W image, row by row.

    Along each axis the windows are laid out by `tile_layout`: at most ``tile`` px (the image's
    side where it is smaller), overlapping their neighbours by at least ``overlap`` px, spread
    evenly from the first row (column) to the last; all windows of one image have the same shape.
    """
    check_tiling(tile, overlap)
    (h, rows), (w, columns) = tile_layout(height, tile, overlap), tile_layout(width, tile, overlap)
    return [(top, left, h, w) for top in rows for left in columns]


def tile_weight(height: int, overlap: int, width: int | None = None) -> torch.Tensor:
    """(height, width) blending weight of a window (width None: square): 1 inside, a linear ramp over
    the ``overlap`` px at each edge (where a U-Net sees less context); a window's share of the blend
    in overlaps.
    """
    def ramp(side: int) -> torch.Tensor:
        return torch.minimum(torch.arange(side) + 1, torch.arange(side).flip(0) + 1).float().clamp(max=overlap + 1)
    return (ramp(height)[:, None] * ramp(height if width is None else width)[None, :]) / (overlap + 1) ** 2


@dataclass(frozen=True)
class Skip:
    """Windows that need not go through the model (glass on a slide): ``where(window)`` is True
    for them, and each gets probability 1 for class 0 (background) of ``classes`` (all the model's
    output channels: a nucleus channel after the classes gets p(nucleus) = 0).
    """

    where: Callable[[tuple[int, int, int, int]], bool]
    classes: int

    def background(self, height: int, width: int) -> torch.Tensor:
        """(classes, height, width): all background."""
        probs = torch.zeros(self.classes, height, width)
        probs[0] = 1
        return probs


@torch.no_grad()
def window_probabilities(model: nn.Module, read: WindowReader, windows: list[tuple[int, int, int, int]],
                         runtime: Runtime, skip: Skip | None = None,
                         ) -> Iterator[tuple[tuple[int, int, int, int], torch.Tensor]]:
    """Each window with its probabilities (channels, h, w), float32 on the CPU, in order: the softmax of
    the model's class channels, then the sigmoid of a nucleus channel where it has one
    (`equiseg.models.unet.probabilities` with `model_class_channels`).

    Windows go through ``model`` (already on ``runtime.device``, eval mode) ``runtime.batch`` at
    a time, under ``runtime.autocast()``; two batches are held at once (one handed out, the next
    one computing). With
    ``runtime.optimize`` they go through `inference_model` of it instead. Windows that
    ``skip`` names are not read and get its background; the others are batched as if they
    were alone.
    """
    skipped = {w for w in windows if skip.where(w)} if skip is not None else set()
    computed = _batched(model, read, [w for w in windows if w not in skipped], runtime)
    for w in windows:
        yield (w, skip.background(w[2], w[3])) if skip is not None and w in skipped else next(computed)


def _batched(model: nn.Module, read: WindowReader, windows: list[tuple[int, int, int, int]],
             runtime: Runtime) -> Iterator[tuple[tuple[int, int, int, int], torch.Tensor]]:
    """The windows' probabilities in order, a batch behind the model: batch k is handed out once
    batch k + 1 has been queued, so that on a GPU the host blends the last windows while the device
    computes (on the CPU the order of work is the same; one more batch of probabilities is held).
    A worker thread reads each batch's windows while the batch before it runs through the model
    (``read`` must allow that: the readers equiseg hands in read one window at a time under a lock),
    so reading and decoding stay in the network's shadow; at most two batches of inputs are held.
    """
    classes = model_class_channels(model)
    model = inference_model(model) if runtime.optimize else model
    cuda = runtime.device.type == "cuda"
    chunks = [windows[k:k + runtime.batch] for k in range(0, len(windows), runtime.batch)]
    pending = None
    with ThreadPoolExecutor(1, thread_name_prefix="equiseg-read") as reader:
        ahead = reader.submit(_read_chunk, read, chunks[0], cuda) if chunks else None
        for k, chunk in enumerate(chunks):
            assert ahead is not None  # submitted for every chunk
            tiles = ahead.result()
            ahead = reader.submit(_read_chunk, read, chunks[k + 1], cuda) if k + 1 < len(chunks) else None
            x = _load_batch(tiles, runtime.device)
            with torch.no_grad(), runtime.kernels(), runtime.autocast():
                logits = model(x)
            if cuda:
                # copies to pinned host memory, queued behind this batch's forward; its event says when they are in
                host = [p.to("cpu", non_blocking=True) for p in probabilities(logits.float(), classes, 1)]
                done = torch.cuda.Event()
                done.record()
            else:
                # softmax a window at a time: host buffers of one window's size, which the allocator
                # reuses from batch to batch. A batch-sized one (48 MB for 4 windows of 1024 px) is above
                # glibc's largest mmap threshold (32 MB): fresh pages each time, faulted in one by one
                # (benchmarks/tiling.py)
                host, done = [probabilities(window_logits.float(), classes, 0) for window_logits in logits], None
            if pending is not None:
                yield from _hand_out(*pending)
            pending = chunk, host, done
    if pending is not None:
        yield from _hand_out(*pending)


def _hand_out(chunk: list[tuple[int, int, int, int]], host: list[torch.Tensor], done: torch.cuda.Event | None,
              ) -> Iterator[tuple[tuple[int, int, int, int], torch.Tensor]]:
    if done is not None:
        done.synchronize()  # this batch's copies are in (the batch queued after it may still run)
    yield from zip(chunk, host)


def _read_chunk(read: WindowReader, chunk: list[tuple[int, int, int, int]], cuda: bool) -> list[torch.Tensor]:
    """The windows' inputs, each as ``read`` gives it; for a GPU staged contiguous in pinned memory, so
    that its copy to the device is queued and does not wait for the work already queued
    (``pin_memory()`` of a view would keep its strides).
    """
    tiles = [read(*window) for window in chunk]
    if cuda:
        tiles = [torch.empty(tile.shape, dtype=torch.float32, pin_memory=True).copy_(tile) for tile in tiles]
    return tiles


def _load_batch(tiles: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The windows' inputs as one float32 batch on ``device``, each copied into its place
    (``torch.stack`` of the windows would build the batch on the host first: one more pass, over a
    buffer that is fresh pages from 32 MB up).
    """
    x = torch.empty((len(tiles), *tiles[0].shape), dtype=torch.float32, device=device)
    for i, tile in enumerate(tiles):
        x[i].copy_(tile, non_blocking=device.type == "cuda")
    return x


_OPTIMIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_model(model: nn.Module) -> nn.Module:
    """`optimize_for_inference` of ``model``, made once and kept while
    ``model`` lives and its parameters and buffers are unchanged (an optimiser step, a load or a
    move makes a new one).
    """
    key = tuple((t._version, t.data_ptr()) for t in (*model.parameters(), *model.buffers()))
    cached = _OPTIMIZED.get(model)
    if cached is None or cached[0] != key:
        cached = (key, optimize_for_inference(model))
        _OPTIMIZED[model] = cached
    return cached[1]


def model_runtime(model: nn.Module) -> Runtime:
    """Batch 1, float32, on the device of ``model``'s parameters."""
    return Runtime(next(model.parameters()).device)


def predict_probabilities(model: nn.Module, image: torch.Tensor, tile: int | None = 1024,
                          overlap: int = 128, runtime: Runtime | None = None) -> torch.Tensor:
    """Probabilities (classes, H, W), float32 on the CPU, for one input (C, H, W): RGB in
    [0, 1], then any context. A model with a nucleus output gives (classes + 1, H, W): the class
    softmax, then p(nucleus) (`window_probabilities`).

    Images no larger than ``tile`` on both sides go through whole. Larger ones are cut into
    ``tile`` x ``tile`` windows overlapping by ``overlap`` px (`tile_grid`); each window's
    probabilities are weighted by `tile_weight` and the weighted sum is normalised: each
    pixel sums its windows' terms in row-major window order, starting from zero, then divides
    by the sum of their weights, all in float32. ``runtime`` (default: the model's device,
    batch 1, float32) says where and how many windows go through at once; batches take the
    windows in the order of `window_blocks` (with batch 1 the order does not matter).

    It is `stream_blocks` put together, so the two agree bit for bit. Memory: the
    (C, H, W) input and output plus what `stream_blocks` holds. ``model`` should be in
    eval mode.
    """
    _, height, width = image.shape
    def read(top, left, h, w):
        return image[:, top:top + h, left:left + w]
    out = None
    for top, left, probs in stream_blocks(model, read, height, width, tile, overlap, runtime):
        if out is None:
            out = torch.empty(probs.shape[0], height, width)
        out[:, top:top + probs.shape[1], left:left + probs.shape[2]] = probs
    assert out is not None  # an image has a block
    return out


class BlockSink:
    """Finished blocks handed to ``consume(top, left, probs)`` in order: on a worker thread when
    ``threaded`` (at most ``depth`` blocks wait; the stream computes the next blocks meanwhile, which
    on a GPU keeps the device busy while the host detects and writes), else at once. Use it in
    ``with``: leaving waits for the last block; an error in ``consume`` is raised again in the caller
    (at its next `put` or on leaving) and the blocks after it are dropped.
    """

    def __init__(self, consume: Callable[[int, int, torch.Tensor], None], threaded: bool, depth: int = 2) -> None:
        self.consume, self.threaded = consume, threaded
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="equiseg-blocks", daemon=True) if threaded else None

    def __enter__(self) -> BlockSink:  # noqa: PYI034 (Self needs Python 3.11)
        if self._thread is not None:
            self._thread.start()
        return self

    def put(self, top: int, left: int, probs: torch.Tensor) -> None:
        """Hand over the next block."""
        if self._thread is None:
            self.consume(top, left, probs)
            return
        self._raise()
        self._queue.put((top, left, probs))

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            if exc[0] is None:
                self._raise()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.consume(*item)
                except BaseException as error:  # handed to the caller's thread  # noqa: BLE001
                    self._error = error

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


BLOCK_SIDE = 1024  # px: about the side of the blocks of windows that stream_blocks finishes at a time


@dataclass(frozen=True)
class WindowBlock:
    """K x K neighbouring windows of `tile_grid` and the region of the image they finish.

    The block owns the rows from the start of its first window row to the start of the next
    block row's first window row (the image's bottom for the last block row), and likewise the
    columns. Windows only reach right and down into later blocks, so once this block's windows
    and those of every block before it (row-major) are in, its region is final.

    Attributes:
        top, bottom, left, right: its region, rows top .. bottom - 1 and columns left .. right - 1, px.
        windows: its windows (top, left, h, w), row by row.
    """

    top: int
    bottom: int
    left: int
    right: int
    windows: tuple[tuple[int, int, int, int], ...]


def window_blocks(height: int, width: int, tile: int, overlap: int, block_side: int = BLOCK_SIDE,
                  columns: tuple[int, int] | None = None) -> list[WindowBlock]:
    """The windows of `tile_grid` in blocks of K x K, K = max(1, block_side // (tile - overlap)),
    row-major; the blocks' regions tile the H x W image.

    With ``columns`` = (m0, m1), only the windows that reach into columns m0 .. m1 - 1, and
    regions that tile that stripe of the image: the first block column also holds the windows
    that start left of m0, and the last one's region ends at m1.
    """
    group = max(1, block_side // (tile - overlap))
    m0, m1 = columns if columns is not None else (0, width)
    if not 0 <= m0 < m1 <= width:
        raise ValueError(f"columns {m0}..{m1 - 1} are not within the image's {width}")
    (h, rows), (w, cols) = tile_layout(height, tile, overlap), tile_layout(width, tile, overlap)
    cols = [c for c in cols if c < m1 and c + w > m0]
    row_cuts = rows[::group] + [height]
    col_cuts = [m0] + [c for c in cols[group::group] if c > m0] + [m1]
    col_groups = [[c for c in cols if (j == 0 or c >= col_cuts[j]) and c < col_cuts[j + 1]]
                  for j in range(len(col_cuts) - 1)]
    return [WindowBlock(row_cuts[i], row_cuts[i + 1], col_cuts[j], col_cuts[j + 1],
                        tuple((top, left, h, w) for top in rows[i * group:(i + 1) * group] for left in col_groups[j]))
            for i in range(len(row_cuts) - 1) for j in range(len(col_cuts) - 1)]


def block_count(height: int, width: int, tile: int | None, overlap: int, block_side: int | None = None,
                columns: tuple[int, int] | None = None) -> int:
    """How many blocks `stream_blocks` yields for these arguments (for a progress bar)."""
    if tile is None or (height <= tile and width <= tile):
        return 1
    return len(window_blocks(height, width, tile, overlap, BLOCK_SIDE if block_side is None else block_side, columns))


@dataclass
class _Piece:
    """The weighted probabilities of one window over a rectangle outside its own block's region,
    kept until the blocks that own those pixels add them.
    """

    order: tuple[int, int]  # (top, left) of its window: the order of sums is row-major in windows
    top: int
    left: int
    terms: torch.Tensor  # (C, h, w): probabilities x tile weight, rows top.., columns left..


@dataclass
class StreamState:
    """Where `stream_blocks` stands: the blocks yielded so far and the pieces they left
    for later blocks. Given to it, it is kept up to date as each block is yielded; saved
    (`state_dict`) and given to a new call over the same image, that call continues with
    the next block, and the blocks equal the uninterrupted stream's bit for bit (with batch 1:
    batches that ran across the cut are formed anew).
    """

    blocks_done: int = 0
    pieces: list[_Piece] = field(default_factory=list)

    def state_dict(self) -> dict:
        """Ints, tuples and tensors only (``torch.load(weights_only=True)`` reads them)."""
        return {"blocks_done": self.blocks_done,
                "pieces": [(p.order, p.top, p.left, p.terms) for p in self.pieces]}

    def load_state_dict(self, state: dict) -> None:
        self.blocks_done = state["blocks_done"]
        self.pieces = [_Piece(tuple(order), top, left, terms) for order, top, left, terms in state["pieces"]]


def stream_blocks(model: nn.Module, read: WindowReader, height: int, width: int, tile: int | None = 1024,
                  overlap: int = 128, runtime: Runtime | None = None, block_side: int | None = None,
                  skip: Skip | None = None, state: StreamState | None = None,
                  columns: tuple[int, int] | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The probabilities of an H x W image, a finished block at a time, row-major.

    Yields ``(top, left, probs)``: probs (classes, h, w), float32 on the CPU, are rows top ..
    top + h - 1 and columns left .. left + w - 1 of what `predict_probabilities` returns
    for the image that ``read`` gives, bit for bit: the same windows, weights and normalisation,
    and every pixel sums its windows' terms in the same (row-major) order, starting from zero.
    The windows go through ``runtime.batch`` at a time in block order, batches running on from
    one block into the next. The regions are those of `window_blocks` (one region, the
    whole image, when it is no larger than the tile): they tile the image, each block row
    sharing its rows.

    A window's terms outside its own block's region are kept, unsummed, as pieces until the
    blocks owning those pixels add them in order: summing them early would change the order of
    float32 sums where windows of two block columns and two window rows meet. So what is held
    is one block's accumulator ((classes + 1) x about ``block_side``² float32), the pieces
    (about ``overlap`` rows x the width, and ``overlap`` columns x the block's height, x
    classes float32) and two batches of windows, whatever H and W.

    Args:
        model: in eval mode, on ``runtime.device``.
        read: (top, left, h, w) -> (C, h, w) float input of that window, read when needed.
        height, width: the image's size, px.
        tile, overlap: as in `predict_probabilities`.
        runtime: default: the model's device, batch 1, float32.
        block_side: about the side of a block, px (at least one window step; default
            `BLOCK_SIDE`).
        skip: windows not to run (`window_probabilities`); they still take part in the
            blend, as background.
        state: continue from, and keep up to date, this `StreamState`.
        columns: (m0, m1): only the stripe of columns m0 .. m1 - 1, its blocks
            (`window_blocks`) yielded with their image coordinates. Its probabilities equal
            the whole image's there, bit for bit: the stripe runs every window that reaches
            into it, so neighbouring stripes both run the windows across their seam. Memory
            then grows with the stripe's width, not the image's.
    """
    check_tiling(tile, overlap)
    runtime = runtime or model_runtime(model)
    state = state if state is not None else StreamState()
    m0, m1 = columns if columns is not None else (0, width)
    if tile is None or (height <= tile and width <= tile):
        if state.blocks_done == 0:
            (_, probs), = window_probabilities(model, read, [(0, 0, height, width)], runtime, skip)
            state.blocks_done = 1
            yield 0, m0, probs[:, :, m0:m1]
        return
    blocks = window_blocks(height, width, tile, overlap, BLOCK_SIDE if block_side is None else block_side, columns)
    (_, _, h, w), = blocks[0].windows[:1]
    yield from _stream_tiled(model, read, blocks, tile_weight(h, overlap, w), runtime, skip, state, m1)


def _stream_tiled(model: nn.Module, read: WindowReader, blocks: list[WindowBlock], weight: torch.Tensor,
                  runtime: Runtime, skip: Skip | None, state: StreamState,
                  right: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """`stream_blocks` over ``blocks`` (of a tiled image) from ``state.blocks_done`` on,
    up to column ``right``.
    """
    start = state.blocks_done
    # one stream of windows, so that batches run on across blocks (a window's output can depend
    # on its batch's size in the last bit: predict_probabilities batches them the same way)
    results = window_probabilities(model, read, [window for block in blocks[start:] for window in block.windows],
                                   runtime, skip)
    pieces = state.pieces  # from earlier blocks
    for k in range(start, len(blocks)):
        block = blocks[k]
        probs = _finish_block(block, itertools.islice(results, len(block.windows)), pieces, weight, right)
        # finished now: every row above this block's bottom, up to its right edge; a piece is
        # dropped once all of it lies there
        pieces = [piece for piece in pieces if piece.top + piece.terms.shape[1] > block.bottom
                  or piece.left + piece.terms.shape[2] > block.right]
        state.pieces, state.blocks_done = pieces, k + 1
        yield block.top, block.left, probs


def _finish_block(block: WindowBlock, results: Iterator[tuple[tuple[int, int, int, int], torch.Tensor]],
                  pieces: list[_Piece], weight: torch.Tensor, right_edge: int) -> torch.Tensor:
    """The probabilities (C, h, w) over ``block``'s region from its windows' ``results`` and the
    ``pieces`` earlier blocks left in it, each pixel summing its windows in row-major order.
    The parts of this block's windows that reach beyond its region, up to column
    ``right_edge`` (the image's, or its stripe's, right edge), are appended to ``pieces``.
    """
    out = total = None
    waiting = sorted(pieces, key=lambda piece: piece.order)
    done = 0
    for (row, col, h, w), probs in results:
        if out is None or total is None:  # the first window: both are made
            out = torch.zeros(probs.shape[0], block.bottom - block.top, block.right - block.left)
            total = torch.zeros(block.bottom - block.top, block.right - block.left)
        # the pieces of windows before this one (row-major) go first: that is each pixel's order of sums
        while done < len(waiting) and waiting[done].order < (row, col):
            _add_part(out, total, block, weight, waiting[done])
            done += 1
        terms = probs * weight
        _add_part(out, total, block, weight, _Piece((row, col), row, col, terms))
        # what lies right of the region (in its rows), then below it: disjoint, so each term is summed once
        inside = min(row + h, block.bottom) - row
        if col + w > block.right < right_edge:
            pieces.append(_Piece((row, col), row, block.right,
                                 terms[:, :inside, block.right - col:right_edge - col].clone()))
        if row + h > block.bottom:
            pieces.append(_Piece((row, col), block.bottom, col, terms[:, inside:, :right_edge - col].clone()))
    assert out is not None and total is not None  # a block has a window
    for piece in waiting[done:]:
        _add_part(out, total, block, weight, piece)
    return out / total


def _add_part(out: torch.Tensor, total: torch.Tensor, block: WindowBlock, weight: torch.Tensor,
              piece: _Piece) -> None:
    """Add the part of ``piece`` inside ``block``'s region to its sums: out (C, h, w) of the
    weighted probabilities and total (h, w) of the weights, both over the region.
    """
    row, col = piece.top, piece.left
    a, b = max(row, block.top), min(row + piece.terms.shape[1], block.bottom)
    c, d = max(col, block.left), min(col + piece.terms.shape[2], block.right)
    if a >= b or c >= d:
        return
    (y, x), (top, left) = piece.order, (block.top, block.left)  # weight is indexed from the window's corner
    out[:, a - top:b - top, c - left:d - left] += piece.terms[:, a - row:b - row, c - col:d - col]
    total[a - top:b - top, c - left:d - left] += weight[a - y:b - y, c - x:d - x]
