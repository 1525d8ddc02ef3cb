"""Stage 2 of the two-stage cell model as a module that TorchScript compiles (and, as `ExportedWindows`,
that ``torch.export`` and ONNX take), so that a package's ``cells.pt`` and ``cells.onnx`` carry the whole
two-stage model: `ScriptedWindows` takes the input tile and stage 1's cells and returns the instance label
image and each cell's class, as `equiseg.inference.instance_outputs.two_stage_file` gives them.

* The windows: each cell's (S, S) window centred on its pixel, mirrored beyond the tile's edges again and
  again as `equiseg.data.windows` and `reader_window` mirror them (a triangle wave of indices: `mirror`),
  gathered a batch of ``batch`` cells at a time in the cells' order (the batches `run_windows` makes).
* Stage 2 (a traced `CellWindowNet`) on each batch: p(nucleus) in the window and the class probabilities.
* Pasting (`paste_instances`' rule): a pixel goes to the window with the highest p(nucleus), if at least
  ``threshold``; ties to the higher proposal score, then the higher class, then the earlier cell: the least
  (-p, -score, -class, row) among a pixel's entries (`_winners`, one scatter a key).
* Settling (`settle_instances`): every cell owns its centre's pixel, then each instance keeps the 4-connected
  piece holding its centre (`ScriptedInstances`' own steps).
"""

from __future__ import annotations

import torch
from torch import nn

from equiseg.detection.instances import NUCLEUS_THRESHOLD
from equiseg.detection.scripted import ExportedInstances, ScriptedInstances, _winners


def mirror(position: torch.Tensor, length: int) -> torch.Tensor:
    """The index into 0 .. length - 1 of each ``position``, mirrored at both ends again and again (the
    edge not repeated: ``np.pad``'s ``reflect``; `equiseg.models.unet.reflect_pad`).
    """
    if length == 1:
        return torch.zeros_like(position)
    period = torch.full_like(position, 2 * (length - 1))  # a tensor: ONNX's exporter takes no symbolic divisor
    folded = position.remainder(period)
    return torch.where(folded < length, folded, period - folded)


class ScriptedWindows(nn.Module):
    """(x (C, H, W) float32 stage 2's input, cells (N, 4) float64 stage 1's rows x, y, class, probability) ->
    (labels (H, W) int32: k for row k - 1, 0 background; cells (N, 4): the same positions, stage 2's class and
    its probability). ``net`` maps (B, C, S, S) windows to (mask logits (B, 1, S, S), class logits (B, K)).
    """

    def __init__(self, net: nn.Module, side: int, classes: int, threshold: float = NUCLEUS_THRESHOLD,
                 batch: int = 64) -> None:
        super().__init__()
        self.net, self.side, self.classes = net, int(side), int(classes)
        self.threshold, self.batch = float(threshold), int(batch)
        self.settle = self._settler()

    def _settler(self) -> ScriptedInstances:
        return ScriptedInstances()

    def forward(self, x: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masks, class_probs = self._windows(x, cells[:, 0].long(), cells[:, 1].long())
        return self.place(masks, class_probs, cells, x.shape[1], x.shape[2])

    def place(self, masks: torch.Tensor, class_probs: torch.Tensor, cells: torch.Tensor, height: int,
              width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The label image and the cells from each cell's window outputs ((N, S, S) p(nucleus), (N, K) class
        probabilities): pasted and settled.
        """
        xs, ys = cells[:, 0].long(), cells[:, 1].long()
        best, index = class_probs.max(1)
        classes = (index + 1).double()
        labels = self._paste(masks, xs, ys, cells[:, 3], classes, height, width)
        table = torch.stack([cells[:, 0], cells[:, 1], classes, cells[:, 3]], 1)  # x, y, class, score
        labels = self.settle._own_centres(labels, xs, ys, table, width)
        labels = self.settle._centre_pieces(labels, xs, ys, width)
        return labels.to(torch.int32), torch.stack([cells[:, 0], cells[:, 1], classes, best.double()], 1)

    def _cut(self, x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S): the windows centred on (xs, ys), mirrored beyond the edges."""
        offsets = torch.arange(self.side) - self.side // 2
        rows = mirror(ys[:, None] + offsets[None, :], x.shape[1])
        columns = mirror(xs[:, None] + offsets[None, :], x.shape[2])
        return x[:, rows[:, :, None], columns[:, None, :]].permute(1, 0, 2, 3).contiguous()

    def _run(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask, logits = self.net(windows)
        return torch.sigmoid(mask[:, 0].float()), torch.softmax(logits.float(), 1)

    def _windows(self, x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2 on every cell's window, ``batch`` cells at a time in their order: (N, S, S) p(nucleus),
        (N, K) class probabilities.
        """
        masks: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for start in range(0, xs.shape[0], self.batch):
            mask, prob = self._run(self._cut(x, xs[start:start + self.batch], ys[start:start + self.batch]))
            masks.append(mask)
            probs.append(prob)
        if len(masks) == 0:
            return torch.zeros(0, self.side, self.side), torch.zeros(0, self.classes)
        return torch.cat(masks), torch.cat(probs)

    def _paste(self, masks: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, scores: torch.Tensor,
               classes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(H, W) int64: each pixel's owner (row + 1) by `paste_instances`' rule, 0 where none."""
        n, side = masks.shape[0], self.side
        offsets = torch.arange(side) - side // 2
        rows = (ys[:, None] + offsets[None, :])[:, :, None].expand(n, side, side)
        columns = (xs[:, None] + offsets[None, :])[:, None, :].expand(n, side, side)
        keep = (rows >= 0) & (rows < height) & (columns >= 0) & (columns < width) & (masks >= self.threshold)
        pixels = (rows * width + columns)[keep]
        entry = torch.arange(n)[:, None, None].expand(n, side, side)[keep]
        keys = [-masks.double()[keep], -scores[entry], -classes[entry], entry.double()]
        return _winners(pixels, keys, height * width).reshape(height, width)


class ExportedWindows(ScriptedWindows):
    """`ScriptedWindows` as ``torch.export`` (and ONNX) takes it: the batches one ``torch.while_loop`` (an ONNX
    ``Loop``) that writes each batch's outputs into (N, S, S) and (N, K) tensors it carries; the last batch
    is filled up with repeats of the last cell (the same windows, written twice), and the settling is
    `ExportedInstances`'.
    """

    def _settler(self) -> ScriptedInstances:
        return ExportedInstances()

    def _windows(self, x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = xs.shape[0]
        count = torch.tensor(n)
        last = (count - 1).clamp_min(0)

        def more(i: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
            return i * self.batch < count

        def step(i: torch.Tensor, masks: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            index = torch.minimum(i * self.batch + torch.arange(self.batch), last)
            mask, prob = self._run(self._cut(x, xs.index_select(0, index), ys.index_select(0, index)))
            return i + 1, masks.index_put((index,), mask), probs.index_put((index,), prob)

        masks = torch.zeros(n, self.side, self.side)
        probs = torch.zeros(n, self.classes)
        _, masks, probs = torch.while_loop(more, step, (torch.tensor(0), masks, probs))
        return masks, probs
