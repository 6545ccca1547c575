"""On-disk format: Arrow IPC shards + a self-checksummed JSON manifest, committed atomically.

Directory layout (format version 1)::

    <index>/MANIFEST.json        the committed state; replaced atomically
    <index>/LOCK                 flock()ed by the one writer
    <index>/shards/rows-<uid>.arrow     id, scale[, norm], codes[, qjl, residual_norm]
                                        (scale: float32, or float16 where the manifest's
                                        params say scale_dtype "float16"; absent means float32)
    <index>/shards/vectors-<uid>.arrow  kept full-precision vectors (only read by rerank)
    <index>/shards/deleted-<uid>.arrow  row numbers removed from one rows shard (tombstones)

Shards are Arrow IPC files (Feather v2), uncompressed, one record batch each, so they can be
memory-mapped and their columns viewed as numpy arrays without copying. A shard is never modified
after it is written; appends, deletions and compaction write new files.

Commit protocol: write every new file and fsync it; write the manifest to a temporary file, fsync,
rename it over MANIFEST.json, fsync the directory; only then delete files no manifest names. A crash
at any point leaves either the old or the new manifest, and every file it names is complete. A
reader that has loaded (and mapped) a manifest's shards keeps a consistent view: files are only
unlinked, never rewritten, so its mappings stay valid.

The manifest holds every parameter needed to reproduce the codes, and a CRC-32 of its own body, so
a flipped digit in, say, the seed is detected rather than silently changing every score. Each shard
entry records its size and CRC-32. Nothing in the directory is pickled or executed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import uuid
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from .codebook import CODEBOOK_VERSIONS
from .quantizer import SCALE_DTYPES, EncodedVectors
from .segment import Segment

__all__ = ["FORMAT_VERSION", "IndexFormatError", "IndexLockedError", "Store", "save", "load", "open_index"]

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
LOCK = "LOCK"
SHARDS = "shards"
_CHECKSUM_CHUNK = 8 << 20
_LOAD_RETRIES = 5


class IndexFormatError(ValueError):
    """A saved index is missing, damaged, or of an unsupported format; the message names the file."""


class IndexLockedError(RuntimeError):
    """Another writer holds the index directory."""


# -- small file helpers -------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHECKSUM_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# -- schemas ------------------------------------------------------------------------------------
def _rows_schema(params: dict, code_bytes: int, qjl_bytes: int, stores_norm: bool) -> pa.Schema:
    scale_type = pa.from_numpy_dtype(SCALE_DTYPES[params.get("scale_dtype", "float32")])
    fields = [pa.field("id", pa.int64(), nullable=False), pa.field("scale", scale_type, nullable=False)]
    if stores_norm:
        fields.append(pa.field("norm", pa.float32(), nullable=False))
    if code_bytes:
        fields.append(pa.field("codes", pa.binary(code_bytes), nullable=False))
    if params["variant"] == "prod":
        fields += [pa.field("qjl", pa.binary(qjl_bytes), nullable=False),
                   pa.field("residual_norm", pa.float32(), nullable=False)]
    return pa.schema(fields)


def _vectors_schema(dim: int) -> pa.Schema:
    return pa.schema([pa.field("vector", pa.list_(pa.float32(), dim), nullable=False)])


_DELETED_SCHEMA = pa.schema([pa.field("row", pa.int64(), nullable=False)])


def _fixed_binary(matrix: np.ndarray) -> pa.Array:
    matrix = np.ascontiguousarray(matrix, dtype=np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(matrix.shape[1]), len(matrix),
                                                [None, pa.py_buffer(matrix.reshape(-1))])


def _write_table(path: Path, schema: pa.Schema, columns: list[pa.Array]) -> dict:
    batch = pa.RecordBatch.from_arrays(columns, schema=schema)
    with pa.OSFile(str(path), "wb") as sink:
        with ipc.new_file(sink, schema) as writer:
            writer.write_batch(batch)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return {"name": path.name, "bytes": path.stat().st_size, "crc32": _crc32_file(path), "rows": batch.num_rows}


def _read_table(path: Path, entry: dict, schema: pa.Schema, *, mmap: bool, verify: bool) -> pa.RecordBatch:
    """Open one shard and check it against its manifest entry; raise IndexFormatError otherwise."""
    if not path.exists():
        raise IndexFormatError(f"missing shard file {path}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise IndexFormatError(f"shard {path} has {size} bytes, the manifest records {entry['bytes']} "
                               f"(truncated or replaced)")
    if verify and _crc32_file(path) != entry["crc32"]:
        raise IndexFormatError(f"checksum mismatch in shard {path}: the file is corrupted")
    try:
        source = pa.memory_map(str(path), "r") if mmap else pa.BufferReader(pa.py_buffer(path.read_bytes()))
        reader = ipc.open_file(source)
        if reader.num_record_batches != 1:
            raise IndexFormatError(f"shard {path} holds {reader.num_record_batches} record batches, expected 1")
        batch = reader.get_batch(0)
    except IndexFormatError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IndexFormatError(f"shard {path} is not a readable Arrow IPC file: {exc}") from exc
    if not batch.schema.equals(schema):
        raise IndexFormatError(f"shard {path} has schema {batch.schema}, expected {schema}")
    if batch.num_rows != entry["rows"]:
        raise IndexFormatError(f"shard {path} has {batch.num_rows} rows, the manifest records {entry['rows']}")
    return batch


def _column_numpy(column: pa.Array, width: int | None = None) -> np.ndarray:
    """Zero-copy numpy view of a non-null primitive or fixed-size column."""
    if column.null_count:
        raise IndexFormatError("unexpected null values in a shard column")
    if width is None:
        return column.to_numpy(zero_copy_only=True)
    if isinstance(column.type, pa.FixedSizeListType):
        values = column.values.to_numpy(zero_copy_only=True)
        return values[column.offset * width:(column.offset + len(column)) * width].reshape(len(column), width)
    data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
    return data[column.offset * width:(column.offset + len(column)) * width].reshape(len(column), width)


# -- the store bound to a directory -------------------------------------------------------------
class Store:
    """The directory an Index is saved in: its lock, last committed manifest, and file names."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.generation = 0
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        if self._lock_fd is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise IndexLockedError(f"index directory {self.path} is locked by another writer "
                                       f"(close that Index first)") from None
            raise
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __del__(self):
        self.close()


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        if path.exists() and (path / SHARDS).exists():
            raise IndexFormatError(f"missing manifest {manifest_path}: the index directory has shards but no manifest")
        raise FileNotFoundError(f"no tqindex index at {path} (no {MANIFEST})")
    raw = manifest_path.read_bytes()
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFormatError(f"manifest {manifest_path} is not valid JSON (truncated or corrupted): {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict) or "crc32" not in doc:
        raise IndexFormatError(f"manifest {manifest_path} lacks the body/crc32 layout of a tqindex manifest")
    body = doc["body"]
    # The version first: a newer format may checksum differently, and deserves the clearer message.
    version = body.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise IndexFormatError(f"manifest {manifest_path} has format version {version}; this tqindex reads "
                               f"versions up to {FORMAT_VERSION} (upgrade tqindex)")
    if doc["crc32"] != zlib.crc32(_canonical(body)):
        raise IndexFormatError(f"checksum mismatch in manifest {manifest_path}: the file is corrupted")
    if body.get("format") != "tqindex" or not isinstance(version, int):
        raise IndexFormatError(f"manifest {manifest_path} is not a tqindex manifest")
    if body["params"].get("codebook_version") not in CODEBOOK_VERSIONS:
        raise IndexFormatError(f"manifest {manifest_path} uses codebook version "
                               f"{body['params'].get('codebook_version')}, this tqindex builds {CODEBOOK_VERSIONS}")
    return body


def _write_manifest(path: Path, body: dict) -> None:
    data = json.dumps({"body": body, "crc32": zlib.crc32(_canonical(body))}, indent=1, sort_keys=True).encode()
    tmp = path / (MANIFEST + ".tmp")
    _write_durable(tmp, data)
    os.replace(tmp, path / MANIFEST)
    _fsync_dir(path)


def _collect_garbage(path: Path, body: dict) -> None:
    """Delete shard files the committed manifest does not name (superseded ones, crash leftovers)."""
    keep = set()
    for entry in body["shards"]:
        for part in ("rows", "vectors", "deleted"):
            if entry.get(part):
                keep.add(entry[part]["name"])
    for file in (path / SHARDS).iterdir():
        if file.name not in keep:
            _unlink_quietly(file)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# -- save ---------------------------------------------------------------------------------------
def save(index, path=None) -> None:
    store: Store | None = index._store
    state = index._state()
    fresh = False  # a new directory: every segment is written there, whatever it has elsewhere
    if path is None:
        if store is None:
            raise ValueError("save() needs a path: this index has never been saved")
        target = store.path
    else:
        target = Path(path)
    if store is None or store.path.resolve() != target.resolve():
        new_store = Store(target)
        new_store.acquire()
        if (target / MANIFEST).exists():
            new_store.close()
            raise FileExistsError(f"{target} already holds an index; load it (Index.load/open) to update it")
        if store is not None:
            store.close()
        store = index._store = new_store
        fresh = True
    else:
        store.acquire()
        if (target / MANIFEST).exists():
            on_disk = _read_manifest(target)["generation"]
            if on_disk != store.generation:
                raise RuntimeError(f"index at {target} was changed by another writer since it was loaded "
                                   f"(generation {on_disk}, expected {store.generation}); reload it")
    shard_dir = target / SHARDS
    shard_dir.mkdir(parents=True, exist_ok=True)
    params = state["params"]
    q = index._quantizer
    rows_schema = _rows_schema(params, q.code_bytes, q.qjl_bytes, q.stores_norm(params["metric"]))
    entries = []
    for segment in state["segments"]:
        rewrite = fresh or segment.shard is None
        entry = _write_segment(shard_dir, segment, rows_schema, index.dim) if rewrite else dict(segment.shard)
        if rewrite or segment.deletions_dirty:
            rows = np.nonzero(segment.deleted)[0].astype(np.int64) if segment.deleted is not None else None
            entry["deleted"] = None if rows is None or not rows.size else _write_table(
                shard_dir / f"deleted-{uuid.uuid4().hex}.arrow", _DELETED_SCHEMA, [pa.array(rows, pa.int64())])
        entries.append(entry)
    _fsync_dir(shard_dir)
    body = {"format": "tqindex", "format_version": FORMAT_VERSION, "generation": store.generation + 1,
            "params": params, "next_id": state["next_id"], "count": state["live"], "shards": entries}
    _write_manifest(target, body)
    # Committed: only now may the in-memory state say so, and old files go.
    store.generation = body["generation"]
    for segment, entry in zip(state["segments"], entries):
        segment.shard = entry
        segment.deletions_dirty = False
    _collect_garbage(target, body)


def _write_segment(shard_dir: Path, segment: Segment, schema: pa.Schema, dim: int) -> dict:
    uid = uuid.uuid4().hex
    enc = segment.encoded
    columns = [pa.array(np.asarray(segment.ids), pa.int64()),
               pa.array(np.asarray(enc.scale), schema.field("scale").type)]
    if "norm" in schema.names:
        columns.append(pa.array(np.asarray(enc.norm), pa.float32()))
    if "codes" in schema.names:
        columns.append(_fixed_binary(np.asarray(enc.codes)))
    if "qjl" in schema.names:
        columns += [_fixed_binary(np.asarray(enc.qjl)), pa.array(np.asarray(enc.residual_norm), pa.float32())]
    entry = {"rows": _write_table(shard_dir / f"rows-{uid}.arrow", schema, columns), "vectors": None, "deleted": None}
    if segment.vectors is not None:
        flat = pa.array(np.ascontiguousarray(segment.vectors, dtype=np.float32).reshape(-1), pa.float32())
        entry["vectors"] = _write_table(shard_dir / f"vectors-{uid}.arrow", _vectors_schema(dim),
                                        [pa.FixedSizeListArray.from_arrays(flat, dim)])
    return entry


# -- load ---------------------------------------------------------------------------------------
def load(cls, path, *, mmap: bool = True, device: str = "cpu", verify: bool = True):
    path = Path(path)
    last_error = None
    # A writer may commit and delete superseded shards between our reading the manifest and opening
    # them; then the manifest has moved on, and reading it again gives a consistent set.
    for _ in range(_LOAD_RETRIES):
        body = _read_manifest(path)
        try:
            return _load_body(cls, path, body, mmap=mmap, device=device, verify=verify)
        except IndexFormatError as exc:
            last_error = exc
            try:
                if _read_manifest(path)["generation"] == body["generation"]:
                    raise
            except FileNotFoundError:
                raise exc from None
    raise last_error


def _load_body(cls, path: Path, body: dict, *, mmap: bool, verify: bool, device: str):
    params = dict(body["params"])
    # Indexes saved before scale_dtype existed stored float32 scales, and before codebook existed,
    # the scalar codebook.
    params.setdefault("scale_dtype", "float32")
    params.setdefault("codebook", "scalar")
    params.setdefault("center", None)
    try:
        index = cls._from_state(params, segments=[], next_id=0)
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFormatError(f"manifest {path / MANIFEST} has invalid parameters {params}: {exc}") from None
    q = index._quantizer
    rows_schema = _rows_schema(params, q.code_bytes, q.qjl_bytes, q.stores_norm(params["metric"]))
    store = Store(path)
    shard_dir = path / SHARDS
    segments = []
    for entry in body["shards"]:
        batch = _read_table(shard_dir / entry["rows"]["name"], entry["rows"], rows_schema, mmap=mmap, verify=verify)
        col = {name: batch.column(name) for name in batch.schema.names}
        encoded = EncodedVectors(
            codes=_column_numpy(col["codes"], q.code_bytes) if "codes" in col else np.zeros((batch.num_rows, 0), np.uint8),
            norm=_column_numpy(col["norm"]) if "norm" in col else None, scale=_column_numpy(col["scale"]),
            qjl=_column_numpy(col["qjl"], q.qjl_bytes) if "qjl" in col else None,
            residual_norm=_column_numpy(col["residual_norm"]) if "residual_norm" in col else None)
        vectors = None
        if index.keep_vectors:
            if not entry.get("vectors"):
                raise IndexFormatError(f"manifest {path / MANIFEST} names no vectors shard for {entry['rows']['name']}")
            vb = _read_table(shard_dir / entry["vectors"]["name"], entry["vectors"], _vectors_schema(index.dim),
                             mmap=mmap, verify=verify)
            if vb.num_rows != batch.num_rows:
                raise IndexFormatError(f"vectors shard {entry['vectors']['name']} has {vb.num_rows} rows, "
                                       f"its rows shard has {batch.num_rows}")
            vectors = _column_numpy(vb.column(0), index.dim)
        deleted = None
        if entry.get("deleted"):
            db = _read_table(shard_dir / entry["deleted"]["name"], entry["deleted"], _DELETED_SCHEMA, mmap=False,
                             verify=verify)
            rows = _column_numpy(db.column(0))
            if rows.size and (rows.min() < 0 or rows.max() >= batch.num_rows):
                raise IndexFormatError(f"tombstones {entry['deleted']['name']} name rows outside their shard")
            deleted = np.zeros(batch.num_rows, dtype=bool)
            deleted[rows] = True
        segments.append(Segment(ids=_column_numpy(col["id"]), encoded=encoded, vectors=vectors, deleted=deleted,
                                shard=entry))
    store.generation = body["generation"]
    index._adopt(segments, int(body["next_id"]), store)
    if len(index) != body["count"]:
        raise IndexFormatError(f"manifest {path / MANIFEST} records {body['count']} live rows, shards hold {len(index)}")
    if device != "cpu":
        index.to(device)
    return index


def open_index(cls, path, **params):
    """Load the index at `path`, or create an empty one there (saved at once) with `params`.

    On an existing index every given parameter must match the stored one (a misspelt name or a
    different value raises ValueError naming it), so `open` never silently ignores an argument.
    """
    path = Path(path)
    if (path / MANIFEST).exists():
        index = load(cls, path, **{k: params.pop(k) for k in ("mmap", "device", "verify") if k in params})
        stored = index.params()
        given = dict(params)
        options = given.pop("options", None)
        if options is not None:
            given.update(options.__dict__)
        unknown = sorted(set(given) - set(stored))
        if unknown:
            index.close()
            raise ValueError(f"Index.open got unknown parameters {unknown}; an index's parameters are {sorted(stored)}")
        if given:
            # What these arguments would build, compared with what is stored (bits as realised,
            # scale_dtype and center normalised the same way).
            probe = cls(**{"dim": stored["dim"], **params}).params()
            clash = {k: (given[k], stored[k]) for k in given if probe[k] != stored[k]}
            if clash:
                index.close()
                raise ValueError(f"index at {path} was built with different parameters (given, stored): "
                                 f"{_short(clash)}")
        index._store.acquire()
        return index
    index = cls(**params)
    index.save(path)
    return index


def _short(value, limit: int = 500) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
