"""Codebooks compared at equal bytes: recall and batch QPS, the timed searches interleaved.

    python bench/bench_codebooks.py --dataset glove-50 --bits 4.48 5
    python bench/bench_codebooks.py --dataset dbpedia-titles-minilm-100k --bits 2 4.38

For each width, the same index is built with codebook="vq" at the current codebook version (block
codebooks at 1-2 bits, bit-plane 5-bit codes), "vq" at codebook version 1 (Lloyd-Max 5-bit codes)
and "scalar" (the paper's Lloyd-Max codebooks everywhere), plus turbovec at whole widths of 1-4
bits when it is installed, as the peer measured in the same run. Speed differences between
codebooks are often 10-20%, about the run-to-run noise of a shared machine, so the timed searches
go round-robin (one batch of every method, then the next round) and each method's QPS is the
median over the rounds. Writes bench/results/codebooks-<dataset>.json and .md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import RESULTS, command_line, load_ip_dataset, write_json

from tqindex import CODEBOOK_VERSION, Index, QuantizerOptions
from tqindex.datasets import recall_1_at_k, recall_at_k

CONFIGS = [("vq", CODEBOOK_VERSION), ("vq", 1), ("scalar", CODEBOOK_VERSION)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="glove-50")
    parser.add_argument("--bits", type=float, nargs="+", default=[4.48, 5.0])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=9, help="timed batches per method, interleaved")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ds, x, q = load_ip_dataset(args.dataset)
    gt = ds.groundtruth(args.k)
    dim = x.shape[1]
    print(f"{ds.name}: n={len(x)} d={dim} queries={len(q)}", flush=True)

    rows, searches = [], []
    for bits in args.bits:
        seen = set()
        for codebook, version in CONFIGS:
            index = Index(dim=dim, bits=bits, seed=args.seed,
                          options=QuantizerOptions(codebook=codebook, codebook_version=version))
            # Configurations whose codebooks coincide at this width (e.g. no 5-bit group) are one row.
            key = tuple(g.centroids.numpy().tobytes() + (g.codewords.numpy().tobytes()) for g in index._quantizer.groups)
            if key in seen:
                continue
            seen.add(key)
            start = time.perf_counter()
            index.add(x)
            build = time.perf_counter() - start
            ids = index.search(q, args.k).ids
            rows.append({"bits": index.bits, "method": f"tqindex {codebook} v{version}", "build_s": build,
                         "bytes_per_vector": index.bytes_per_vector(),
                         "recall": recall_at_k(ids, gt, args.k), "recall_1": recall_1_at_k(ids, gt, args.k)})
            searches.append(lambda index=index: index.search(q, args.k))
            print(rows[-1], flush=True)
        if float(bits).is_integer() and 1 <= bits <= 4:
            try:
                import turbovec
            except ImportError:
                continue
            pad = -dim % 8  # turbovec needs a multiple of 8 dimensions: zero padding keeps inner products
            xp, qp = np.pad(x, ((0, 0), (0, pad))), np.pad(q, ((0, 0), (0, pad)))
            peer = turbovec.TurboQuantIndex(dim + pad, int(bits))
            start = time.perf_counter()
            peer.add(xp)
            peer.prepare()
            build = time.perf_counter() - start
            ids = peer.search(qp, args.k)[1]
            rows.append({"bits": int(bits), "method": "turbovec" + (f" (zero-padded to {dim + pad}-d)" if pad else ""),
                         "build_s": build, "bytes_per_vector": None,
                         "recall": recall_at_k(ids, gt, args.k), "recall_1": recall_1_at_k(ids, gt, args.k)})
            searches.append(lambda peer=peer, qp=qp: peer.search(qp, args.k))
            print(rows[-1], flush=True)

    times = [[] for _ in searches]
    for fn in searches:  # warm-up
        fn()
    for _ in range(args.rounds):
        for i, fn in enumerate(searches):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    for row, t in zip(rows, times):
        row["qps"] = len(q) / float(np.median(t))
        row["qps_rounds"] = [len(q) / s for s in t]

    lines = [f"`{command_line()}`",
             "", f"{ds.name}: n={len(x)}, d={dim}, {len(q)} queries, k={args.k}; QPS: median of {args.rounds} "
             "interleaved batches", "",
             "| bits | method | recall@10 | Recall@1@10 | bytes/vec | build s | QPS |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        size = "" if r["bytes_per_vector"] is None else f"{r['bytes_per_vector']:.0f}"
        lines.append(f"| {r['bits']:.3g} | {r['method']} | {r['recall']:.4f} | {r['recall_1']:.4f} | {size} | "
                     f"{r['build_s']:.2f} | {r['qps']:,.0f} |")
    text = "\n".join(lines)
    name = f"codebooks-{ds.name}"
    write_json(RESULTS / f"{name}.json", {"dataset": ds.name, "k": args.k, "rounds": args.rounds, "rows": rows})
    (RESULTS / f"{name}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
