"""Metadata columns stored with the vectors (tqindex.payload): add, get, search columns, persistence."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pyarrow as pa
import pytest

from tqindex import Index, IndexFormatError
from tqindex.storage import MANIFEST, SHARDS, _canonical


def _x(n, d=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _rows(start, n):
    return [{"text": f"doc {i}", "year": 1990 + i % 40, "score": i / 7} for i in range(start, start + n)]


@pytest.mark.parametrize("form", ["list", "dict", "table", "batch", "pandas"])
def test_add_accepts_every_metadata_form(form):
    rows = _rows(0, 5)
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    if form == "list":
        meta = rows
    elif form == "dict":
        meta = cols
    elif form == "table":
        meta = pa.table(cols)
    elif form == "batch":
        meta = pa.RecordBatch.from_pydict(cols)
    else:
        pd = pytest.importorskip("pandas", reason="pandas is not installed")
        meta = pd.DataFrame(cols)
    index = Index(dim=16, bits=4)
    ids = index.add(_x(5), metadata=meta)
    got = index.get(ids[::-1])
    assert got.column_names == ["id", "text", "year", "score"]
    assert got.column("text").to_pylist() == [f"doc {i}" for i in range(4, -1, -1)]
    assert got.column("id").to_pylist() == ids[::-1].tolist()


def test_rows_with_different_keys_keep_every_column():
    index = Index(dim=16, bits=4)
    index.add(_x(3), metadata=[{"a": 1}, {"b": "x"}, {"a": 3, "c": [1, 2]}])
    assert index.schema.names == ["a", "b", "c"]
    assert index.get([0, 1, 2]).to_pydict() == {"id": [0, 1, 2], "a": [1, None, 3], "b": [None, "x", None],
                                                 "c": [None, None, [1, 2]]}


def test_bad_metadata_is_refused_and_nothing_changes():
    index = Index(dim=16, bits=4)
    index.add(_x(4), metadata=_rows(0, 4))
    before = index.get([0, 1, 2, 3])
    with pytest.raises(ValueError, match="3 rows for 4 vectors"):
        index.add(_x(4, seed=1), metadata=_rows(0, 3))
    with pytest.raises(ValueError, match="'year'.*string.*int64"):
        index.add(_x(2, seed=1), metadata=[{"year": "1999"}, {"year": "2001"}])
    with pytest.raises(ValueError, match="other than"):
        index.add(_x(1, seed=1), metadata=[{"id": 3}])
    with pytest.raises(TypeError, match="one dict per vector"):
        index.add(_x(2, seed=1), metadata=["a", "b"])
    with pytest.raises(TypeError, match="metadata must be"):
        index.add(_x(2, seed=1), metadata=42)
    assert len(index) == 4 and index.get([0, 1, 2, 3]).equals(before)
    assert index.schema.names == ["text", "year", "score"]


def test_schema_evolves_with_nulls_for_older_rows():
    index = Index(dim=16, bits=4)
    index.add(_x(3), metadata=[{"text": "a"}, {"text": "b"}, {"text": "c"}])
    index.add(_x(2, seed=1))                                       # no metadata: all null
    index.add(_x(2, seed=2), metadata={"text": ["d", "e"], "lang": ["en", "de"]})
    index.add(_x(1, seed=3), metadata={"text": [None], "lang": [None]})  # all-null columns take the stored types
    assert index.schema == pa.schema([("text", pa.string()), ("lang", pa.string())])
    got = index.get(np.arange(8))
    assert got.column("text").to_pylist() == ["a", "b", "c", None, None, "d", "e", None]
    assert got.column("lang").to_pylist() == [None] * 5 + ["en", "de", None]
    # A column first seen all null takes the type of a later batch.
    other = Index(dim=16, bits=4)
    other.add(_x(2), metadata={"n": [None, None]})
    other.add(_x(1, seed=1), metadata={"n": [7]})
    assert other.schema.field("n").type == pa.int64()
    assert other.get([0, 1, 2]).column("n").to_pylist() == [None, None, 7]


def test_get_and_search_columns():
    index = Index(dim=16, bits=4)
    x = _x(50)
    index.add(x, metadata=_rows(0, 50))
    with pytest.raises(KeyError, match="unknown metadata columns"):
        index.get([1], columns=["nope"])
    with pytest.raises(KeyError, match="ids not in the index"):
        index.get([1, 99])
    assert index.get([3], columns=["year"]).column_names == ["id", "year"]
    result = index.search(x[:3], 4, columns=["text"])
    assert result.payload.num_rows == 12
    assert result.payload.column("text").to_pylist() == [f"doc {i}" for i in result.ids.reshape(-1)]
    one = index.search(x[0], 60, columns=["year"])        # k beyond the rows: padding rows are null
    years = one.payload.column("year").to_pylist()
    assert years[:50] == [1990 + i % 40 for i in one.ids[:50]] and years[50:] == [None] * 10
    assert index.search(x[:1], 3).payload is None
    assert index.search(x[:2], 3, columns=[]).payload.num_rows == 6
    assert index.get([4, 5], columns=[]).to_pydict() == {"id": [4, 5]}
    bare = Index(dim=16, bits=4)
    bare.add(x[:5])
    assert bare.schema is None and bare.get([1, 2]).to_pydict() == {"id": [1, 2]}
    with pytest.raises(KeyError, match="unknown metadata columns"):
        bare.search(x[:1], 2, columns=["text"])


@pytest.mark.parametrize("mmap", [True, False])
def test_payload_round_trips_through_save_load_compact_remove_upsert(tmp_path, mmap):
    x = _x(300)
    index = Index(dim=16, bits=3, keep_vectors=True)
    index.add(x[:200], metadata=_rows(0, 200))
    index.save(tmp_path / "ix")
    index.add(x[200:], metadata=[{"text": f"late {i}", "tag": "t"} for i in range(100)])
    index.remove([5, 250])
    index.add(x[7:8] * 2, ids=[7], upsert=True, metadata=[{"text": "replaced", "tag": "u"}])
    index.save()
    index.close()
    loaded = Index.load(tmp_path / "ix", mmap=mmap)
    assert loaded.schema.names == ["text", "year", "score", "tag"]
    got = loaded.get([0, 7, 201]).to_pydict()
    assert got["text"] == ["doc 0", "replaced", "late 1"] and got["tag"] == [None, "u", "t"]
    assert got["year"] == [1990, None, None]
    assert 5 not in loaded and 250 not in loaded
    loaded.compact()
    assert loaded.get([0, 7, 201]).to_pydict() == got
    loaded.save()
    again = Index.load(tmp_path / "ix", mmap=mmap)
    assert again.get([0, 7, 201]).to_pydict() == got
    assert len(list((tmp_path / "ix" / SHARDS).glob("payload-*"))) == 1


def test_a_mapped_payload_is_not_copied(tmp_path):
    index = Index(dim=16, bits=4)
    index.add(_x(100), metadata={"blob": [b"x" * 1000] * 100})
    index.save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix", mmap=True)
    column = loaded._segments[0].payload.column("blob").chunk(0)
    # The values buffer lies inside the mapping of the payload shard file, not in a private copy.
    (shard,) = (tmp_path / "ix" / SHARDS).glob("payload-*")
    maps = [line.split() for line in open("/proc/self/maps") if line.rstrip().endswith(shard.name)]
    ranges = [tuple(int(v, 16) for v in m[0].split("-")) for m in maps]
    address = column.buffers()[2].address
    assert any(lo <= address < hi for lo, hi in ranges), (hex(address), ranges)
    copied = Index.load(tmp_path / "ix", mmap=False)
    address = copied._segments[0].payload.column("blob").chunk(0).buffers()[2].address
    assert not any(lo <= address < hi for lo, hi in ranges)


def test_tampered_payload_schema_is_refused(tmp_path):
    index = Index(dim=16, bits=4)
    index.add(_x(10), metadata=_rows(0, 10))
    index.save(tmp_path / "ix")
    index.close()
    doc = json.loads((tmp_path / "ix" / MANIFEST).read_text())
    doc["body"]["payload_schema"] = "bm90IGEgc2NoZW1h"  # base64 of "not a schema"
    doc["crc32"] = zlib.crc32(_canonical(doc["body"]))
    (tmp_path / "ix" / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(IndexFormatError, match="payload_schema"):
        Index.load(tmp_path / "ix")
    # A shard whose schema names a column the index schema lacks.
    doc = json.loads((tmp_path / "ix" / MANIFEST).read_text())
    doc["body"]["payload_schema"] = __import__("tqindex.payload", fromlist=["x"]).schema_to_text(
        pa.schema([("text", pa.string())]))
    doc["crc32"] = zlib.crc32(_canonical(doc["body"]))
    (tmp_path / "ix" / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(IndexFormatError, match="'year'"):
        Index.load(tmp_path / "ix")


def test_memory_bytes_counts_the_payload():
    index = Index(dim=16, bits=4)
    index.add(_x(100))
    bare = index.memory_bytes()
    other = Index(dim=16, bits=4)
    other.add(_x(100), metadata={"blob": [b"y" * 1000] * 100})
    assert other.memory_bytes() - bare >= 100 * 1000
