"""Filtered search: QPS and recall@10 at several selectivities, tqindex against turbovec's allow-list search
and faiss's IDSelector, and what payload columns cost tqindex on add, save and load.

    python bench/bench_filter.py --dataset ../shared/data/dbpedia-titles-minilm-384-ip.hdf5

Synthetic metadata: each row gets a seeded random `bucket` in 0..999 and a short text; a filter of
selectivity s allows the rows with bucket < 1000·s (0.1%, 1%, 10%, 50%, 100%). Recall@10 is against the
exact top 10 of the allowed rows (float32 inner products). Each method runs in its own fresh process,
round-robin over rounds; a batch of all queries per call, k = 10, the median of 3 timings. tqindex is run
twice: with the filter as an id allow-list and as a pyarrow expression over its payload. Writes
bench/results/filter-<dataset>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from common import RESULTS, environment, load_ip_dataset, report, run_worker, write_json

METHODS = ("tqindex-ids", "tqindex-expr", "turbovec", "faiss-pqfastscan", "faiss-rabitq")
SELECTIVITIES = (0.001, 0.01, 0.1, 0.5, 1.0)
K = 10


def _metadata(n: int):
    rng = np.random.default_rng(7)
    bucket = rng.integers(0, 1000, n)
    text = [f"title {i} bucket {b}" for i, b in enumerate(bucket)]
    return bucket, text


def _truth(x, q, allowed):
    rows = np.flatnonzero(allowed)
    scores = q @ x[rows].T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return rows[top]


def _recall(found, truth):
    hits = [len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits)) / min(K, truth.shape[1]) if truth.shape[1] else 1.0


def _timed(fn, repeat=3):
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def worker(args) -> None:
    _, x, q = load_ip_dataset(args.dataset)
    x, q = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(q, np.float32)
    bucket, text = _metadata(len(x))
    out = {"method": args.method, "bits": args.bits, "rows": len(x), "queries": len(q), "by_selectivity": {}}
    method = args.method
    if method.startswith("tqindex"):
        import pyarrow.compute as pc
        from tqindex import Index, native
        out["simd"] = native.simd()
        start = time.perf_counter()
        bare = Index(dim=x.shape[1], bits=args.bits)
        bare.add(x)
        out["add_s"] = time.perf_counter() - start
        start = time.perf_counter()
        index = Index(dim=x.shape[1], bits=args.bits)
        index.add(x, metadata={"bucket": bucket, "text": text})
        out["add_with_payload_s"] = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            for name, ix in (("bare", bare), ("payload", index)):
                start = time.perf_counter()
                ix.save(os.path.join(tmp, name))
                out[f"save_{name}_s"] = time.perf_counter() - start
                out[f"disk_{name}_bytes"] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
                                                os.walk(os.path.join(tmp, name)) for f in fs)
                start = time.perf_counter()
                Index.load(os.path.join(tmp, name), mmap=True)
                out[f"load_{name}_s"] = time.perf_counter() - start

        def search(s):
            if method == "tqindex-expr":
                where = pc.field("bucket") < int(1000 * s)
            else:
                where = np.flatnonzero(bucket < int(1000 * s))
            return index.search(q, K, filter=where).ids
    elif method == "turbovec":
        import turbovec
        out["simd"] = "its own dispatch (not reported)"
        index = turbovec.IdMapIndex(x.shape[1], args.bits)
        index.add_with_ids(x, np.arange(len(x), dtype=np.uint64))
        index.prepare()

        def search(s):
            allow = np.flatnonzero(bucket < int(1000 * s)).astype(np.uint64)
            _, ids = index.search(q, K, allowlist=allow)
            ids = ids.astype(np.int64)
            return np.concatenate([ids, np.full((len(ids), K - ids.shape[1]), -1)], axis=1) if ids.shape[1] < K else ids
    else:
        import faiss
        out["simd"] = faiss.get_compile_options().strip()
        if method == "faiss-rabitq":
            rabitq = faiss.IndexRaBitQ(x.shape[1], faiss.METRIC_INNER_PRODUCT, args.bits)
            rabitq.qb = 8
            index = faiss.IndexPreTransform(faiss.RandomRotationMatrix(x.shape[1], x.shape[1]), rabitq)
        else:
            index = faiss.IndexPQFastScan(x.shape[1], x.shape[1] * args.bits // 4, 4, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.add(x)

        def search(s):
            sel = faiss.IDSelectorBatch(np.flatnonzero(bucket < int(1000 * s)).astype(np.int64))
            params = faiss.SearchParameters(sel=sel)
            return index.search(q, K, params=params)[1]
    for s in SELECTIVITIES:
        allowed = bucket < int(1000 * s)
        try:
            seconds, found = _timed(lambda: search(s))
        except Exception as exc:  # a peer without filtered search for this index type
            out["by_selectivity"][str(s)] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
            continue
        out["by_selectivity"][str(s)] = {"qps": len(q) / seconds, "recall@10": _recall(np.asarray(found),
                                                                                      _truth(x, q, allowed)),
                                         "allowed": int(allowed.sum())}
    report(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return worker(args)
    results = {}
    for r in range(args.rounds):
        for method in args.methods:
            res = run_worker([sys.executable, __file__, "--dataset", args.dataset, "--bits", str(args.bits),
                              "--method", method])
            if res is not None:
                results.setdefault(method, []).append(res)
                print(f"round {r} {method:17s}", {s: v.get("qps", v.get("error")) for s, v in
                                                  res["by_selectivity"].items()}, flush=True)
    env = environment()
    cpu = env.get("cpu", "?")
    name = os.path.basename(args.dataset).split(".")[0]
    lines = [f"`bench_filter.py --dataset {args.dataset} --bits {args.bits} --rounds {args.rounds}` on {cpu}, "
             f"{os.cpu_count()} threads; {K} results per query, all queries per call; QPS is the median over "
             f"rounds of fresh processes.", "",
             "| method | SIMD | " + " | ".join(f"{100 * s:g}%: QPS / recall@10" for s in SELECTIVITIES) + " |",
             "|---|---|" + "---:|" * len(SELECTIVITIES)]
    for method, runs in results.items():
        cells = []
        for s in SELECTIVITIES:
            values = [r["by_selectivity"][str(s)] for r in runs]
            if "error" in values[0]:
                cells.append("not supported")
                continue
            qps = float(np.median([v["qps"] for v in values]))
            cells.append(f"{qps:,.0f} / {values[0]['recall@10']:.4f}")
        lines.append(f"| {method} | {runs[0]['simd']} | " + " | ".join(cells) + " |")
    tq = results.get("tqindex-ids", results.get("tqindex-expr", []))
    if tq:
        r = tq[0]
        n = r["rows"]
        lines += ["", "Payload cost in tqindex (a `bucket` int64 and a ~25-byte text per row), one process:", "",
                  "| | without payload | with payload |", "|---|---:|---:|",
                  f"| add ({n:,} rows), s | {r['add_s']:.2f} | {r['add_with_payload_s']:.2f} |",
                  f"| save, s | {r['save_bare_s']:.2f} | {r['save_payload_s']:.2f} |",
                  f"| on disk, bytes per row | {r['disk_bare_bytes'] / n:.1f} | {r['disk_payload_bytes'] / n:.1f} |",
                  f"| load (mmap), s | {r['load_bare_s']:.3f} | {r['load_payload_s']:.3f} |"]
    md = "\n".join(lines) + "\n"
    print(md)
    write_json(RESULTS / f"filter-{name}.json", {"results": results})
    (RESULTS / f"filter-{name}.md").write_text(md)


if __name__ == "__main__":
    main()
