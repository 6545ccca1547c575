"""Shared helpers for the benchmarks: timing, environment capture, JSON output."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def environment() -> dict:
    import torch
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "numpy": np.__version__}
    for name in ("faiss", "turbovec", "pyarrow"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return env


def load_ip_dataset(name: str):
    """(dataset, database, queries) as float32, for inner-product search: cosine datasets normalised
    once up front (their inner products are then the cosines); other metrics are refused."""
    from tqindex.datasets import load_dataset
    ds = load_dataset(name)
    x = np.ascontiguousarray(np.asarray(ds.database()), dtype=np.float32)
    q = np.ascontiguousarray(ds.queries(), dtype=np.float32)
    if ds.metric == "cosine":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    elif ds.metric != "ip":
        raise SystemExit(f"{ds.name}: metric {ds.metric!r}; this benchmark compares inner-product search")
    return ds, x, q


def unit_vectors(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """(rows, dim) float32 Gaussian rows scaled to unit length, made 65,536 rows at a time."""
    rng = np.random.default_rng(seed)
    x = np.empty((rows, dim), np.float32)
    for a in range(0, rows, 1 << 16):
        block = rng.standard_normal((min(rows, a + (1 << 16)) - a, dim), dtype=np.float32)
        x[a:a + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def synthetic_clustered(rows: int, dim: int):
    """(database, queries, ground-truth ids (1000, 10)): unit vectors drawn around 1,000 random
    centres (spread 0.7, seed 0; `tests/conftest.clustered`'s model of sentence embeddings), with
    exact inner-product neighbours computed once and cached."""
    from tqindex.datasets import cache_dir, exact_knn
    cache = cache_dir() / "bench" / f"synthetic-{rows}x{dim}.npz"
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)

    def draw(m):
        out = np.empty((m, dim), np.float32)
        for a in range(0, m, 1 << 16):
            b = min(m, a + (1 << 16))
            block = centres[rng.integers(0, 1000, b - a)] + 0.7 * rng.standard_normal((b - a, dim))
            out[a:b] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out

    x, q = draw(rows), draw(1000)
    if cache.exists():
        gt = np.load(cache)["gt"]
    else:
        gt = exact_knn(x, q, 10, "ip")[0]
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, gt=gt)
    return x, q, gt


def median_time(fn, repeat: int) -> tuple[float, object]:
    """Median wall time of `repeat` calls (after one untimed warm-up call); returns (seconds, last result)."""
    result = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


_RESULT = "RESULT "


def report(result: dict) -> None:
    """A worker process's result, on the line `run_worker` reads."""
    print(_RESULT + json.dumps(result), flush=True)


def run_worker(cmd: list[str], env: dict | None = None) -> dict | None:
    """Run one benchmark worker in a fresh process and return its `report`ed result (None, with its
    error printed, if it reported nothing)."""
    import subprocess
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((l for l in proc.stdout.splitlines() if l.startswith(_RESULT)), None)
    if line is None:
        print(f"failed: {' '.join(cmd[2:])}: {proc.stderr[-800:]}", flush=True)
        return None
    return json.loads(line[len(_RESULT):])


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command_line(), "environment": environment(), **payload}
    path.write_text(json.dumps(payload, indent=1, default=float))
    print(f"wrote {path}")
