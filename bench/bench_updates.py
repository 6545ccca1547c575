"""Latency of one-row changes and of the search that follows each: what an application that adds,
replaces and deletes documents one at a time waits for.

    python bench/bench_updates.py --rows 100000 1000000 --partitions 0 1024

Each (rows, partitions) runs in its own fresh process: an index of that many synthetic unit vectors
(384-d, 2 bits; added in one call, ids 0..rows-1) and then, `--repeat` times in turn, one-row
`add` with a fresh id, the single-query `search` after it, `add(..., upsert=True)` of an existing id,
the search after it, `remove` of one id, and the search after it. Medians and 99th percentiles in ms;
"search" is the median of the three searches that each follow a change (the first on a new snapshot,
which makes what a snapshot keeps for its searches). Writes bench/results/updates-<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from common import RESULTS, environment, report, run_worker, unit_vectors, write_json

STEPS = ("add", "upsert", "remove", "search")


def worker(args) -> None:
    import tqindex
    x = unit_vectors(args.worker_rows + args.repeat, args.dim)
    index = tqindex.Index(dim=args.dim, bits=args.bits, partitions=args.worker_partitions, seed=0)
    index.add(x[:args.worker_rows])
    query = x[7].copy()
    index.search(query, 10)
    rng = np.random.default_rng(1)
    times = {step: [] for step in STEPS}

    def timed(step, fn):
        start = time.perf_counter()
        fn()
        times[step].append(time.perf_counter() - start)

    fresh = args.worker_rows
    for i in range(args.repeat):
        timed("add", lambda: index.add(x[fresh + i:fresh + i + 1], ids=[index.next_id]))
        timed("search", lambda: index.search(query, 10))
        target = int(rng.integers(0, args.worker_rows))
        if target in index:
            timed("upsert", lambda: index.add(x[target:target + 1] * 1.0, ids=[target], upsert=True))
            timed("search", lambda: index.search(query, 10))
            timed("remove", lambda: index.remove([target]))
            timed("search", lambda: index.search(query, 10))
    out = {"rows": args.worker_rows, "partitions": args.worker_partitions, "segments": len(index._view.segments),
           "simd": tqindex.native.simd()}
    for step, values in times.items():
        ms = 1e3 * np.asarray(values)
        out[step] = {"p50": float(np.median(ms)), "p99": float(np.percentile(ms, 99)), "count": len(ms)}
    report(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--partitions", type=int, nargs="+", default=[0, 1024])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--tag", default="")
    parser.add_argument("--worker-rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-partitions", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_rows is not None:
        return worker(args)
    runs = []
    for rows in args.rows:
        for partitions in args.partitions:
            result = run_worker([sys.executable, __file__, "--dim", str(args.dim), "--bits", str(args.bits),
                                 "--repeat", str(args.repeat), "--worker-rows", str(rows),
                                 "--worker-partitions", str(partitions)])
            if result:
                runs.append(result)
                print(result, flush=True)
    env = environment()
    tag = "-".join(filter(None, ["updates", args.tag]))
    write_json(RESULTS / f"{tag}.json", {"runs": runs})
    lines = [f"`{' '.join(sys.argv)}` on {env.get('cpu', '?')} ({env.get('cpus')} cores), {args.dim}-d, "
             f"{args.bits} bits, {args.repeat} rounds of one-row changes; ms, median / 99th percentile.", "",
             "| rows | lists | segments after | add | upsert | remove | search after a change | SIMD |",
             "|---:|---:|---:|---|---|---|---|---|"]
    for r in runs:
        cells = " | ".join(f"{r[s]['p50']:.3f} / {r[s]['p99']:.3f}" for s in STEPS)
        lines.append(f"| {r['rows']:,} | {r['partitions'] or 'flat'} | {r['segments']} | {cells} | {r['simd']} |")
    (RESULTS / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
