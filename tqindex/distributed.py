"""Sharded build and search on Ray (``pip install 'tqindex[ray]'``; the core never imports this module).

    import ray, tqindex.distributed as td
    ray.init()
    td.build(vectors, "my-index", dim=384, bits=4)          # numpy, or a Ray Data dataset with "vector"/"id"
    index = td.DistributedIndex.open("my-index", num_actors=4)
    result = index.search(queries, k=10)                    # the same ids and scores as one Index

`build` encodes blocks of rows in Ray tasks; each task writes uniquely named shard files of its rows under
the directory, and the driver checks them and commits one manifest last (atomic rename), so the result is
an ordinary tqindex directory that `Index.load` opens, or nothing if the build fails (repeated ids included). All blocks share one rotation seed
and codebook, so their scores are comparable.

`DistributedIndex.open` starts shard actors, each loading (memory-mapped) its share of the manifest's shards,
balanced by rows. `search` puts the queries in the object store once, every actor returns its local top k
(rerank and filters are applied there), and the driver merges them exactly. An actor that dies is restarted
and reloads its share from disk (`max_restarts`); a search waits for it and asks again (searches have no side
effects; nothing else is retried); if it does not come back, `search` raises naming the share, unless ``allow_partial=True``, which returns
the answer of the shares that did answer and says which.

Not in this version: writes through a `DistributedIndex` (add / remove / save go through `Index` on the
directory, then `refresh()`), and placement across nodes beyond Ray's default scheduling.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

try:
    import ray
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("tqindex.distributed needs Ray: pip install 'tqindex[ray]'") from exc

from . import storage
from .index import Index, SearchResult
from .native import set_num_threads
from .validation import as_float_matrix, as_id_array, check_k

__all__ = ["DistributedIndex", "build"]


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
    """One share of an index's shards, memory-mapped; answers local top-k searches."""

    def __init__(self, path: str, part: int, parts: int, mmap: bool, threads: int):
        # Ray gives a fractional-CPU actor one OpenMP thread (and so tqindex's default); the scan's
        # threads are set here instead.
        set_num_threads(threads)
        self.index = storage.load(Index, path, mmap=mmap, part=(part, parts))

    def rows(self) -> int:
        return len(self.index)

    def node(self) -> str:
        """The Ray node this actor runs on."""
        return ray.get_runtime_context().get_node_id()

    def search(self, queries, k: int, rerank: int, where):
        result = self.index.search(queries, k, rerank=rerank, filter=where)
        return np.atleast_2d(result.ids), np.atleast_2d(result.scores)

    def crash(self) -> None:
        """End this actor's process at once (tests of restarts)."""
        os._exit(1)


class DistributedIndex:
    """A read-only index spread over Ray actors (see the module notes). Open with `open`."""

    def __init__(self, path, *, metric: str, dim: int, num_actors: int, actor_options: dict, mmap: bool,
                 threads: int):
        self.path, self.metric, self.dim = Path(path), metric, dim
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
        params = storage._read_manifest(path)["params"]
        nodes = max(1, len([n for n in ray.nodes() if n.get("Alive")]))
        num_actors = nodes if num_actors is None else num_actors
        if num_actors < 1:
            raise ValueError(f"num_actors must be at least 1, got {num_actors}")
        options = {"num_cpus": 0.25, "max_restarts": max_restarts, "scheduling_strategy": "SPREAD",
                   **(actor_options or {})}
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // -(-num_actors // nodes))
        index = cls(path, metric=params["metric"], dim=params["dim"], num_actors=num_actors, actor_options=options,
                    mmap=mmap, threads=threads)
        index._start()
        return index

    def _start(self) -> None:
        """Start the shard actors and wait until every share is loaded (errors surface here)."""
        actor_cls = ray.remote(_ShardActor).options(**self._actor_options)
        self._actors = [actor_cls.remote(str(self.path), i, self._num_actors, self._mmap, self._threads)
                        for i in range(self._num_actors)]
        ray.get([a.rows.remote() for a in self._actors])

    def __len__(self) -> int:
        return sum(ray.get([a.rows.remote() for a in self._actors]))

    def refresh(self) -> None:
        """Reload every share from the directory's current manifest (after another writer committed)."""
        self.close()
        self._start()

    def search(self, queries, k: int = 10, *, rerank: int = 0, filter=None, allow_partial: bool = False,
               wait_s: float = 120.0) -> SearchResult:
        """The k best rows over all shares: the same ids and scores as one `Index` over the same rows.

        A share whose actor is restarting is waited for (up to `wait_s` seconds), then asked again.
        Raises RuntimeError naming the shares that did not answer, unless `allow_partial`; then the
        result covers the shares listed in `answered`."""
        k = check_k(k)
        q, was_1d = as_float_matrix(queries, self.dim, name="queries", allow_empty=True)
        ref = ray.put(q.numpy())
        calls = [a.search.remote(ref, k, rerank, filter) for a in self._actors]
        parts, failed = [], []
        for i, call in enumerate(calls):
            answer, error = self._answer(i, call, ref, k, rerank, filter, wait_s)
            if error is None:
                parts.append(answer)
            else:
                failed.append((i, error))
        if failed and not allow_partial:
            raise RuntimeError(f"shares {[i for i, _ in failed]} of {self.path} did not answer "
                               f"({type(failed[0][1]).__name__}); pass allow_partial=True for the others' answer")
        self.answered = [i for i in range(len(calls)) if i not in {j for j, _ in failed}]
        ids, scores = _merge(parts, k, self.metric, len(q))
        if was_1d:
            ids, scores = ids[0], scores[0]
        return SearchResult(ids=ids, scores=scores, metric=self.metric)

    def _answer(self, i, call, ref, k, rerank, where, wait_s):
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
                call = self._actors[i].search.remote(ref, k, rerank, where)
            except ray.exceptions.RayActorError as exc:  # dead, no restart left
                return None, exc

    def close(self) -> None:
        for a in self._actors:
            ray.kill(a)
        self._actors = []


def _merge(parts: list, k: int, metric: str, nq: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k of the shares' local top k: ascending distance for "l2", descending similarity
    otherwise; a stable sort in share order breaks ties; −1 ids (padding) last."""
    if not parts:
        pad = np.inf if metric == "l2" else -np.inf
        return np.full((nq, k), -1, np.int64), np.full((nq, k), pad, np.float32)
    ids = np.concatenate([p[0] for p in parts], axis=1)
    scores = np.concatenate([p[1] for p in parts], axis=1).astype(np.float32)
    key = scores if metric == "l2" else -scores
    key = np.where(ids >= 0, key, np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)
