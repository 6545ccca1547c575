"""Sharded build and search on Ray (``pip install 'tqindex[ray]'``; the core never imports this module).

    import ray, tqindex.distributed as td
    ray.init()
    td.build(vectors, "my-index", dim=384, bits=4)          # numpy, or a Ray Data dataset with "vector"/"id"
    index = td.DistributedIndex.open("my-index", num_actors=4)
    result = index.search(queries, k=10)                    # the same ids and scores as one Index
    index.add(more_vectors); index.remove([3, 5]); index.save()   # one manifest commit

`build` encodes blocks of rows in Ray tasks; each task writes uniquely named shard files of its rows under
the directory, and the driver checks them and commits one manifest last (atomic rename), so the result is
an ordinary tqindex directory that `Index.load` opens, or nothing if the build fails (repeated ids included). All blocks share one rotation seed
and codebook, so their scores are comparable.

`DistributedIndex.open` starts shard actors, each loading (memory-mapped) its share of the manifest's shards,
balanced by rows. `search` puts the queries in the object store once, every actor returns its local top k
(rerank, filters and metadata columns are applied there), and the driver merges them exactly.

Writes go through the driver: `add` assigns ids (checking given ones against every share) and spreads
the rows over the shares so that they stay even; `remove` goes to the shares holding the ids; `save`
has every actor write its new shard files, then the driver commits one manifest (atomic rename) and
every share reloads from it. A search sees writes at once; other processes see them after `save`.

Faults: an actor that dies is restarted and reloads its share from the last commit (`max_restarts`);
Ray runs a search again on the restarted actor (searches have no side effects; nothing else is
retried), and the driver waits for it. If it does not come back, `search` raises naming the share,
unless ``allow_partial=True``, which returns the answer of the shares that did answer and says which.
A share that restarts while holding writes not yet saved has lost them: the index then says so and
refuses further writes until `refresh()` (which returns to the last commit), never answering silently
without them. Every share must answer from the same commit: if another writer commits, `save` raises,
and so does a search once a share restarted onto the newer commit, until `refresh()`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

try:
    import ray
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("tqindex.distributed needs Ray: pip install 'tqindex[ray]'") from exc

from . import payload as payloads
from . import storage
from .index import Index, SearchResult
from .native import set_num_threads
from .validation import MAX_ID, as_float_matrix, as_id_array, check_k, check_norms

__all__ = ["DistributedIndex", "build"]

#: Times Ray runs a search again on a restarted actor (searches have no side effects; nothing else
#: is retried).
_SEARCH_RETRIES = 3
#: Attempts at loading every share from one commit while a writer commits.
_LOAD_RETRIES = 5


def _encode(vectors: np.ndarray, ids: np.ndarray, path: str, index_params: dict) -> dict:
    """Encode one block of rows and write its shard files under `path` (no manifest): returns the
    block's manifest entries, live rows and largest id."""
    index = Index(**index_params)
    index.add(np.asarray(vectors, dtype=np.float32), ids=np.asarray(ids, dtype=np.int64))
    entries = storage.write_shards(index._state(), Path(path), fresh=True, written=[])
    return {"entries": entries, "rows": len(index), "max_id": int(np.max(ids)) if len(ids) else -1}


def _encode_rows(x: np.ndarray, a: int, b: int, path: str, index_params: dict) -> dict:
    """Rows [a, b) of `x` (the whole array, read from the object store without a copy), ids a..b−1."""
    return _encode(x[a:b], np.arange(a, b, dtype=np.int64), path, index_params)


def _encode_batch(batch: dict, *, column: str, id_column: str, path: str, index_params: dict) -> dict:
    """A Ray Data batch (numpy format) → its encoded shards, as one JSON row."""
    vectors = batch[column]
    if vectors.dtype == object:  # variable-size lists: stack them
        vectors = np.stack(list(vectors))
    out = _encode(vectors, as_id_array(batch[id_column], len(vectors)), path, index_params)
    return {"result": np.array([json.dumps(out)])}


