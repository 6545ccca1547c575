"""The block layout: how an index holds, stores and scans mse codes of 1-5 bits.

Codes a fast scan can read (mse, every group's kind has `nibble_parts`) are held in one form only,
the one the kernels scan, and the same bytes are written to the shards, so a memory-mapped index
searches its pages as they are. Other codes (prod, groups wider than 5 bits) stay row-major
(`tqindex.packing`).

Layout
------
Each row's codes are regrouped into *nibbles* of 4 bits: one code of 3-4 bits, two of 2 bits, four
of 1 bit, or a block codeword index; a bit-plane 5-bit group is two parts (its codes' high 4 bits,
then their lowest bits four to a nibble); a Lloyd-Max 5-bit group keeps its low 4 bits in nibbles
and its 5th bits in mask columns. Nibble 2c sits in the low half of byte column c, 2c + 1 in the
high half; mask column u, after the ncols nibble columns, has bit t = the 5th bit of wide nibble
8u + t. Rows go in blocks of 32: ``blocks[b, c, v]`` is column c of row 32·b + v, so one 32-byte
load gives a column of a whole block. Rows past the end of the last block are zero.

Where a single group's nibbles are its packed codes (1, 2 or 4 bits, one group), a row's column
bytes are exactly its `tqindex.packing` row.

Per-row floats (scales, norms) stay in row order beside the blocks; the kernels read them as they are.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .packing import pack_codes, unpack_codes

__all__ = ["BLOCK", "BlockLayout", "block_count"]

BLOCK = 32
_CHUNK_ROWS = 1 << 15  # rows converted at a time: bounds the temporaries of every conversion

def block_count(rows: int) -> int:
    return -(-rows // BLOCK)


@dataclass(frozen=True)
class _Part:
    start: int          # rotated coordinates [start, stop) this part codes
    stop: int
    nibble: int         # its first nibble
    nibbles: int        # nibbles it takes
    spec: object        # the kind's `NibblePart`


class BlockLayout:
    """The block layout of one quantizer's codes (see the module notes).

    Build with `BlockLayout.of(groups, variant)`, which returns None for codes without one.

    Attributes
    ----------
    ncols : nibble byte columns per row
    wcols : of the ncols columns, how many hold masked 5-bit nibbles (the first ones; a multiple of 4)
    width : bytes per row in a block, ncols + wcols / 4
    direct : whether a row's nibble columns are its packed codes
    """

    def __init__(self, groups, dim: int):
        self.groups, self.dim = groups, dim
        self.code_bytes = sum(g.nbytes for g in groups)
        plan = [(g.start, g.stop, part) for g in groups for part in g.kind.nibble_parts()]
        first = plan[0][2]
        # Masked nibbles are padded to a multiple of 8 (one mask byte per 8 of them).
        self.wcols = 4 * -(-(plan[0][1] - plan[0][0]) // 8) if first.masked else 0
        self.parts, nibble = [], 0
        for start, stop, spec in plan:
            count = 2 * self.wcols if spec.masked else -(-(stop - start) // spec.per)
            self.parts.append(_Part(start, stop, nibble, count, spec))
            nibble += count
        self.nibbles = nibble
        self.ncols = -(-nibble // 2)
        self.width = self.ncols + self.wcols // 4
        self.direct = len(plan) == 1 and 4 % first.bits == 0

    @classmethod
    def of(cls, groups, variant: str, dim: int) -> "BlockLayout | None":
        """The layout of these code groups, or None where the kernels cannot read them: the mse
        variant, every group readable as nibbles, and a masked group only first (groups are ordered
        widest first)."""
        if variant != "mse" or not groups:
            return None
        parts = [g.kind.nibble_parts() for g in groups]
        if any(p is None for p in parts) or any(q.masked for p in parts[1:] for q in p):
            return None
        return cls(groups, dim)

    # -- sizes ----------------------------------------------------------------------------------
    def nbytes(self, rows: int) -> int:
        """Bytes of the blocks holding `rows` rows."""
        return block_count(rows) * BLOCK * self.width

    def empty(self, rows: int) -> np.ndarray:
        """Zeroed blocks for `rows` rows: (ceil(rows/32), width, 32) uint8."""
        return np.zeros((block_count(rows), self.width, BLOCK), np.uint8)

    # -- rows ↔ nibble rows ---------------------------------------------------------------------
    def nibble_rows(self, codes: np.ndarray) -> np.ndarray:
        """Packed codes (n, code_bytes) → (n, width) bytes in the layout's column order."""
        codes = np.asarray(codes)
        if self.direct:
            return codes
        n = codes.shape[0]
        if not n:
            return np.zeros((0, self.width), np.uint8)
        idx = _unpack(self.groups, codes, self.dim)
        nib = np.zeros((n, 2 * self.ncols), np.uint8)
        masks = []
        for p in self.parts:
            spec, part = p.spec, idx[:, p.start:p.stop]
            if spec.pick is not None:
                part = part >> 1 if spec.pick == "high" else part & 1
            width = p.nibbles if spec.masked else p.nibbles * spec.per
            if width != part.shape[1]:
                part = np.concatenate([part, np.zeros((n, width - part.shape[1]), np.uint8)], axis=1)
            if spec.masked:
                high = (part >> 4).reshape(n, -1, 8)
                masks.append(np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8), axis=2).astype(np.uint8))
                part = part & 15
            part = part.reshape(n, -1, spec.per)
            value = part[:, :, 0].copy()
            for t in range(1, spec.per):
                value |= part[:, :, t] << (t * spec.bits)
            nib[:, p.nibble:p.nibble + p.nibbles] = value
        return np.concatenate([nib[:, 0::2] | (nib[:, 1::2] << 4)] + masks, axis=1)

    def codes_from_nibble_rows(self, rows: np.ndarray) -> np.ndarray:
        """The inverse of `nibble_rows`: (n, width) → packed codes (n, code_bytes)."""
        rows = np.asarray(rows)
        if self.direct:
            return np.ascontiguousarray(rows[:, :self.code_bytes])
        n = rows.shape[0]
        if not n:
            return np.zeros((0, self.code_bytes), np.uint8)
        nib = np.empty((n, 2 * self.ncols), np.uint8)
        nib[:, 0::2] = rows[:, :self.ncols] & 15
        nib[:, 1::2] = rows[:, :self.ncols] >> 4
        idx = np.zeros((n, self.dim), np.uint8)
        for p in self.parts:
            spec, length = p.spec, p.stop - p.start
            part = nib[:, p.nibble:p.nibble + p.nibbles]
            if spec.masked:
                masks = rows[:, self.ncols:self.ncols + p.nibbles // 8]
                high = (masks[:, :, None] >> np.arange(8, dtype=np.uint8)) & 1
                values = part | (high.reshape(n, -1) << 4)
            else:
                shifts = (np.arange(spec.per) * spec.bits).astype(np.uint8)
                values = ((part[:, :, None] >> shifts) & ((1 << spec.bits) - 1)).reshape(n, -1)
            values = values[:, :length]
            if spec.pick == "high":
                idx[:, p.start:p.stop] |= values << 1
            elif spec.pick == "low":
                idx[:, p.start:p.stop] |= values
            else:
                idx[:, p.start:p.stop] = values
        codes = np.empty((n, self.code_bytes), np.uint8)
        for g in self.groups:
            codes[:, g.offset:g.offset + g.nbytes] = pack_codes(idx[:, g.start:g.stop], g.bits)
        return codes

    # -- blocks ---------------------------------------------------------------------------------
    def write_rows(self, blocks: np.ndarray, first_row: int, rows: np.ndarray) -> None:
        """Put nibble rows (m, width) into `blocks` at rows first_row.. (first_row a multiple of 32)."""
        m = len(rows)
        if first_row % BLOCK:
            raise ValueError(f"rows are written from a block boundary, got row {first_row}")
        full = m - m % BLOCK
        b = first_row // BLOCK
        if full:
            blocks[b:b + full // BLOCK] = rows[:full].reshape(-1, BLOCK, self.width).transpose(0, 2, 1)
        if m > full:
            blocks[b + full // BLOCK, :, :m - full] = rows[full:].T

    def write_device_rows(self, blocks: np.ndarray, first_row: int, codes) -> None:
        """`write_rows` for packed codes (m, code_bytes) uint8 held in a torch tensor on a GPU: where
        the nibble rows are the codes (`direct`), the rows are put in block order there and copied
        to the host once; otherwise they are converted on the host."""
        if not self.direct:
            self.write_rows(blocks, first_row, self.nibble_rows(codes.cpu().numpy()))
            return
        m = codes.shape[0]
        if first_row % BLOCK:
            raise ValueError(f"rows are written from a block boundary, got row {first_row}")
        padded = torch.zeros((block_count(m) * BLOCK, self.width), dtype=torch.uint8, device=codes.device)
        padded[:m, :codes.shape[1]] = codes
        b = first_row // BLOCK
        # Regrouped there, then one copy from the GPU straight into the blocks (no host temporary).
        torch.from_numpy(blocks[b:b + block_count(m)]).copy_(padded.view(-1, BLOCK, self.width).transpose(1, 2))

    def device_rows(self, blocks: np.ndarray, start: int, stop: int, device):
        """Packed codes (stop − start, code_bytes) uint8 of rows [start, stop) as a torch tensor on
        `device`: for a `direct` layout the blocks holding them are copied there as they are (one
        contiguous copy) and regrouped into rows there; otherwise converted on the host."""
        if not self.direct:
            return torch.from_numpy(self.codes(blocks, start, stop)).to(device)
        b0, b1 = start // BLOCK, block_count(stop)
        with warnings.catch_warnings():  # memory-mapped blocks are read-only; they are only read here
            warnings.simplefilter("ignore", UserWarning)
            part = torch.from_numpy(np.asarray(blocks[b0:b1])).to(device)
        rows = part.transpose(1, 2).reshape(-1, self.width)
        return rows[start - b0 * BLOCK:stop - b0 * BLOCK, :self.code_bytes]

    def from_codes(self, codes: np.ndarray) -> np.ndarray:
        """Packed codes (n, code_bytes) → blocks (ceil(n/32), width, 32), converted in chunks."""
        codes = np.asarray(codes)
        blocks = self.empty(len(codes))
        chunk = -(-_CHUNK_ROWS // BLOCK) * BLOCK  # whole blocks: each chunk starts on a block
        for start in range(0, len(codes), chunk):
            self.write_rows(blocks, start, self.nibble_rows(codes[start:start + chunk]))
        return blocks

    def take_nibble_rows(self, blocks: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Nibble rows (len(rows), width) of the rows at these positions."""
        rows = np.asarray(rows, dtype=np.int64)
        return np.asarray(blocks)[rows // BLOCK, :, rows % BLOCK]

    def codes(self, blocks: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Packed codes (stop − start, code_bytes) of rows [start, stop): a transient copy."""
        return self.codes_at(blocks, np.arange(start, stop))

    def codes_at(self, blocks: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Packed codes (len(rows), code_bytes) of the rows at these positions: a transient copy."""
        return self.codes_from_nibble_rows(self.take_nibble_rows(blocks, rows))

    def gather(self, sources: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """New blocks holding, in order, the given rows of each source (blocks, positions), copied a
        chunk at a time (the result and one chunk are all that is allocated)."""
        total = sum(len(rows) for _, rows in sources)
        out = self.empty(total)
        pending, at = [], 0
        for blocks, rows in sources:
            rows = np.asarray(rows, dtype=np.int64)
            for start in range(0, len(rows), _CHUNK_ROWS):
                pending.append(self.take_nibble_rows(blocks, rows[start:start + _CHUNK_ROWS]))
                # A chunk is written once it fills whole blocks, so writes start on block boundaries.
                held = sum(len(p) for p in pending)
                if held >= _CHUNK_ROWS:
                    chunk = np.concatenate(pending)
                    keep = held - held % BLOCK
                    self.write_rows(out, at, chunk[:keep])
                    at += keep
                    pending = [chunk[keep:]]
        if pending:
            self.write_rows(out, at, np.concatenate(pending))
        return out


def _unpack(groups, codes: np.ndarray, dim: int) -> np.ndarray:
    """Packed codes (n, code_bytes) → per-coordinate codes (n, dim) uint8."""
    idx = np.zeros((codes.shape[0], dim), np.uint8)
    with warnings.catch_warnings():  # memory-mapped codes are read-only; they are only read here
        warnings.simplefilter("ignore", UserWarning)
        for g in groups:
            idx[:, g.start:g.stop] = unpack_codes(np.ascontiguousarray(codes[:, g.offset:g.offset + g.nbytes]),
                                                  g.bits, g.stop - g.start)
    return idx
