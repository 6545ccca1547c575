"""Command line: ``tqindex bench`` (build + search a real dataset, print recall and speed) and
``tqindex info PATH`` (describe a saved index)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _bench(args) -> int:
    from tqdm import tqdm

    from . import Index
    from .datasets import load_dataset, recall_1_at_k, recall_at_k

    print(f"dataset: {args.dataset}", flush=True)
    ds = load_dataset(args.dataset)
    queries = ds.queries()
    k_max = 100
    gt_ids, gt_scores = ds.groundtruth(k_max), ds.groundtruth_scores(k_max)
    index = Index(dim=ds.dim, bits=args.bits, metric=ds.metric, variant=args.variant, seed=args.seed,
                  keep_vectors=args.rerank > 0, scale_dtype=args.scale_dtype, codebook=args.codebook)
    start = time.perf_counter()
    with tqdm(total=len(ds), desc=f"indexing {args.variant} {args.bits}-bit", unit="vec") as bar:
        for block in ds.database_iterator(args.add_batch):
            index.add(block)
            bar.update(len(block))
    build_s = time.perf_counter() - start
    index.search(queries[:8], k_max, rerank=args.rerank)  # warm-up (thread pools, caches)
    timings = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        result = index.search(queries, k_max, rerank=args.rerank)
        timings.append(time.perf_counter() - start)
    search_s = float(np.median(timings))
    report = {
        "dataset": ds.name, "n": len(ds), "dim": ds.dim, "metric": ds.metric, "queries": len(queries),
        "bits": args.bits, "variant": args.variant, "codebook": args.codebook, "rerank": args.rerank, "seed": args.seed,
        "recall@1": recall_at_k(result.ids, gt_ids, 1, gt_scores, ds.metric),
        "recall@10": recall_at_k(result.ids, gt_ids, 10, gt_scores, ds.metric),
        "recall@100": recall_at_k(result.ids, gt_ids, 100, gt_scores, ds.metric),
        "recall_1@10": recall_1_at_k(result.ids, gt_ids, 10),
        "bytes_per_vector": index.bytes_per_vector(),
        "float32_bytes_per_vector": 4 * ds.dim,
        "build_s": build_s, "vectors_per_s": len(ds) / build_s,
        "search_s": search_s, "qps": len(queries) / search_s,
    }
    print(f"\n{ds.name}: n={len(ds)} d={ds.dim} metric={ds.metric} queries={len(queries)}")
    print(f"tqindex {args.variant} {args.bits}-bit" + (f", rerank x{args.rerank}" if args.rerank else ""))
    for key in ("recall@1", "recall@10", "recall@100", "recall_1@10"):
        print(f"  {key:<12} {report[key]:.4f}")
    print(f"  bytes/vector {report['bytes_per_vector']} (float32: {report['float32_bytes_per_vector']})")
    print(f"  build        {build_s:.2f} s ({report['vectors_per_s']:,.0f} vectors/s)")
    print(f"  search       {search_s:.3f} s for {len(queries)} queries, k={k_max} ({report['qps']:,.0f} QPS)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def _info(args) -> int:
    from . import Index
    index = Index.load(args.path, verify=not args.no_verify)
    print(index)
    print(json.dumps(index.params(), indent=1))
    print(f"bytes/vector {index.bytes_per_vector()}; shards {len(index._segments)}")
    return 0


def _bits(text: str):
    value = float(text)
    return int(value) if value.is_integer() else value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tqindex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="build an index over a real dataset and report recall and speed")
    bench.add_argument("--dataset", default="dbpedia-titles-minilm-20k",
                       help="a name (dbpedia-titles-minilm-20k, dbpedia-titles-minilm-100k, glove-50) or a file "
                            "(.hdf5 ann-benchmarks, .parquet, .npy, .fvecs, .fbin)")
    bench.add_argument("--bits", type=_bits, default=4, help="bits per coordinate: 1..8, or fractional, e.g. 2.5")
    bench.add_argument("--variant", choices=["mse", "prod"], default="mse")
    bench.add_argument("--scale-dtype", choices=["float32", "float16"], default="float32",
                       help="storage of the per-vector scale (float16: 2 bytes less per vector)")
    bench.add_argument("--codebook", choices=["vq", "scalar"], default="vq",
                       help="block codebooks for 1- and 2-bit codes (vq) or the paper's scalar one")
    bench.add_argument("--rerank", type=int, default=0)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--repeat", type=int, default=3, help="timed search repetitions (median reported)")
    bench.add_argument("--add-batch", type=int, default=16384)
    bench.add_argument("--json", help="also write the figures to this JSON file")
    bench.set_defaults(func=_bench)
    info = sub.add_parser("info", help="describe a saved index")
    info.add_argument("path")
    info.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
