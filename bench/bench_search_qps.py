"""Batch search QPS of the default index at 2 and 4 bits on one dataset, for A/B runs of two checkouts.

    python bench/bench_search_qps.py --dataset ../shared/data/dbpedia-titles-minilm-384-ip.hdf5 --tag new

Run it alternately from each checkout's own environment (round-robin, several rounds) on a quiet machine and
compare the medians; it prints one line per run: tag, CPU, SIMD level, QPS per width.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import environment, load_ip_dataset

from tqindex import Index, native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--bits", type=float, nargs="+", default=[2, 4])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    _, x, q = load_ip_dataset(args.dataset)
    out = []
    for bits in args.bits:
        index = Index(dim=x.shape[1], bits=int(bits) if bits == int(bits) else bits)
        index.add(x)
        index.search(q, 10)  # warm-up: the fast-scan layout is built here
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            index.search(q, 10)
            times.append(time.perf_counter() - start)
        out.append(f"{bits:g}b {len(q) / np.median(times):,.0f} QPS")
    print(args.tag, environment().get("cpu", "?"), native.simd(), *out)


if __name__ == "__main__":
    main()
