import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from tqindex import Index, IndexFormatError, IndexLockedError, QuantizerOptions
from tqindex.storage import MANIFEST, SHARDS, _canonical

HERE = Path(__file__).parent


def _data(n=500, d=37, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("variant,bits", [("mse", 1), ("mse", 4), ("prod", 1), ("prod", 3), ("mse", 2.3),
                                          ("prod", 3.6)])
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_identical_results(tmp_path, metric, variant, bits, mmap):
    x = _data()
    index = Index(dim=37, bits=bits, metric=metric, variant=variant, seed=3, keep_vectors=True)
    index.add(x[:300])
    index.add(x[300:], ids=np.arange(1000, 1200))
    index.remove([1, 2, 1005])
    index.save(tmp_path / "ix")
    index.close()
    loaded = Index.load(tmp_path / "ix", mmap=mmap)
    assert loaded.params() == index.params() and len(loaded) == len(index) == 497
    assert loaded.next_id == index.next_id
    for rerank in (0, 3):
        a, b = index.search(x[:20], 15, rerank=rerank), loaded.search(x[:20], 15, rerank=rerank)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_mmap_load_views_the_files(tmp_path):
    index = Index(dim=64, bits=4, keep_vectors=True)
    index.add(_data(2000, 64))
    index.save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix", mmap=True)
    (segment,) = loaded._segments
    # The codes are held in the block layout the scan reads, and stored so: nothing is built.
    assert segment.encoded.codes is None and segment.encoded.blocks is not None
    for array in (segment.encoded.blocks, segment.encoded.scale, segment.ids, segment.vectors):
        # A read-only view onto the memory-mapped file, not a private copy.
        assert not array.flags.owndata and not array.flags.writeable
    copied = Index.load(tmp_path / "ix", mmap=False)
    np.testing.assert_array_equal(copied._segments[0].encoded.blocks, segment.encoded.blocks)
    np.testing.assert_array_equal(loaded.search(_data(5, 64), 5).ids, index.search(_data(5, 64), 5).ids)


def test_incremental_save_keeps_unchanged_shards(tmp_path):
    x = _data()
    index = Index(dim=37, bits=2, keep_vectors=True)
    index.add(x[:200])
    index.save(tmp_path / "ix")
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ix" / SHARDS).iterdir()}
    index.add(x[200:])
    index.save()
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ix" / SHARDS).iterdir()}
    assert all(after.get(name) == mtime for name, mtime in files.items())  # untouched
    assert len(after) == len(files) + 3  # one rows, codes and vectors shard for the append
    index.remove([0])
    index.save()
    names = {p.name for p in (tmp_path / "ix" / SHARDS).iterdir()}
    assert set(files) <= names and sum(n.startswith("deleted-") for n in names) == 1
    index.compact()
    index.save()
    names = {p.name for p in (tmp_path / "ix" / SHARDS).iterdir()}
    assert not (set(files) & names) and len(names) == 3  # compacted into one shard (rows, codes, vectors)
    index.close()
    loaded = Index.load(tmp_path / "ix")
    assert len(loaded) == 499 and 0 not in loaded and 1 in loaded


def test_upsert_and_load_after_append_continues_ids(tmp_path):
    x = _data()
    with Index.open(tmp_path / "ix", dim=37, bits=3, keep_vectors=True) as index:
        index.add(x[:10])
        index.add(-x[:1], ids=[0], upsert=True)
        index.save()
    with Index.open(tmp_path / "ix", dim=37) as index:
        assert len(index) == 10 and index.add(x[10:12]).tolist() == [10, 11]
        assert index.search(-x[0], 1, rerank=2).ids.tolist() == [0]
        index.save()
    assert len(Index.load(tmp_path / "ix")) == 12


def test_open_rejects_different_parameters(tmp_path):
    Index.open(tmp_path / "ix", dim=8, bits=2).close()
    with pytest.raises(ValueError, match="different parameters.*bits"):
        Index.open(tmp_path / "ix", dim=8, bits=4)


def test_open_compares_the_realised_fractional_width(tmp_path):
    # 2.334 bits at d = 384 is round(0.334 · 384) = 128 coordinates at 3 bits: bits = 2 + 128/384.
    Index.open(tmp_path / "ix", dim=384, bits=2.334).close()
    index = Index.open(tmp_path / "ix", dim=384, bits=2 + 128 / 384)
    assert index.bits == 2 + 128 / 384 and index._quantizer.code_bytes == 112
    index.close()
    with pytest.raises(ValueError, match="different parameters.*bits"):
        Index.open(tmp_path / "ix", dim=384, bits=2.5)


def test_second_writer_gets_a_clear_error(tmp_path):
    first = Index.open(tmp_path / "ix", dim=8)
    with pytest.raises(IndexLockedError, match="locked by another writer"):
        Index.open(tmp_path / "ix", dim=8)
    # Another process too (flock is per open file, so this also covers a second process).
    code = ("from tqindex import Index, IndexLockedError\n"
            "try:\n Index.open(%r, dim=8)\nexcept IndexLockedError as e:\n print('locked')" % str(tmp_path / "ix"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "locked", out.stderr
    first.close()
    Index.open(tmp_path / "ix", dim=8).close()


def test_stale_writer_cannot_overwrite_newer_commit(tmp_path):
    Index.open(tmp_path / "ix", dim=8).close()
    a = Index.load(tmp_path / "ix")
    b = Index.load(tmp_path / "ix")
    a.add(np.ones((1, 8), dtype=np.float32))
    a.save()
    a.close()
    b.add(np.ones((2, 8), dtype=np.float32))
    with pytest.raises(RuntimeError, match="changed by another writer"):
        b.save()
    assert len(Index.load(tmp_path / "ix")) == 1


def test_save_refuses_to_clobber_another_index(tmp_path):
    Index.open(tmp_path / "ix", dim=8).close()
    other = Index(dim=8)
    with pytest.raises(FileExistsError):
        other.save(tmp_path / "ix")


def test_reader_keeps_consistent_view_while_writer_commits(tmp_path):
    x = _data()
    writer = Index(dim=37, bits=3)
    writer.add(x[:100])
    writer.save(tmp_path / "ix")
    reader = Index.load(tmp_path / "ix", mmap=True)
    before = reader.search(x[:5], 10)
    writer.add(x[100:])
    writer.remove(np.arange(50))
    writer.compact()
    writer.save()  # unlinks the shard the reader has mapped
    after = reader.search(x[:5], 10)
    np.testing.assert_array_equal(before.ids, after.ids)
    assert len(reader) == 100 and len(Index.load(tmp_path / "ix")) == 450


# -- corruption ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    x = _data(300, 21, seed=4)
    index = Index(dim=21, bits=3, metric="l2", keep_vectors=True)  # mse: its codes in codes shards
    index.add(x[:200], metadata={"text": [f"t{i}" for i in range(200)]})
    index.save(root / "ix")
    index.add(x[200:], metadata={"text": [f"t{i}" for i in range(200, 300)]})
    index.remove([3, 4, 250])
    index.save()
    index.close()
    return root / "ix"


def _files(ix: Path) -> dict[str, Path]:
    """The manifest and one file of each shard kind ("rows", "codes", "vectors", "payload", "deleted"),
    plus a second one of each kind as "<kind>2" where there is one."""
    out = {"manifest": ix / MANIFEST}
    for kind in ("rows", "codes", "vectors", "payload", "deleted"):
        found = sorted((ix / SHARDS).glob(kind + "-*"))
        out[kind] = found[0]
        if len(found) > 1:
            out[kind + "2"] = found[1]
    return out


def _mutations():
    cases = []
    for kind in ("manifest", "rows", "codes", "vectors", "payload", "deleted"):
        for frac in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999):
            cases.append((kind, "truncate", frac))
        for frac in (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0):
            cases.append((kind, "flip", frac))
        cases.append((kind, "delete", None))
        cases.append((kind, "empty", None))
        cases.append((kind, "append", None))
    for kind in ("rows", "codes", "vectors", "payload", "deleted"):
        cases.append((kind, "swap", None))
    cases.append(("manifest", "json-edit-seed", None))
    cases.append(("manifest", "json-newer-version", None))
    return cases


MUTATIONS = _mutations()


def test_mutations_cover_every_file_the_index_writes(pristine):
    """The corruption cases reach every kind of file a saved index holds (a new kind of file, say a
    payload shard, fails this until cases for it are added)."""
    written = {f.name.split("-")[0] for f in (pristine / SHARDS).iterdir()} | {"manifest"}
    covered = {kind for kind, _, _ in MUTATIONS}
    assert written == covered, (written, covered)
    for kind in written - {"manifest"}:  # each shard kind is also swapped with a second one of its kind
        assert kind + "2" in _files(pristine) and (kind, "swap", None) in MUTATIONS


@pytest.mark.parametrize("kind,how,where", MUTATIONS)
def test_corruption_gives_clear_error(pristine, tmp_path, kind, how, where):
    ix = tmp_path / "ix"
    shutil.copytree(pristine, ix)
    files = _files(ix)
    target = files[kind]
    data = target.read_bytes()
    if how == "truncate":
        target.write_bytes(data[: int(len(data) * where)])
    elif how == "flip":
        pos = min(int(len(data) * where), len(data) - 1)
        target.write_bytes(data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1:])
    elif how == "delete":
        target.unlink()
    elif how == "empty":
        target.write_bytes(b"")
    elif how == "append":
        target.write_bytes(data + b"\0garbage")
    elif how == "swap":
        other = files[kind + "2"]
        other_data = other.read_bytes()
        other.write_bytes(data)
        target.write_bytes(other_data)
    elif how == "json-edit-seed":
        doc = json.loads(data)
        doc["body"]["params"]["seed"] += 1
        target.write_text(json.dumps(doc))
    elif how == "json-newer-version":
        doc = json.loads(data)
        doc["body"]["format_version"] = 99  # as a newer tqindex would write it: checksum valid
        doc["crc32"] = zlib.crc32(_canonical(doc["body"]))
        target.write_text(json.dumps(doc))
    # The error names the damaged file (for a swap, either of the two).
    names = ["MANIFEST"] if kind == "manifest" else [target.name]
    if how == "swap":
        names.append(files[kind + "2"].name)
    with pytest.raises(IndexFormatError) as info:
        Index.load(ix)
    message = str(info.value)
    assert any(name in message for name in names), message
    if how == "json-newer-version":
        assert "format version 99" in message


@pytest.mark.parametrize("metric,variant,bits", [("ip", "mse", 2.52), ("l2", "mse", 4), ("cosine", "prod", 3)])
def test_float16_scale_round_trips_as_a_float16_column(tmp_path, metric, variant, bits):
    import pyarrow.ipc as ipc
    x = _data(700, 50)
    index = Index(dim=50, bits=bits, metric=metric, variant=variant, scale_dtype="float16")
    index.add(x[:400])
    index.save(tmp_path / "ix")
    index.add(x[400:])  # a second shard, appended to the saved index
    index.save()
    index.close()
    for shard in (tmp_path / "ix" / SHARDS).glob("rows-*.arrow"):
        schema = ipc.open_file(str(shard)).schema
        assert str(schema.field("scale").type) == "halffloat"
        assert "norm" not in schema.names or str(schema.field("norm").type) == "float"  # ‖x‖ stays float32
    for mmap in (True, False):
        loaded = Index.load(tmp_path / "ix", mmap=mmap)
        assert loaded.scale_dtype == "float16" and loaded.params() == index.params()
        a, b = index.search(x[:20], 15), loaded.search(x[:20], 15)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)
        loaded.close()
    with pytest.raises(ValueError, match="different parameters.*scale_dtype"):
        Index.open(tmp_path / "ix", dim=50, bits=bits, metric=metric, variant=variant, scale_dtype="float32")
    Index.open(tmp_path / "ix", dim=50, bits=bits, metric=metric, variant=variant, scale_dtype=np.float16).close()


