"""`Index`: add vectors, search them by asymmetric TurboQuant scoring, optionally rerank."""

from __future__ import annotations

import dataclasses
import numbers
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from . import native
from . import payload as payloads
from . import storage
from .filters import allowed_rows
from .backends import ListScan, Queries, make_scanners
from .codebook import CODEBOOK_VERSION, CODEBOOK_VERSIONS
from .idmap import IdMap, grouped
from .layout import BlockLayout
from .partition import MAX_PARTITIONS, CoarseQuantizer, fit_kmeans
from .quantizer import CODEBOOKS, VARIANTS, EncodedVectors, TurboQuantizer, scale_dtype_name, stores_norm
from .rotation import ROTATION_KINDS
from .segment import Segment
from .topk import empty_topk, topk_padded
from .validation import (MAX_DIM, MAX_ID, MAX_NORM, METRICS, array_kind, as_float_matrix, as_id_array, check_k,
                         check_norms, to_kind)

__all__ = ["METRICS", "Index", "QuantizerOptions", "SearchResult"]

DEVICES = ("cpu", "cuda")

# Unsaved appends are merged (see `_append`) while below this many rows, so many small `add` calls do
# not fragment the index into tiny segments (and tiny shards on save).
_MERGE_BELOW_ROWS = 1 << 16
# A save first merges the smallest adjacent segments while there are more than this many (see
# `_consolidated`), which bounds shards per index whatever the pattern of adds and saves.
_MAX_SEGMENTS = 8
# Queries scored per scan pass when the caller gives no batch_size.
_DEFAULT_QUERY_BATCH = 1024
# A filter that allows at most this share of the rows is searched by gathering the allowed rows
# into one segment first (their codes only), instead of scanning every row and skipping the rest.
_DIRECT_FRACTION = 0.02
# Gathered rows up to this many are scored by decoding them (the torch scan) instead of lookup tables.
_DECODE_BELOW_ROWS = 4096
# A partitioned index's search scans partitions / this many lists by default.
_DEFAULT_NPROBE_FRACTION = 16
# A partitioned index holds at most this many segments per list after a save (see `_consolidated`).
_MAX_SEGMENTS_PER_LIST = 4
# An untrained partitioned index trains on its first add of at least this many rows per list (faiss
# warns below 39 training points per centroid).
_AUTO_TRAIN_PER_LIST = 39


@dataclass(frozen=True)
class SearchResult:
    """Results of `Index.search`.

    ids : (nq, k) int64, −1 where fewer than k live rows exist (shape (k,) for a 1-D query)
    scores : (nq, k) float32, the index's own measure: similarity for "ip"/"cosine" (descending,
        −inf padding) or squared L2 distance for "l2" (ascending, +inf padding)
    metric : the index's metric

    `distances` is a dissimilarity for every metric, lower is better (the usearch convention):
    squared L2 distance for "l2", 1 − similarity for "ip" and "cosine" (+inf padding).
    """

    ids: object
    scores: object
    metric: str = "ip"
    #: With `search(..., columns=[...])`: a pyarrow Table of the results' payload columns, one row per
    #: result in row-major order (nq·k rows; k for a 1-D query; nulls where the id is −1), else None.
    payload: object = None

    @classmethod
    def _of(cls, ids, scores, metric: str) -> "SearchResult":
        """SearchResult(ids=ids, scores=scores, metric=metric): the same object, made without the frozen
        dataclass's four `object.__setattr__` calls (a third of a microsecond against one), for the
        single-query path."""
        result = object.__new__(cls)
        result.__dict__.update(ids=ids, scores=scores, metric=metric, payload=None)
        return result

    @property
    def keys(self):
        return self.ids

    @property
    def distances(self):
        return self.scores if self.metric == "l2" else 1 - self.scores

    def __iter__(self):
        # Allows `ids, scores = index.search(...)`.
        return iter((self.ids, self.scores))


@dataclass(frozen=True)
class QuantizerOptions:
    """Settings that reproduce the paper or read old files, kept off `Index`'s everyday signature
    (the faiss pattern: an explicit object for the experimental knobs).

    variant : {"mse", "prod"}
        "prod" adds the paper's 1-bit QJL stage (unbiased inner products, but lower recall at equal bits).
    rotation : {"dense", "hadamard"}
        "hadamard" (randomized Hadamard, O(d log d)) is experimental; see docs/design.md.
    rescale : bool
        mse only: the unbiased per-vector score scale (default); False is the paper's plain estimator.
    codebook : {"vq", "scalar"}
        "vq" (default): block codebooks at 1-2 bits and the bit-plane codebook at 5 bits
        (`tqindex.groups`); "scalar": the paper's per-coordinate Lloyd-Max codebook everywhere.
    codebook_version : int
        The codebook construction. `Index.load` sets it from the file; set it only to build codes
        the way an older tqindex did (`tqindex.CODEBOOK_VERSIONS`).
    """

    variant: str = "mse"
    rotation: str = "dense"
    rescale: bool = True
    codebook: str = "vq"
    codebook_version: int = CODEBOOK_VERSION

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; expected one of {VARIANTS}")
        if self.rotation not in ROTATION_KINDS:
            raise ValueError(f"unknown rotation {self.rotation!r}; expected one of {ROTATION_KINDS}")
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"unknown codebook {self.codebook!r}; expected one of {CODEBOOKS}")
        if isinstance(self.codebook_version, bool) or self.codebook_version not in CODEBOOK_VERSIONS:
            raise ValueError(f"unknown codebook_version {self.codebook_version!r}; this tqindex builds "
                             f"{CODEBOOK_VERSIONS}")


#: Keywords `Index` still accepts for `QuantizerOptions` fields (the constructor before options existed).
_OPTION_KEYWORDS = ("variant", "rotation", "rescale", "codebook")


