"""TurboQuant quantizers (fast path, torch).

`TurboQuantizer` encodes float vectors into `EncodedVectors` (packed codes + per-vector floats) and
computes the pieces that asymmetric search needs. The codes equal those of `tqindex.reference`
(tests check it, up to coordinates that fall within float32 rounding of a decision boundary).

Per-vector fields
-----------------
norm : ‖x‖ (float32). Only "l2" with rescaling needs it next to `scale` (the index drops it
    otherwise: see `stores_norm`); where it is absent, `scale` stands in for it.
scale : the factor applied to ⟨Πq, ỹ⟩ for the inner product estimate (float32, or float16 with
    ``scale_dtype="float16"``: 2 more bytes per vector for codes at a given budget, for a relative
    rounding of at most 2⁻¹¹ on every score of the row, ≤ 2⁻¹¹‖q‖‖x‖, against an estimation error
    of about ‖q‖‖x‖·√(MSE/d), far larger at any width this index supports; see `SCALE_DTYPES`).
    For variant "mse" with ``rescale=True`` it is ‖x‖ / ⟨y, ỹ⟩ with y = Πx/‖x‖ and ỹ its centroid
    vector: since ỹ's component orthogonal to y is symmetric about y, ⟨Πq, ỹ⟩ / ⟨y, ỹ⟩ is an unbiased
    estimate of ⟨Πq, y⟩ (the RaBitQ argument), where the plain ⟨Πq, ỹ⟩ shrinks every score by a
    per-vector factor ≈ 1 − MSE that differs between vectors and so reorders them. Otherwise ‖x‖.
residual_norm : prod only, ‖r‖ of the unit vector's residual after the mse stage (float32).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import native
from .codebook import CODEBOOK_VERSION, CODEBOOK_VERSIONS, effective_bits
from .devcache import PerDevice
from .groups import CODEBOOKS, CodeGroup, group_layout, make_groups
from .layout import BLOCK, BlockLayout
from .packing import pack_codes, packed_row_bytes, unpack_codes
from .rotation import make_rotation, qjl_gaussian

__all__ = ["CODEBOOKS", "SCALE_DTYPES", "VARIANTS", "CodeGroup", "EncodedVectors", "TurboQuantizer", "bits_for_bytes",
           "row_code_bytes", "stores_norm"]

VARIANTS = ("mse", "prod")


# Storage types of the per-vector `scale`. float16 keeps every scale in its normal range
# [2⁻¹⁴, 65504] (or 0) to relative precision 2⁻¹¹; encoding refuses rows outside it rather than
# lose their precision silently. ‖x‖ for "l2" and prod's ‖r‖ stay float32 whatever this says.
SCALE_DTYPES = {"float32": np.float32, "float16": np.float16}


def scale_dtype_name(value) -> str:
    """"float32" or "float16" from that name or anything numpy reads as it (np.float16, "f2")."""
    try:
        name = value if isinstance(value, str) and value in SCALE_DTYPES else np.dtype(value).name
    except TypeError:
        name = None
    if name not in SCALE_DTYPES:
        raise ValueError(f"unknown scale_dtype {value!r}; expected one of {tuple(SCALE_DTYPES)}")
    return name

# Encode in chunks so that the temporary float buffers (a few (rows, d) float32 copies: unit,
# rotated, reconstructed rows) stay near this many bytes per thread whatever the batch size.
_ENCODE_CHUNK_BYTES = 2 << 20
_ENCODE_MIN_ROWS = 256  # per thread: below this, handing rows to a thread costs more than it saves
# On a GPU, rows at a time: their float32 copies (input, rotated, reconstructed) stay near 3 × this.
_DEVICE_CHUNK_BYTES = 256 << 20


@dataclass(eq=False)  # identity hashing: backends key their caches by a segment's encoded rows
class EncodedVectors:
    """Encoded rows. All arrays are numpy with n rows, except `blocks`.

    The mse codes are held in exactly one of two forms: `codes`, row-major, or `blocks`, the block
    layout the fast scan reads (`tqindex.layout`; the form an index holds wherever the quantizer
    has one). `TurboQuantizer.row_codes` gives row-major codes of either, in bounded ranges.

    codes : (n, code_bytes) uint8, packed mse codes (0 columns for prod at 1 bit), or None
    norm : (n,) float32, or None where the index does not store it
    scale : (n,) float32 or float16 (the quantizer's `scale_dtype`)
    qjl : (n, ceil(d/8)) uint8 packed signs, or None (mse)
    residual_norm : (n,) float32, or None (mse)
    blocks : (ceil(n/32), width, 32) uint8, the codes in block layout, or None
    """

    codes: np.ndarray | None
    norm: np.ndarray | None
    scale: np.ndarray
    qjl: np.ndarray | None = None
    residual_norm: np.ndarray | None = None
    blocks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scale)


def row_code_bytes(dim: int, bits, variant: str) -> tuple[int, int]:
    """(packed mse code bytes, QJL sign bytes) of one row, from the parameters alone (no codebook
    or rotation is built: storage checks shards against these before building a quantizer)."""
    codes = sum(packed_row_bytes(b - a, w) for a, b, w in group_layout(dim, bits, variant))
    return codes, packed_row_bytes(dim, 1) if variant == "prod" else 0


def stores_norm(metric: str, variant: str, rescale: bool) -> bool:
    """Whether ‖x‖ is kept beside `scale`: only "l2" needs ‖x‖ itself, and only rescaled mse has a
    scale that differs from it."""
    return metric == "l2" and rescale and variant == "mse"


def _bytes_per_vector(dim: int, bits, variant: str, norm: bool, scale_dtype: str = "float32") -> int:
    codes, signs = row_code_bytes(dim, bits, variant)
    scale = np.dtype(SCALE_DTYPES[scale_dtype]).itemsize
    return codes + signs + scale + 4 * ((variant == "prod") + norm)


def bits_for_bytes(dim: int, nbytes: int, *, metric: str = "ip", variant: str = "mse", rescale: bool = True,
                   scale_dtype: str = "float32"):
    """The widest bit width (whole or fractional) whose encoded vectors take at most `nbytes` bytes.

    Useful to compare with another index at equal memory: e.g. 116 B at d = 384 ("ip", mse) gives
    2 + 128/384 bits (112 B of codes + 4 B of scale), and with ``scale_dtype="float16"``
    2 + 144/384 bits (114 B of codes + 2 B of scale).

    Returns
    -------
    int or float, a valid `bits` argument; raises ValueError if even 1 bit does not fit.
    """
    scale_dtype = scale_dtype_name(scale_dtype)
    norm = stores_norm(metric, variant, rescale)
    best = None
    for base in range(1 + (variant == "prod"), 9):
        if _bytes_per_vector(dim, base, variant, norm, scale_dtype) > nbytes:
            break
        for high in range(dim if base < 8 else 1):
            # Padding to whole bytes per group can make one more coordinate cost nothing: scan all.
            bits = effective_bits(dim, base + high / dim)
            if _bytes_per_vector(dim, bits, variant, norm, scale_dtype) <= nbytes:
                best = bits
    if best is None:
        raise ValueError(f"no bit width fits {nbytes} bytes per vector at dim={dim} ({variant}, {metric}, "
                         f"{scale_dtype} scale)")
    return best


class TurboQuantizer:
    """TurboQuant_mse or TurboQuant_prod at a given total bit width.

    Parameters
    ----------
    dim : int
    bits : int or float
        Total bits per coordinate, in [1, 8]. For "prod", bits−1 go to the mse stage and 1 to QJL.
        A fractional width gives some coordinates one more bit than the others (see
        `tqindex.codebook.split_bits`), e.g. 2.5 bits: half at 3 bits, half at 2.
    variant : {"mse", "prod"}
    seed : int
    rotation : {"dense", "hadamard"}
    rescale : bool
        mse only: store the unbiasing factor ‖x‖/⟨y, ỹ⟩ as the score scale (see module notes).
    scale_dtype : {"float32", "float16"}
        How `scale` is stored (see module notes).
    codebook : {"vq", "scalar"}
        See `CODEBOOKS`. A 1- or 2-bit group uses blocks only when its length is a multiple of
        the block (and dim ≥ 8); otherwise it stays scalar.
    codebook_version : int
        Which construction to follow (`tqindex.codebook.CODEBOOK_VERSION`); older ones rebuild the
        codes of indexes saved by older tqindex versions.
    """

    def __init__(self, *, dim: int, bits: int, variant: str = "mse", seed: int = 0,
                 rotation: str = "dense", rescale: bool = True, scale_dtype: str = "float32",
                 codebook: str = "vq", codebook_version: int = CODEBOOK_VERSION):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        if codebook not in CODEBOOKS:
            raise ValueError(f"unknown codebook {codebook!r}; expected one of {CODEBOOKS}")
        if isinstance(codebook_version, bool) or codebook_version not in CODEBOOK_VERSIONS:
            raise ValueError(f"unknown codebook_version {codebook_version!r}; this tqindex builds {CODEBOOK_VERSIONS}")
        self.codebook, self.codebook_version = codebook, int(codebook_version)
        self.scale_dtype = scale_dtype_name(scale_dtype)
        if not isinstance(dim, (int, np.integer)) or dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
        self.dim, self.variant, self.seed = int(dim), variant, int(seed)
        self.bits = effective_bits(self.dim, bits)
        self.rescale = bool(rescale) and variant == "mse"
        self.rotation = make_rotation(self.dim, rotation, self.seed)
        layout = group_layout(self.dim, bits, variant)
        self.mse_bits = effective_bits(self.dim, self.bits - (variant == "prod")) if layout else 0
        self.groups: list[CodeGroup] = make_groups(self.dim, bits, variant, codebook, self.codebook_version)
        #: How an index holds these codes: the fast scan's block layout, or None (row-major).
        self.layout: BlockLayout | None = BlockLayout.of(self.groups, variant, self.dim)
        if variant == "prod":
            self.qjl_matrix = torch.from_numpy(qjl_gaussian(self.dim, self.seed).astype(np.float32))  # G
            self.qjl_scale = math.sqrt(math.pi / 2) / self.dim
        else:
            self.qjl_matrix = None
        self._qjl_by_device = PerDevice(lambda device: self.qjl_matrix.to(device))

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def code_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    @property
    def qjl_bytes(self) -> int:
        return packed_row_bytes(self.dim, 1) if self.variant == "prod" else 0

    def nbytes(self) -> int:
        """Host memory held by the rotation, the QJL matrix and the codebook tensors."""
        held = self.rotation.nbytes() + (0 if self.qjl_matrix is None else self.qjl_matrix.nbytes)
        return held + sum(g.centroids.nbytes + g.boundaries.nbytes + g.codewords.nbytes for g in self.groups)

    def stores_norm(self, metric: str) -> bool:
        """Whether ‖x‖ must be kept beside `scale` (see the module function `stores_norm`)."""
        return stores_norm(metric, self.variant, self.rescale)

    def bytes_per_vector(self, metric: str) -> int:
        """Bytes of one encoded vector: codes, signs and per-vector floats (ids not included)."""
        return _bytes_per_vector(self.dim, self.bits, self.variant, self.stores_norm(metric), self.scale_dtype)

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, *, blocks: bool = False, keep_norm: bool = True) -> EncodedVectors:
        """Encode rows of a float32 (n, d) tensor (already validated).

        With blocks=True the codes come in the form an index holds: the block layout where the
        quantizer has one (`layout`), else row-major. With keep_norm=False `norm` is None (for an
        index that does not store it: never allocated at the batch's size). Rows on a GPU are
        rotated and coded there (`_encode_rotated`, in torch) and come back as host arrays.

        Raises ValueError, naming the first such row, if a scale does not fit `scale_dtype`."""
        n = x.shape[0]
        layout = self.layout if blocks else None
        on_device = x.device.type != "cpu"  # a GPU: rotated and coded there, in torch
        # A whole number of blocks per chunk, so each chunk's blocks are written whole.
        if on_device:
            chunk = max(BLOCK, _DEVICE_CHUNK_BYTES // (4 * self.dim) // BLOCK * BLOCK)
        else:
            per_thread = max(_ENCODE_MIN_ROWS, _ENCODE_CHUNK_BYTES // (16 * self.dim))
            chunk = -(-per_thread * native.get_num_threads() // BLOCK) * BLOCK
        # Each chunk's rows go straight into arrays of the final size: the peak is the result plus
        # one chunk's temporaries, not the result twice (as concatenating the parts would be).
        fields: dict = {}
        # The chunks' two (rows, d) float buffers are made once and reused: fresh ones per chunk
        # leave freed blocks scattered in the heap, resident until the allocator trims them.
        buffers = None
        if n and not on_device:
            buffers = (torch.empty((min(n, chunk), self.dim)), torch.empty((min(n, chunk), self.dim)))
        for start in range(0, max(n, 1), chunk):
            rows = x[start:start + chunk]
            part = self._encode_chunk(rows, buffers)
            if not keep_norm:
                part["norm"] = None
            if layout is not None:
                if "blocks" not in fields:
                    fields["blocks"] = layout.empty(n)
                codes, part["codes"] = part["codes"], None
                if on_device:
                    layout.write_device_rows(fields["blocks"], start, codes)
                else:
                    layout.write_rows(fields["blocks"], start, layout.nibble_rows(codes))
            for name, value in part.items():
                if value is not None and not isinstance(value, np.ndarray):
                    value = value.cpu().numpy()
                if name not in fields:
                    fields[name] = None if value is None else np.empty((n,) + value.shape[1:], value.dtype)
                if value is not None:
                    fields[name][start:start + len(value)] = value
        fields["scale"] = self._store_scale(fields["scale"])
        return EncodedVectors(**fields)

    def row_codes(self, encoded: EncodedVectors, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Row-major packed codes (stop − start, code_bytes) of rows [start, stop) of `encoded`: a
        view when it holds them so, a transient copy when it holds blocks."""
        stop = len(encoded) if stop is None else stop
        if encoded.blocks is None:
            return np.asarray(encoded.codes)[start:stop]
        return self.layout.codes(encoded.blocks, start, stop)

    def _store_scale(self, scale: np.ndarray) -> np.ndarray:
        """float32 scales in `scale_dtype`; for float16, refuse scales it would overflow or hold
        below full precision (subnormals), since either would reorder that row's scores."""
        if self.scale_dtype == "float32":
            return scale
        info = np.finfo(np.float16)
        magnitude = np.abs(scale)
        # Above max by less than half a step still rounds to max: judge overflow after rounding.
        with np.errstate(over="ignore"):
            half = scale.astype(np.float16)
        bad = np.flatnonzero((magnitude != 0) & ((magnitude < info.smallest_normal) | ~np.isfinite(half)))
        if len(bad):
            row = int(bad[0])
            raise ValueError(f"scale_dtype='float16' holds per-vector scales (≈ vector norms) in "
                             f"[{float(info.smallest_normal):.3g}, {float(info.max):.0f}] or 0; row {row} of the batch "
                             f"has scale {float(scale[row]):.6g} ({len(bad)} rows outside): use "
                             f"scale_dtype='float32' or rescale the vectors")
        return half

    def _encode_chunk(self, x: torch.Tensor, buffers: tuple | None = None) -> dict:
        """Rows (n, d) float32 → the `EncodedVectors` fields but blocks (codes, norm, scale, qjl,
        residual_norm): numpy arrays from the compiled encoder on the CPU, else torch tensors on x's
        device (`_encode_rotated`: the GPU encoder, and the CPU's without the extension).
        buffers: two float32 (≥ n, d) tensors for the unit and rotated rows (CPU), or None."""
        n = x.shape[0]
        norms = torch.linalg.vector_norm(x, dim=1)
        denominator = torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
        if buffers is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            y = self.rotation.apply(torch.div(x, denominator, out=buffers[0][:n]), out=buffers[1][:n])
        else:
            y = self.rotation.apply(x / denominator)
        if not (self.groups and native.enabled() and y.device.type == "cpu"):
            return self._encode_rotated(y, norms)
        # One pass per row in C: codes and ⟨y, ỹ⟩ (bucketize + gather + pack in torch take longer).
        codes = np.zeros((n, self.code_bytes), dtype=np.uint8)
        y_np = y.contiguous().numpy()
        alignment = np.empty(n, dtype=np.float32)
        specs = [(g.start, g.stop, g.bits, g.offset, g.boundaries.numpy(), g.centroids.numpy(),
                  g.block, g.codewords.numpy()) for g in self.groups]
        native.parallel_ranges(n, lambda a, b: native.kernels.encode(
            y_np[a:b], self.dim, b - a, specs, codes[a:b], alignment[a:b]), min_per_thread=_ENCODE_MIN_ROWS)
        out = {"codes": codes, "norm": norms.numpy().astype(np.float32),
               "scale": self._scale(norms, torch.from_numpy(alignment)).numpy(), "qjl": None, "residual_norm": None}
        if self.variant == "prod":  # the QJL stage on the mse stage's ỹ
            qjl, residual_norm = self._qjl(y, self.rotated_reconstruction(torch.from_numpy(codes)))
            out["qjl"], out["residual_norm"] = qjl.numpy(), residual_norm.numpy()
        return out

    def _encode_rotated(self, y: torch.Tensor, norms: torch.Tensor) -> dict:
        """Rotated unit rows y (n, d) float32 and their norms (n,) → the `EncodedVectors` fields as
        tensors on y's device, in torch (no compiled kernels: the CPU fallback and the GPU encoder):
        codes (n, code_bytes) uint8, norm and scale (n,) float32, qjl and residual_norm (prod)."""
        n = y.shape[0]
        codes = torch.zeros((n, self.code_bytes), dtype=torch.uint8, device=y.device)
        y_tilde = torch.zeros_like(y)
        for g in self.groups:
            idx = g.nearest(y[:, g.start:g.stop].contiguous())
            y_tilde[:, g.start:g.stop] = g.reconstruct(idx)
            codes[:, g.offset:g.offset + g.nbytes] = pack_codes(idx.to(torch.uint8), g.bits)
        out = {"codes": codes, "norm": norms.float(), "scale": self._scale(norms, (y * y_tilde).sum(dim=1)),
               "qjl": None, "residual_norm": None}
        if self.variant == "prod":
            out["qjl"], out["residual_norm"] = self._qjl(y, y_tilde)
        return out

    def _qjl(self, y: torch.Tensor, y_tilde: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prod's second stage: packed signs of G·r (n, ceil(d/8)) uint8 and ‖r‖ (n,) float32 of the
        residual r = y − ỹ, on y's device."""
        residual = y - y_tilde
        signs = (residual @ self._qjl_by_device.get(y.device).T) >= 0
        return pack_codes(signs.to(torch.uint8), 1), torch.linalg.vector_norm(residual, dim=1).float()

    def _scale(self, norms: torch.Tensor, alignment: torch.Tensor) -> torch.Tensor:
        """The per-vector `scale` (float32) from ‖x‖ and ⟨y, ỹ⟩ (see the module notes)."""
        if not self.rescale:
            return norms.float()
        return torch.where(alignment > 0, norms / alignment.clamp_min(1e-30), norms).float()

    # -- decoding ------------------------------------------------------------------------------
    def rotated_reconstruction(self, codes: torch.Tensor, qjl: torch.Tensor | None = None,
                               residual_norm: torch.Tensor | None = None) -> torch.Tensor:
        """ỹ for unit vectors in the rotated domain, float32 (n, d).

        For "prod" this includes the QJL term √(π/2)/d · ‖r‖ · Gᵀ·signs (left out when `qjl` is None:
        the mse stage alone).
        """
        idx = self.unpack(codes).long()
        y_tilde = torch.zeros((codes.shape[0], self.dim), dtype=torch.float32)
        for g in self.groups:
            y_tilde[:, g.start:g.stop] = g.reconstruct(idx[:, g.start:g.stop])
        if self.variant == "prod" and qjl is not None:
            signs = unpack_codes(qjl, 1, self.dim).to(torch.float32) * 2 - 1
            y_tilde = y_tilde + self.qjl_scale * residual_norm[:, None] * (signs @ self.qjl_matrix)
        return y_tilde

    def unpack(self, codes):
        """Packed mse codes (n, code_bytes) uint8 → per-coordinate codes (n, d) uint8 (numpy or
        torch like the input; all zero when there is no mse stage). For a block group, coordinate
        t of a block holds bits t·b.. of its codeword index (see `CodeGroup.reconstruct`)."""
        as_numpy = isinstance(codes, np.ndarray)
        if as_numpy:
            with warnings.catch_warnings():  # memory-mapped codes are read-only; they are only read here
                warnings.simplefilter("ignore", UserWarning)
                c = torch.from_numpy(np.ascontiguousarray(codes))
        else:
            c = codes
        idx = torch.zeros((c.shape[0], self.dim), dtype=torch.uint8, device=c.device)
        for g in self.groups:
            idx[:, g.start:g.stop] = unpack_codes(c[:, g.offset:g.offset + g.nbytes], g.bits, g.stop - g.start)
        return idx.numpy() if as_numpy else idx

    def decode(self, encoded: EncodedVectors) -> np.ndarray:
        """Reconstruct x̃ (n, d) float32 in the original space.

        Without a stored norm, `scale` multiplies instead: then x̃ is the vector whose inner
        products the index's scores estimate (for rescaled mse, ‖x‖/⟨y, ỹ⟩ · Πᵀỹ).
        """
        t = torch.from_numpy
        y_tilde = self.rotated_reconstruction(
            t(self.row_codes(encoded)), None if encoded.qjl is None else t(encoded.qjl),
            None if encoded.residual_norm is None else t(encoded.residual_norm))
        norm = encoded.norm if encoded.norm is not None else encoded.scale
        return (self.rotation.inverse(y_tilde) * t(np.asarray(norm))[:, None]).numpy()

    # -- queries -------------------------------------------------------------------------------
    def prepare_queries(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotate queries once: returns (Πq, G·Πq or None), both float32 (nq, d).

        On the CPU the dense rotation runs in the native kernels on tqindex's own threads: a torch
        matmul would start torch's OpenMP pool, whose threads keep spinning afterwards and take the
        cores from the scan that follows (twice the time of a small batch, measured)."""
        rotated = self.rotation.apply_native(q)
        if rotated is None:
            rotated = self.rotation.apply(q)
        projected = None
        if self.variant == "prod":
            projected = rotated @ self._qjl_by_device.get(q.device).T  # G: copied to a GPU once
        return rotated, projected
