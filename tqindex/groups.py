"""Code groups and codebook kinds: which codebook codes which rotated coordinates, and its rules.

A quantizer's rotated coordinates are split into at most two *groups* (a fractional width gives the
first coordinates one more bit, `codebook.split_bits`). Each group is coded by one *kind* of
codebook, an object that holds everything that differs between kinds:

- `ScalarKind`: the paper's Lloyd-Max codebook, one level per coordinate.
- `BlockKind`: 16 codewords over blocks of 4 // bits coordinates (1 and 2 bits, codebook="vq"), so a
  4-bit nibble of packed codes is one codeword index (`codebook.block_codebook`).
- `PlaneKind`: 5-bit levels of the form low[n] + p·step (codebook="vq", codebook version ≥ 2), which
  the fast scan reads as a 4-bit code plus a plane of 1-bit codes (`codebook.plane_codebook`).

`choose_kind` is the one place that decides the kind of a group; the quantizer and the float64
reference oracle both call it. The packed layout is the same for every kind (`tqindex.packing`):
a kind changes what the codes mean, not where their bits are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .codebook import (PLANE_BITS, block_codebook, lloyd_max_codebook, plane_codebook, split_bits,
                       vq_block)
from .packing import packed_row_bytes

__all__ = ["CODEBOOKS", "BlockKind", "CodeGroup", "NibblePart", "PlaneKind", "ScalarKind", "choose_kind",
           "group_layout", "make_groups"]

#: Codebook families an index can ask for: "scalar" (the paper's, every group a `ScalarKind`) or
#: "vq" (block codebooks at 1-2 bits, the bit-plane codebook at 5 bits, scalar elsewhere).
CODEBOOKS = ("vq", "scalar")

#: Widest code the fast scan reads in one nibble plus a mask bit (a Lloyd-Max 5-bit code).
_MASKED_BITS = PLANE_BITS


@dataclass(frozen=True)
class NibblePart:
    """What the fast scan reads of a group, as 4-bit nibbles.

    bits : width of each code in this part
    per : codes per nibble (4 // bits for 1-2 bits, else 1)
    centroids : (2**bits,) float32, the level of each code value
    codewords : (16, per) float32 for a block codebook (nibble v is codeword v), else None
    pick : which bits of the per-coordinate code this part holds: None (all), "high" (code >> 1)
        or "low" (code & 1)
    masked : a 5-bit code kept as a 4-bit nibble plus a mask bit (two 16-entry tables, blended)
    """

    bits: int
    per: int
    centroids: np.ndarray
    codewords: np.ndarray | None = None
    pick: str | None = None
    masked: bool = False


class ScalarKind:
    """One Lloyd-Max level per coordinate (the paper's codebook).

    Attributes
    ----------
    bits : int
    block : int, coordinates per codeword (1 here)
    centroids : (2**bits,) float64 ascending levels; boundaries : (2**bits − 1,) float64 midpoints
    codewords : (2**(bits·block), block) float64; for a scalar kind, centroids[:, None]
    """

    name = "scalar"
    block = 1

    def __init__(self, dim: int, bits: int):
        self.dim, self.bits = int(dim), int(bits)
        self.scalar = self._scalar_codebook()
        self.centroids = self.scalar.centroids
        self.boundaries = self.scalar.boundaries
        self.codewords = self.centroids[:, None]

    def _scalar_codebook(self):
        return lloyd_max_codebook(self.dim, self.bits)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, bits={self.bits})"

    # -- the fast scan --------------------------------------------------------------------------
    def nibble_parts(self) -> list[NibblePart] | None:
        """How the fast scan reads this kind, or None if it cannot (codes wider than 5 bits)."""
        c = self.centroids.astype(np.float32)
        if self.bits <= 4:
            return [NibblePart(self.bits, 4 // self.bits if self.bits in (1, 2) else 1, c)]
        if self.bits == _MASKED_BITS:
            return [NibblePart(self.bits, 1, c, masked=True)]
        return None

    @property
    def rescores_from_codes(self) -> bool:
        """Whether the fast scan may rescore rows by decoding packed codes to levels (scalar ≤ 4 bits)."""
        return self.bits <= 4

    # -- tables ---------------------------------------------------------------------------------
    def nibble_values(self) -> np.ndarray:
        """(16, 4 // bits) float32: the levels of the codes a nibble value v holds (bits 1, 2, 4)."""
        per = 4 // self.bits
        v = np.arange(16)[:, None] >> (np.arange(per) * self.bits)
        return self.centroids.astype(np.float32)[v & ((1 << self.bits) - 1)]

    def byte_table(self) -> np.ndarray | None:
        """(256, 8 // bits) float32: the levels a packed code byte decodes to, or None when codes
        straddle bytes (widths that do not divide 8)."""
        if 8 % self.bits:
            return None
        per = 8 // self.bits
        v = np.arange(256)[:, None] >> (np.arange(per) * self.bits)
        return self.centroids.astype(np.float32)[v & ((1 << self.bits) - 1)]

    # -- coding ---------------------------------------------------------------------------------
    def reconstruct(self, idx: torch.Tensor, codewords: torch.Tensor) -> torch.Tensor:
        """Per-coordinate codes (n, m) → levels (n, m) float32; `codewords` is this kind's table
        as a tensor on idx's device."""
        return codewords[:, 0][idx.long()]

    def nearest(self, part: torch.Tensor, boundaries: torch.Tensor, codewords: torch.Tensor) -> torch.Tensor:
        """Rotated coordinates (n, m) → per-coordinate codes (n, m) int64: the nearest level."""
        return torch.bucketize(part, boundaries)  # the first boundary ≥ y: the nearest centroid


class PlaneKind(ScalarKind):
    """5-bit levels c[2n + p] = low[n] + p·step: scanned as a 4-bit code and a 1-bit plane."""

    name = "plane"

    def _scalar_codebook(self):
        return plane_codebook(self.dim, self.bits)

    @property
    def step(self) -> float:
        """The level gap of the plane bit, as float32 (what the tables use)."""
        return float(np.float32(self.scalar.step))

    def nibble_parts(self) -> list[NibblePart]:
        low = np.ascontiguousarray(self.centroids.astype(np.float32)[0::2])
        return [NibblePart(self.bits - 1, 1, low, pick="high"),
                NibblePart(1, 4, np.array([0.0, self.step], np.float32), pick="low")]

    @property
    def rescores_from_codes(self) -> bool:
        return False


class BlockKind(ScalarKind):
    """16 codewords for blocks of 4 // bits consecutive coordinates (one nibble of packed codes).

    The scalar Lloyd-Max levels are kept too (`centroids`): they bound decoded values and give the
    zero codebook rows of scalar-only consumers, but codes mean codewords.
    """

    name = "block"

    def __init__(self, dim: int, bits: int):
        super().__init__(dim, bits)
        self.block = vq_block(dim, bits)
        self.codewords = block_codebook(dim, bits).codewords

    def nibble_parts(self) -> list[NibblePart]:
        return [NibblePart(self.bits, self.block, self.centroids.astype(np.float32),
                           self.codewords.astype(np.float32))]

    @property
    def rescores_from_codes(self) -> bool:
        return False

    def nibble_values(self) -> np.ndarray:
        return self.codewords.astype(np.float32)

    def byte_table(self) -> np.ndarray:
        # A byte is two whole codewords (a block is one nibble).
        words = self.codewords.astype(np.float32)
        v = np.arange(256)
        return np.concatenate([words[v & 15], words[v >> 4]], axis=1)

    def reconstruct(self, idx: torch.Tensor, codewords: torch.Tensor) -> torch.Tensor:
        n = idx.shape[0]
        blocks = idx.long().reshape(n, -1, self.block)
        word = sum(blocks[:, :, t] << (t * self.bits) for t in range(self.block))
        return codewords[word].reshape(n, -1)

    def nearest(self, part: torch.Tensor, boundaries: torch.Tensor, codewords: torch.Tensor) -> torch.Tensor:
        """Each block's nearest codeword (squared distance; ties: the lowest index), split into
        `bits`-bit per-coordinate codes."""
        n = part.shape[0]
        blocks = part.reshape(-1, self.block)
        # One codeword at a time keeps memory at O(blocks); sums in coordinate order and a strict
        # "<" (the lowest index wins ties) are the C encoder's rule, so both give the same codes.
        best = torch.full((blocks.shape[0],), float("inf"), device=part.device)
        word = torch.zeros(blocks.shape[0], dtype=torch.int64, device=part.device)
        for v in range(codewords.shape[0]):
            dist = (blocks[:, 0] - codewords[v, 0]).square()
            for t in range(1, self.block):
                dist = dist + (blocks[:, t] - codewords[v, t]).square()
            closer = dist < best
            best = torch.where(closer, dist, best)
            word = torch.where(closer, v, word)
        shifts = torch.arange(self.block, device=part.device) * self.bits
        return ((word[:, None] >> shifts) & ((1 << self.bits) - 1)).reshape(n, -1)


@functools.lru_cache(maxsize=None)
def choose_kind(dim: int, bits: int, length: int, codebook: str, version: int) -> ScalarKind:
    """The codebook kind for a group of `length` coordinates coded with `bits` bits each.

    Under "vq" a 1- or 2-bit group is a `BlockKind` when its blocks tile it (and dim ≥ 8), a 5-bit
    group (codebook version ≥ 2) a `PlaneKind`; everything else, and everything under "scalar", is a
    `ScalarKind`.
    """
    if codebook not in CODEBOOKS:
        raise ValueError(f"unknown codebook {codebook!r}; expected one of {CODEBOOKS}")
    if codebook == "vq":
        block = vq_block(dim, bits)
        if block > 1 and length % block == 0:
            return BlockKind(dim, bits)
        if bits == PLANE_BITS and version >= 2:
            return PlaneKind(dim, bits)
    return ScalarKind(dim, bits)


def group_layout(dim: int, bits, variant: str = "mse") -> list[tuple[int, int, int]]:
    """(start, stop, bits) of the mse stage's code groups: the first `high` rotated coordinates at
    base + 1 bits, the rest at base (`split_bits`); "prod" gives one bit of each to QJL."""
    base, high = split_bits(dim, bits)
    if variant == "prod":
        base -= 1
        if base == 0 and high:
            raise ValueError(f"variant 'prod' needs bits >= 2 when bits are fractional, got {bits!r}")
    return [(a, b, w) for a, b, w in ((0, high, base + 1), (high, dim, base)) if b > a and w > 0]


@dataclass(frozen=True, eq=False)
class CodeGroup:
    """Rotated coordinates [start, stop) coded by `kind`; their packed codes fill bytes
    [offset, offset + nbytes) of a row (`tqindex.packing` layout). Whole widths have one group,
    fractional widths two (the wider one first). Tensors are float32 on the CPU."""

    start: int
    stop: int
    offset: int
    nbytes: int
    kind: ScalarKind
    centroids: torch.Tensor    # (2**bits,) float32
    boundaries: torch.Tensor   # (2**bits − 1,) float32
    codewords: torch.Tensor    # (2**(bits·block), block) float32

    @property
    def bits(self) -> int:
        return self.kind.bits

    @property
    def block(self) -> int:
        return self.kind.block

    @property
    def plane(self) -> bool:
        return isinstance(self.kind, PlaneKind)

    def reconstruct(self, idx: torch.Tensor) -> torch.Tensor:
        """Per-coordinate codes (n, stop − start) integer → the group's ỹ part, float32."""
        return self.kind.reconstruct(idx, self.codewords.to(idx.device))

    def nearest(self, part: torch.Tensor) -> torch.Tensor:
        """Rotated coordinates (n, stop − start) → per-coordinate codes (n, stop − start) int64."""
        return self.kind.nearest(part, self.boundaries.to(part.device), self.codewords.to(part.device))


def make_groups(dim: int, bits, variant: str, codebook: str, version: int) -> list[CodeGroup]:
    """The code groups of a quantizer (see `group_layout` and `choose_kind`)."""
    groups, offset = [], 0
    for start, stop, width in group_layout(dim, bits, variant):
        kind = choose_kind(dim, width, stop - start, codebook, version)
        nbytes = packed_row_bytes(stop - start, width)
        f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        groups.append(CodeGroup(start, stop, offset, nbytes, kind, f32(kind.centroids), f32(kind.boundaries),
                                f32(kind.codewords)))
        offset += nbytes
    return groups
