"""Reliability round 2: failed saves, crafted manifests, bounds on input, writes during searches.

Each test reproduces a failure of the previous code (issue 16) and checks the fixed behaviour.
"""

import errno
import json
import os
import signal
import threading
import tracemalloc
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import pytest

from tqindex import Index, IndexFormatError, storage
from tqindex.storage import MANIFEST, SHARDS, _canonical


def _x(n=100, d=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _saved(path: Path, n=100, d=16, **kw) -> Path:
    index = Index(dim=d, keep_vectors=True, **kw)
    index.add(_x(n, d))
    index.remove([3, 4])
    index.save(path)
    index.close()
    return path


def _edit_manifest(path: Path, change) -> None:
    doc = json.loads((path / MANIFEST).read_text())
    change(doc["body"])
    doc["crc32"] = zlib.crc32(_canonical(doc["body"]))
    (path / MANIFEST).write_text(json.dumps(doc))


# 1 ------------------------------------------------------------------------------------------------
def test_a_retried_save_to_a_new_directory_commits_a_whole_index(tmp_path, monkeypatch):
    _saved(tmp_path / "A")
    ix = Index.load(tmp_path / "A")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(storage, "_write_table", boom)
        with pytest.raises(KeyboardInterrupt):
            ix.save(tmp_path / "B")
    assert ix.path == tmp_path / "A"            # still bound to its own directory
    ix.save(tmp_path / "B")
    loaded = Index.load(tmp_path / "B")
    assert len(loaded) == len(ix) == 98
    np.testing.assert_array_equal(loaded.search(_x(3), 5).ids, ix.search(_x(3), 5).ids)


# 2 ------------------------------------------------------------------------------------------------
def test_saving_never_deletes_files_the_index_did_not_write(tmp_path):
    path = _saved(tmp_path / "ix")
    (path / SHARDS / "notes.txt").write_text("mine")
    (path / SHARDS / "subdir").mkdir()
    index = Index.load(path)
    index.add(_x(10, seed=1))
    index.compact()
    index.save()                                # superseded shards go, the user's files stay
    assert (path / SHARDS / "notes.txt").read_text() == "mine" and (path / SHARDS / "subdir").is_dir()
    names = {p.name for p in (path / SHARDS).iterdir()} - {"notes.txt", "subdir"}
    assert len(names) == 3                      # one rows, codes and vectors shard: the rest collected
    assert len(Index.load(path)) == 108


def test_saving_a_new_index_into_a_foreign_directory_is_refused(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    index = Index(dim=8)
    index.add(_x(5, 8))
    with pytest.raises(FileExistsError, match="cat.jpg"):
        index.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["cat.jpg"]
    (folder / "cat.jpg").unlink()
    index.save(folder)                          # empty now: fine
    assert len(Index.load(folder)) == 5


# 3 ------------------------------------------------------------------------------------------------
def test_a_shard_removed_under_a_reader_is_retried_not_raised(tmp_path, monkeypatch):
    path = _saved(tmp_path / "ix")
    stale = json.loads((path / MANIFEST).read_text())["body"]
    writer = Index.load(path)
    writer.add(_x(7, seed=2))
    writer.compact()
    writer.save()                               # generation 2: generation 1's shards collected
    reads = []
    real = storage._read_manifest

    def first_stale(p):
        reads.append(p)
        return stale if len(reads) == 1 else real(p)

    monkeypatch.setattr(storage, "_read_manifest", first_stale)
    # Path.exists says yes for every file: the race window in which a shard vanishes after a check.
    monkeypatch.setattr(Path, "exists", lambda self: True)
    loaded = Index.load(path)
    assert len(loaded) == len(writer) == 105


# 4 ------------------------------------------------------------------------------------------------
@contextmanager
def _opens_recorded(monkeypatch):
    opened = []
    real = os.open

    def recording(path, *args, **kwargs):
        opened.append(os.path.abspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording)
    real_builtin = open

    def builtin_recording(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.path.abspath(file))
        return real_builtin(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", builtin_recording)
    yield opened


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "rows-../../x.arrow", "",
                                  "rows-0123456789abcdef0123456789abcdef.arrow/../../MANIFEST.json"])
def test_shard_names_outside_the_pattern_are_refused_unopened(tmp_path, monkeypatch, name):
    path = _saved(tmp_path / "ix")
    _edit_manifest(path, lambda body: body["shards"][0]["rows"].update(name=name))
    with _opens_recorded(monkeypatch) as opened:
        with pytest.raises(IndexFormatError, match="shard name"):
            Index.load(path)
    root = str(path.resolve())
    assert all(p.startswith(root) for p in opened), [p for p in opened if not p.startswith(root)]


@pytest.mark.parametrize("kind", ["symlink-out", "fifo", "dev-zero", "directory"])
def test_shards_that_are_not_regular_files_are_refused_without_hanging(tmp_path, kind):
    path = _saved(tmp_path / "ix")
    rows = sorted((path / SHARDS).glob("rows-*"))[0]
    rows.unlink()
    if kind == "symlink-out":
        (tmp_path / "outside").write_bytes(b"x" * 1000)
        rows.symlink_to(tmp_path / "outside")
    elif kind == "fifo":
        os.mkfifo(rows)
    elif kind == "dev-zero":
        rows.symlink_to("/dev/zero")
    else:
        rows.mkdir()
    with _alarm(20):
        with pytest.raises(IndexFormatError) as err:
            Index.load(path)
    assert "1000" not in str(err.value)        # nothing about the file outside leaks


def test_absurd_dimensions_are_refused_before_anything_is_built(tmp_path, monkeypatch):
    path = _saved(tmp_path / "ix")
    built = []
    import tqindex.quantizer
    real = tqindex.quantizer.make_rotation
    monkeypatch.setattr(tqindex.quantizer, "make_rotation", lambda *a: built.append(a) or real(*a))
    for dim in (100_000, 60_000):               # beyond the bound; within it but not what the shards hold
        _edit_manifest(path, lambda body: body["params"].update(dim=dim))
        with pytest.raises(IndexFormatError, match="dim|schema|bytes"):
            Index.load(path)
    assert built == []


# 5 ------------------------------------------------------------------------------------------------
def test_k_beyond_the_rows_costs_no_more_work_than_the_rows(monkeypatch):
    index = Index(dim=16)
    index.add(_x(500))
    index.remove([0])
    seen = []
    scanner = index._scanner()
    real = scanner.topk_queries  # what Index calls (a search of k beyond the rows takes the general path)
    monkeypatch.setattr(scanner, "topk_queries",
                        lambda segments, queries, k: seen.append(k) or real(segments, queries, k))
    result = index.search(_x(1, seed=3)[0], k=10 ** 6)
    assert seen == [499]                        # the scan asked for the live rows, not 10**6
    assert result.ids.shape == (10 ** 6,) and (result.ids[499:] == -1).all() and (result.ids[:499] >= 0).all()


# 6 ------------------------------------------------------------------------------------------------
def test_a_full_disk_leaves_no_partial_files_and_later_saves_work(tmp_path, monkeypatch):
    path = _saved(tmp_path / "ix")
    before = sorted(p.name for p in (path / SHARDS).iterdir())
    index = Index.load(path)
    index.add(_x(50, seed=4))
    calls = []
    real = storage._write_table

    def second_fails(file, *args):
        calls.append(file)
        if len(calls) == 2:                     # the rows shard is written, then the disk is full
            file.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(file, *args)

    with monkeypatch.context() as m:
        m.setattr(storage, "_write_table", second_fails)
        with pytest.raises(OSError, match="No space"):
            index.save()
    assert sorted(p.name for p in (path / SHARDS).iterdir()) == before
    assert not (path / (MANIFEST + ".tmp")).exists()
    assert len(Index.load(path)) == 98          # the last commit
    index.remove([10])
    index.save()                                # the same writer commits afterwards
    assert len(Index.load(path)) == 147


# 7 ------------------------------------------------------------------------------------------------
def test_an_interrupt_after_the_rename_is_a_commit(tmp_path, monkeypatch):
    path = _saved(tmp_path / "ix")
    index = Index.load(path)
    index.add(_x(5, seed=5))
    real = storage._fsync_dir

    def interrupt_after_rename(p):
        real(p)
        if Path(p).name != SHARDS:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(storage, "_fsync_dir", interrupt_after_rename)
        with pytest.raises(KeyboardInterrupt):
            index.save()
    assert len(Index.load(path)) == 103         # committed
    index.remove([0])
    index.save()                                # no "changed by another writer"
    assert len(Index.load(path)) == 102
    index.close()
    Index.open(path).close()                    # and the lock was released with the index


def test_a_failed_first_save_releases_the_new_directory(tmp_path, monkeypatch):
    index = Index(dim=16)
    index.add(_x(20))

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(storage, "_write_table", boom)
        with pytest.raises(OSError):
            index.save(tmp_path / "new")
    assert index.path is None
    other = Index(dim=16)                       # the directory is not locked by the failed writer
    other.add(_x(3))
    other.save(tmp_path / "new")
    index.save(tmp_path / "mine")
    assert len(Index.load(tmp_path / "new")) == 3 and len(Index.load(tmp_path / "mine")) == 20


# 8 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,match", [
    (lambda b: b.update(next_id=50), "ids outside"),                 # below the largest id: duplicates later
    (lambda b: b.update(next_id=-1), "next_id"),
    (lambda b: b["shards"].append(dict(b["shards"][0])), "second time"),
    (lambda b: b.pop("next_id"), "next_id"),
    (lambda b: b["params"].pop("dim"), "dim"),
    (lambda b: b["params"].update(seed="zero"), "seed"),
    (lambda b: b["params"].update(center=list(range(5_000_000))), "center"),
    (lambda b: b["shards"][0]["rows"].update(rows="many"), "rows"),
    (lambda b: b.update(shards={"a": 1}), "shards"),
])
def test_manifest_fields_are_validated(tmp_path, change, match):
    path = _saved(tmp_path / "ix")
    _edit_manifest(path, change)
    with pytest.raises(IndexFormatError, match=match) as err:
        Index.load(path)
    assert len(str(err.value)) < 1000


