"""Resident memory per vector: tqindex against turbovec, faiss IndexRaBitQ and faiss IndexPQFastScan.

    python bench/bench_memory.py --rows 1000000 --dim 384 --bits 2 4

Each (method, bits) runs in its own fresh process, which reports its resident set (VmRSS, after
handing freed memory back with malloc_trim) and peak (VmHWM) at each step, in bytes per vector beyond
its own baseline: after `add` (the float32 array already in memory is excluded), after the first
search, and for tqindex also after saving and loading the index with `mmap=True` and `mmap=False` in a
fresh process, before and after its first search. The baseline is the process with its library
imported and used once (a 1,000-row index of the same kind built, searched and dropped), the same
for every method, so one-off costs (LAPACK workspaces, thread pools) do not count per vector; the
import alone and that first use are reported in their own columns. Synthetic
unit vectors (their values do not change the memory). Writes bench/results/memory-<rows>x<dim>.json
and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from common import RESULTS, environment, report, run_worker, unit_vectors, write_json

METHODS = ("tqindex", "turbovec", "faiss-rabitq", "faiss-pqfastscan")


def _status() -> tuple[int, int]:
    """(resident bytes, peak resident bytes) of this process, after returning freed heap memory."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values["VmRSS"], values["VmHWM"]


def _batches(args):
    """The rows in batches of args.batch (default rows/10): views of one array made first, or with
    --stream each batch made just before it is added (the whole array never exists)."""
    size = args.batch or args.rows // 10
    if args.stream:
        return (unit_vectors(min(size, args.rows - a), args.dim, seed=a) for a in range(0, args.rows, size)), None
    x = unit_vectors(args.rows, args.dim)
    return (x[a:a + size] for a in range(0, args.rows, size)), x


