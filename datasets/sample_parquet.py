"""Sample a DBpedia-OpenAI parquet set into an ann-benchmarks HDF5 file with exact ground truth.

    python datasets/sample_parquet.py data/*.parquet --n 100000 --queries 1000 --out dbpedia-100k-ip.hdf5

As in the paper: n database vectors and distinct queries drawn without replacement (seed 0), inner product.
"""

import argparse

import numpy as np

from tqindex.datasets import read_parquet_embeddings, write_ann_benchmarks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--column", default=None, help="embedding column (default: the one list column)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    vectors, titles = read_parquet_embeddings(args.files, column=args.column)
    if args.n + args.queries > len(vectors):
        raise SystemExit(f"only {len(vectors)} rows; cannot sample {args.n} + {args.queries}")
    pick = np.random.default_rng(args.seed).choice(len(vectors), args.n + args.queries, replace=False)
    texts = (titles[i] for i in pick) if titles else None
    texts = list(texts) if texts is not None else None
    write_ann_benchmarks(args.out, vectors[pick[:args.n]], vectors[pick[args.n:]], "ip",
                         texts=None if texts is None else (texts[:args.n], texts[args.n:]))
    print(args.out)


if __name__ == "__main__":
    main()
