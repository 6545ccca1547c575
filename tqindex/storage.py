"""On-disk format: Arrow IPC shards + a self-checksummed JSON manifest, committed atomically.

Directory layout (format version 2)::

    <index>/MANIFEST.json        the committed state; replaced atomically
    <index>/LOCK                 flock()ed by the one writer
    <index>/shards/rows-<uid>.arrow     id, scale[, norm], [codes,] [qjl, residual_norm]
                                        (scale: float32, or float16 where the manifest's
                                        params say scale_dtype "float16"; absent means float32;
                                        codes: row-major, for codes without a block layout)
    <index>/shards/codes-<uid>.arrow    blocks: the rows' codes in the block layout the fast scan
                                        reads (`tqindex.layout`), one fixed-size binary of
                                        32 rows' bytes per block (ceil(rows / 32) of them)
    <index>/shards/vectors-<uid>.arrow  kept full-precision vectors (only read by rerank)
    <index>/shards/payload-<uid>.arrow  metadata columns of the rows (`tqindex.payload`), any Arrow
                                        types; the manifest records each one's schema and the
                                        index's (base64 Arrow IPC schemas: data, never code)
    <index>/shards/deleted-<uid>.arrow  row numbers removed from one rows shard (tombstones)

Shards are Arrow IPC files (Feather v2), uncompressed, one record batch each, so they can be
memory-mapped and their columns viewed as numpy arrays without copying: a mapped index searches its
codes' pages as they are, building nothing. Format version 1 held every index's codes row-major in
the rows shard; such shards still load (their codes are converted to blocks in memory) and are
rewritten in the new form when next rewritten. A shard is never modified
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
import mmap as mmap_module
import numbers
import os
import re
import stat
import uuid
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from . import payload as payloads
from .codebook import CODEBOOK_VERSIONS
from .groups import CODEBOOKS, make_groups
from .layout import BLOCK, BlockLayout, block_count
from .partition import MAX_PARTITIONS, CoarseQuantizer
from .quantizer import SCALE_DTYPES, VARIANTS, EncodedVectors, row_code_bytes, stores_norm
from .rotation import ROTATION_KINDS
from .segment import Segment
from .validation import MAX_DIM, MAX_ID, METRICS

__all__ = ["FORMAT_VERSION", "IndexFormatError", "IndexLockedError", "Store", "save", "load", "open_index"]

FORMAT_VERSION = 2
MANIFEST = "MANIFEST.json"
LOCK = "LOCK"
SHARDS = "shards"
_CHECKSUM_CHUNK = 8 << 20
_LOAD_RETRIES = 100  # a retry happens only when a writer committed meanwhile
#: Every file the index writes under shards/ has such a name; nothing else there is ever opened or removed.
_SHARD_NAME = re.compile(r"(rows|codes|vectors|payload|deleted|centroids)-[0-9a-f]{32}\.arrow")
#: The files of one shard entry in the manifest; only "rows" is always there.
_PARTS = ("rows", "codes", "vectors", "payload", "deleted")
#: A manifest larger than this is refused unread (a real one holds a few hundred bytes per shard).
_MAX_MANIFEST_BYTES = 64 << 20
#: Parameters indexes saved by older tqindex versions lack, as those versions built them.
_LEGACY_PARAMS = {"scale_dtype": "float32", "codebook": "scalar", "center": None, "partitions": 0}


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


def _crc32(f) -> int:
    """CRC-32 of a binary file object, read in chunks from its current position."""
    crc = 0
    while chunk := f.read(_CHECKSUM_CHUNK):
        crc = zlib.crc32(chunk, crc)
    return crc


def _open_regular(path: Path) -> int:
    """A read-only descriptor of `path` if it is a regular file, not a symlink (O_NOFOLLOW) and
    not a FIFO or device (O_NONBLOCK, then fstat), so that opening can neither leave the directory
    nor hang. Raises FileNotFoundError or IndexFormatError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a symlink; others: unreadable
        raise IndexFormatError(f"{path} cannot be opened as a regular file of the index ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IndexFormatError(f"{path} is not a regular file")
    return fd


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# -- schemas ------------------------------------------------------------------------------------
def _rows_schema(params: dict, code_bytes: int, qjl_bytes: int, stores_norm: bool, blocked: bool = False
                 ) -> pa.Schema:
    """The rows shard's schema; `blocked`: the codes are in a codes shard, not here."""
    scale_type = pa.from_numpy_dtype(SCALE_DTYPES[params.get("scale_dtype", "float32")])
    fields = [pa.field("id", pa.int64(), nullable=False), pa.field("scale", scale_type, nullable=False)]
    if stores_norm:
        fields.append(pa.field("norm", pa.float32(), nullable=False))
    if code_bytes and not blocked:
        fields.append(pa.field("codes", pa.binary(code_bytes), nullable=False))
    if params["variant"] == "prod":
        fields += [pa.field("qjl", pa.binary(qjl_bytes), nullable=False),
                   pa.field("residual_norm", pa.float32(), nullable=False)]
    return pa.schema(fields)


def _codes_schema(width: int) -> pa.Schema:
    return pa.schema([pa.field("blocks", pa.binary(width * BLOCK), nullable=False)])


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
        crc = _crc32(f)
    return {"name": path.name, "bytes": path.stat().st_size, "crc32": crc, "rows": batch.num_rows}


def _read_table(path: Path, entry: dict, schema: pa.Schema, *, mmap: bool, verify: bool) -> pa.RecordBatch:
    """Open one shard and check it against its manifest entry; raise IndexFormatError otherwise
    (a file removed meanwhile, say by a writer's garbage collection, included: load then retries)."""
    try:
        fd = _open_regular(path)
    except FileNotFoundError:
        raise IndexFormatError(f"missing shard file {path}") from None
    try:
        size = os.fstat(fd).st_size
        if size != entry["bytes"]:
            raise IndexFormatError(f"shard {path} has {size} bytes, the manifest records {entry['bytes']} "
                                   f"(truncated or replaced)")
        if verify:
            with os.fdopen(os.dup(fd), "rb") as f:
                crc = _crc32(f)
            if crc != entry["crc32"]:
                raise IndexFormatError(f"checksum mismatch in shard {path}: the file is corrupted")
        if mmap and size:
            # Mapped from the descriptor checked above, so the file read is the file validated.
            buffer = pa.py_buffer(mmap_module.mmap(fd, 0, access=mmap_module.ACCESS_READ))
        else:
            os.lseek(fd, 0, os.SEEK_SET)  # the checksum pass read through the shared offset
            with os.fdopen(os.dup(fd), "rb") as f:
                buffer = pa.py_buffer(f.read())
        reader = ipc.open_file(pa.BufferReader(buffer))
        if reader.num_record_batches != 1:
            raise IndexFormatError(f"shard {path} holds {reader.num_record_batches} record batches, expected 1")
        batch = reader.get_batch(0)
    except IndexFormatError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise IndexFormatError(f"shard {path} is not a readable Arrow IPC file: {exc}") from exc
    finally:
        os.close(fd)
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
        return _primitive_numpy(column)
    if isinstance(column.type, pa.FixedSizeListType):
        values = _primitive_numpy(column.values)
        return values[column.offset * width:(column.offset + len(column)) * width].reshape(len(column), width)
    data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
    return data[column.offset * width:(column.offset + len(column)) * width].reshape(len(column), width)


def _primitive_numpy(column: pa.Array) -> np.ndarray:
    """A numeric column's values buffer as numpy, without a copy. (pyarrow's own `to_numpy` imports
    pandas the first time, some 40 MB of resident memory for nothing a load needs.)"""
    dtype = np.dtype(column.type.to_pandas_dtype())
    data = np.frombuffer(column.buffers()[1], dtype=dtype) if len(column) else np.empty(0, dtype)
    return data[column.offset:column.offset + len(column)]


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
    """The committed manifest's body, checked (`_check_body`); FileNotFoundError where there is none."""
    manifest_path = path / MANIFEST
    try:
        fd = _open_regular(manifest_path)
    except FileNotFoundError:
        if path.is_dir() and (path / SHARDS).is_dir():
            raise IndexFormatError(f"missing manifest {manifest_path}: the index directory has shards but no manifest")
        raise FileNotFoundError(f"no tqindex index at {path} (no {MANIFEST})") from None
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_size > _MAX_MANIFEST_BYTES:
            raise IndexFormatError(f"manifest {manifest_path} is larger than {_MAX_MANIFEST_BYTES} bytes")
        raw = f.read()
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise IndexFormatError(f"manifest {manifest_path} is not valid JSON (truncated or corrupted): "
                               f"{_short(exc, 200)}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict) or "crc32" not in doc:
        raise IndexFormatError(f"manifest {manifest_path} lacks the body/crc32 layout of a tqindex manifest")
    body = doc["body"]
    # The version first: a newer format may checksum differently, and deserves the clearer message.
    version = body.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise IndexFormatError(f"manifest {manifest_path} has format version {version}; this tqindex reads "
                               f"versions up to {FORMAT_VERSION} (upgrade tqindex)")
    try:
        crc = zlib.crc32(_canonical(body))
    except (TypeError, ValueError, RecursionError):
        raise IndexFormatError(f"manifest {manifest_path} body cannot be checksummed") from None
    if doc["crc32"] != crc:
        raise IndexFormatError(f"checksum mismatch in manifest {manifest_path}: the file is corrupted")
    if body.get("format") != "tqindex" or not isinstance(version, int):
        raise IndexFormatError(f"manifest {manifest_path} is not a tqindex manifest")
    _check_body(body, manifest_path)
    return body


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value <= high


def _check_body(body: dict, where: Path) -> None:
    """Validate every field a load uses, before anything is allocated from it: types, ranges, shard
    names (plain names of the index's own pattern, each once). Raises IndexFormatError naming the field."""
    def bad(field, why):
        raise IndexFormatError(f"manifest {where}: {field} {why}")

    for field in ("generation", "count"):
        if not _is_int(body.get(field), 0, 2 ** 63 - 1):
            bad(field, f"must be a non-negative integer, got {_short(body.get(field), 80)}")
    if not _is_int(body.get("next_id"), 0, MAX_ID):
        bad("next_id", f"must be an integer in [0, {MAX_ID}], got {_short(body.get('next_id'), 80)}")
    params = body.get("params")
    if not isinstance(params, dict):
        bad("params", "must be an object")
    if not _is_int(params.get("dim"), 2, MAX_DIM):
        bad("params.dim", f"must be an integer in [2, {MAX_DIM}], got {_short(params.get('dim'), 80)}")
    bits = params.get("bits")
    if isinstance(bits, bool) or not isinstance(bits, numbers.Real) or not 1 <= bits <= 8:
        bad("params.bits", f"must be a number in [1, 8], got {_short(bits, 80)}")
    choices = {"metric": METRICS, "variant": VARIANTS, "rotation": ROTATION_KINDS,
               "scale_dtype": tuple(SCALE_DTYPES), "codebook": CODEBOOKS}
    for field, allowed in choices.items():
        value = params.get(field, _LEGACY_PARAMS.get(field))
        if not isinstance(value, str) or value not in allowed:
            bad(f"params.{field}", f"must be one of {allowed}, got {_short(value, 80)}")
    if params.get("codebook_version") not in CODEBOOK_VERSIONS:
        bad("params", f"uses codebook version {_short(params.get('codebook_version'), 80)}, this tqindex builds "
                      f"{CODEBOOK_VERSIONS}")
    if not _is_int(params.get("seed"), 0, 2 ** 63 - 1):
        bad("params.seed", f"must be a non-negative integer, got {_short(params.get('seed'), 80)}")
    for field in ("rescale", "keep_vectors"):
        if not isinstance(params.get(field), bool):
            bad(f"params.{field}", f"must be true or false, got {_short(params.get(field), 80)}")
    center = params.get("center")
    if center is not None:
        if not isinstance(center, list) or len(center) != params["dim"]:
            bad("params.center", f"must be null or a list of {params['dim']} numbers")
        if not all(isinstance(c, numbers.Real) and not isinstance(c, bool) for c in center):
            bad("params.center", "must hold only numbers")
    partitions = params.get("partitions", 0)
    if not _is_int(partitions, 0, MAX_PARTITIONS):
        bad("params.partitions", f"must be an integer in [0, {MAX_PARTITIONS}], got {_short(partitions, 80)}")
    coarse = body.get("coarse")
    if partitions and center is not None:
        bad("params", "sets both center and partitions")
    if coarse is not None:
        if not partitions or not isinstance(coarse, dict) or not isinstance(coarse.get("fit"), dict):
            bad("coarse", "must be null, or for a partitioned index an object with centroids and fit")
        _check_file_entry(coarse.get("centroids"), "centroids", "coarse.centroids", bad)
        if coarse["centroids"]["rows"] != partitions:
            bad("coarse.centroids.rows", f"must be {partitions} (one per list)")
    index_schema = None
    if body.get("payload_schema") is not None:
        try:
            index_schema = payloads.schema_from_text(body["payload_schema"])
        except ValueError as exc:
            bad("payload_schema", str(exc))
    shards = body.get("shards")
    if not isinstance(shards, list):
        bad("shards", "must be a list")
    names = set() if coarse is None else {coarse["centroids"]["name"]}
    if shards and partitions and coarse is None:
        bad("coarse", "is missing: a partitioned index with rows must name its centroids")
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict) or not isinstance(entry.get("rows"), dict):
            bad(f"shards[{i}]", "must be an object with a rows entry")
        partition = entry.get("partition")
        if partitions and not _is_int(partition, 0, partitions - 1):
            bad(f"shards[{i}].partition", f"must be a list number in [0, {partitions}), got {_short(partition, 80)}")
        if not partitions and partition is not None:
            bad(f"shards[{i}].partition", "is set, but the index is not partitioned")
        for part in _PARTS:
            file = entry.get(part)
            if file is None and part != "rows":
                continue
            _check_file_entry(file, part, f"shards[{i}].{part}", bad)
            name = file["name"]
            if name in names:
                bad(f"shards[{i}].{part}.name", f"names {name} a second time")
            names.add(name)
            if part == "payload":
                if index_schema is None:
                    bad(f"shards[{i}].payload", "names a payload shard, but the manifest has no payload_schema")
                try:
                    own = payloads.schema_from_text(file.get("schema"))
                except ValueError as exc:
                    bad(f"shards[{i}].payload.schema", str(exc))
                for field in own:
                    known = index_schema.field(field.name) if field.name in index_schema.names else None
                    if known is None or not (known.type == field.type or pa.types.is_null(field.type)):
                        bad(f"shards[{i}].payload.schema", f"has column {field.name!r} ({field.type}) that the "
                                                           f"index schema does not")


def _check_file_entry(file, part: str, field: str, bad) -> None:
    """One file's manifest entry: a name of the index's own pattern for `part`, sizes, checksum."""
    if not isinstance(file, dict):
        bad(field, "must be an object or null")
    name = file.get("name")
    if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or not name.startswith(part + "-"):
        bad(f"{field}.name", f"is not a {part} shard name of this index: {_short(name, 80)}")
    for key in ("bytes", "rows"):
        if not _is_int(file.get(key), 0, 2 ** 62):
            bad(f"{field}.{key}", "must be a non-negative integer")
    if not _is_int(file.get("crc32"), 0, 2 ** 32 - 1):
        bad(f"{field}.crc32", "must be a 32-bit checksum")


def _write_manifest(path: Path, body: dict) -> None:
    data = json.dumps({"body": body, "crc32": zlib.crc32(_canonical(body))}, indent=1, sort_keys=True).encode()
    tmp = path / (MANIFEST + ".tmp")
    _write_durable(tmp, data)
    os.replace(tmp, path / MANIFEST)
    _fsync_dir(path)


def _collect_garbage(path: Path, body: dict) -> None:
    """Delete shard files the committed manifest does not name (superseded ones, crash leftovers).
    Only regular files named as the index names its own are touched: anything else a user put in
    shards/ stays."""
    keep = set() if not body.get("coarse") else {body["coarse"]["centroids"]["name"]}
    for entry in body["shards"]:
        for part in _PARTS:
            if entry.get(part):
                keep.add(entry[part]["name"])
    for file in (path / SHARDS).iterdir():
        if file.name not in keep and _SHARD_NAME.fullmatch(file.name) and file.is_file() and not file.is_symlink():
            _unlink_quietly(file)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# -- save ---------------------------------------------------------------------------------------
def _check_empty_target(target: Path) -> None:
    """A new index may be saved into a new or empty directory, or one that holds only what a crashed
    first save of an index left (its lock, temporary manifest and shard files); never into a
    directory holding anything else."""
    if not target.exists() or (target / MANIFEST).exists():  # an index there: refused below, by name
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    ours = {LOCK, MANIFEST + ".tmp", SHARDS}
    foreign = [p.name for p in target.iterdir() if p.name not in ours]
    shards = target / SHARDS
    if shards.is_symlink() or (shards.exists() and not shards.is_dir()):
        foreign.append(SHARDS)
    elif shards.is_dir():
        foreign += [f"{SHARDS}/{p.name}" for p in shards.iterdir() if not _SHARD_NAME.fullmatch(p.name)]
    if foreign:
        raise FileExistsError(f"{target} is not empty and holds no tqindex index ({_short(sorted(foreign), 200)}); "
                              f"save a new index into a new or empty directory")


def save(index, path=None) -> None:
    """Commit `index` to `path` (or its own directory). Call with the index's write lock held.

    A save that fails (an error, a full disk, Ctrl-C) removes the files it wrote and leaves the
    last commit, the index's binding to its directory and its lock as they were; one that fails
    after the manifest was renamed into place has committed, and the index records that.
    """
    state = index._state()
    store: Store | None = state["store"]
    if path is None:
        if store is None:
            raise ValueError("save() needs a path: this index has never been saved")
        target = store.path
    else:
        target = Path(path)
    # A new directory: every segment is written there, whatever it has elsewhere, and the index is
    # bound to it only once the commit is made.
    fresh = store is None or store.path.resolve() != target.resolve()
    if fresh:
        _check_empty_target(target)
        writer = Store(target)
        writer.acquire()
        if (target / MANIFEST).exists():
            writer.close()
            raise FileExistsError(f"{target} already holds an index; load it (Index.load/open) to update it")
    else:
        writer = store
        writer.acquire()
        if (target / MANIFEST).exists():
            on_disk = _read_manifest(target)["generation"]
            if on_disk != writer.generation:
                raise RuntimeError(f"index at {target} was changed by another writer since it was loaded "
                                   f"(generation {on_disk}, expected {writer.generation}); reload it")
    written: list[Path] = []
    body = None
    try:
        entries = write_shards(state, target, fresh=fresh, written=written)
        body = manifest_body(state["params"], generation=writer.generation + 1, next_id=state["next_id"],
                             count=state["live"], shards=entries, payload_schema=state["payload_schema"],
                             coarse=write_coarse(state, target, fresh=fresh, written=written))
        written.append(target / (MANIFEST + ".tmp"))
        _write_manifest(target, body)
    except BaseException:
        if body is not None and _committed(target, body["generation"]):
            _record_commit(index, writer, state, body)  # the rename happened: so did the commit
        else:
            for file in written:
                _unlink_quietly(file)
            if fresh:
                writer.close()
        raise
    _record_commit(index, writer, state, body)
    _collect_garbage(target, body)


def write_shards(state: dict, target: Path, *, fresh: bool, written: list[Path]) -> list[dict]:
    """Write the shard files of `state`'s segments that `target` does not hold yet (all of them when
    `fresh`), and new tombstones where deletions changed; fsync them. Returns one manifest entry per
    segment; every file written is appended to `written` (for removal if the commit fails). Several
    processes may do this for their own segments (`tqindex.distributed.build`) before one commits."""
    shard_dir = target / SHARDS
    shard_dir.mkdir(parents=True, exist_ok=True)
    params = state["params"]
    sizes = _code_sizes(params)
    entries = []
    for segment in state["segments"]:
        # A segment held in blocks whose shard has row-major codes (format 1) is rewritten once,
        # so that the next load maps its blocks instead of converting them.
        upgrade = segment.shard is not None and segment.encoded.blocks is not None and not segment.shard.get("codes")
        rewrite = fresh or segment.shard is None or upgrade
        entry = _write_segment(shard_dir, segment, params, sizes, written) if rewrite else dict(segment.shard)
        if segment.partition is not None:
            entry["partition"] = int(segment.partition)
        if rewrite or segment.deletions_dirty:
            rows = np.nonzero(segment.deleted)[0].astype(np.int64) if segment.deleted is not None else None
            entry["deleted"] = None if rows is None or not rows.size else _write_new(
                shard_dir / f"deleted-{uuid.uuid4().hex}.arrow", _DELETED_SCHEMA, [pa.array(rows, pa.int64())],
                written)
        entries.append(entry)
    _fsync_dir(shard_dir)
    return entries


def write_coarse(state: dict, target: Path, *, fresh: bool, written: list[Path]) -> dict | None:
    """The manifest's "coarse" entry of a partitioned index: its centroids file (written when new
    here) and how they were fitted; None for a flat or untrained index."""
    coarse = state["coarse"]
    if coarse is None:
        return None
    if state["coarse_shard"] is not None and not fresh:
        return state["coarse_shard"]
    centroids = coarse.centroids.numpy().astype(np.float32)  # a contiguous copy
    flat = pa.array(centroids.reshape(-1), pa.float32())
    entry = _write_new(target / SHARDS / f"centroids-{uuid.uuid4().hex}.arrow", _vectors_schema(centroids.shape[1]),
                       [pa.FixedSizeListArray.from_arrays(flat, centroids.shape[1])], written)
    return {"centroids": entry, "fit": dict(coarse.fit)}


def manifest_body(params: dict, *, generation: int, next_id: int, count: int, shards: list[dict],
                  payload_schema=None, coarse: dict | None = None) -> dict:
    """The manifest body a commit writes (`_write_manifest` adds its checksum)."""
    body = {"format": "tqindex", "format_version": FORMAT_VERSION, "generation": generation, "params": params,
            "next_id": next_id, "count": count, "shards": shards, "coarse": coarse}
    if payload_schema is not None:
        body["payload_schema"] = payloads.schema_to_text(payload_schema)
    return body


def _committed(target: Path, generation: int) -> bool:
    try:
        return _read_manifest(target)["generation"] == generation
    except (FileNotFoundError, IndexFormatError):
        return False


def _record_commit(index, writer: Store, state: dict, body: dict) -> None:
    """Committed: only now may the in-memory state say so (and a new directory become the index's)."""
    index._bind(writer)
    writer.generation = body["generation"]
    index._coarse_shard = body.get("coarse")
    for segment, entry in zip(state["segments"], body["shards"]):
        segment.shard = entry
        segment.deletions_dirty = False


def _write_new(path: Path, schema: pa.Schema, columns: list, written: list[Path]) -> dict:
    written.append(path)  # before writing: a failure part-way leaves a file to remove
    return _write_table(path, schema, columns)


def _write_segment(shard_dir: Path, segment: Segment, params: dict, sizes: tuple, written: list[Path]) -> dict:
    uid = uuid.uuid4().hex
    enc = segment.encoded
    blocked = enc.blocks is not None
    schema = _rows_schema(params, *sizes, blocked=blocked)
    columns = [pa.array(np.asarray(segment.ids), pa.int64()),
               pa.array(np.asarray(enc.scale), schema.field("scale").type)]
    if "norm" in schema.names:
        columns.append(pa.array(np.asarray(enc.norm), pa.float32()))
    if "codes" in schema.names:
        columns.append(_fixed_binary(np.asarray(enc.codes)))
    if "qjl" in schema.names:
        columns += [_fixed_binary(np.asarray(enc.qjl)), pa.array(np.asarray(enc.residual_norm), pa.float32())]
    entry = {"rows": _write_new(shard_dir / f"rows-{uid}.arrow", schema, columns, written), "codes": None,
             "vectors": None, "payload": None, "deleted": None}
    if blocked:
        blocks = np.asarray(enc.blocks)
        entry["codes"] = _write_new(shard_dir / f"codes-{uid}.arrow", _codes_schema(blocks.shape[1]),
                                    [_fixed_binary(blocks.reshape(len(blocks), -1))], written)
    if segment.payload is not None:
        table = segment.payload.combine_chunks()
        columns = [c.chunk(0) if c.num_chunks else pa.array([], c.type) for c in table.columns]
        entry["payload"] = _write_new(shard_dir / f"payload-{uid}.arrow", table.schema, columns, written)
        entry["payload"]["schema"] = payloads.schema_to_text(table.schema)
    if segment.vectors is not None:
        dim = params["dim"]
        flat = pa.array(np.ascontiguousarray(segment.vectors, dtype=np.float32).reshape(-1), pa.float32())
        entry["vectors"] = _write_new(shard_dir / f"vectors-{uid}.arrow", _vectors_schema(dim),
                                      [pa.FixedSizeListArray.from_arrays(flat, dim)], written)
    return entry


# -- load ---------------------------------------------------------------------------------------
def load(cls, path, *, mmap: bool = True, device: str = "cpu", verify: bool = True, part=None):
    """Load the index at `path`. With `part` = (i, parts): only the i-th of `parts` shares of its
    segments, balanced by rows (`split_shards`), as one shard actor of `tqindex.distributed` holds
    (the live-row count is then the share's, not checked against the manifest's)."""
    path = Path(path)
    last_error = None
    # A writer may commit and delete superseded shards between our reading the manifest and opening
    # them; then the manifest has moved on, and reading it again gives a consistent set.
    for _ in range(_LOAD_RETRIES):
        body = _read_manifest(path)
        try:
            if part is not None:
                share = split_shards(body["shards"], part[1])[part[0]]
                body = {**body, "shards": share, "count": None}
            return _load_body(cls, path, body, mmap=mmap, device=device, verify=verify)
        except IndexFormatError as exc:
            last_error = exc
            try:
                if _read_manifest(path)["generation"] == body["generation"]:
                    raise
            except FileNotFoundError:
                raise exc from None
    raise last_error


def split_shards(entries: list[dict], parts: int) -> list[list[dict]]:
    """The manifest's shard entries in `parts` shares balanced by rows (largest first, each to the
    lightest share; ties by name), the same for every caller that reads the same manifest."""
    shares: list[list[dict]] = [[] for _ in range(parts)]
    load = [0] * parts
    for entry in sorted(entries, key=lambda e: (-e["rows"]["rows"], e["rows"]["name"])):
        i = min(range(parts), key=lambda j: (load[j], j))
        shares[i].append(entry)
        load[i] += entry["rows"]["rows"]
    return shares


def _code_sizes(params: dict) -> tuple[int, int, bool]:
    """(code bytes, QJL bytes, whether ‖x‖ is stored) of a row, from the params alone: the shards
    are checked against these before the quantizer (a d² rotation) is built."""
    code_bytes, qjl_bytes = row_code_bytes(params["dim"], params["bits"], params["variant"])
    return code_bytes, qjl_bytes, stores_norm(params["metric"], params["variant"], params["rescale"])


def _block_layout(params: dict, path: Path) -> BlockLayout | None:
    """The block layout the params give their codes (codebooks are built; the rotation is not)."""
    try:
        groups = make_groups(params["dim"], params["bits"], params["variant"], params["codebook"],
                             params["codebook_version"])
    except ValueError as exc:
        raise IndexFormatError(f"manifest {path / MANIFEST} has invalid parameters: {_short(exc, 200)}") from None
    return BlockLayout.of(groups, params["variant"], params["dim"])


def _load_body(cls, path: Path, body: dict, *, mmap: bool, verify: bool, device: str):
    params = {**_LEGACY_PARAMS, **body["params"]}
    try:
        code_bytes, qjl_bytes, stores_norm = _code_sizes(params)
    except ValueError as exc:
        raise IndexFormatError(f"manifest {path / MANIFEST} has invalid parameters: {_short(exc, 200)}") from None
    layout = _block_layout(params, path)
    dim = params["dim"]
    shard_dir = path / SHARDS
    segments = []
    for entry in body["shards"]:
        blocked = bool(entry.get("codes"))
        if blocked and (layout is None or entry["codes"]["rows"] != block_count(entry["rows"]["rows"])):
            raise IndexFormatError(f"manifest {path / MANIFEST}: codes shard {entry['codes']['name']} does not fit "
                                   f"these parameters and {entry['rows']['rows']} rows")
        rows_schema = _rows_schema(params, code_bytes, qjl_bytes, stores_norm, blocked=blocked)
        batch = _read_table(shard_dir / entry["rows"]["name"], entry["rows"], rows_schema, mmap=mmap, verify=verify)
        col = {name: batch.column(name) for name in batch.schema.names}
        codes, blocks = None, None
        if blocked:
            cb = _read_table(shard_dir / entry["codes"]["name"], entry["codes"], _codes_schema(layout.width),
                             mmap=mmap, verify=verify)
            blocks = _column_numpy(cb.column(0), layout.width * BLOCK).reshape(cb.num_rows, layout.width, BLOCK)
        elif "codes" in col:
            codes = _column_numpy(col["codes"], code_bytes)
            if layout is not None:  # format 1: held as blocks from now on (a chunked conversion)
                codes, blocks = None, layout.from_codes(codes)
        else:
            codes = np.zeros((batch.num_rows, 0), np.uint8)
        encoded = EncodedVectors(
            codes=codes, blocks=blocks,
            norm=_column_numpy(col["norm"]) if "norm" in col else None, scale=_column_numpy(col["scale"]),
            qjl=_column_numpy(col["qjl"], qjl_bytes) if "qjl" in col else None,
            residual_norm=_column_numpy(col["residual_norm"]) if "residual_norm" in col else None)
        vectors = None
        if params["keep_vectors"]:
            if not entry.get("vectors"):
                raise IndexFormatError(f"manifest {path / MANIFEST} names no vectors shard for {entry['rows']['name']}")
            vb = _read_table(shard_dir / entry["vectors"]["name"], entry["vectors"], _vectors_schema(dim),
                             mmap=mmap, verify=verify)
            if vb.num_rows != batch.num_rows:
                raise IndexFormatError(f"vectors shard {entry['vectors']['name']} has {vb.num_rows} rows, "
                                       f"its rows shard has {batch.num_rows}")
            vectors = _column_numpy(vb.column(0), dim)
        table = None
        if entry.get("payload"):
            pb = _read_table(shard_dir / entry["payload"]["name"], entry["payload"],
                             payloads.schema_from_text(entry["payload"]["schema"]), mmap=mmap, verify=verify)
            if pb.num_rows != batch.num_rows:
                raise IndexFormatError(f"payload shard {entry['payload']['name']} has {pb.num_rows} rows, "
                                       f"its rows shard has {batch.num_rows}")
            table = pa.Table.from_batches([pb])
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
                                shard=entry, payload=table, partition=entry.get("partition")))
    _check_rows(segments, body, path / MANIFEST)
    store = Store(path)
    store.generation = body["generation"]
    try:
        schema = payloads.schema_from_text(body["payload_schema"]) if body.get("payload_schema") else None
        index = cls._from_state(params, segments=segments, next_id=body["next_id"], store=store, payload_schema=schema,
                                coarse=_load_coarse(path, body, dim, verify=verify),
                                coarse_shard=body.get("coarse"))
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFormatError(f"manifest {path / MANIFEST} has invalid parameters: {_short(exc, 200)}") from None
    if device != "cpu":
        index.to(device)
    return index