def build(data, path, *, dim: int, bits=4, metric: str = "ip", seed: int = 0, block_rows: int = 100_000,
          column: str = "vector", id_column: str = "id", num_cpus: float = 0.5, **params) -> None:
    """Encode `data` on Ray and commit it as a new index at `path`.

    Parameters
    ----------
    data : numpy array (n, dim) (ids 0..n−1), or a Ray Data Dataset with a vector column `column`
        and an integer column `id_column` (unique ids in [0, 2**62))
    block_rows : rows per task (one shard each)
    num_cpus : logical CPUs per task (fractional, so that a small cluster runs several at once)
    **params : further `Index` parameters (keep_vectors, scale_dtype, center, options, ...)
    """
    target = Path(path)
    if params.get("partitions"):
        raise ValueError("a partitioned index needs one k-means fit before its rows are coded: build it with "
                         "Index (train, add, save), then open it with DistributedIndex")
    index_params = dict(dim=dim, bits=bits, metric=metric, seed=seed, **params)
    params_record = Index(**index_params).params()  # validates the parameters before any work
    storage._check_empty_target(target)
    store = storage.Store(target)
    store.acquire()
    try:
        if (target / storage.MANIFEST).exists():
            raise FileExistsError(f"{target} already holds an index")
        (target / storage.SHARDS).mkdir(parents=True, exist_ok=True)
        if isinstance(data, ray.data.Dataset):
            rows = data.map_batches(_encode_batch, batch_size=block_rows, batch_format="numpy", num_cpus=num_cpus,
                                    fn_kwargs=dict(column=column, id_column=id_column, path=str(target),
                                                   index_params=index_params)).take_all()
            parts = [json.loads(r["result"]) for r in rows]
        else:
            x = as_float_matrix(data, dim)[0].numpy()
            ref = ray.put(x)
            task = ray.remote(_encode_rows).options(num_cpus=num_cpus)
            parts = ray.get([task.remote(ref, a, min(a + block_rows, len(x)), str(target), index_params)
                             for a in range(0, len(x), block_rows)])
        entries = [e for p in parts for e in p["entries"]]
        body = storage.manifest_body(params_record, generation=1, next_id=max([p["max_id"] for p in parts] + [-1]) + 1,
                                     count=sum(p["rows"] for p in parts), shards=entries)
        # What the tasks wrote is checked as a load checks it (sizes, checksums, each live id once)
        # before the manifest makes it the index: a failed build commits nothing.
        storage._check_body(body, target / storage.MANIFEST)
        storage._load_body(Index, target, body, mmap=True, verify=True, device="cpu")
        storage._write_manifest(target, body)
    finally:
        store.close()


class _ShardActor:
    """One share of an index's shards, memory-mapped: answers local searches and holds the share's
    uncommitted writes until the driver's `save`.

    Every reply carries (generation, token): the manifest generation the share was loaded from and
    this incarnation's token (new when Ray restarts the actor, which reloads from disk and so loses
    writes not yet saved); the driver checks both, so a restart is never silently a different index."""

    def __init__(self, path: str, part: int, parts: int, mmap: bool, threads: int):
        # Ray gives a fractional-CPU actor one OpenMP thread (and so tqindex's default); the scan's
        # threads are set here instead.
        set_num_threads(threads)
        self.path, self.part, self.parts, self.mmap = Path(path), part, parts, mmap
        self.token = uuid.uuid4().hex
        self._fail_next_search = False
        self.reload()

    def reload(self) -> tuple[int, str]:
        """Load this share from the directory's current manifest (uncommitted writes are dropped)."""
        self.index = storage.load(Index, self.path, mmap=self.mmap, part=(self.part, self.parts))
        return self.state()

    def state(self) -> tuple[int, str]:
        return self.index._store.generation, self.token

    def rows(self) -> int:
        return len(self.index)

    def node(self) -> str:
        """The Ray node this actor runs on."""
        return ray.get_runtime_context().get_node_id()

    # Searches have no side effects: Ray retries one whose actor died, once the actor is back.
    @ray.method(max_task_retries=_SEARCH_RETRIES)
    def search(self, queries, k: int, rerank: int, where, columns, nprobe):
        if self._fail_next_search:  # a test's crash in the middle of a search
            os._exit(1)
        result = self.index.search(queries, k, rerank=rerank, filter=where, columns=columns, nprobe=nprobe)
        return np.atleast_2d(result.ids), np.atleast_2d(result.scores), result.payload, self.state()

    def held(self, ids: np.ndarray) -> np.ndarray:
        """The ones of `ids` this share holds (ascending)."""
        return self.index.select(ids)

    def get(self, ids: np.ndarray, columns):
        return self.index.get(ids, columns)

    def add(self, vectors, ids, table, schema) -> tuple[int, str]:
        self.index.add(vectors, ids=ids, metadata=table)
        self.adopt_schema(schema)
        return self.state()

    def remove(self, ids) -> tuple[int, str]:
        self.index.remove(ids)
        return self.state()

    def adopt_schema(self, schema) -> None:
        """Take the driver's payload schema (the union over all shares), so a filter or column
        names the same columns on every share."""
        index = self.index
        if schema is not None and schema != index.schema:
            with index._write_lock:
                index._swap(list(index._view.segments), schema)

    def write_shards(self) -> tuple[list, list, int, tuple[int, str]]:
        """Write this share's new shard files (no manifest): its manifest entries, the files
        written (for removal if the commit fails), its live rows and its state."""
        index = self.index
        with index._write_lock:
            state = index._state()
            written: list[Path] = []
            try:
                entries = storage.write_shards(state, self.path, fresh=False, written=written)
            except BaseException:
                for file in written:
                    storage._unlink_quietly(file)
                raise
        return entries, [str(f) for f in written], state["live"], self.state()

    def crash(self) -> None:
        """End this actor's process at once (tests of restarts)."""
        os._exit(1)

    def crash_in_next_search(self) -> None:
        """End this actor's process inside its next search (tests of restarts mid-search)."""
        self._fail_next_search = True