class Index:
    """A TurboQuant vector index.

    Parameters
    ----------
    dim : int
        Vector dimension (≥ 2).
    bits : int or float
        Bits per coordinate, in [1, 8] (for "prod", one of them is the QJL bit). A fractional width
        such as 2.5 gives round(0.5 · dim) coordinates 3 bits and the rest 2 (`Index.bits` reports
        the width realised, base + high / dim). Useful to match a byte budget exactly.
    metric : {"ip", "cosine", "l2"}
    seed : int
        Seeds the rotation (and prod's QJL matrix); codes are a pure function of (vector, parameters).
    keep_vectors : bool
        Keep full-precision float32 vectors so `search(..., rerank=m)` can rescore candidates.
    device : {"cpu", "cuda"}
    scale_dtype : {"float32", "float16"}
        How the per-vector score scale is stored. "float16" frees 2 bytes per vector (pass it to
        `bits_for_bytes` too, to spend them on codes) at a relative error ≤ 2⁻¹¹ per score, and
        refuses vectors whose norm is outside about [6.1e-5, 65504] (see `tqindex.quantizer`).
    center : array (dim,), optional
        A vector c subtracted from every vector (and, for "l2", query) before quantization; scores
        are corrected exactly (⟨q, x⟩ = ⟨q, c⟩ + ⟨q, x − c⟩). With c near the data's mean, the
        quantized residuals are shorter and more isotropic. Off by default: tqindex needs no
        training, and a mean is data-dependent (compute it from any sample you trust).
    options : QuantizerOptions, optional
        The paper-reproduction and experimental settings (variant, rotation, rescale, codebook).
        Their old keywords (``variant=``, ``rotation=``, ``rescale=``, ``codebook=``) are still
        accepted and override the matching field.
    partitions : int
        0 (default): a flat index, no training. nlist > 0: a partitioned (IVF) index whose rows are
        kept in nlist lists by their nearest k-means centroid and coded as residuals from it;
        `search(..., nprobe=)` scans only the nearest lists. Trained by `train(sample)`, or on the
        first `add` of at least 39·nlist rows (`tqindex.partition`). Needs no `center` (each list has
        its own), and for "l2" the mse variant with rescale (the defaults).
    """

    def __init__(self, *, dim: int, bits: int = 4, metric: str = "ip", seed: int = 0, keep_vectors: bool = False,
                 device: str = "cpu", scale_dtype: str = "float32", center=None,
                 options: QuantizerOptions | None = None, partitions: int = 0, **option_keywords):
        unknown = sorted(set(option_keywords) - set(_OPTION_KEYWORDS))
        if unknown:
            raise TypeError(f"Index() got unexpected keyword arguments {unknown}; parameters are dim, bits, metric, "
                            f"seed, keep_vectors, device, scale_dtype, center, options (and {_OPTION_KEYWORDS})")
        if options is not None and not isinstance(options, QuantizerOptions):
            raise TypeError(f"options must be a QuantizerOptions, got {type(options).__name__}")
        options = QuantizerOptions(**{**(options or QuantizerOptions()).__dict__, **option_keywords})
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not 2 <= dim <= MAX_DIM:
            raise ValueError(f"dim must be an integer in [2, {MAX_DIM}], got {dim!r}")
        if isinstance(bits, bool) or not isinstance(bits, numbers.Real) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be a number in [1, 8], got {bits!r}")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        scale_dtype = scale_dtype_name(scale_dtype)
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
        self._options = options
        self._quantizer = TurboQuantizer(dim=int(dim), bits=bits, variant=options.variant, seed=int(seed),
                                         rotation=options.rotation, rescale=options.rescale, scale_dtype=scale_dtype,
                                         codebook=options.codebook, codebook_version=options.codebook_version)
        self._center = None
        if center is not None:
            c, _ = as_float_matrix(center, int(dim), name="center")
            if c.shape[0] != 1:
                raise ValueError(f"center must be one vector of dimension {dim}, got shape {tuple(c.shape)}")
            self._center = c[0]
        self._metric = metric
        self._keep_vectors = bool(keep_vectors)
        if isinstance(partitions, bool) or not isinstance(partitions, numbers.Integral) or \
                not 0 <= partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions must be an integer in [0, {MAX_PARTITIONS}] (0: a flat index), "
                             f"got {partitions!r}")
        if partitions and self._center is not None:
            raise ValueError("a partitioned index centers each list on its own centroid; pass center or "
                             "partitions, not both")
        if partitions and metric == "l2" and not stores_norm(metric, options.variant, options.rescale):
            raise ValueError("a partitioned l2 index needs the vector norm beside its residual's codes: use the "
                             "mse variant with rescale=True (the defaults)")
        self._partitions = int(partitions)
        self._coarse: CoarseQuantizer | None = None
        self._coarse_shard: dict | None = None   # the manifest entry of the committed centroids
        # Searches read one immutable snapshot (`_View`); writers build the next one under
        # `_write_lock` and swap it in with one assignment, so a search sees the index before or
        # after a write, never half of it.
        self._view = _View(())
        self._write_lock = threading.RLock()
        self._next_id = 0
        # One scanner per backend, in order of preference; each keeps its own caches.
        self._scanners = make_scanners(self._quantizer, metric)
        self._store: storage.Store | None = None
        self._device = "cpu"
        if device == "cuda":
            self.to("cuda")

    # -- properties ----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._quantizer.dim

    @property
    def bits(self) -> int | float:
        return self._quantizer.bits

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def variant(self) -> str:
        return self._quantizer.variant

    @property
    def seed(self) -> int:
        return self._quantizer.seed

    @property
    def rotation(self) -> str:
        return self._quantizer.rotation.kind

    @property
    def rescale(self) -> bool:
        return self._quantizer.rescale

    @property
    def scale_dtype(self) -> str:
        return self._quantizer.scale_dtype

    @property
    def codebook(self) -> str:
        return self._quantizer.codebook

    @property
    def center(self) -> np.ndarray | None:
        """The centering vector (dim,) float32, or None."""
        return None if self._center is None else self._center.numpy().copy()

    @property
    def keep_vectors(self) -> bool:
        return self._keep_vectors

    @property
    def device(self) -> str:
        return self._device

    @property
    def next_id(self) -> int:
        """The id the next automatic `add` starts at (one past the largest id ever used)."""
        return self._next_id

    @property
    def path(self):
        """Directory this index is saved in, or None."""
        return None if self._store is None else self._store.path

    @property
    def _segments(self) -> tuple[Segment, ...]:
        """The segments of the current snapshot (read-only)."""
        return self._view.segments

    @property
    def _ids(self) -> IdMap:
        return self._view.ids

    @property
    def options(self) -> QuantizerOptions:
        """The quantizer options this index was built with."""
        return self._options

    def params(self) -> dict:
        """Everything needed to reproduce this index's codes (what the manifest stores)."""
        return {"dim": self.dim, "bits": self.bits, "metric": self.metric, "variant": self.variant,
                "seed": self.seed, "rotation": self.rotation, "rescale": self.rescale, "scale_dtype": self.scale_dtype,
                "codebook": self.codebook, "center": None if self._center is None else self._center.tolist(),
                "keep_vectors": self.keep_vectors, "codebook_version": self._quantizer.codebook_version,
                "partitions": self._partitions}

    @property
    def partitions(self) -> int:
        """Lists of a partitioned index (0: flat)."""
        return self._partitions

    @property
    def trained(self) -> bool:
        """Whether a partitioned index has its centroids (a flat index needs none: always True)."""
        return not self._partitions or self._coarse is not None

    @property
    def centroids(self) -> np.ndarray | None:
        """(partitions, dim) float32 centroids of a trained partitioned index, else None."""
        return None if self._coarse is None else self._coarse.centroids.numpy().copy()

    def train(self, sample, *, iterations: int = 10, max_sample: int | None = None, refit: bool = False) -> None:
        """Fit a partitioned index's centroids by k-means on `sample` (n, dim), seeded by `seed`.

        At most `max_sample` rows per list are used (default 64, sampled by the seed). An index
        that holds rows keeps its centroids (their codes depend on them) unless `refit=True`, which
        re-encodes every row from its kept full-precision vectors (needs keep_vectors=True)."""
        if not self._partitions:
            raise ValueError("train() is for a partitioned index (Index(..., partitions=nlist)); a flat index "
                             "needs no training")
        x, _ = as_float_matrix(sample, self.dim, name="sample")
        check_norms(x, zero_ok=self._metric != "cosine", metric=self._metric, name="sample")
        if self._metric == "cosine":
            x = torch.nn.functional.normalize(x, dim=1)
        with self._write_lock:
            live = self._view.live
            if live and not refit:
                raise ValueError(f"this index holds {live} rows coded against its current centroids; pass "
                                 f"refit=True to fit new ones and re-encode every row (needs keep_vectors=True)")
            if live and not self._keep_vectors:
                raise ValueError("refit re-encodes rows from their full-precision vectors: this index was built "
                                 "without keep_vectors=True, so build a new one instead")
            coarse = fit_kmeans(x, self._partitions, seed=self.seed, iterations=iterations, max_sample=max_sample)
            if not live:
                self._coarse, self._coarse_shard = coarse, None
                self._swap([])
                return
            view = self._view
            rows = [(s, np.flatnonzero(~s.deleted) if s.deleted is not None else np.arange(len(s)))
                    for s in view.segments]
            ids = np.concatenate([np.asarray(s.ids)[r] for s, r in rows])
            vectors = np.concatenate([np.asarray(s.vectors)[r] for s, r in rows])
            table = payloads.take([(s.payload, len(s), r) for s, r in rows], view.schema)
            old = self._coarse
            self._coarse = coarse
            try:
                segments = self._encode_segments(torch.from_numpy(vectors), ids, table,
                                                 torch.linalg.vector_norm(torch.from_numpy(vectors), dim=1))
            except BaseException:
                self._coarse = old
                raise
            self._coarse_shard = None
            self._swap(segments)

    def __len__(self) -> int:
        return self._view.live

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return (f"Index(dim={self.dim}, bits={self.bits}, metric={self.metric!r}, variant={self.variant!r}, "
                f"n={len(self)}, keep_vectors={self.keep_vectors}, device={self.device!r}{where})")

    def bytes_per_vector(self) -> int:
        """Bytes of one encoded vector (codes + per-vector floats), without its 8-byte id."""
        return self._quantizer.bytes_per_vector(self._metric)

    def memory_bytes(self) -> int:
        """Bytes of index data held in host memory: ids, codes, per-vector floats, kept vectors,
        masks, the rotation/QJL matrices, and what the search backends derived from them (the
        fast-scan layout). Memory-mapped rows count although the OS may not have read them; GPU
        memory does not count."""
        view = self._view
        seen: set = set()  # a scanner's cache may hold a segment's own arrays: each counts once
        rows = sum(s.nbytes(seen) for s in view.segments)
        cached = sum(scanner.cache.nbytes(seen) for scanner in self._scanners) + view.ids.nbytes(seen)
        coarse = 0 if self._coarse is None else self._coarse.centroids.numel() * 4
        return self._quantizer.nbytes() + rows + cached + coarse

    def __contains__(self, key) -> bool:
        return bool(self._ids.positions(np.asarray([key], dtype=np.int64))[0] >= 0)

    # -- device --------------------------------------------------------------------------------
    def to(self, device: str) -> "Index":
        """Move search to `device` ("cpu" or "cuda"); returns self.

        On "cuda" each segment's codes and per-vector floats are uploaded on first search and stay
        on the GPU (no float copy of the database); queries and results cross over per call, and
        `add` rotates and codes new vectors there (a flat index).
        """
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")
        if device == "cuda":
            from .backends import cuda
            cuda.require()
        elif self._device == "cuda":
            for scanner in self._scanners:  # GPU memory goes back; the CPU backends keep their layouts
                if scanner.caches_on_device:
                    scanner.release()
        self._device = device
        return self

    # -- writes --------------------------------------------------------------------------------
    def add(self, vectors, ids=None, *, upsert: bool = False, metadata=None) -> np.ndarray:
        """Add vectors.

        Parameters
        ----------
        vectors : array (n, dim) or (dim,), float16/32/64 (numpy, torch or CuPy)
        ids : array (n,) of non-negative integers, optional
            Defaults to consecutive ids after the largest id ever used.
        upsert : bool
            Replace rows whose id already exists instead of raising.
        metadata : pyarrow Table or RecordBatch, pandas DataFrame, dict of columns or list of dicts, optional
            One row per vector, any Arrow types (text included), stored with the vectors in the same
            commit. A new column is added with nulls for older rows; a column whose type differs from
            the stored one is refused (ValueError naming it).

        Returns
        -------
        ids : (n,) int64
        """
        # A flat index on "cuda" rotates and codes on the GPU (the codes come back to the host,
        # which holds and stores them); a partitioned one assigns and codes on the CPU.
        on_gpu = self._device == "cuda" and not self._partitions
        x, _ = as_float_matrix(vectors, self.dim, keep_device=on_gpu)
        if on_gpu and not x.is_cuda:
            x = x.to("cuda")
        n = x.shape[0]
        given_ids = None if ids is None else as_id_array(ids, n)  # checked before any encoding work
        table = None if metadata is None else payloads.as_table(metadata, n)
        norms = check_norms(x, zero_ok=self._metric != "cosine", metric=self._metric)
        if self._metric == "cosine":
            x = x / norms[:, None]
            norms = torch.ones_like(norms)
        if self._partitions:
            with self._write_lock:
                if self._coarse is None:
                    need = _AUTO_TRAIN_PER_LIST * self._partitions
                    if n < need:
                        raise ValueError(f"this partitioned index is not trained: call train(sample) first, or "
                                         f"make the first add at least {need} rows ({_AUTO_TRAIN_PER_LIST} per "
                                         f"list; got {n})")
                    self._coarse, self._coarse_shard = fit_kmeans(x, self._partitions, seed=self.seed), None
                coarse = self._coarse
            return self._add_rows(n, given_ids, upsert, table, coarse=coarse, x=x, norms=norms)
        encoded = self._quantizer.encode(x if self._center is None else x - self._center.to(x.device), blocks=True,
                                         keep_norm=self._quantizer.stores_norm(self._metric))
        vectors_kept = x.cpu().numpy().copy() if self._keep_vectors else None
        return self._add_rows(n, given_ids, upsert, table,
                              new=[Segment(ids=None, encoded=encoded, vectors=vectors_kept, payload=table)])

    def _encode_segments(self, x: torch.Tensor, ids: np.ndarray, table, norms: torch.Tensor) -> list[Segment]:
        """A partitioned index's new rows: one segment per list that receives rows, holding the codes
        of their residuals x − c (and, for "l2", ‖x‖ itself in `norm`: see `tqindex.partition`)."""
        coarse = self._coarse
        assign = coarse.assign(x).numpy()
        keep_norm = self._quantizer.stores_norm(self._metric)
        segments = []
        for lst, rows in grouped(assign):
            picked = torch.from_numpy(rows)
            xs = x[picked]
            encoded = self._quantizer.encode(xs - coarse.centroids[lst], blocks=True, keep_norm=keep_norm)
            if keep_norm:
                encoded.norm = norms[picked].numpy().astype(np.float32)
            segments.append(Segment(ids=ids[rows], encoded=encoded,
                                    vectors=xs.numpy().copy() if self._keep_vectors else None,
                                    payload=None if table is None else table.take(pa.array(rows)),
                                    partition=lst))
        return segments

    def _add_rows(self, n, given_ids, upsert, table, *, new=None, coarse=None, x=None, norms=None) -> np.ndarray:
        """Publish new rows: ids assigned or checked, upserts removed, metadata merged; `new` holds
        the encoded segment (flat, ids still None), or the rows are encoded per list (partitioned)."""
        with self._write_lock:
            view = self._view
            if given_ids is None:
                if self._next_id + n > MAX_ID:
                    raise OverflowError(f"automatic ids would pass the largest id {MAX_ID - 1}; pass ids explicitly")
                new_ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
                replaced = np.empty(0, dtype=np.int64)
            elif not n or int(given_ids.min()) >= self._next_id:
                # Past every id ever used (ids that only grow, as a database's keys): none can be in the
                # index, and building the id lookup (a sort of every live id) would cost O(n log n) an add.
                new_ids, replaced = given_ids, np.empty(0, dtype=np.int64)
            else:
                new_ids = given_ids
                positions = view.ids.positions(new_ids)
                replaced = positions[positions >= 0]
                if replaced.size and not upsert:
                    raise ValueError(f"ids already in the index: {new_ids[positions >= 0][:10].tolist()} "
                                     f"(pass upsert=True to replace them)")
            schema = view.schema
            if table is not None:
                schema, table = payloads.merged_schema(schema, table)
            if new is None:
                if coarse is not self._coarse:
                    raise RuntimeError("the index was refitted while this batch was being added; add it again")
                new = self._encode_segments(x, new_ids, table, norms)
            else:
                new = [dataclasses.replace(new[0], ids=new_ids, payload=table)]
            # Nothing above touched the index: a rejected batch leaves it exactly as it was.
            segments = _with_deleted(view, replaced) if replaced.size else list(view.segments)
            for segment in new:
                segments = _appended(segments, segment, self._quantizer.layout, schema)
            self._swap(segments, schema, live=view.live + n - replaced.size)  # replaced: distinct live rows
            self._next_id = max(self._next_id, int(new_ids.max()) + 1) if n else self._next_id
        return new_ids

    def remove(self, ids) -> int:
        """Remove rows by id (tombstones; `compact()` reclaims space). Unknown ids raise KeyError.

        Returns the number of rows removed.
        """
        arr = as_id_array(ids)
        with self._write_lock:
            view = self._view
            positions = view.ids.positions(arr)
            if (positions < 0).any():
                raise KeyError(f"ids not in the index: {arr[positions < 0][:10].tolist()}")
            self._swap(_with_deleted(view, positions), live=view.live - len(positions))  # distinct live rows
        return int(arr.size)

    def compact(self) -> None:
        """Drop removed rows and merge all segments into one (rewritten on the next save)."""
        with self._write_lock:
            live = [segment for segment in self._view.segments if segment.live_count]
            self._swap([_merged(part, self._quantizer.layout, self._view.schema)
                        for part in _by_partition(live).values()])

    # -- reads ---------------------------------------------------------------------------------
    def search(self, queries, k: int = 10, *, rerank: int = 0, batch_size: int | None = None, filter=None,
               columns=None, nprobe: int | None = None) -> SearchResult:
        """Search the k best rows for each query.

        Parameters
        ----------
        queries : array (nq, dim) or (dim,), float16/32/64 (numpy, torch or CuPy)
        k : int ≥ 1
        rerank : int ≥ 0
            If > 0, take the k·rerank best by quantized score and rescore them with the kept
            full-precision vectors (needs ``keep_vectors=True``).
        batch_size : int, optional
            Queries per scan pass (bounds memory); default 1024.
        filter : optional
            Only rows it allows are returned (`tqindex.filters`): an id allow-list (integer array), a
            boolean mask indexed by id, or a pyarrow compute Expression over the metadata columns.
            The result is exactly the top k of the allowed rows (fewer only if fewer exist).
        columns : list of str, optional
            Metadata columns to return with the results (`SearchResult.payload`).
        nprobe : int, optional
            A partitioned index: lists scanned per query, the nearest by centroid score (default
            `default_nprobe`); nprobe = partitions scans every row. Ignored by a flat index.

        Returns
        -------
        SearchResult with ids (int64) and scores (float32), in the queries' kind of array;
        1-D results for a 1-D query.
        """
        if type(k) is not int or k < 1:
            k = check_k(k)
        if (type(queries) is np.ndarray and type(rerank) is int and not rerank and batch_size is None
                and filter is None and columns is None and (nprobe is None or (type(nprobe) is int and nprobe > 0))):
            result = self._search_direct(queries, k, nprobe)
            if result is not None:
                return result
        if isinstance(rerank, bool) or not isinstance(rerank, numbers.Integral) or rerank < 0:
            raise ValueError(f"rerank must be a non-negative integer, got {rerank!r}")
        if rerank and not self._keep_vectors:
            raise ValueError("rerank needs full-precision vectors: build the index with keep_vectors=True")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                       or batch_size <= 0):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, numbers.Integral) or nprobe <= 0):
            raise ValueError(f"nprobe must be a positive integer, got {nprobe!r}")
        nprobe = self.default_nprobe if nprobe is None else int(nprobe)
        kind = array_kind(queries)
        on_gpu = self._device == "cuda"
        q, was_1d = as_float_matrix(queries, self.dim, name="queries", allow_empty=True, keep_device=on_gpu,
                                    check_finite=False)  # check_norms refuses NaN and inf
        if on_gpu:
            q = q.cuda()  # a no-op for queries already on the GPU
        norms = check_norms(q, zero_ok=self._metric != "cosine", metric=self._metric, name="queries")
        if self._metric == "cosine":
            q = q / norms[:, None]
        view = self._view  # this search reads one snapshot, whatever writers do meanwhile
        if columns is not None:
            columns = self._check_columns(view, columns)
        if filter is not None:
            view = _filtered(view, filter, self._quantizer.layout)
        # A few gathered rows are scored by decoding them (one small matrix product per query
        # batch): cheaper than building per-query lookup tables for a handful of rows.
        scanner = self._backend("torch") if view.gathered and view.live <= _DECODE_BELOW_ROWS else None
        # The scan's work and buffers are bounded by the live rows, whatever k asks; the result is
        # padded to k columns at the end.
        k_scan = min(k, view.live)
        candidates = min(k_scan * rerank, view.live) if rerank else k_scan
        batch = int(batch_size or _DEFAULT_QUERY_BATCH)
        all_ids, all_scores = [], []
        for start in range(0, q.shape[0] if k_scan else 0, batch):
            qb = q[start:start + batch]
            scores, positions = self._scan(view, qb, candidates, scanner, nprobe)
            if rerank:
                scores, positions = self._rerank(view, qb, scores, positions, k_scan)
            all_scores.append(scores)
            all_ids.append(positions)
        if len(all_ids) == 1:
            scores, positions = all_scores[0].numpy(), all_ids[0].numpy()
        elif all_ids:
            scores = torch.cat(all_scores).numpy()
            positions = torch.cat(all_ids).numpy()
        else:
            scores = np.empty((q.shape[0], 0), dtype=np.float32)
            positions = np.empty((q.shape[0], 0), dtype=np.int64)
        if k_scan < k:
            scores = np.concatenate([scores, np.full((len(scores), k - k_scan), -np.inf, np.float32)], axis=1)
            positions = np.concatenate([positions, np.full((len(positions), k - k_scan), -1, np.int64)], axis=1)
        ids = view.ids.ids_at(positions)
        scores = (-scores if self._metric == "l2" else scores).astype(np.float32)
        table = None if columns is None else _payload_at(view, positions.reshape(-1), columns)
        if was_1d:
            ids, scores = ids[0], scores[0]
        return SearchResult(ids=to_kind(ids, kind, queries), scores=to_kind(scores, kind, queries), metric=self._metric,
                            payload=table)

    def _search_direct(self, queries: np.ndarray, k: int, nprobe: int | None) -> SearchResult | None:
        """`search` without options (but nprobe) in one native call where the index and queries allow
        it (an index on the CPU whose scanner is `direct`; numpy float32 queries, C-contiguous, 1-D or
        up to a default batch of them; k ≤ the live rows): the same results, without the Python steps
        a single query otherwise spends as much time in as in its scan. None where it does not apply,
        or where a query fails a check, whose error the general path then raises."""
        view = self._view
        if (queries.dtype != np.float32 or not queries.flags.c_contiguous or queries.ndim not in (1, 2)
                or queries.shape[-1] != self.dim or self._center is not None or self._device != "cpu"
                or k > view.live):
            return None
        q = queries if queries.ndim == 2 else queries[None]
        if not 0 < len(q) <= _DEFAULT_QUERY_BATCH:
            return None
        if self._partitions:
            found = None
            if self._coarse is not None:
                found = self._search_direct_lists(view, q, k, nprobe or self.default_nprobe)
        else:
            scanner = self._scanner()
            found = scanner.search_direct(list(view.segments), q, k) if scanner.direct else None
        if found is None:
            return None
        ids, scores = found
        if self._metric == "l2":
            np.negative(scores, out=scores)  # distances, as the general path returns them
        if queries.ndim == 1:
            ids, scores = ids[0], scores[0]
        return SearchResult._of(ids, scores, self._metric)

    def _search_direct_lists(self, view: "_View", q: np.ndarray, k: int,
                             nprobe: int) -> tuple[np.ndarray, np.ndarray] | None:
        """A partitioned index's queries for `_search_direct`: a single query checked, scaled ("cosine"),
        probed and scanned in one native call; a batch checked (and scaled) here as `check_norms` does,
        each query's nprobe best lists probed, and all scanned in one native call."""
        starts, members, memo = view.lists()
        if len(q) == 1:
            search = memo.get("probing-search")  # kept for the snapshot: a single query's Python is most of its cost
            if search is None:
                scanner = self._scanner()
                search = scanner.direct and scanner.probing_search(
                    ListScan(segments=view.segments, starts=starts, members=members, lists=None, offsets=None,
                             memo=memo), self._coarse)
                if not search:
                    return None
                memo["probing-search"] = search
            return search(q, k, nprobe)
        scanner = self._scanner()
        if not scanner.direct:
            return None
        norms = np.empty(len(q), np.float32)
        if native.kernels.row_norms(q, norms, len(q), self.dim, MAX_NORM, self._metric != "cosine") >= 0:
            return None  # the general path names the fault
        if self._metric == "cosine":
            q = q / norms[:, None]
        lists, offsets = self._coarse.probe_arrays(q, self._metric, nprobe, True)  # fastscan: kernels on
        request = ListScan(segments=view.segments, starts=starts, members=members, lists=lists, offsets=offsets,
                           memo=memo)
        return scanner.search_direct_lists(request, q, k)

    # -- payload ---------------------------------------------------------------------------------
    @property
    def schema(self) -> pa.Schema | None:
        """The metadata columns this index holds (pyarrow Schema), or None if it has none."""
        return self._view.schema

    def get(self, ids, columns=None) -> pa.Table:
        """Metadata rows for these ids, in order: a pyarrow Table with an "id" column and the named
        columns (default all). Unknown ids raise KeyError."""
        arr = as_id_array(ids)
        view = self._view
        columns = self._check_columns(view, columns)
        positions = view.ids.positions(arr)
        if (positions < 0).any():
            raise KeyError(f"ids not in the index: {arr[positions < 0][:10].tolist()}")
        table = _payload_at(view, positions, columns)
        return table.add_column(0, "id", pa.array(arr, pa.int64()))

    def select(self, filter=None) -> np.ndarray:
        """Ids (int64, ascending) of the live rows `filter` allows (see `search`), or of every live
        row without one."""
        view = self._view
        masks = [None] * len(view.segments) if filter is None else allowed_rows(view, filter)
        parts = [np.empty(0, dtype=np.int64)]
        for segment, mask in zip(view.segments, masks):
            keep = np.ones(len(segment), dtype=bool) if segment.deleted is None else ~segment.deleted
            if mask is not None:
                keep &= mask
            parts.append(np.asarray(segment.ids)[keep])
        return np.sort(np.concatenate(parts))

    @staticmethod
    def _check_columns(view: "_View", columns) -> list[str]:
        names = [] if view.schema is None else view.schema.names
        if columns is None:
            return names
        if isinstance(columns, str):
            raise TypeError("columns must be a list of column names, not one string")
        columns = list(columns)
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise KeyError(f"unknown metadata columns {unknown}; this index has {names}")
        return columns

    @property
    def default_nprobe(self) -> int:
        """Lists a search of a partitioned index scans by default: partitions / 16, at least 1 (0
        for a flat index)."""
        return max(1, -(-self._partitions // _DEFAULT_NPROBE_FRACTION)) if self._partitions else 0

    def _scan(self, view: "_View", q: torch.Tensor, k: int, scanner=None, nprobe: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._partitions:
            return self._scan_lists(view, q, k, scanner or self._scanner(), nprobe)
        offset = None
        if self._center is not None:
            center = self._center.to(q.device)
            if self._metric == "l2":
                q = q - center      # ‖q − x‖ = ‖(q − c) − (x − c)‖
            else:
                offset = q @ center  # ⟨q, x⟩ = ⟨q, c⟩ + ⟨q, x − c⟩
        result = (scanner or self._scanner()).topk_queries(list(view.segments), q, k)
        scores, positions = result.scores, result.positions
        if offset is not None:
            scores = scores + offset[:, None].to(scores.device)
        return scores.cpu(), positions.cpu()

    def _scan_lists(self, view: "_View", q: torch.Tensor, k: int, scanner, nprobe: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A partitioned index's top k: each query's `nprobe` best lists (`CoarseQuantizer.probe`)
        are scanned by the backend's `topk_lists`, every score with its list's offset added.
        Positions are the view's."""
        nq = q.shape[0]
        if self._coarse is None or not nq:
            return empty_topk(nq, k)
        device = q.device
        lists, offsets = self._coarse.probe(q.cpu(), self._metric, nprobe)
        starts, members, memo = view.lists()
        request = ListScan(segments=view.segments, starts=starts, members=members, lists=lists.numpy(),
                           offsets=offsets.numpy(), memo=memo)
        result = scanner.topk_lists(request, Queries.of(self._quantizer, q, self._metric).to(device), k)
        return result.scores.cpu(), result.positions.cpu()

    def _scanner(self):
        """The first backend that supports this index on its device."""
        return next(s for s in self._scanners if s.supports(self._device))

    def _backend(self, name: str):
        """This index's scanner of backend `name` ("fastscan", "cuda", "torch"), for tests and benchmarks."""
        return next(s for s in self._scanners if s.name == name)

    def _rerank(self, view: "_View", q: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, k: int):
        """Rescore candidate positions with full-precision vectors; exact top-k of those."""
        q = q.cpu()  # the full-precision vectors stay in host memory
        pos = positions.numpy()
        valid = pos >= 0
        exact = torch.full(pos.shape, -torch.inf, dtype=torch.float32)
        if valid.any():
            vectors = torch.from_numpy(self._gather_vectors(view, pos[valid]))
            rows = torch.from_numpy(np.nonzero(valid)[0])
            if self._metric == "l2":
                values = -(q[rows] - vectors).square().sum(dim=1)
            else:
                values = (q[rows] * vectors).sum(dim=1)
            exact[torch.from_numpy(valid)] = values
        return topk_padded(exact, positions, k)

    def _gather_vectors(self, view: "_View", positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        for segment, where, rows in view.ids.by_segment(positions):
            out[where] = segment.vectors[rows]
        return out

    def reconstruct(self, ids) -> np.ndarray:
        """Dequantized vectors x̃ for the given ids, (n, dim) float32 (for inspection and tests)."""
        arr = as_id_array(ids)
        view = self._view
        positions = view.ids.positions(arr)
        if (positions < 0).any():
            raise KeyError(f"ids not in the index: {arr[positions < 0][:10].tolist()}")
        out = np.empty((len(arr), self.dim), dtype=np.float32)
        for segment, where, rows in view.ids.by_segment(positions):
            encoded = _take_encoded(self._quantizer, segment.encoded, rows)
            if segment.partition is not None:
                # c + the residual's estimate (its `norm` holds ‖x‖, not ‖x − c‖: the scale serves)
                encoded.norm = None
                out[where] = self._quantizer.decode(encoded) + self._coarse.centroids[segment.partition].numpy()
            else:
                out[where] = self._quantizer.decode(encoded)
        return out if self._center is None else out + self._center.numpy()

    # -- state (what storage saves and restores) -----------------------------------------------
    def _state(self) -> dict:
        """What a commit records: params, the id counter, and the segments (their arrays and shard
        entries), consolidated first (`_consolidated`). Call with `_write_lock` held."""
        if len(self._view.segments) > _MAX_SEGMENTS:
            self._swap(_consolidated(self._view.segments, self._quantizer.layout, self._view.schema))
        view = self._view
        return {"params": self.params(), "next_id": self._next_id, "segments": list(view.segments),
                "live": view.live, "store": self._store, "payload_schema": view.schema, "coarse": self._coarse,
                "coarse_shard": self._coarse_shard}

    def _take_lock(self) -> None:
        """Hold the writer lock of the directory this index was loaded from (Index.open)."""
        self._bind(self._store)

    def _bind(self, store) -> None:
        """Make `store` (a committed directory) this index's, holding its writer lock; a previous
        directory's lock is released."""
        store.acquire()
        if self._store is not None and self._store is not store:
            self._store.close()
        self._store = store

    @classmethod
    def _from_state(cls, params: dict, *, segments: list[Segment], next_id: int, store=None,
                    payload_schema: pa.Schema | None = None, coarse: CoarseQuantizer | None = None,
                    coarse_shard: dict | None = None) -> "Index":
        """An index with these params holding these segments (the load path; raises ValueError,
        KeyError or TypeError on bad params)."""
        options = QuantizerOptions(variant=params["variant"], rotation=params["rotation"], rescale=params["rescale"],
                                   codebook=params["codebook"], codebook_version=params["codebook_version"])
        index = cls(dim=params["dim"], bits=params["bits"], metric=params["metric"], seed=params["seed"],
                    keep_vectors=params["keep_vectors"], scale_dtype=params["scale_dtype"],
                    center=params["center"], options=options, partitions=params["partitions"])
        index._coarse, index._coarse_shard = coarse, coarse_shard
        index._swap(segments, payload_schema)
        index._next_id = int(next_id)
        index._store = store
        return index

    def _swap(self, segments: list[Segment], schema: pa.Schema | None = None, live: int | None = None) -> None:
        """Make `segments` (and a payload schema, else the current one) the index's rows: the active
        backend prepares any new segment first (its scan layout), so that no search pays for it, then
        one assignment publishes the snapshot. `live`: their live rows where the caller knows them (a
        one-row change need not count every segment's)."""
        scanner = self._scanner()
        known = {id(s.encoded) for s in self._view.segments}
        for segment in segments:
            if id(segment.encoded) not in known:
                scanner.prepare(segment)
        self._view = _View(segments, self._view.schema if schema is None else schema, live=live)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path=None) -> None:
        """Commit the index to directory `path` (incremental when it is already saved there)."""
        with self._write_lock:
            storage.save(self, path)

    @classmethod
    def load(cls, path, *, mmap: bool = True, device: str = "cpu", verify: bool = True) -> "Index":
        """Load an index saved with `save`. With ``mmap=True`` rows stay on disk until read."""
        return storage.load(cls, path, mmap=mmap, device=device, verify=verify)

    @classmethod
    def open(cls, path, **params) -> "Index":
        """Load the index at `path` if one exists, else create an empty one bound to it."""
        return storage.open_index(cls, path, **params)

    def close(self) -> None:
        """Release the writer lock held on the index directory, if any."""
        if self._store is not None:
            self._store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _View:
    """An immutable snapshot of an index's rows: its segments, their id map and payload schema."""

    __slots__ = ("segments", "ids", "live", "schema", "gathered", "_lists")

    def __init__(self, segments, schema: pa.Schema | None = None, ids: IdMap | None = None, gathered: bool = False,
                 live: int | None = None):
        self.segments = tuple(segments)
        self.schema = schema
        self.ids = IdMap(lambda: self.segments) if ids is None else ids
        self.gathered = gathered  # a filter's allowed rows, copied into one small segment
        # Counted once, not per search (or given by a change that knows it).
        self.live = sum(s.live_count for s in self.segments) if live is None else live
        self._lists = None

    def lists(self) -> tuple[np.ndarray, dict, dict]:
        """Each segment's first position, {list: segment numbers} over segments with live rows, and
        a dict where backends keep what they derive from them (`ListScan.memo`): a partitioned index's
        search request, made once per snapshot."""
        if self._lists is None:
            members: dict = {}
            for i, segment in enumerate(self.segments):
                if segment.live_count:
                    members.setdefault(segment.partition, []).append(i)
            self._lists = (np.cumsum([0] + [len(s) for s in self.segments]), members, {})
        return self._lists


def _with_deleted(view: _View, positions: np.ndarray) -> list[Segment]:
    """The view's segments with these positions removed: copies of the affected segments with new
    deletion masks (codes and ids shared), the others as they are."""
    segments = list(view.segments)
    index_of = {id(s): i for i, s in enumerate(segments)}
    for segment, _, rows in view.ids.by_segment(positions):
        mask = np.zeros(len(segment), dtype=bool) if segment.deleted is None else segment.deleted.copy()
        mask[rows] = True
        segments[index_of[id(segment)]] = dataclasses.replace(segment, deleted=mask, deletions_dirty=True)
    return segments


def _appended(segments: list[Segment], segment: Segment, layout: BlockLayout | None,
              schema: pa.Schema | None) -> list[Segment]:
    """Binary-counter merging: a new segment absorbs unsaved predecessors with no more live rows than
    it has rows (their removed rows dropped), so n one-row adds copy O(n log n) rows in total and
    leave O(log n) segments, where merging every add into the tail would copy O(n²); removals of
    recent rows (a document replaced, then deleted) do not stop it."""
    while True:
        # The latest segment of the same list (a flat index has one list: the tail).
        i = next((j for j in range(len(segments) - 1, -1, -1) if segments[j].partition == segment.partition), None)
        if not (i is not None and segments[i].shard is None and len(segment) < _MERGE_BELOW_ROWS
                and segments[i].live_count <= len(segment)):
            return segments + [segment]
        segment = _merged([segments.pop(i), segment], layout, schema)


def _consolidated(segments: list[Segment], layout: BlockLayout | None, schema: pa.Schema | None) -> list[Segment]:
    """At most `_MAX_SEGMENTS` segments: while there are more, the adjacent pair with the fewest
    live rows is merged (removed rows dropped). Saved segments count too, so many small commits
    (add one row, save, repeat) do not leave one shard each; a merged pair is written once more on
    the next save and its old shards collected."""
    if any(s.partition is not None for s in segments):  # a partitioned index: per list
        return [s for part in _by_partition(segments).values()
                for s in _consolidated_list(part, _MAX_SEGMENTS_PER_LIST, layout, schema)]
    return _consolidated_list(list(segments), _MAX_SEGMENTS, layout, schema)


def _consolidated_list(segments: list[Segment], most: int, layout, schema) -> list[Segment]:
    while len(segments) > most:
        sizes = [a.live_count + b.live_count for a, b in zip(segments, segments[1:])]
        i = int(np.argmin(sizes))
        segments[i:i + 2] = [_merged(segments[i:i + 2], layout, schema)]
    return segments


def _by_partition(segments) -> dict:
    """Segments grouped by list, in list order, each group in index order."""
    groups: dict = {}
    for s in segments:
        groups.setdefault(s.partition, []).append(s)
    return dict(sorted(groups.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))


def _merged(segments: list[Segment], layout: BlockLayout | None, schema: pa.Schema | None = None) -> Segment:
    """One new segment holding the live rows of `segments`, in order (one copy of each row; blocks
    are gathered a chunk at a time). A single segment without removed rows is returned as is."""
    if len(segments) == 1 and segments[0].deleted is None:
        return segments[0]
    keep = [np.arange(len(s)) if s.deleted is None else np.flatnonzero(~np.asarray(s.deleted)) for s in segments]

    def cat(arrays):
        if arrays[0] is None:
            return None
        return np.concatenate([np.asarray(a)[rows] for a, rows in zip(arrays, keep)])

    encs = [s.encoded for s in segments]
    field = lambda name: cat([getattr(e, name) for e in encs])  # noqa: E731
    blocks = None
    if encs[0].blocks is not None:
        blocks = layout.gather([(e.blocks, rows) for e, rows in zip(encs, keep)])
    encoded = EncodedVectors(codes=field("codes"), norm=field("norm"), scale=field("scale"), qjl=field("qjl"),
                             residual_norm=field("residual_norm"), blocks=blocks)
    table = payloads.take([(s.payload, len(s), rows) for s, rows in zip(segments, keep)], schema)
    return Segment(ids=cat([s.ids for s in segments]), encoded=encoded, vectors=cat([s.vectors for s in segments]),
                   payload=table, partition=segments[0].partition)


def _take_encoded(quantizer: TurboQuantizer, enc: EncodedVectors, rows) -> EncodedVectors:
    """Rows of `enc` with row-major codes (for decoding a few rows)."""
    pick = lambda a: None if a is None else np.asarray(a)[rows]  # noqa: E731
    codes = pick(enc.codes) if enc.blocks is None else quantizer.layout.codes_at(enc.blocks, rows)
    return EncodedVectors(codes=codes, norm=pick(enc.norm), scale=pick(enc.scale),
                          qjl=pick(enc.qjl), residual_norm=pick(enc.residual_norm))


def _filtered(view: _View, where, layout: BlockLayout | None) -> _View:
    """The snapshot as the filter sees it: disallowed rows marked removed (every backend skips
    removed rows inside its scan). Below `_DIRECT_FRACTION` of the rows the allowed rows are first
    gathered into one small segment, so the scan reads only them."""
    masks = allowed_rows(view, where)
    # A segment the filter allows whole is scanned as it is (its cached per-row floats stay valid).
    segments = [s if m.all() else dataclasses.replace(s, deleted=~m if s.deleted is None else (s.deleted | ~m))
                for s, m in zip(view.segments, masks)]
    # Same rows and positions as the snapshot: its id map serves as it is.
    filtered = _View(segments, view.schema, ids=view.ids)
    partitioned = any(s.partition is not None for s in segments)  # its lists must stay apart
    if not partitioned and filtered.live and filtered.live <= _DIRECT_FRACTION * view.live:
        return _View([_merged([s for s in segments if s.live_count], layout, view.schema)], view.schema,
                     gathered=True)
    return filtered


def _payload_at(view: _View, positions: np.ndarray, columns: list[str]) -> pa.Table:
    """Metadata rows at these positions (−1: a row of nulls), as a Table of `columns`."""
    positions = np.asarray(positions, dtype=np.int64)
    if not columns:  # no columns, but one row per position
        return payloads.conform(None, len(positions), pa.schema([]), [])
    schema = view.schema
    valid = positions >= 0
    order = np.full(len(positions), -1, dtype=np.int64)
    parts, at = [], 0
    for segment, where, rows in view.ids.by_segment(positions[valid]):
        parts.append(payloads.conform(segment.payload, len(segment), schema, columns)
                     .take(pa.array(rows.astype(np.int64))))
        order[np.flatnonzero(valid)[where]] = at + np.arange(len(rows))
        at += len(rows)
    parts.append(payloads.conform(None, 1, schema, columns))  # the row that padding points at
    table = pa.concat_tables(parts)
    return table.take(pa.array(np.where(order >= 0, order, at)))
