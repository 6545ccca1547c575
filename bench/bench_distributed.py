"""tqindex.distributed on this machine: build throughput and search QPS with 1, 2 and 4 shard actors, and
the driver's own cost per query batch (putting the queries in the object store, merging the answers).

    python bench/bench_distributed.py --rows 1000000 --dim 384 --bits 4

Synthetic unit vectors. A local Ray (`ray.init(num_cpus=4)`: logical CPUs; the machine's cores are what
they are, so on a 2-core machine more actors share the same cores). The single-process `Index` on the same
directory is timed in the same run for reference. Writes bench/results/distributed-<rows>x<dim>-<bits>bit.json
and .md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from common import RESULTS, environment, unit_vectors, write_json


def _median(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    import ray
    import tqindex.distributed as td
    from tqindex import Index
    from tqindex.distributed import _merge

    x = unit_vectors(args.rows, args.dim, 0)
    q = unit_vectors(args.queries, args.dim, 1)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    out = {"rows": args.rows, "dim": args.dim, "bits": args.bits, "queries": args.queries, "actors": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ix")
        start = time.perf_counter()
        td.build(x, path, dim=args.dim, bits=args.bits, block_rows=100_000)
        out["build_s"] = time.perf_counter() - start
        start = time.perf_counter()
        Index(dim=args.dim, bits=args.bits).add(x)
        out["single_add_s"] = time.perf_counter() - start
        single = Index.load(path)
        single.search(q[:10], 10)
        out["single"] = {"batch_qps": args.queries / _median(lambda: single.search(q, 10), 3),
                         "one_query_ms": 1e3 * _median(lambda: single.search(q[0], 10), 21)}
        for actors in args.actors:
            index = td.DistributedIndex.open(path, num_actors=actors)
            index.search(q[:10], 10)
            batch = _median(lambda: index.search(q, 10), 3)
            one = _median(lambda: index.search(q[0], 10), 21)
            put = _median(lambda: ray.put(q), 11)
            parts = [(np.tile(np.arange(10), (args.queries, 1)), np.random.default_rng(i).random((args.queries, 10),
                      dtype=np.float32)) for i in range(actors)]
            merge = _median(lambda: _merge(parts, 10, "ip", args.queries), 11)
            out["actors"][actors] = {"batch_qps": args.queries / batch, "one_query_ms": 1e3 * one,
                                     "put_ms": 1e3 * put, "merge_ms": 1e3 * merge}
            index.close()
    ray.shutdown()
    env = environment()
    lines = [f"`bench_distributed.py --rows {args.rows} --dim {args.dim} --bits {args.bits}` on {env.get('cpu', '?')}, "
             f"{os.cpu_count()} cores, local Ray with 4 logical CPUs; {args.queries} queries per batch, k = 10.", "",
             f"Build: {args.rows / out['build_s']:,.0f} rows/s on Ray tasks (10 blocks) against "
             f"{args.rows / out['single_add_s']:,.0f} rows/s for one `Index.add` in the driver.", "",
             "| shares | batch QPS | one query, ms | driver: put queries, ms | driver: merge, ms |", "|---|---:|---:|---:|---:|",
             f"| one `Index` (no Ray) | {out['single']['batch_qps']:,.0f} | {out['single']['one_query_ms']:.2f} | – | – |"]
    for actors, r in out["actors"].items():
        lines.append(f"| {actors} actor{'s' if actors > 1 else ''} | {r['batch_qps']:,.0f} | {r['one_query_ms']:.2f} | "
                     f"{r['put_ms']:.3f} | {r['merge_ms']:.3f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    name = f"distributed-{args.rows}x{args.dim}-{args.bits}bit"
    write_json(RESULTS / f"{name}.json", out)
    (RESULTS / f"{name}.md").write_text(md)


if __name__ == "__main__":
    main()
