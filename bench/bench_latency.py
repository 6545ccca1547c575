"""Single-query latency and QPS by batch size: tqindex against turbovec, faiss and usearch.

    python bench/bench_latency.py --dataset ../shared/data/dbpedia-titles-minilm-384-ip.hdf5 --bits 2 4
    python bench/bench_latency.py --synthetic 1000000 --bits 2 4 --rounds 2

Every (method, bits) runs in its own fresh process, methods round-robin, `--rounds` times, on the same
CPU; each process is limited to `--threads` threads (OMP/RAYON/OpenBLAS variables and tqindex's own
setting), so no library's pool slows another's. Each process builds its index, then times: `--single`
queries one at a time (p50, p99; with `--load`, again while another process keeps one core busy),
and QPS at 1, 8, 64 and 1,000 queries per call; recall@10 from the 1,000-query batch. The CPU model
and each library's SIMD level are printed beside the figures. Writes bench/results/latency-<tag>.json
and .md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

from common import RESULTS, environment, load_ip_dataset, report, run_worker, synthetic_clustered, write_json

METHODS = ("tqindex", "turbovec", "faiss-rabitq", "faiss-pqfastscan", "usearch-i8")
BATCHES = (1, 8, 64, 1000)


def _data(args):
    """(database, queries, ground-truth ids (nq, ≥10)) as float32 unit vectors for inner product."""
    if args.dataset:
        _, x, q = load_ip_dataset(args.dataset)
        from tqindex.datasets import load_dataset
        return x, q, load_dataset(args.dataset).groundtruth(10)
    return synthetic_clustered(args.synthetic, args.dim)


class Tq:
    def __init__(self, bits, dim):
        from tqindex import Index, native
        self.index = Index(dim=dim, bits=bits)
        self.simd = native.simd()

    def build(self, x):
        self.index.add(x)

    def search(self, q, k):
        return self.index.search(q, k).ids

    def one(self, q, k):
        return self.index.search(q, k).ids


class TurboVec:
    def __init__(self, bits, dim):
        import turbovec
        self.index = turbovec.TurboQuantIndex(dim, bits)
        self.simd = "its own dispatch (not reported)"

    def build(self, x):
        self.index.add(x)
        self.index.prepare()

    def search(self, q, k):
        return self.index.search(q, k)[1]

    def one(self, q, k):
        return self.index.search(q[None], k)[1][0]


class Faiss:
    def __init__(self, kind, bits, dim):
        import faiss
        self.faiss, self.kind, self.bits, self.dim = faiss, kind, bits, dim
        self.simd = faiss.get_compile_options().strip()

    def build(self, x):
        f = self.faiss
        if self.kind == "rabitq":  # as bench_recall.py: multi-bit RaBitQ, 8-bit queries, a random rotation first
            rabitq = f.IndexRaBitQ(self.dim, f.METRIC_INNER_PRODUCT, self.bits)
            rabitq.qb = 8
            self.index = f.IndexPreTransform(f.RandomRotationMatrix(self.dim, self.dim), rabitq)
            self._keep = rabitq
        else:
            m = self.dim * self.bits // 4
            self.index = f.IndexPQFastScan(self.dim, m, 4, f.METRIC_INNER_PRODUCT)
        self.index.train(x[:min(len(x), 100_000)])
        self.index.add(x)

    def search(self, q, k):
        return self.index.search(q, k)[1]

    def one(self, q, k):
        return self.index.search(q[None], k)[1][0]


class USearch:
    def __init__(self, bits, dim):
        from usearch.index import Index
        self.index = Index(ndim=dim, metric="ip", dtype="i8", connectivity=16, expansion_add=128, expansion_search=64)
        self.simd = self.index.hardware_acceleration

    def build(self, x):
        self.index.add(np.arange(len(x)), x, threads=0)

    def search(self, q, k):
        return self.index.search(q, k, threads=0).keys

    def one(self, q, k):
        return self.index.search(q, k).keys


def _make(method, bits, dim):
    if method == "tqindex":
        return Tq(bits, dim)
    if method == "turbovec":
        return TurboVec(bits, dim)
    if method.startswith("faiss"):
        return Faiss(method.split("-")[1], bits, dim)
    return USearch(bits, dim)


def _recall(found, gt):
    return float(np.mean([len(set(f[:10].tolist()) & set(g[:10].tolist())) / 10 for f, g in zip(found, gt)]))


def _threaded_qps(method, q, threads: int, per_thread: int = 200) -> float:
    """Single queries from `threads` Python threads at once: total queries per second."""
    import threading

    def run(part):
        for i in range(per_thread):
            method.one(q[(part * per_thread + i) % len(q)], 10)

    pool = [threading.Thread(target=run, args=(p,)) for p in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return threads * per_thread / (time.perf_counter() - start)


def worker(args) -> None:
    if args.threads:
        from tqindex import set_num_threads
        set_num_threads(args.threads)
        import torch
        torch.set_num_threads(args.threads)
    x, q, gt = _data(args)
    method = _make(args.method, args.worker_bits, x.shape[1])
    start = time.perf_counter()
    method.build(x)
    out = {"method": args.method, "bits": args.worker_bits, "build_s": time.perf_counter() - start,
           "simd": method.simd, "rows": len(x), "dim": x.shape[1]}
    t = time.perf_counter()
    method.one(q[0], 10)
    out["first_s"] = time.perf_counter() - t  # the first search after the build (any deferred work)
    for i in range(20):  # warm-up
        method.one(q[i], 10)

    def single(count):
        times = []
        for i in range(count):
            t = time.perf_counter()
            method.one(q[i % len(q)], 10)
            times.append(time.perf_counter() - t)
        return float(np.percentile(times, 50)), float(np.percentile(times, 99))

    out["p50_s"], out["p99_s"] = single(args.single)
    if args.load:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            out["loaded_p50_s"], out["loaded_p99_s"] = single(args.single)
        finally:
            busy.kill()
    qps = {}
    for b in BATCHES:
        reps = max(3, 2000 // b)
        t = time.perf_counter()
        for r in range(reps):
            s = (r * b) % len(q)
            method.search(q[s:s + b] if s + b <= len(q) else q[:b], 10)
        qps[b] = reps * b / (time.perf_counter() - t)
    out["qps"] = qps
    out["recall10"] = _recall(method.search(q, 10), gt)
    out["threads_qps"] = {n: _threaded_qps(method, q, n) for n in (1, 4)}
    report(out)


def _read_rate(args) -> tuple[float, float]:
    """(MB, GB/s): how fast one core reads an array the size of the index's 4-bit codes, summed by numpy,
    best of 20 passes. It bounds a single-threaded scan that reads every code once."""
    rows = len(load_ip_dataset(args.dataset)[1]) if args.dataset else args.synthetic
    words = np.ones(rows * args.dim // 2 // 8, np.uint64)
    best = min(_timed(words.sum) for _ in range(20))
    return words.nbytes / 1e6, words.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--synthetic", type=int, default=None, help="rows of synthetic clustered unit vectors")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--single", type=int, default=500, help="single queries timed per process")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--load", action="store_true", help="also time single queries with one core kept busy")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--worker-bits", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return worker(args)
    if not (args.dataset or args.synthetic):
        raise SystemExit("give --dataset or --synthetic")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    runs = []
    for rnd in range(args.rounds):
        for bits in args.bits:
            for method in args.methods:
                if method == "usearch-i8" and bits != args.bits[0]:
                    continue  # HNSW has no bit width: once per round
                cmd = [sys.executable, __file__, "--method", method, "--worker-bits", str(bits), "--threads",
                       str(args.threads), "--single", str(args.single), "--dim", str(args.dim)]
                cmd += ["--dataset", args.dataset] if args.dataset else ["--synthetic", str(args.synthetic)]
                cmd += ["--load"] if args.load else []
                result = run_worker(cmd, env)
                if result is None:
                    continue
                result["round"] = rnd
                runs.append(result)
                print(f"round {rnd} {method:17s} {bits}b p50 {result['p50_s'] * 1e3:.3f} ms  "
                      f"p99 {result['p99_s'] * 1e3:.3f} ms  QPS@1000 {result['qps']['1000']:,.0f}  "
                      f"R@10 {result['recall10']:.4f}", flush=True)
    env_info = environment()
    read_mb, read_gbs = _read_rate(args)
    tag = args.tag or (os.path.basename(args.dataset).split(".")[0] if args.dataset else f"synthetic-{args.synthetic}")
    write_json(RESULTS / f"latency-{tag}.json", {"runs": runs, "threads": args.threads})
    lines = [f"`{' '.join(sys.argv)}` on {env_info.get('cpu', '?')}, {args.threads} threads; median over "
             f"{args.rounds} rounds of fresh processes (round-robin). One core reads {read_gbs:.1f} GB/s from a "
             f"{read_mb:.0f} MB array, the 4-bit codes' size (numpy sum, best of 20).", "",
             "| bits | method | SIMD | recall@10 | first ms | p50 ms | p99 ms | " +
             ("loaded p50 | loaded p99 | " if args.load else "") + " | ".join(f"QPS@{b}" for b in BATCHES) + " | 4 threads × 1 query / 1 thread | build s |",
             "|---:|---|---|---:|---:|---:|---:|" + ("---:|---:|" if args.load else "") + "---:|" * len(BATCHES) +
             "---:|---:|"]
    for bits in args.bits:
        for method in args.methods:
            rows = [r for r in runs if r["method"] == method and (r["bits"] == bits or method == "usearch-i8")]
            if not rows or (method == "usearch-i8" and bits != args.bits[0]):
                continue
            med = lambda key: float(np.median([r[key] for r in rows]))  # noqa: E731
            qps = [float(np.median([r["qps"][str(b)] for r in rows])) for b in BATCHES]
            loaded = f"{med('loaded_p50_s') * 1e3:.3f} | {med('loaded_p99_s') * 1e3:.3f} | " if args.load else ""
            threads = float(np.median([r["threads_qps"]["4"] / r["threads_qps"]["1"] for r in rows]))
            lines.append(f"| {bits if method != 'usearch-i8' else '8 (i8)'} | {method} | {rows[0]['simd']} | "
                         f"{med('recall10'):.4f} | {med('first_s') * 1e3:.2f} | {med('p50_s') * 1e3:.3f} | "
                         f"{med('p99_s') * 1e3:.3f} | {loaded}" + " | ".join(f"{v:,.0f}" for v in qps) +
                         f" | {threads:.2f}x | {med('build_s'):.2f} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"latency-{tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
