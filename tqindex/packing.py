"""Bit packing of b-bit codes, b = 1..8.

Layout (little-endian bitstream, one row per vector)
----------------------------------------------------
Code j of a row occupies stream bits [j·b, (j+1)·b), least significant bit first; stream bit i is
bit (i mod 8) of byte i // 8. A row of d codes takes ceil(d·b / 8) bytes; unused high bits of the
last byte are zero. So 8 consecutive codes always fill exactly b bytes, which is what makes the
vectorised unpacking below (and the CUDA kernels) simple: read b bytes as one little-endian word,
shift and mask. The 1-bit QJL signs use the same layout with b = 1 (bit set ⇔ sign +1).

Both functions accept numpy arrays or torch tensors and return the same kind.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["packed_row_bytes", "pack_codes", "unpack_codes"]


def packed_row_bytes(dim: int, bits: int) -> int:
    """Bytes taken by one packed row of `dim` codes of `bits` bits."""
    return (dim * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def pack_codes(codes, bits: int):
    """Pack codes into rows of bytes.

    Parameters
    ----------
    codes : array of shape (n, d), integer values in [0, 2**bits)
    bits : int, 1..8

    Returns
    -------
    uint8 array of shape (n, ceil(d * bits / 8)), numpy or torch like the input.
    """
    _check_bits(bits)
    as_numpy = isinstance(codes, np.ndarray)
    c = torch.from_numpy(np.ascontiguousarray(codes)) if as_numpy else codes
    if c.ndim != 2:
        raise ValueError(f"codes must be 2-D (n, d), got shape {tuple(c.shape)}")
    n, d = c.shape
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}")
    if 8 % bits == 0:
        # 1, 2, 4, 8 bits: whole codes per byte; shift and add in uint8 (8x less traffic than words).
        per_byte = 8 // bits
        row = packed_row_bytes(d, bits)
        padded = torch.zeros((n, row * per_byte), dtype=torch.uint8, device=c.device)
        padded[:, :d] = c.to(torch.uint8)
        grouped = padded.view(n, row, per_byte)
        packed = grouped[:, :, 0].clone()
        for j in range(1, per_byte):
            packed |= grouped[:, :, j] << (j * bits)
        return packed.numpy() if as_numpy else packed
    groups = (d + 7) // 8
    padded = torch.zeros((n, groups * 8), dtype=torch.int64, device=c.device)
    padded[:, :d] = c.to(torch.int64)
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * bits
    words = (padded.view(n, groups, 8) << shifts).sum(dim=2)  # (n, groups), b bytes of payload each
    byte_shifts = torch.arange(bits, device=c.device, dtype=torch.int64) * 8
    packed = ((words.unsqueeze(2) >> byte_shifts) & 0xFF).to(torch.uint8).view(n, groups * bits)
    packed = packed[:, : packed_row_bytes(d, bits)].contiguous()
    return packed.numpy() if as_numpy else packed


def unpack_codes(packed, bits: int, dim: int):
    """Inverse of `pack_codes`.

    Parameters
    ----------
    packed : uint8 array of shape (n, ceil(dim * bits / 8))
    bits : int, 1..8
    dim : int, number of codes per row

    Returns
    -------
    uint8 array of shape (n, dim), numpy or torch like the input.
    """
    _check_bits(bits)
    as_numpy = isinstance(packed, np.ndarray)
    p = torch.from_numpy(np.ascontiguousarray(packed)) if as_numpy else packed
    n = p.shape[0]
    row = packed_row_bytes(dim, bits)
    if p.ndim != 2 or p.shape[1] != row or p.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8 of shape (n, {row}) for dim={dim}, bits={bits}; "
                         f"got {p.dtype} {tuple(p.shape)}")
    if bits == 8:
        out = p.contiguous()
    elif 8 % bits == 0:
        # 1, 2, 4 bits: every code sits inside one byte.
        shifts = torch.arange(0, 8, bits, device=p.device, dtype=torch.uint8)
        out = ((p.unsqueeze(2) >> shifts) & ((1 << bits) - 1)).view(n, row * (8 // bits))[:, :dim]
    else:
        groups = (dim + 7) // 8
        full = torch.zeros((n, groups * bits), dtype=torch.int64, device=p.device)
        full[:, :row] = p.to(torch.int64)
        byte_shifts = torch.arange(bits, device=p.device, dtype=torch.int64) * 8
        words = (full.view(n, groups, bits) << byte_shifts).sum(dim=2)
        shifts = torch.arange(8, device=p.device, dtype=torch.int64) * bits
        out = ((words.unsqueeze(2) >> shifts) & ((1 << bits) - 1)).view(n, groups * 8)[:, :dim]
    out = out.to(torch.uint8).contiguous()
    return out.numpy() if as_numpy else out