def test_load_checks_shard_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.ipc as ipc
    index = Index(dim=8, bits=2)
    index.add(_data(10, 8))
    index.save(tmp_path / "ix")
    index.close()
    (shard,) = (tmp_path / "ix" / SHARDS).glob("rows-*")
    table = pa.table({"id": pa.array(np.arange(10)), "norm": pa.array(np.ones(10, np.float32))})
    with ipc.new_file(str(shard), table.schema) as w:
        w.write_table(table)
    # Fix up size and checksum in the manifest so that only the schema is wrong.
    doc = json.loads((tmp_path / "ix" / MANIFEST).read_text())
    entry = doc["body"]["shards"][0]["rows"]
    entry["bytes"] = shard.stat().st_size
    entry["crc32"] = zlib.crc32(shard.read_bytes())
    doc["crc32"] = zlib.crc32(_canonical(doc["body"]))
    (tmp_path / "ix" / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(IndexFormatError, match="schema"):
        Index.load(tmp_path / "ix")


# -- frozen fixture --------------------------------------------------------------------------------
def test_frozen_v1_fixture_loads_with_same_results():
    fixture = HERE / "fixtures" / "v1"
    expected = json.loads((fixture / "expected.json").read_text())
    index = Index.load(fixture / "index")
    assert index.codebook == "scalar"  # saved before block codebooks: its codes are scalar ones
    queries = np.asarray(expected["queries"], dtype=np.float32)
    result = index.search(queries, expected["k"])
    np.testing.assert_array_equal(result.ids, expected["ids"])
    np.testing.assert_allclose(result.scores, expected["scores"], rtol=1e-5)
    reranked = index.search(queries, expected["k"], rerank=4)
    np.testing.assert_array_equal(reranked.ids, expected["rerank_ids"])


# -- crash safety ------------------------------------------------------------------------------------
import crash_worker  # noqa: E402  (tests/ is on sys.path, as for conftest)


def _expected_state(batches: int) -> Index:
    index = Index(**crash_worker.PARAMS)
    for i in range(batches):
        crash_worker.apply_step(index, i)
    return index


def _check_state(path: Path, committed: int) -> int:
    """The directory must hold exactly the state after `committed` or `committed + 1` batches (the
    child can die after its commit but before it reports it). Returns the one it holds."""
    if not (path / MANIFEST).exists():
        assert committed == 0, "committed state vanished"
        return 0
    loaded = Index.load(path)
    batches = loaded.next_id // crash_worker.BATCH
    assert batches in (committed, committed + 1), (batches, committed)
    expected = _expected_state(batches)
    assert len(loaded) == len(expected)
    live = np.sort(np.concatenate([np.asarray(s.ids)[~s.deleted] if s.deleted is not None else np.asarray(s.ids)
                                   for s in expected._segments] + [np.empty(0, np.int64)]))
    if not live.size:  # the empty index Index.open commits before the first batch
        loaded.close()
        return batches
    np.testing.assert_array_equal(np.sort([i for i in live if i in loaded]), live)
    np.testing.assert_array_equal(loaded.reconstruct(live), expected.reconstruct(live))
    # Every live row has its own payload, and no payload is left without its row.
    got = loaded.get(live)
    assert got.column("text").to_pylist() == [f"row {i}" for i in live]
    assert got.column("batch").to_pylist() == [int(i) // crash_worker.BATCH for i in live]
    assert sum(s.payload.num_rows for s in loaded._segments) == sum(len(s) for s in loaded._segments)
    probe = crash_worker.batch(batches - 1)[:3]
    np.testing.assert_array_equal(loaded.search(probe, 5, rerank=2).ids, expected.search(probe, 5, rerank=2).ids)
    loaded.close()
    return batches


def _crash_plan(kills: int) -> list[tuple[int, str]]:
    """(save number, phase) of each kill: every phase in turn, at the child's 1st, 2nd or 3rd save,
    so most children commit once or twice before they die."""
    phases = crash_worker.PHASES
    return [(1 + (i // len(phases)) % 3, phases[i % len(phases)]) for i in range(kills)]


def test_crash_safety_under_sigkill(tmp_path):
    """SIGKILL a committing writer at chosen points of its commit; the directory must always load as
    the last or the next committed state. Each kill lands where the child stopped itself (SIGSTOP
    at a phase of its save), so which kills land mid-commit does not depend on machine speed."""
    path = tmp_path / "ix"
    server = subprocess.Popen([sys.executable, str(HERE / "crash_worker.py"), str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, bufsize=1)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l.strip()) for l in server.stdout], daemon=True).start()
    assert lines.get(timeout=120) == "ready"
    plan = _crash_plan(63)
    committed, stopped_at = 0, []
    try:
        for target, phase in plan:
            server.stdin.write(f"go {target} {phase}\n")
            server.stdin.flush()
            line = lines.get(timeout=120)
            assert line.startswith("pid "), line
            pid = int(line.split()[1])
            while not (line := lines.get(timeout=120)).startswith("stop "):
                assert line.startswith("commit "), line
                committed = int(line.split()[1])
            stopped_at.append(line.split()[1])
            os.kill(pid, signal.SIGKILL)
            assert lines.get(timeout=120) == "dead"
            committed = _check_state(path, committed)
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    # Where a phase is not on a save's path (nothing to collect), the child stops when save() returns.
    for (_, phase), where in zip(plan, stopped_at):
        assert where == phase or (phase == "gc" and where == "returned"), (phase, where)
    mid_commit = sum(where in crash_worker.MID_COMMIT for where in stopped_at)
    planned = sum(phase in crash_worker.MID_COMMIT and phase != "gc" for _, phase in plan)
    assert planned == 36 and mid_commit >= planned and committed >= 40, (mid_commit, committed)


def test_center_round_trips(tmp_path):
    x = _data()
    index = Index(dim=37, bits=2, center=x.mean(axis=0))
    index.add(x)
    index.save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix")
    np.testing.assert_array_equal(loaded.center, index.center)
    a, b = index.search(x[:5], 10), loaded.search(x[:5], 10)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("codebook", ["vq", "scalar"])
def test_codebook_round_trips_and_is_checked_on_open(tmp_path, codebook):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 64)).astype(np.float32)
    index = Index(dim=64, bits=2, codebook=codebook, seed=1)
    index.add(x)
    assert (index._quantizer.groups[0].block > 1) == (codebook == "vq")
    index.save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix")
    assert loaded.codebook == codebook and loaded.params() == index.params()
    a, b = index.search(x[:7], 10), loaded.search(x[:7], 10)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    other = "scalar" if codebook == "vq" else "vq"
    with pytest.raises(ValueError, match="codebook"):
        Index.open(tmp_path / "ix", dim=64, bits=2, codebook=other)


def test_codebook_version_round_trips_and_unknown_versions_are_refused(tmp_path):
    """An index saved under codebook version 1 (Lloyd-Max 5-bit codes under "vq") loads as version 1
    and searches as it did; the current version's index uses bit-plane 5-bit codes; a manifest
    naming a version this tqindex cannot build is refused, naming it."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((400, 50)).astype(np.float32)
    results = {}
    for version in (1, 2):
        index = Index(dim=50, bits=4.5, options=QuantizerOptions(codebook_version=version), seed=3)
        index.add(x)
        index.save(tmp_path / f"v{version}")
        loaded = Index.load(tmp_path / f"v{version}")
        assert loaded.params()["codebook_version"] == version
        assert loaded._quantizer.groups[0].plane == (version == 2)
        a, b = index.search(x[:9], 10), loaded.search(x[:9], 10)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)
        results[version] = a
    assert not np.array_equal(results[1].scores, results[2].scores)  # the versions code differently
    with pytest.raises(ValueError, match="codebook_version"):
        Index.open(tmp_path / "v1", dim=50, bits=4.5, options=QuantizerOptions(codebook_version=2))
    manifest = tmp_path / "v1" / MANIFEST
    doc = json.loads(manifest.read_text())
    doc["body"]["params"]["codebook_version"] = 99
    doc["crc32"] = zlib.crc32(_canonical(doc["body"]))
    manifest.write_text(json.dumps(doc))
    with pytest.raises(IndexFormatError, match="codebook version 99"):
        Index.load(tmp_path / "v1")


def test_load_refuses_a_live_id_held_twice(tmp_path):
    # Two committed shards that both hold ids 0-9 (each a valid shard of these parameters).
    for name in ("a", "b"):
        index = Index(dim=16, bits=2, seed=1)
        index.add(_data(10, 16))
        index.save(tmp_path / name)
        index.close()
    doc_a = json.loads((tmp_path / "a" / MANIFEST).read_text())
    doc_b = json.loads((tmp_path / "b" / MANIFEST).read_text())
    for file in (tmp_path / "b" / SHARDS).iterdir():
        shutil.copy(file, tmp_path / "a" / SHARDS / file.name)
    doc_a["body"]["shards"] += doc_b["body"]["shards"]
    doc_a["body"]["count"] = 20
    doc_a["crc32"] = zlib.crc32(_canonical(doc_a["body"]))
    (tmp_path / "a" / MANIFEST).write_text(json.dumps(doc_a))
    with pytest.raises(IndexFormatError, match="live id more than once"):
        Index.load(tmp_path / "a")


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
def test_a_load_and_search_import_nothing_heavy(tmp_path, scale_dtype):
    """pyarrow's Array.to_numpy imports pandas (~40 MB resident) on first use; a load reads its
    columns without it, so a loaded index costs only its own bytes."""
    index = Index(dim=16, bits=3, metric="l2", scale_dtype=scale_dtype, keep_vectors=True)
    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    index.add(x)
    index.remove([3])
    index.save(tmp_path / "ix")
    code = ("import sys, numpy as np\n"
            "from tqindex import Index\n"
            f"ix = Index.load({str(tmp_path / 'ix')!r})\n"
            "r = ix.search(np.ones(16, np.float32), 5, rerank=2)\n"
            "assert len(ix) == 299 and r.ids.shape == (5,)\n"
            "print(sorted(m for m in ('pandas', 'pyarrow.compute') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    loaded = Index.load(tmp_path / "ix")
    np.testing.assert_array_equal(loaded.search(x[:4], 5).ids, index.search(x[:4], 5).ids)
