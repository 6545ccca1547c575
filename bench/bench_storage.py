"""Save time, load time (memory-mapped and not), on-disk bytes per vector, and the first single-query search
after the adds and after each load against the steady state (median of the next 20).

    python bench/bench_storage.py                 # 1M x 384 at 4 bits (synthetic unit vectors)
    python bench/bench_storage.py --n 200000 --dim 1536 --bits 2

The data are synthetic (random unit vectors): storage cost does not depend on the values. Load
times are measured in fresh subprocesses so that neither Python's nor tqindex's caches help; the
OS page cache is warm (the files were just written), which is the usual case for a restart.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import RESULTS, write_json

from tqindex import Index

def first_and_steady(index, dim: int) -> tuple[float, float]:
    """Seconds of the first single-query search, and the median of the next 20 (the steady state)."""
    q = np.random.default_rng(1).standard_normal((1, dim)).astype(np.float32)
    start = time.perf_counter()
    index.search(q, 10)
    first = time.perf_counter() - start
    steady = []
    for _ in range(20):
        start = time.perf_counter()
        index.search(q, 10)
        steady.append(time.perf_counter() - start)
    return first, float(np.median(steady))


LOAD_PROBE = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
from tqindex import Index
from bench_storage import first_and_steady
def rss_kb():  # current resident set (not the peak, which imports already set)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
rss0 = rss_kb()
start = time.perf_counter()
index = Index.load({path!r}, mmap={mmap}, verify={verify})
load_s = time.perf_counter() - start
rss1 = rss_kb()
first_search_s, steady_search_s = first_and_steady(index, {dim})
print(json.dumps({{"load_s": load_s, "rss_growth_mb": (rss1 - rss0) / 1024, "first_search_s": first_search_s,
                   "steady_search_s": steady_search_s, "n": len(index)}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--dir", default=None, help="where to write the index (default: a temporary folder)")
    args = parser.parse_args()

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="tqindex-bench-"))
    path = workdir / "index"
    rng = np.random.default_rng(0)
    index = Index(dim=args.dim, bits=args.bits)
    add_s = 0.0
    for lo in range(0, args.n, 100_000):
        x = rng.standard_normal((min(100_000, args.n - lo), args.dim)).astype(np.float32)
        start = time.perf_counter()  # time the adds only, not drawing the data
        index.add(x)
        add_s += time.perf_counter() - start
    first_after_add_s, steady_s = first_and_steady(index, args.dim)
    start = time.perf_counter()
    index.save(path)
    save_s = time.perf_counter() - start
    index.add(rng.standard_normal((1000, args.dim)).astype(np.float32))
    start = time.perf_counter()
    index.save()
    append_save_s = time.perf_counter() - start
    index.close()

    disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    n = args.n + 1000
    payload = args.dim * args.bits / 8
    per_vector_meta = index.bytes_per_vector() - index._quantizer.code_bytes + 8  # floats + int64 id
    expected = payload + per_vector_meta
    loads = {}
    for mmap, verify in [(True, False), (True, True), (False, True)]:
        code = LOAD_PROBE.format(path=str(path), mmap=mmap, verify=verify, dim=args.dim,
                                 bench=str(Path(__file__).parent))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        loads[f"mmap={mmap},verify={verify}"] = json.loads(out.stdout.strip().splitlines()[-1])

    print(f"{n} x {args.dim} at {args.bits} bits (synthetic), index in {path}")
    print(f"  add           {add_s:8.2f} s  ({args.n / add_s:,.0f} vectors/s)")
    print(f"  first search  {first_after_add_s:8.3f} s after the adds; steady state {steady_s:.3f} s (median of 20)")
    print(f"  save          {save_s:8.2f} s  (full, fsynced)")
    print(f"  append+save   {append_save_s:8.3f} s  (1000 rows; unchanged shards untouched)")
    print(f"  on disk       {disk / n:8.2f} bytes/vector; expected d*b/8 + metadata = {payload:g} + "
          f"{per_vector_meta} = {expected:g} ({100 * (disk / n / expected - 1):+.2f}%)")
    for name, r in loads.items():
        print(f"  load {name:<22} {r['load_s']:7.3f} s, RSS +{r['rss_growth_mb']:7.1f} MB, "
              f"first search {r['first_search_s']:.3f} s, then {r['steady_search_s']:.3f} s (median of 20)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"storage-{n}x{args.dim}-{args.bits}bit.json", {
        "n": n, "dim": args.dim, "bits": args.bits, "add_s": add_s, "first_search_after_add_s": first_after_add_s,
        "steady_search_s": steady_s, "save_s": save_s,
        "append_save_s": append_save_s, "disk_bytes": disk, "disk_bytes_per_vector": disk / n,
        "expected_bytes_per_vector": expected, "loads": loads})


if __name__ == "__main__":
    main()
