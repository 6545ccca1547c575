"""Partitioned search: recall@10 against QPS for tqindex's IVF mode and its peers, nprobe (or ef) swept.

    python bench/bench_ivf.py --dataset ../shared/data/dbpedia-titles-minilm-384-ip.hdf5 --bits 2 4
    python bench/bench_ivf.py --synthetic 1000000 --nlist 1024 --bits 4
    python bench/bench_ivf.py --dataset dbpedia-titles-minilm-1m --nlist 1024 --bits 2 4 5 \
        --probes 4 8 16 32 64 128 256 --single 200

faiss IVF-PQ FastScan is run only where its 4-bit sub-quantizers give the width asked (dim · bits / 4
of them dividing dim); every other method at every width asked. usearch runs once (its bytes do not
depend on our widths).

Methods, each at its own bytes per vector and in its own fresh process on the same CPU, one after
another: tqindex flat and partitioned (`--nlist` lists), faiss IndexIVFRaBitQ and its FastScan
variant (8-bit queries), faiss IndexIVFPQFastScan, and usearch HNSW with f16 and i8 vectors. Each
process builds its index once (build time and resident bytes per vector measured: RSS growth after
malloc_trim), then for every nprobe (HNSW: expansion_search) times a batch of all queries per call
(QPS, median of 3) and `--single` queries one at a time (QPS from their mean latency), with recall@10
from the batch. With `--rounds`, every method runs that many times, round-robin, and each figure is the
median over the rounds. The CPU model and each library's SIMD level are recorded. Writes
bench/results/ivf-<dataset>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from common import RESULTS, environment, load_ip_dataset, median_time, report, run_worker, synthetic_clustered, write_json

METHODS = ("tqindex-flat", "tqindex-ivf", "faiss-ivfrabitq", "faiss-ivfrabitq-fs", "faiss-ivfpq-fs",
           "usearch-hnsw-f16", "usearch-hnsw-i8")
PROBES = (1, 2, 4, 8, 16, 32, 64, 128)
EFS = (16, 32, 64, 128, 256)


def _rss() -> int:
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


class TqIndex:
    def __init__(self, method, bits, dim, nlist, probes):
        from tqindex import Index, native
        self.index = Index(dim=dim, bits=bits, partitions=nlist if method == "tqindex-ivf" else 0)
        self.simd = native.simd()
        self.sweep = probes if self.index.partitions else (None,)

    def build(self, x):
        self.index.add(x)

    def search(self, q, k, p):
        return self.index.search(q, k, nprobe=p).ids


class FaissIvf:
    def __init__(self, method, bits, dim, nlist, probes):
        import faiss
        self.faiss = faiss
        code = {"faiss-ivfrabitq": f"RaBitQ{bits}", "faiss-ivfrabitq-fs": f"RaBitQfs{bits}",
                "faiss-ivfpq-fs": f"PQ{dim * bits // 4}x4fs"}[method]
        self.index = faiss.index_factory(dim, f"IVF{nlist},{code}", faiss.METRIC_INNER_PRODUCT)
        self.ivf = faiss.extract_index_ivf(self.index)
        if hasattr(self.ivf, "qb"):
            self.ivf.qb = 8  # 8-bit queries, as bench_recall.py uses RaBitQ
        self.simd = faiss.get_compile_options().strip()
        self.sweep = probes

    def build(self, x):
        self.index.train(x)
        self.index.add(x)

    def search(self, q, k, p):
        self.ivf.nprobe = p
        return self.index.search(q, k)[1]


class USearch:
    def __init__(self, method, bits, dim, nlist, efs):
        from usearch.index import Index
        self.index = Index(ndim=dim, metric="ip", dtype=method.rsplit("-", 1)[1], connectivity=16,
                           expansion_add=128)
        self.simd = self.index.hardware_acceleration
        self.sweep = efs

    def build(self, x):
        self.index.add(np.arange(len(x)), x, threads=0)

    def search(self, q, k, p):
        self.index.expansion_search = p
        found = self.index.search(q, k, threads=0)
        return found.keys if q.ndim == 2 else found.keys[None]


def _make(method, bits, dim, args):
    if method.startswith("tqindex"):
        return TqIndex(method, bits, dim, args.nlist, args.probes)
    if method.startswith("faiss"):
        return FaissIvf(method, bits, dim, args.nlist, args.probes)
    return USearch(method, bits, dim, args.nlist, args.efs)


def _runs_at(method: str, bits: int, dim: int, first_bits: int) -> bool:
    """Whether `method` is measured at this width (see the module docstring)."""
    if method.startswith("usearch"):
        return bits == first_bits
    if method == "faiss-ivfpq-fs":
        return dim * bits % 4 == 0 and dim % (dim * bits // 4) == 0
    return True


def _recall(found, gt) -> float:
    return float(np.mean([len(set(f[:10].tolist()) & set(g[:10].tolist())) / 10 for f, g in zip(found, gt)]))


def worker(args) -> None:
    if args.dataset:
        ds, x, q = load_ip_dataset(args.dataset)
        gt = ds.groundtruth(10)
    else:
        x, q, gt = synthetic_clustered(args.synthetic, args.dim)
    method = _make(args.method, args.worker_bits, x.shape[1], args)
    before = _rss()
    start = time.perf_counter()
    method.build(x)
    out = {"method": args.method, "bits": args.worker_bits, "build_s": time.perf_counter() - start,
           "bytes_per_vector": (_rss() - before) / len(x), "simd": method.simd, "rows": len(x), "dim": x.shape[1],
           "nlist": args.nlist, "points": []}
    for p in method.sweep:
        method.search(q[:20], 10, p)  # warm-up
        batch_s, found = median_time(lambda: method.search(q, 10, p), 3)
        times = []
        for i in range(args.single):
            t = time.perf_counter()
            method.search(q[i % len(q)][None], 10, p)
            times.append(time.perf_counter() - t)
        out["points"].append({"param": p, "recall": _recall(found, gt), "batch_qps": len(q) / batch_s,
                              "single_qps": 1.0 / float(np.mean(times)),
                              "single_p50_ms": 1e3 * float(np.median(times))})
    report(out)


def _median_run(results: list) -> dict:
    """One method's runs (fresh processes, the same sweep) as one: every time, size and QPS the median over
    them (recall does not depend on the run)."""
    run = dict(results[0])
    for key in ("build_s", "bytes_per_vector"):
        run[key] = float(np.median([r[key] for r in results]))
    run["points"] = [dict(p, **{key: float(np.median([r["points"][i][key] for r in results]))
                                for key in ("batch_qps", "single_qps", "single_p50_ms")})
                     for i, p in enumerate(results[0]["points"])]
    run["rounds"] = len(results)
    return run


def _dataset_dim(name: str) -> int:
    from tqindex.datasets import load_dataset
    return int(load_dataset(name).dim)


def _at_recall(runs, target: float) -> list[str]:
    """Per method and width, the fastest single-query point at recall@10 >= target (or that it has none)."""
    lines = [f"At recall@10 ≥ {target}: the fastest single-query point of each method.", "",
             "| bits | method | build s | B/vector | param | recall@10 | single QPS |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        ok = [p for p in r["points"] if p["recall"] >= target]
        if not ok:
            best = max(p["recall"] for p in r["points"])
            lines.append(f"| {r['bits']} | {r['method']} | {r['build_s']:.2f} | {r['bytes_per_vector']:.0f} | – | "
                         f"not reached (best {best:.4f}) | – |")
            continue
        p = max(ok, key=lambda p: p["single_qps"])
        lines.append(f"| {r['bits']} | {r['method']} | {r['build_s']:.2f} | {r['bytes_per_vector']:.0f} | "
                     f"{p['param'] if p['param'] is not None else 'all'} | {p['recall']:.4f} | {p['single_qps']:,.0f} |")
    return lines


def _table(runs, env, args) -> str:
    lines = [f"`{' '.join(['bench/bench_ivf.py'] + sys.argv[1:])}` on {env.get('cpu', '?')} ({env.get('cpus')} cores), "
             f"{runs[0]['rows'] if runs else '?'} × {runs[0]['dim'] if runs else '?'}, 1,000 queries, k = 10; "
             f"IVF indexes with {args.nlist} lists. Bytes per vector: resident-set growth over the build. "
             f"Single-query QPS is 1 / mean latency over {args.single} queries; batch QPS: all queries per call; "
             f"each figure the median of {args.rounds} round(s) of fresh processes.", "",
             "| bits | method | build s | B/vector | param | recall@10 | single QPS | batch QPS | SIMD |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        for i, pt in enumerate(r["points"]):
            head = (f"| {r['bits']} | {r['method']} | {r['build_s']:.2f} | {r['bytes_per_vector']:.0f}" if i == 0
                    else "| | | | ")
            lines.append(f"{head} | {pt['param'] if pt['param'] is not None else 'all'} | {pt['recall']:.4f} | "
                         f"{pt['single_qps']:,.0f} | {pt['batch_qps']:,.0f} | {r['simd'] if i == 0 else ''} |")
    lines += [""] + _at_recall(runs, 0.95)
    return "\n".join(lines) + "\n"


def _plot(runs, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    bits = sorted({r["bits"] for r in runs})
    fig, axes = plt.subplots(1, len(bits), figsize=(6 * len(bits), 4.5), squeeze=False)
    for ax, b in zip(axes[0], bits):
        for r in (r for r in runs if r["bits"] == b):
            pts = r["points"]
            ax.plot([p["recall"] for p in pts], [p["single_qps"] for p in pts], marker="o",
                    label=f"{r['method']} ({r['bytes_per_vector']:.0f} B)")
        ax.set_yscale("log")
        ax.set_xlabel("recall@10")
        ax.set_ylabel("single-query QPS")
        ax.set_title(f"{b} bits")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset")
    parser.add_argument("--synthetic", type=int, help="rows of synthetic clustered unit vectors (no real set)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--nlist", type=int, default=256)
    parser.add_argument("--single", type=int, default=200)
    parser.add_argument("--probes", type=int, nargs="+", default=list(PROBES), help="nprobe values swept")
    parser.add_argument("--efs", type=int, nargs="+", default=list(EFS), help="HNSW expansion_search values swept")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per method, round-robin; each figure is the median over them")
    parser.add_argument("--tag", help="suffix of the results files (default: none)")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--worker-bits", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.dataset or args.synthetic):
        raise SystemExit("give --dataset or --synthetic")
    if args.method:
        return worker(args)
    data = ["--dataset", args.dataset] if args.dataset else ["--synthetic", str(args.synthetic), "--dim", str(args.dim)]
    rounds: dict = {}
    for _ in range(args.rounds):  # every (bits, method) once a round: a slow stretch of a shared machine hits all
        for bits in args.bits:
            for method in args.methods:
                if not _runs_at(method, bits, args.dim if args.synthetic else _dataset_dim(args.dataset),
                                args.bits[0]):
                    continue
                result = run_worker([sys.executable, __file__, *data, "--nlist", str(args.nlist),
                                     "--single", str(args.single), "--probes", *map(str, args.probes),
                                     "--efs", *map(str, args.efs), "--method", method, "--worker-bits", str(bits)])
                if result:
                    rounds.setdefault((bits, method), []).append(result)
                    print(json.dumps({k: v for k, v in result.items() if k != "points"}), flush=True)
    runs = [_median_run(results) for results in rounds.values()]
    env = environment()
    tag = Path(args.dataset).stem if args.dataset else f"synthetic-{args.synthetic}x{args.dim}"
    tag += f"-{args.tag}" if args.tag else ""
    write_json(RESULTS / f"ivf-{tag}.json", {"runs": runs})
    text = _table(runs, env, args)
    (RESULTS / f"ivf-{tag}.md").write_text(text)
    _plot(runs, RESULTS / f"ivf-{tag}.png")
    print(text)


if __name__ == "__main__":
    main()
