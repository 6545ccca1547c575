"""What the CUDA kernels read: code regions in the interleaved word layout, and per-query tables.

Per segment the packed codes are regrouped into "interleaved words" (see the .cu file): the same
bits, each code group (and prod's QJL signs) a `Region` padded to whole 32-code chunks, so that
consecutive threads read consecutive 16 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...quantizer import TurboQuantizer

__all__ = ["Region", "regions", "query_tables"]


@dataclass(frozen=True)
class Region:
    """One code group (or the QJL signs) in the kernel's word layout."""

    bits: int
    chunks: int        # 32-code chunks
    woff: int          # first word (a multiple of 4)
    loff: int          # first float of the region's part of a query table
    qjl: bool
    start: int         # rotated coordinates [start, stop)
    stop: int
    src_offset: int    # bytes [src_offset, src_offset + src_nbytes) of the packed row (codes or qjl)
    src_nbytes: int

    @property
    def unit(self) -> int:
        return 4 if self.bits in (1, 2, 4) else self.bits

    @property
    def words(self) -> int:
        return -(-self.chunks * self.bits // 4) * 4

    @property
    def lut_floats(self) -> int:
        return self.chunks * (32 * self.bits // self.unit) * (1 << self.unit)


def regions(quantizer: TurboQuantizer) -> list[Region]:
    out, woff, loff = [], 0, 0
    specs = [(g.bits, g.start, g.stop, False, g.offset, g.nbytes) for g in quantizer.groups]
    if quantizer.variant == "prod":
        specs.append((1, 0, quantizer.dim, True, 0, quantizer.qjl_bytes))
    for bits, start, stop, qjl, offset, nbytes in specs:
        r = Region(bits, -(-(stop - start) // 32), woff, loff, qjl, start, stop, offset, nbytes)
        out.append(r)
        woff += r.words
        loff += r.lut_floats
    return out


def query_tables(quantizer: TurboQuantizer, regs: list[Region], rotated: torch.Tensor,
          projected: torch.Tensor | None) -> torch.Tensor:
    """Per-query tables of the table kernel: (nq, Σ lut_floats) float32.

    For a nibble unit (b ∈ {1, 2, 4}: 4/b codes) and each of its 16 values v, the entry is
    Σ_t q_{j+t} · c(code_t(v)) (for a block codebook, Σ_t q_{j+t} · codeword_v[t]); for wider codes,
    q_j · c(v). Coordinates past the group's end are
    zero, so the zero-padded codes of the last chunk add nothing. Products and sums are done
    elementwise in float32 (no TF32 matmul).
    """
    nq, device = rotated.shape[0], rotated.device
    parts = []
    groups = iter(quantizer.groups)
    for r in regs:
        words = None
        if r.qjl:
            q, cent = projected, torch.tensor([-1.0, 1.0], device=device)
        else:
            g = next(groups)
            q, cent = rotated, g.centroids.to(device)
            if r.unit == 4:  # the kind's rule: what each of a nibble's 16 values decodes to
                words = torch.from_numpy(g.kind.nibble_values()).to(device)
        qg = torch.zeros((nq, r.chunks * 32), dtype=torch.float32, device=device)
        qg[:, :r.stop - r.start] = q[:, r.start:r.stop]
        if r.unit == 4:
            per = 4 // r.bits
            v = torch.arange(16, device=device)[:, None] >> (torch.arange(per, device=device) * r.bits)
            table = cent[v & ((1 << r.bits) - 1)] if words is None else words  # (16, per)
            lut = (qg.view(nq, -1, 1, per) * table[None, None]).sum(dim=3)  # (nq, units, 16)
        else:
            lut = qg[:, :, None] * cent[None, None, :]
        parts.append(lut.reshape(nq, -1))
    return torch.cat(parts, dim=1).contiguous()
