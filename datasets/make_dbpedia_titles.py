"""Build the DBpedia-titles / all-MiniLM-L6-v2 dataset (see datasets/README.md).

    python datasets/make_dbpedia_titles.py --n 100000 [--queries 1000] [--seed 0] [--force]
"""

import argparse

from tqindex.datasets import dbpedia


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args()
    print(dbpedia.build(args.n, n_queries=args.queries, seed=args.seed, force=args.force))


if __name__ == "__main__":
    main()