class DistributedIndex:
    """An index spread over Ray actors (see the module notes). Open with `open`."""

    def __init__(self, path, *, num_actors: int, actor_options: dict, mmap: bool, threads: int):
        self.path = Path(path)
        self._num_actors, self._actor_options, self._mmap, self._threads = num_actors, actor_options, mmap, threads
        self._actors: list = []
        #: After a partial search: which shares answered (a list of actor numbers).
        self.answered: list[int] = list(range(num_actors))

    @classmethod
    def open(cls, path, num_actors: int | None = None, actor_options: dict | None = None, *, mmap: bool = True,
             max_restarts: int = 3, threads: int | None = None) -> "DistributedIndex":
        """Start `num_actors` shard actors (default: one per alive Ray node) on the index at `path`;
        each scans with `threads` threads (default: the node's cores over the actors per node)."""
        path = Path(path)
        storage._read_manifest(path)  # a clear error for a directory without an index, before any actor
        nodes = max(1, len([n for n in ray.nodes() if n.get("Alive")]))
        num_actors = nodes if num_actors is None else num_actors
        if num_actors < 1:
            raise ValueError(f"num_actors must be at least 1, got {num_actors}")
        options = {"num_cpus": 0.25, "max_restarts": max_restarts, "scheduling_strategy": "SPREAD",
                   **(actor_options or {})}
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // -(-num_actors // nodes))
        index = cls(path, num_actors=num_actors, actor_options=options, mmap=mmap, threads=threads)
        index._start()
        return index

    def _start(self) -> None:
        """Start the shard actors and wait until every share is loaded (errors surface here); all
        shares must come from one commit (a writer may commit while they load: then they reload)."""
        actor_cls = ray.remote(_ShardActor).options(**self._actor_options)
        self._actors = [actor_cls.remote(str(self.path), i, self._num_actors, self._mmap, self._threads)
                        for i in range(self._num_actors)]
        for _ in range(_LOAD_RETRIES):
            body = storage._read_manifest(self.path)
            states = ray.get([a.state.remote() for a in self._actors])
            if all(g == body["generation"] for g, _ in states):
                break
            states = ray.get([a.reload.remote() for a in self._actors])
        else:
            raise RuntimeError(f"the index at {self.path} kept changing while its shares loaded")
        self._adopt(body)
        self._tokens = [t for _, t in states]

    def _adopt(self, body: dict) -> None:
        """The committed state the shares hold: no writes pending after it."""
        self._generation = body["generation"]
        self._params = body["params"]
        self._next_id = body["next_id"]
        self._schema = payloads.schema_from_text(body["payload_schema"]) if body.get("payload_schema") else None
        self._coarse = body.get("coarse")  # a partitioned index's centroids entry: every commit keeps it
        self._dirty: set[int] = set()     # shares holding writes not yet saved
        self._broken: str | None = None   # why the writes since the last commit cannot be trusted

    @property
    def dim(self) -> int:
        return self._params["dim"]

    @property
    def metric(self) -> str:
        return self._params["metric"]

    @property
    def next_id(self) -> int:
        return self._next_id

    @property
    def schema(self) -> pa.Schema | None:
        """The metadata columns over all shares (pyarrow Schema), or None."""
        return self._schema

    def __len__(self) -> int:
        return sum(self._rows())

    def _rows(self) -> list[int]:
        self._check_open()
        return ray.get([a.rows.remote() for a in self._actors])

    def refresh(self) -> None:
        """Reload every share from the directory's current manifest (after another writer
        committed); writes not saved are dropped."""
        self.close()
        self._start()

    # -- writes ------------------------------------------------------------------------------------
    def add(self, vectors, ids=None, *, upsert: bool = False, metadata=None) -> np.ndarray:
        """Add vectors (as `Index.add`), spread over the shares so that their rows stay even.
        The rows are held by the actors until `save` commits them; a search sees them at once.

        Returns
        -------
        ids : (n,) int64
        """
        self._check_writable()
        if self._params.get("partitions") and self._coarse is None:
            raise ValueError("this partitioned index has no centroids yet: train it with Index (train or a first "
                             "add, then save) before adding through shares, which must share one fit")
        x, _ = as_float_matrix(vectors, self.dim)
        check_norms(x, zero_ok=self.metric != "cosine", metric=self.metric)  # as Index.add: refused here
        x = x.numpy()
        n = len(x)
        table = None if metadata is None else payloads.as_table(metadata, n)
        schema = self._schema
        if table is not None:
            schema, table = payloads.merged_schema(schema, table)
        if ids is None:
            if self._next_id + n > MAX_ID:
                raise OverflowError(f"automatic ids would pass the largest id {MAX_ID - 1}; pass ids explicitly")
            new_ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        else:
            new_ids = as_id_array(ids, n)
            held = self._held(new_ids)
            if any(len(h) for h in held):
                if not upsert:
                    found = np.sort(np.concatenate(held))[:10].tolist()
                    raise ValueError(f"ids already in the index: {found} (pass upsert=True to replace them)")
                self._apply([(i, "remove", (h,)) for i, h in enumerate(held) if len(h)])
        if not n:
            return new_ids
        counts = _share_out(self._rows(), n)
        ends = np.cumsum(counts)
        calls = [(i, "add", (x[b - c:b], new_ids[b - c:b], None if table is None else table.slice(b - c, c), schema))
                 for i, (c, b) in enumerate(zip(counts, ends)) if c]
        self._apply(calls)
        if schema is not None and schema != self._schema:
            ray.get([a.adopt_schema.remote(schema) for a in self._actors])
        self._schema = schema
        self._next_id = max(self._next_id, int(new_ids.max()) + 1)
        return new_ids

    def remove(self, ids) -> int:
        """Remove rows by id, on the shares that hold them. Unknown ids raise KeyError (and nothing
        is removed). Returns the number of rows removed."""
        self._check_writable()
        arr = as_id_array(ids)
        held = self._held(arr)
        missing = np.setdiff1d(arr, np.concatenate(held + [np.empty(0, np.int64)]))
        if missing.size:
            raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
        self._apply([(i, "remove", (h,)) for i, h in enumerate(held) if len(h)])
        return int(arr.size)

    def save(self) -> None:
        """Commit every share's writes as one new generation of the directory's manifest.

        Each actor writes its new shard files; the driver checks them as a whole and commits one
        manifest (atomic rename), then every share reloads from it, as a restarted actor would. A
        save that fails before the rename removes the files it wrote and commits nothing."""
        self._check_writable()
        store = storage.Store(self.path)
        store.acquire()   # the directory's writer lock, for the commit
        written: list[str] = []
        body = None
        try:
            on_disk = storage._read_manifest(self.path)["generation"]
            if on_disk != self._generation:
                raise RuntimeError(f"index at {self.path} was changed by another writer since it was loaded "
                                   f"(generation {on_disk}, expected {self._generation}); refresh() it")
            replies = ray.get([a.write_shards.remote() for a in self._actors])
            for _, files, _, _ in replies:
                written += files
            self._check_states([r[3] for r in replies])
            body = storage.manifest_body(
                self._params, generation=self._generation + 1, next_id=self._next_id,
                count=sum(r[2] for r in replies), shards=[e for r in replies for e in r[0]],
                payload_schema=self._schema, coarse=self._coarse)
            storage._check_body(body, self.path / storage.MANIFEST)
            written.append(str(self.path / (storage.MANIFEST + ".tmp")))
            storage._write_manifest(self.path, body)
        except BaseException:
            if body is None or not storage._committed(self.path, body["generation"]):
                for file in written:
                    storage._unlink_quietly(Path(file))
                raise
        finally:
            store.close()
        self._adopt(body)  # committed; the shares now reload what it names
        self._tokens = [t for _, t in ray.get([a.reload.remote() for a in self._actors])]
        storage._collect_garbage(self.path, body)

    def _check_open(self) -> None:
        if not self._actors:
            raise RuntimeError(f"this DistributedIndex on {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._broken:
            raise RuntimeError(self._broken)

    def _held(self, ids: np.ndarray) -> list[np.ndarray]:
        """Per share, which of `ids` it holds."""
        self._check_open()
        ref = ray.put(ids)
        return ray.get([a.held.remote(ref) for a in self._actors])

    def _apply(self, calls: list) -> None:
        """Run writes (share, method, args) on their actors. If one fails, the shares' uncommitted
        state is unknown: the index refuses further writes and saves until `refresh()`."""
        if not calls:
            return
        try:
            states = ray.get([getattr(self._actors[i], method).remote(*args) for i, method, args in calls])
        except Exception as exc:
            self._broken = (f"a write to {self.path} failed on a share ({type(exc).__name__}); what the shares hold "
                            f"beyond the last commit is unknown: refresh() to return to it")
            raise
        self._dirty.update(i for i, _, _ in calls)
        self._check_states(states, shares=[i for i, _, _ in calls])

    def _check_states(self, states: list, shares: list[int] | None = None) -> None:
        """Every share answers from the commit the driver holds, and a share holding unsaved writes
        is still the incarnation that took them (a restart reloads from disk and drops them)."""
        for i, (generation, token) in zip(range(len(states)) if shares is None else shares, states):
            if generation != self._generation:
                raise RuntimeError(f"share {i} of {self.path} holds generation {generation}, the others "
                                   f"{self._generation}: another writer committed meanwhile; refresh()")
            if token != self._tokens[i]:
                if i in self._dirty:
                    self._broken = (f"share {i} of {self.path} restarted and lost the writes made since the last "
                                    f"save; refresh() to return to the last commit")
                    raise RuntimeError(self._broken)
                self._tokens[i] = token  # a clean share restarted: it reloaded the same commit

    # -- reads -------------------------------------------------------------------------------------
    def get(self, ids, columns=None) -> pa.Table:
        """Metadata rows for these ids, in order (as `Index.get`); unknown ids raise KeyError."""
        arr = as_id_array(ids)
        held = self._held(arr)
        found = np.concatenate(held + [np.empty(0, np.int64)])
        missing = np.setdiff1d(arr, found)
        if missing.size:
            raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
        asked = [(i, h) for i, h in enumerate(held) if len(h)] or [(0, arr)]   # no ids: one share's empty table
        table = pa.concat_tables(ray.get([self._actors[i].get.remote(h, columns) for i, h in asked]))
        at = {int(i): j for j, i in enumerate(table.column("id").to_numpy())}
        return table.take(pa.array([at[int(i)] for i in arr], pa.int64()))

    def search(self, queries, k: int = 10, *, rerank: int = 0, filter=None, columns=None, nprobe: int | None = None,
               allow_partial: bool = False, wait_s: float = 120.0) -> SearchResult:
        """The k best rows over all shares: the same ids and scores as one `Index` over the same
        rows (and with `columns`, their metadata as `SearchResult.payload`). A partitioned index
        probes the same `nprobe` lists on every share (they hold the same centroids).

        A share whose actor is restarting is waited for (up to `wait_s` seconds), then asked again.
        Raises RuntimeError naming the shares that did not answer, unless `allow_partial`; then the
        result covers the shares listed in `answered`."""
        k = check_k(k)
        q, was_1d = as_float_matrix(queries, self.dim, name="queries", allow_empty=True)
        if columns is not None:
            columns = Index._check_columns(SimpleNamespace(schema=self._schema), columns)
        self._check_open()
        ref = ray.put(q.numpy())
        args = (ref, k, rerank, filter, columns, nprobe)
        calls = [a.search.remote(*args) for a in self._actors]
        parts, failed, shares = [], [], []
        for i, call in enumerate(calls):
            answer, error = self._answer(i, call, args, wait_s)
            if error is None:
                parts.append(answer)
                shares.append(i)
            else:
                failed.append((i, error))
        if failed and not allow_partial:
            raise RuntimeError(f"shares {[i for i, _ in failed]} of {self.path} did not answer "
                               f"({type(failed[0][1]).__name__}); pass allow_partial=True for the others' answer")
        self._check_states([p[3] for p in parts], shares)
        self.answered = shares
        ids, scores, order = _merge(parts, k, self.metric, len(q))
        payload = None
        if columns is not None:
            payload = _merged_payload(parts, order, k, len(q))
        if was_1d:
            ids, scores = ids[0], scores[0]
        return SearchResult(ids=ids, scores=scores, metric=self.metric, payload=payload)

    def _answer(self, i, call, args, wait_s):
        """(answer, None) from share i, asking again while its actor restarts; (None, error) if it
        is gone for good or does not come back within wait_s. A search has no side effects, so
        asking again is safe."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return ray.get(call), None
            except ray.exceptions.ActorUnavailableError as exc:  # restarting: wait, then ask again
                if time.monotonic() > deadline:
                    return None, exc
                time.sleep(0.2)
                call = self._actors[i].search.remote(*args)
            except ray.exceptions.RayActorError as exc:  # dead, no restart left
                return None, exc

    def close(self) -> None:
        """Stop the actors (writes not saved are dropped)."""
        for a in self._actors:
            ray.kill(a)
        self._actors = []


def _share_out(rows: list[int], n: int) -> list[int]:
    """How many of n new rows each share takes so that the shares end as even as possible (the
    lightest are filled first; ties to the lower share number)."""
    r = np.asarray(rows, dtype=np.int64)
    filled = lambda level: np.maximum(level - r, 0)  # noqa: E731 - rows each share takes to reach `level`
    low, high = int(r.min()), int(r.max()) + n
    while low < high:  # the lowest level that takes all n rows
        mid = (low + high) // 2
        low, high = (mid + 1, high) if filled(mid).sum() < n else (low, mid)
    counts = filled(low - 1)
    extra = n - int(counts.sum())   # one more each to the shares below the level, in order
    for i in np.flatnonzero(r < low)[:extra]:
        counts[i] += 1
    return counts.tolist()


def _merge(parts: list, k: int, metric: str, nq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact top k of the shares' local top k: ascending distance for "l2", descending similarity
    otherwise; a stable sort in share order breaks ties; −1 ids (padding) last. Also returns each
    result's column in the shares' concatenated answers."""
    if not parts:
        pad = np.inf if metric == "l2" else -np.inf
        return np.full((nq, k), -1, np.int64), np.full((nq, k), pad, np.float32), np.zeros((nq, 0), np.int64)
    ids = np.concatenate([p[0] for p in parts], axis=1)
    scores = np.concatenate([p[1] for p in parts], axis=1).astype(np.float32)
    key = scores if metric == "l2" else -scores
    key = np.where(ids >= 0, key, np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1), order


def _merged_payload(parts: list, order: np.ndarray, k: int, nq: int) -> pa.Table:
    """The metadata rows of the merged results: share s answered nq·k rows, query-major, so the
    result in column c = s·k + j of query r is row s·nq·k + r·k + j of the shares' tables."""
    table = pa.concat_tables([p[2] for p in parts])
    share, j = np.divmod(order, k)
    rows = share * nq * k + np.arange(nq)[:, None] * k + j
    return table.take(pa.array(rows.reshape(-1), pa.int64()))
