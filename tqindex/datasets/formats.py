"""Dataset readers with one interface, and writers for the formats they read.

Every dataset offers (after faiss ``contrib/datasets.py``)::

    ds.database()                 (n, d) float32
    ds.queries()                  (nq, d) float32
    ds.groundtruth(k)             (nq, k) int64 ids of the exact top-k, and
    ds.groundtruth_scores(k)      their exact scores (similarity for ip/cosine, squared distance for l2)
    ds.database_iterator(bs)      (≤ bs, d) float32 blocks, bounded memory
    ds.metric, ds.dim, ds.name

Formats: ann-benchmarks HDF5 (needs h5py, the "data" extra), ``.npy``, ``.fvecs``/``.ivecs``,
``.fbin``/``.ibin`` (big-ann), and the Hugging Face parquet layout of the DBpedia OpenAI sets.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .knn import METRIC_ALIASES as _METRIC_ALIASES
from .knn import exact_knn

__all__ = ["Dataset", "ArrayDataset", "AnnBenchmarksDataset", "read_vecs", "write_vecs", "read_bin", "write_bin",
           "read_parquet_embeddings", "write_ann_benchmarks"]


class Dataset:
    """Base class: subclasses provide database/queries; ground truth is computed if absent."""

    name = "dataset"
    metric = "ip"

    def database(self) -> np.ndarray:
        raise NotImplementedError

    def queries(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def dim(self) -> int:
        return int(self.queries().shape[1])

    def __len__(self) -> int:
        return len(self.database())

    def database_iterator(self, batch_size: int = 65536):
        db = self.database()
        for i in range(0, len(db), batch_size):
            yield np.ascontiguousarray(db[i:i + batch_size], dtype=np.float32)

    def _stored_groundtruth(self):
        return None

    def _groundtruth(self, k: int):
        stored = self._stored_groundtruth()
        if stored is not None and stored[0].shape[1] >= k:
            return stored[0][:, :k], stored[1][:, :k]
        if getattr(self, "_gt_cache", None) is None or self._gt_cache[0].shape[1] < k:
            self._gt_cache = exact_knn(self.database_iterator(), self.queries(), max(k, 100), self.metric)
        return self._gt_cache[0][:, :k], self._gt_cache[1][:, :k]

    def groundtruth(self, k: int = 100) -> np.ndarray:
        return self._groundtruth(k)[0]

    def groundtruth_scores(self, k: int = 100) -> np.ndarray:
        return self._groundtruth(k)[1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)}, dim={self.dim}, metric={self.metric!r})"


class ArrayDataset(Dataset):
    """A dataset from in-memory (or memory-mapped) arrays."""

    def __init__(self, database, queries, *, metric: str = "ip", name: str = "arrays", groundtruth=None,
                 groundtruth_scores=None):
        if metric not in _METRIC_ALIASES:
            raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(_METRIC_ALIASES)}")
        self._db, self._q = database, np.asarray(queries, dtype=np.float32)
        if self._q.ndim != 2 or np.asarray(database[:1]).shape[-1] != self._q.shape[1]:
            raise ValueError(f"database and queries must be 2-D with one dimension; got {np.shape(database)} "
                             f"and {self._q.shape}")
        self.metric, self.name = _METRIC_ALIASES[metric], name
        self._gt = None if groundtruth is None else (np.asarray(groundtruth, np.int64),
                                                     None if groundtruth_scores is None
                                                     else np.asarray(groundtruth_scores, np.float32))

    def database(self):
        return self._db

    def queries(self):
        return self._q

    def _stored_groundtruth(self):
        if self._gt is None or self._gt[1] is None:
            return None
        return self._gt


class AnnBenchmarksDataset(Dataset):
    """An ann-benchmarks HDF5 file: train, test, neighbors, distances; attrs distance, dimension.

    ann-benchmarks stores distances (1 − cos for angular); `groundtruth_scores` converts them back
    to this module's convention (similarity for ip/cosine, squared distance for l2).
    """

    def __init__(self, path):
        import h5py  # the "data" extra; only needed for this format
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no such dataset file {self.path}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise ValueError(f"{self.path} is not a readable HDF5 file (truncated?): {exc}") from None
        missing = [key for key in ("train", "test") if key not in self._file]
        if missing:
            raise ValueError(f"{self.path} lacks the ann-benchmarks datasets {missing}")
        distance = self._file.attrs.get("distance", "ip")
        distance = distance.decode() if isinstance(distance, bytes) else str(distance)
        if distance not in _METRIC_ALIASES:
            raise ValueError(f"{self.path} has distance {distance!r}, expected one of {sorted(_METRIC_ALIASES)}")
        self.metric = _METRIC_ALIASES[distance]
        self._distance = distance
        self.name = self.path.stem
        self._queries = None
        dim = self._file["train"].shape[1]
        if int(self._file.attrs.get("dimension", dim)) != dim or self._file["test"].shape[1] != dim:
            raise ValueError(f"{self.path}: train, test and the dimension attribute disagree")

    def database(self):
        return _H5Rows(self._file["train"])

    def __len__(self):
        return self._file["train"].shape[0]

    def queries(self):
        if self._queries is None:
            self._queries = np.asarray(self._file["test"][:], dtype=np.float32)
        return self._queries

    def database_iterator(self, batch_size: int = 65536):
        train = self._file["train"]
        for i in range(0, train.shape[0], batch_size):
            yield np.asarray(train[i:i + batch_size], dtype=np.float32)

    def _stored_groundtruth(self):
        if "neighbors" not in self._file:
            return None
        ids = np.asarray(self._file["neighbors"][:], dtype=np.int64)
        if "distances" not in self._file:
            return None
        dist = np.asarray(self._file["distances"][:], dtype=np.float32)
        if self._distance == "angular":
            dist = 1 - dist
        elif self._distance == "euclidean":
            dist = dist ** 2
        return ids, dist


class _H5Rows:
    """Lazy row access to an HDF5 dataset as float32 (slices read on demand)."""

    def __init__(self, ds):
        self._ds = ds
        self.shape = ds.shape

    def __len__(self):
        return self._ds.shape[0]

    def __getitem__(self, item):
        return np.asarray(self._ds[item], dtype=np.float32)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self._ds[:], dtype=dtype or np.float32)


# -- raw formats ---------------------------------------------------------------------------------
def read_vecs(path, *, mmap: bool = True) -> np.ndarray:
    """.fvecs (float32), .ivecs (int32) or .bvecs (uint8): each row is int32 d, then d values."""
    path = Path(path)
    dtype = {".fvecs": np.float32, ".ivecs": np.int32, ".bvecs": np.uint8}.get(path.suffix)
    if dtype is None:
        raise ValueError(f"{path}: expected a .fvecs, .ivecs or .bvecs file")
    size = path.stat().st_size
    if size < 4:
        raise ValueError(f"{path} is empty or truncated ({size} bytes)")
    d = int(np.fromfile(path, dtype=np.int32, count=1)[0])
    row = 4 + d * np.dtype(dtype).itemsize
    if d <= 0 or size % row:
        raise ValueError(f"{path}: size {size} is not a multiple of the row size {row} for d={d} (truncated?)")
    raw = np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, dtype=np.uint8)
    rows = raw.reshape(-1, row)
    if not np.all(rows[:, :4].view(np.int32) == d):
        raise ValueError(f"{path}: rows disagree on the dimension (corrupted?)")
    return rows[:, 4:].view(dtype)


def write_vecs(path, array: np.ndarray) -> None:
    path = Path(path)
    dtype = {".fvecs": np.float32, ".ivecs": np.int32, ".bvecs": np.uint8}[path.suffix]
    a = np.ascontiguousarray(array, dtype=dtype)
    header = np.full((len(a), 1), a.shape[1], dtype=np.int32).view(np.uint8)
    np.concatenate([header, a.view(np.uint8).reshape(len(a), -1)], axis=1).tofile(path)


def read_bin(path, *, mmap: bool = True) -> np.ndarray:
    """big-ann .fbin (float32), .ibin (int32), .u8bin/.i8bin: uint32 n, uint32 d, then n·d values."""
    path = Path(path)
    dtype = {".fbin": np.float32, ".ibin": np.int32, ".u8bin": np.uint8, ".i8bin": np.int8}.get(path.suffix)
    if dtype is None:
        raise ValueError(f"{path}: expected a .fbin, .ibin, .u8bin or .i8bin file")
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path} is truncated: {size} bytes, no header")
    n, d = (int(v) for v in np.fromfile(path, dtype=np.uint32, count=2))
    expected = 8 + n * d * np.dtype(dtype).itemsize
    if size != expected:
        raise ValueError(f"{path}: header says {n} x {d} ({expected} bytes) but the file has {size} bytes "
                         f"(truncated?)")
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", offset=8, shape=(n, d))
    return np.fromfile(path, dtype=dtype, offset=8).reshape(n, d)


def write_bin(path, array: np.ndarray) -> None:
    path = Path(path)
    dtype = {".fbin": np.float32, ".ibin": np.int32, ".u8bin": np.uint8, ".i8bin": np.int8}[path.suffix]
    a = np.ascontiguousarray(array, dtype=dtype)
    with open(path, "wb") as f:
        np.asarray(a.shape, dtype=np.uint32).tofile(f)
        a.tofile(f)


def read_parquet_embeddings(paths, *, column: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Embeddings (float32) and titles from the Hugging Face DBpedia OpenAI parquet layout.

    Columns: ``_id``, ``title``, ``text`` and one embedding column of float lists, e.g.
    ``text-embedding-3-large-1536-embedding`` or ``openai``. With `column` None the one list-typed
    column is used. Reads row groups one at a time.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    blocks, titles = [], []
    for path in paths:
        try:
            file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{path} is not a readable parquet file (truncated?): {exc}") from None
        schema = file.schema_arrow
        name = column
        if name is None:
            lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
                     or pa.types.is_fixed_size_list(f.type)]
            if len(lists) != 1:
                raise ValueError(f"{path}: cannot tell the embedding column among {lists}; pass column=")
            name = lists[0]
        if name not in schema.names:
            raise ValueError(f"{path} has no column {name!r}; columns are {schema.names}")
        for i in range(file.num_row_groups):
            table = file.read_row_group(i, columns=[name] + (["title"] if "title" in schema.names else []))
            col = table.column(name).combine_chunks()
            values = col.flatten().to_numpy(zero_copy_only=False)
            if len(col) and len(values) % len(col):
                raise ValueError(f"{path}: embeddings of unequal length in column {name!r}")
            blocks.append(values.reshape(len(col), -1).astype(np.float32))
            if "title" in table.column_names:
                titles.extend(table.column("title").to_pylist())
    dims = {b.shape[1] for b in blocks if len(b)}
    if len(dims) > 1:
        raise ValueError(f"embeddings of different dimensions {sorted(dims)}")
    return np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32), titles


def write_ann_benchmarks(path, train: np.ndarray, test: np.ndarray, metric: str, *, k: int = 100,
                         attrs: dict | None = None, texts: tuple | None = None) -> None:
    """Write an ann-benchmarks HDF5 file with exact top-k ground truth."""
    import h5py
    ids, scores = exact_knn(train, test, k, metric)
    distance = {"ip": "ip", "cosine": "angular", "l2": "euclidean"}[_METRIC_ALIASES[metric]]
    dist = 1 - scores if distance == "angular" else (np.sqrt(np.maximum(scores, 0)) if distance == "euclidean"
                                                       else scores)
    tmp = Path(str(path) + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["distance"] = distance
        f.attrs["dimension"] = train.shape[1]
        f.attrs["type"] = "dense"
        f.attrs["point_type"] = "float"
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        f.create_dataset("train", data=train)
        f.create_dataset("test", data=test)
        f.create_dataset("neighbors", data=ids.astype(np.int32))
        f.create_dataset("distances", data=dist.astype(np.float32))
        if texts is not None:
            string = h5py.string_dtype()
            f.create_dataset("train_text", data=np.asarray(texts[0], dtype=object), dtype=string)
            f.create_dataset("test_text", data=np.asarray(texts[1], dtype=object), dtype=string)
    os.replace(tmp, path)