def _make(method, dim, bits, train):
    """(index, add, search) for a method; `train` rows train the faiss indexes."""
    if method == "tqindex":
        from tqindex import Index
        index = Index(dim=dim, bits=bits)
        return index, index.add, lambda q: index.search(q, 10)
    if method == "turbovec":
        import turbovec  # noqa: F401  (its import is part of the baseline)
        index = turbovec.TurboQuantIndex(dim, bits)

        def search(q):
            index.prepare()
            return index.search(q, 10)
        return index, index.add, search
    import faiss
    if method == "faiss-rabitq":
        index = faiss.IndexRaBitQ(dim, faiss.METRIC_INNER_PRODUCT, bits)
    else:
        index = faiss.IndexPQFastScan(dim, dim * bits // 4, 4, faiss.METRIC_INNER_PRODUCT)
    index.train(train)
    return index, index.add, lambda q: index.search(q, 10)


def worker(args) -> None:
    out = {"method": args.method, "bits": args.worker_bits}
    # Import everything the method needs first: the baseline is the process with its libraries loaded.
    if args.method == "tqindex":
        from tqindex import Index
        import torch  # noqa: F401  (its import is part of the baseline)
    elif args.method == "turbovec":
        import turbovec  # noqa: F401  (its import is part of the baseline)
    else:
        import faiss  # noqa: F401  (its import is part of the baseline)
    out["import_baseline"], _ = _status()

    def first_use(rows):
        """A small index of the same kind built, searched and dropped (every method alike)."""
        small = rows[:1000].copy()
        warm, add, search = _make(args.method, args.dim, args.worker_bits, small)
        add(small)
        search(small[:1])

    if args.load:  # tqindex: a fresh process that loads a saved index
        first_use(unit_vectors(1000, args.dim, seed=1))
        base, _ = _status()
        out["after_first_use"] = base - out["import_baseline"]
        index = Index.load(args.load, mmap=args.mmap == "yes")
        out["after_load"] = _status()[0] - base
        index.search(np.ones(args.dim, np.float32), 10)
        out["after_first_search"] = _status()[0] - base
        report(out)
        return
    batches, x = _batches(args)
    first = next(batches)
    first_use(first)
    resident, _ = _status()
    out["after_first_use"] = resident - out["import_baseline"] - (x.nbytes if x is not None else first.nbytes)
    # With --stream the baseline is as if no batch existed: each is made, added and dropped inside the count.
    with_array = resident - (first.nbytes if args.stream else 0)
    try:  # restart the peak (VmHWM) here, so that it measures add and not making the data
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    out["array_bytes"] = 0 if x is None else x.nbytes
    out["batch_bytes"] = first.nbytes
    query = first[:1].copy()
    # Batches added one after another, as a user adding a stream would.
    index, add, search = _make(args.method, args.dim, args.worker_bits, first[:100_000])
    add(first)
    del first
    for batch in batches:
        add(batch)
        del batch
    if args.method == "turbovec":
        index.prepare()  # its search layout, built once after the adds
    if args.method == "tqindex":
        out["memory_bytes"] = index.memory_bytes()
    rss, peak = _status()
    out["after_add"] = rss - with_array
    out["peak_during_add"] = peak - with_array
    search(query)
    out["after_first_search"] = _status()[0] - with_array
    if args.method == "tqindex" and args.save:
        index.save(args.save)
    report(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, help="rows per add (default rows/10)")
    parser.add_argument("--stream", action="store_true",
                        help="make each batch just before adding it (for sizes whose float32 array would not fit)")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--worker-bits", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--mmap", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return worker(args)
    runs = []
    base = [sys.executable, __file__, "--rows", str(args.rows), "--dim", str(args.dim)]
    base += (["--batch", str(args.batch)] if args.batch else []) + (["--stream"] if args.stream else [])
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            for method in args.methods:
                saved = os.path.join(tmp, f"tq-{bits}")
                cmd = base + ["--method", method, "--worker-bits", str(bits)]
                cmd += ["--save", saved] if method == "tqindex" else []
                result = run_worker(cmd)
                if result is None:
                    continue
                runs.append(result)
                if method == "tqindex":
                    for mmap in ("yes", "no"):
                        loaded = run_worker(base + ["--method", "tqindex", "--worker-bits", str(bits), "--load", saved,
                                              "--mmap", mmap])
                        if loaded:
                            result[f"load_mmap_{mmap}"] = loaded
                print(json.dumps(result), flush=True)
    env = environment()
    tag = f"{args.rows}x{args.dim}"
    write_json(RESULTS / f"memory-{tag}.json", {"runs": runs})
    n = args.rows
    lines = [f"`{' '.join(sys.argv)}` on {env.get('cpu', '?')}: resident bytes per vector beyond each process's "
             f"baseline, its library imported and used once on a 1,000-row index (malloc_trim first; the import and "
             f"that first use in MB in their own columns); " + (
                 f"batches of {args.batch or args.rows // 10} rows made just before each add (one batch, "
                 f"{4 * args.dim * (args.batch or args.rows // 10) / args.rows:.1f} B/vector, is inside the peak)"
                 if args.stream else f"the float32 input array ({4 * args.dim} B/vector) excluded") +
             ". tqindex's `memory_bytes()` per vector: " +
             ", ".join(f"{r['bits']} bits {r['memory_bytes'] / n:.1f}" for r in runs if 'memory_bytes' in r) + ".", "",
             "| bits | method | import MB | first use MB | after add | peak during add | after first search | "
             "load mmap: after load / first search | load (no mmap): after load / first search |",
             "|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in runs:
        def loaded(key):
            part = r.get(key)
            return "" if not part else f"{part['after_load'] / n:.1f} / {part['after_first_search'] / n:.1f}"
        lines.append(f"| {r['bits']} | {r['method']} | {r['import_baseline'] / 2 ** 20:.0f} | "
                     f"{r['after_first_use'] / 2 ** 20:.1f} | {r['after_add'] / n:.1f} | "
                     f"{r['peak_during_add'] / n:.1f} | {r['after_first_search'] / n:.1f} | {loaded('load_mmap_yes')} | "
                     f"{loaded('load_mmap_no')} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"memory-{tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