def test_deeply_nested_json_is_a_format_error(tmp_path):
    path = _saved(tmp_path / "ix")
    (path / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(IndexFormatError, match="not valid JSON"):
        Index.load(path)


# 9 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_norms_beyond_float32_scores_are_refused(metric):
    index = Index(dim=8, metric=metric)
    index.add(_x(10, 8))
    with pytest.raises(ValueError, match="vectors row 1 has norm"):
        index.add(np.stack([np.ones(8), 1e37 * np.ones(8)]).astype(np.float32))
    with pytest.raises(ValueError, match="queries row 0 has norm"):
        index.search(1e19 * np.ones((1, 8), np.float32), 3)
    assert len(index) == 10


def test_norms_are_checked_in_small_chunks_and_the_row_is_named_past_the_first():
    from tqindex import validation
    dim = 384
    rows = validation._NORM_CHUNK_ELEMENTS // dim          # rows per chunk: float64 temporaries of ~2 MiB
    assert rows * dim * 8 <= 4 << 20
    x = _x(3 * rows + 5, dim)
    x[2 * rows + 3] = 1e37
    with pytest.raises(ValueError, match=f"vectors row {2 * rows + 3} has norm"):
        Index(dim=dim).add(x)
    x[2 * rows + 3] = 0
    with pytest.raises(ValueError, match=f"vectors row {2 * rows + 3} is zero"):
        Index(dim=dim, metric="cosine").add(x)
    norms = validation.check_norms(torch.from_numpy(x), zero_ok=True, metric="ip")
    np.testing.assert_allclose(norms.numpy(), np.linalg.norm(x.astype(np.float64), axis=1), rtol=1e-6)


def test_device_norm_check_equals_the_host_one(monkeypatch):
    # The path a GPU batch takes (large float64 chunks on its device, one check on the host), run here
    # on a CPU tensor: the same norms, and the same rows named, across several chunks.
    from tqindex import validation
    monkeypatch.setattr(validation, "_DEVICE_NORM_CHUNK_ELEMENTS", 384 * 7)
    x = _x(50, 384)
    host = validation.check_norms(torch.from_numpy(x), zero_ok=True, metric="ip")
    dev = validation._tensor_norms(torch.from_numpy(x), zero_ok=True, metric="ip", name="vectors")
    assert dev.dtype == torch.float32
    np.testing.assert_allclose(dev.numpy(), host.numpy(), rtol=1e-7)  # float64 sums, rounded to float32
    x[23] = 1e37
    with pytest.raises(ValueError, match="vectors row 23 has norm"):
        validation._tensor_norms(torch.from_numpy(x), zero_ok=True, metric="ip", name="vectors")
    x[23] = 0
    with pytest.raises(ValueError, match="vectors row 23 is zero"):
        validation._tensor_norms(torch.from_numpy(x), zero_ok=False, metric="cosine", name="vectors")


def test_a_zero_cosine_query_is_refused():
    index = Index(dim=8, metric="cosine")
    index.add(_x(10, 8))
    with pytest.raises(ValueError, match="queries row 1 is zero"):
        index.search(np.stack([np.ones(8), np.zeros(8)]).astype(np.float32), 3)


# 10 -----------------------------------------------------------------------------------------------
def test_ids_stay_below_2_62_so_automatic_ids_can_continue():
    index = Index(dim=8)
    with pytest.raises(ValueError, match="below 2\\*\\*62"):
        index.add(_x(1, 8), ids=[2 ** 63 - 1])
    index.add(_x(1, 8), ids=[2 ** 62 - 2])
    assert index.add(_x(1, 8)).tolist() == [2 ** 62 - 1]
    with pytest.raises(OverflowError, match="largest id"):
        index.add(_x(1, 8))
    assert len(index) == 2


# 12 -----------------------------------------------------------------------------------------------
def test_many_small_commits_leave_few_shards(tmp_path):
    index = Index(dim=8, keep_vectors=True)
    index.save(tmp_path / "ix")
    x = _x(300, 8)
    for i in range(300):
        index.add(x[i:i + 1])
        if i % 50 == 7:
            index.remove([i - 3])
        index.save()
    rows = list((tmp_path / "ix" / SHARDS).glob("rows-*"))
    assert len(rows) <= 8 and len(index._segments) <= 8
    loaded = Index.load(tmp_path / "ix")
    compacted = Index.load(tmp_path / "ix")
    compacted.compact()
    a, b = loaded.search(x[:20], 10), compacted.search(x[:20], 10)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert len(loaded) == 294


# fuzz ---------------------------------------------------------------------------------------------
@contextmanager
def _alarm(seconds: int):
    def expired(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


_ODD_VALUES = [None, True, False, 0, -1, 1, 2, 3, 7, 16, 2 ** 31, 2 ** 62, 2 ** 63, -2 ** 63, 10 ** 30, 1e308, -0.5,
               0.5, 2.5, float("nan"), "", "x", "ip", "l2", "mse", "prod", "dense", "../x", "/etc/passwd",
               "rows-00000000000000000000000000000000.arrow", [], [1, 2], {}, {"name": "x"}, [[[[]]]]]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, prefix + (i,))


def _mutate(body: dict, rng: np.random.Generator) -> None:
    """One random edit: a value replaced (odd values, or another value from the manifest), a key
    removed, or a shard entry duplicated or dropped."""
    paths = [p for p in _paths(body) if p]
    where = paths[rng.integers(len(paths))]
    parent = body
    for key in where[:-1]:
        parent = parent[key]
    action = rng.integers(4)
    if action == 0 and isinstance(parent, dict):
        del parent[where[-1]]
    elif action == 1 and isinstance(body.get("shards"), list) and body["shards"]:
        shards = body["shards"]
        if rng.integers(2):
            shards.append(json.loads(json.dumps(shards[rng.integers(len(shards))])))
        else:
            shards.pop(rng.integers(len(shards)))
    else:
        pool = _ODD_VALUES + [json.loads(json.dumps(_get(body, paths[rng.integers(len(paths))])))]
        parent[where[-1]] = pool[rng.integers(len(pool))]


def _get(body, path):
    for key in path:
        body = body[key]
    return body


def test_manifest_fuzz_loads_a_consistent_state_or_a_format_error(tmp_path, monkeypatch):
    """400 seeded random edits of a manifest, its checksum recomputed: every load either gives an
    index consistent with its own manifest or raises IndexFormatError; it opens nothing outside the
    directory, allocates little before validating, and answers within a time limit."""
    pristine = _saved(tmp_path / "pristine", n=60)
    original = (pristine / MANIFEST).read_text()
    rng = np.random.default_rng(2026)
    outcomes = {"loaded": 0, "refused": 0}
    root = str(pristine.resolve())
    with _opens_recorded(monkeypatch) as opened:
        for case in range(400):
            doc = json.loads(original)
            for _ in range(1 + rng.integers(3)):
                _mutate(doc["body"], rng)
            try:
                doc["crc32"] = zlib.crc32(_canonical(doc["body"]))
                text = json.dumps(doc)
            except ValueError:                 # NaN cannot be canonical JSON: not a case
                continue
            (pristine / MANIFEST).write_text(text)
            opened.clear()
            tracemalloc.start()
            try:
                with _alarm(20):
                    try:
                        index = Index.load(pristine)
                    except IndexFormatError:
                        outcomes["refused"] += 1
                    else:
                        outcomes["loaded"] += 1
                        assert len(index) == doc["body"]["count"]
                        index.search(_x(2), 5)
                        index.close()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 64 << 20, (case, peak)
            outside = [p for p in opened if not p.startswith(root)]
            assert not outside, (case, outside)
    (pristine / MANIFEST).write_text(original)
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 0, outcomes


# 11 -----------------------------------------------------------------------------------------------
_LOADER = r"""
import sys
from tqindex import Index, IndexFormatError
import numpy as np
import torch
path, rounds = sys.argv[1], int(sys.argv[2])
q = np.ones(8, np.float32)
for _ in range(rounds):
    index = Index.load(path)          # any exception fails the test
    n = len(index)
    assert index.search(q, 1000).ids[:n].min() >= 0
    index.close()
print("ok", rounds)
"""


def test_writes_and_searches_together_see_whole_states(tmp_path):
    """Writer threads (add, remove, upsert, compact, save) and reader threads (search), plus a
    process loading the directory meanwhile. Every search must return exactly the rows of some
    state the writers produced (ids and, through the scores, which version of each row), and
    nothing may raise. Bounded by counts of operations, not by time."""
    import subprocess
    import sys

    rng = np.random.default_rng(11)
    base = rng.standard_normal((400, 8)).astype(np.float32)
    q = np.ones(8, np.float32)
    # Version v of row i is (1 + v)·base[i]: same codes, scale (and so score) times 1 + v.
    reference = Index(dim=8, bits=4)
    reference.add(base)
    ref = reference.search(q, 400)
    base_score = dict(zip(ref.ids.tolist(), ref.scores.tolist()))

    index = Index(dim=8, bits=4)
    index.add(base[:100])
    index.save(tmp_path / "ix")
    history = [frozenset((i, 0) for i in range(100))]
    live = {i: 0 for i in range(100)}
    record = threading.Lock()   # writers: the operation and its record together
    errors = []

    def write(op):
        with record:
            op()
            history.append(frozenset(live.items()))

    def adder():
        try:
            for i in range(100, 400, 3):
                def op(i=i):
                    index.add(base[i:i + 3], ids=np.arange(i, i + 3))
                    live.update({j: 0 for j in range(i, i + 3)})
                write(op)
                victim = int(rng.integers(i))
                def remove(victim=victim):
                    if victim in live:
                        index.remove([victim])
                        del live[victim]
                write(remove)
                target = int(rng.integers(i))
                def upsert(target=target):
                    if target in live:
                        v = live[target] + 1
                        index.add((1 + v) * base[target:target + 1], ids=[target], upsert=True)
                        live[target] = v
                write(upsert)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def maintainer():
        try:
            for i in range(30):
                write(index.compact if i % 3 == 0 else index.save)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    seen = []

    def reader():
        try:
            for _ in range(60):
                res = index.search(q, 1000)
                found = res.ids >= 0
                state = set()
                for i, s in zip(res.ids[found].tolist(), res.scores[found].tolist()):
                    v = round(s / base_score[i] - 1)
                    assert abs(s - (1 + v) * base_score[i]) <= 1e-3 * abs(s) + 1e-5, (i, s, base_score[i])
                    state.add((i, v))
                seen.append(frozenset(state))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    loader = subprocess.Popen([sys.executable, "-c", _LOADER, str(tmp_path / "ix"), "25"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    threads = [threading.Thread(target=f) for f in (adder, maintainer, reader, reader, reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out, err = loader.communicate(timeout=600)
    assert not errors, errors
    assert loader.returncode == 0 and out.startswith("ok"), err[-2000:]
    states = set(history)
    torn = [s for s in seen if s not in states]
    assert not torn, f"{len(torn)} of {len(seen)} searches saw no state the writers produced"
    assert len(seen) == 180