def _load_coarse(path: Path, body: dict, dim: int, *, verify: bool) -> CoarseQuantizer | None:
    """A partitioned index's centroids (checked: one finite row of `dim` floats per list)."""
    coarse = body.get("coarse")
    if not coarse:
        return None
    entry = coarse["centroids"]
    batch = _read_table(path / SHARDS / entry["name"], entry, _vectors_schema(dim), mmap=False, verify=verify)
    centroids = _column_numpy(batch.column(0), dim).astype(np.float32)  # an owned, writable copy for torch
    if not np.isfinite(centroids).all():
        raise IndexFormatError(f"centroids shard {entry['name']} holds values that are not finite")
    return CoarseQuantizer(torch.from_numpy(centroids), dict(coarse["fit"]))


def _check_rows(segments: list[Segment], body: dict, where: Path) -> None:
    """What the shards hold must agree with the manifest: the live-row count, ids below next_id
    (so automatic ids never repeat one), and each live id once."""
    ids = [np.asarray(s.ids) for s in segments]
    live = np.concatenate([i if s.deleted is None else i[~s.deleted] for i, s in zip(ids, segments)] +
                          [np.empty(0, np.int64)])
    if body["count"] is not None and len(live) != body["count"]:
        raise IndexFormatError(f"manifest {where} records {body['count']} live rows, shards hold {len(live)}")
    if any(len(i) and (int(i.min()) < 0 or int(i.max()) >= body["next_id"]) for i in ids):
        raise IndexFormatError(f"manifest {where}: shards hold ids outside [0, next_id = {body['next_id']})")
    ordered = np.sort(live)  # a sort and a neighbour compare: far quicker than np.unique's hashing here
    if (ordered[1:] == ordered[:-1]).any():
        raise IndexFormatError(f"manifest {where}: shards hold a live id more than once")


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
        index._take_lock()
        return index
    index = cls(**params)
    index.save(path)
    return index


def _short(value, limit: int = 500) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
