"""The symmetry groups of the square pixel grid, C4 and D4, and the finer rotation groups C8, C16 and D8.

C4 holds the four rotations by multiples of 90 degrees; D4 adds the four reflections.
Semidirect with the translations of Z2 they give the wallpaper groups p4 = Z2 x| C4 and
p4m = Z2 x| D4 of Cohen & Welling (2016).

Conventions
-----------
An element is ``(r, m)``: first mirror left-right if ``m`` (``torch.flip(x, dims=(-1,))``),
then rotate by ``r`` quarter turns with ``torch.rot90(x, r, dims=(-2, -1))``, which turns
counter-clockwise as an image is shown (row 0 at the top). With flips after rotations,
``flip(rot90(x, r)) = rot90(flip(x), -r)``, so the product is

    (r1, m1) * (r2, m2) = (r1 + (-1)**m1 * r2 mod 4, m1 xor m2),

and ``act_on_image(a, act_on_image(b, x)) == act_on_image(a * b, x)`` exactly.

Elements are indexed ``4 * m + r``; C4 is the first four elements of D4.

Regular features carry a group axis of length |G|: ``f[h]`` is the response of the filter
turned by ``h``. ``g`` acts on them by turning the image plane and permuting that axis,

    (T_g f)[h](p) = f[g^-1 h](g^-1 p),

which is how the outputs of lifting and group convolutions transform (see ``equiseg.nn``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


@dataclass(frozen=True, order=True)
class GroupElement:
    """One element of D4: mirror left-right if ``flip``, then ``rotation`` quarter turns."""

    rotation: int
    flip: bool = False

    def __str__(self) -> str:
        angle = f"rot{90 * self.rotation}"
        return f"flip.{angle}" if self.flip else angle


@dataclass(frozen=True)
class Group:
    """A finite subgroup of D4 acting on images and on regular group features.

    Use the module constants ``C4`` and ``D4`` rather than building one.
    """

    name: str
    flips: bool

    @property
    def order(self) -> int:
        """|G|: 4 for C4, 8 for D4."""
        return 8 if self.flips else 4

    @cached_property
    def elements(self) -> tuple[GroupElement, ...]:
        """All elements in index order ``4 * flip + rotation``; the identity first."""
        flips = (False, True) if self.flips else (False,)
        return tuple(GroupElement(r, m) for m in flips for r in range(4))

    def index(self, g: GroupElement) -> int:
        """Position of ``g`` on the group axis."""
        if g.flip and not self.flips:
            raise ValueError(f"{g} is not an element of {self.name}")
        return 4 * int(g.flip) + g.rotation % 4

    @staticmethod
    def compose(a: GroupElement, b: GroupElement) -> GroupElement:
        """The product ``a * b`` (apply ``b`` first, then ``a``)."""
        sign = -1 if a.flip else 1
        return GroupElement((a.rotation + sign * b.rotation) % 4, a.flip != b.flip)

    @staticmethod
    def inverse(g: GroupElement) -> GroupElement:
        """``g^-1``: a reflection is its own inverse; a rotation turns back."""
        return g if g.flip else GroupElement((-g.rotation) % 4, False)

    @cached_property
    def cayley(self) -> torch.Tensor:
        """``cayley[i, j]`` is the index of ``elements[i] * elements[j]``; shape (|G|, |G|)."""
        table = [[self.index(self.compose(a, b)) for b in self.elements] for a in self.elements]
        return torch.tensor(table, dtype=torch.long, device="cpu")

    def regular_permutation(self, g: GroupElement) -> torch.Tensor:
        """Indices ``perm`` with ``perm[h] = index(g^-1 h)``, shape (|G|,).

        ``f[..., perm, :, :]`` permutes a group axis as ``g`` does in the regular
        representation: ``(T_g f)[h] = f[g^-1 h]``.
        """
        g_inv = self.inverse(g)
        return torch.tensor([self.index(self.compose(g_inv, h)) for h in self.elements], device="cpu")

    @staticmethod
    def act_on_image(g: GroupElement, x: torch.Tensor) -> torch.Tensor:
        """``T_g x`` for ``x`` of shape (..., H, W); an exact permutation of pixels.

        A rotation by an odd number of quarter turns swaps H and W.
        """
        if g.flip:
            x = torch.flip(x, dims=(-1,))
        return torch.rot90(x, g.rotation, dims=(-2, -1)) if g.rotation % 4 else x

    def act_on_regular(self, g: GroupElement, x: torch.Tensor) -> torch.Tensor:
        """``T_g`` on regular features of shape (..., |G|, H, W): turn the plane, permute the axis."""
        if x.shape[-3] != self.order:
            raise ValueError(f"expected a group axis of {self.order} at dim -3, got shape {tuple(x.shape)}")
        return self.act_on_image(g, x[..., self.regular_permutation(g).to(x.device), :, :])

    def __str__(self) -> str:
        return self.name


C4 = Group("C4", flips=False)
"""Rotations by 0, 90, 180 and 270 degrees (the point group of p4)."""

D4 = Group("D4", flips=True)
"""C4 and the four reflections (the point group of p4m)."""


def fold_group(x: torch.Tensor) -> torch.Tensor:
    """(B, C, |G|, H, W) -> (B, C*|G|, H, W), channel-major: the layout that convolutions see."""
    return x.flatten(1, 2)


def unfold_group(x: torch.Tensor, group: Group | PlaneGroup) -> torch.Tensor:
    """(B, C*|G|, H, W) -> (B, C, |G|, H, W); the inverse of `fold_group`."""
    if x.shape[1] % group.order:
        raise ValueError(f"{x.shape[1]} channels do not fold into fields of {group.name} (|G| = {group.order})")
    return x.unflatten(1, (-1, group.order))


@dataclass(frozen=True)
class PlaneGroup:
    """C_N or D_N as a group of the plane: ``n`` rotations by 2 pi r / n, and with ``flips`` their mirror images.

    The steerable families' point groups (see `equiseg.nn.steerable`). Elements are indexed
    ``n * m + r``: mirror left-right if ``m``, then turn by ``r / n`` of a full turn counter-clockwise
    as an image is shown, the conventions of C4 and D4 above, which are the subgroup of every
    ``n`` divisible by 4 that acts on the pixel grid exactly: D4's element ``(r, m)`` is ``(n // 4 * r, m)``.
    Regular features carry a group axis of length ``order`` and transform as for C4 and D4.
    """

    name: str
    n: int
    flips: bool

    @property
    def order(self) -> int:
        """|G|: n, or 2n with flips."""
        return self.n * (2 if self.flips else 1)

    @cached_property
    def matrices(self) -> np.ndarray:
        """(|G|, 2, 2) float64: how each element moves a point (x right, y down) of the plane."""
        mats = []
        for m in ((0, 1) if self.flips else (0,)):
            for r in range(self.n):
                angle = 2 * math.pi * r / self.n
                c, s = (round(v) if abs(v - round(v)) < 1e-12 else v for v in (math.cos(angle), math.sin(angle)))
                turn = np.array([[c, s], [-s, c]])  # counter-clockwise on screen (y down); quarter turns exact
                mats.append(turn @ np.diag([-1.0 if m else 1.0, 1.0]))
        return np.stack(mats)

    @cached_property
    def cayley(self) -> torch.Tensor:
        """``cayley[i, j]``: the index of element i times element j (j first); shape (|G|, |G|)."""
        mats = self.matrices
        products = np.einsum("iab,jbc->ijac", mats, mats)  # (|G|, |G|, 2, 2)
        distance = np.abs(products[:, :, None] - mats[None, None]).reshape(self.order, self.order, self.order, 4)
        return torch.tensor(distance.max(axis=-1).argmin(axis=-1), dtype=torch.long, device="cpu")

    @cached_property
    def inverses(self) -> torch.Tensor:
        """``inverses[i]``: the index of element i's inverse; shape (|G|,)."""
        return torch.tensor(np.argmin(self.cayley.numpy(), axis=1), dtype=torch.long, device="cpu")

    @cached_property
    def left_regular(self) -> torch.Tensor:
        """``left_regular[g, h] = index(g^-1 h)``: the regular action's permutation of a group axis, row by element."""
        return self.cayley[self.inverses]

    def index(self, g: GroupElement) -> int:
        """The index of a D4 element (quarter turns, flips) in this group."""
        if self.n % 4 or (g.flip and not self.flips):
            raise ValueError(f"{g} is not an element of {self.name}")
        return self.n * int(g.flip) + self.n // 4 * (g.rotation % 4)

    def act_on_regular(self, g: GroupElement, x: torch.Tensor) -> torch.Tensor:
        """``T_g`` for a D4 element on regular features (..., |G|, H, W): turn the plane, permute the axis."""
        if x.shape[-3] != self.order:
            raise ValueError(f"expected a group axis of {self.order} at dim -3, got shape {tuple(x.shape)}")
        return Group.act_on_image(g, x[..., self.left_regular[self.index(g)].to(x.device), :, :])

    def __str__(self) -> str:
        return self.name


C8 = PlaneGroup("C8", 8, flips=False)
"""Rotations by multiples of 45 degrees (exact on the pixel grid for its C4)."""

C16 = PlaneGroup("C16", 16, flips=False)
"""Rotations by multiples of 22.5 degrees (exact on the pixel grid for its C4)."""

D8 = PlaneGroup("D8", 8, flips=True)
"""C8 and eight reflections (exact on the pixel grid for its D4)."""
