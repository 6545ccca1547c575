"""Datasets for benchmarks and examples: readers, named real sets, exact ground truth, recall.

Not imported by ``import tqindex``: the index needs none of it, and its optional dependencies
(h5py, tqdm, sentence-transformers for the DBpedia recipe) are imported only where used.
"""

from .cache import cache_dir
from .formats import (AnnBenchmarksDataset, ArrayDataset, Dataset, read_bin, read_parquet_embeddings, read_vecs,
                      write_ann_benchmarks, write_bin, write_vecs)
from .knn import exact_knn, recall_1_at_k, recall_at_k
from .named import NAMED_DATASETS, load_dataset

__all__ = ["AnnBenchmarksDataset", "ArrayDataset", "Dataset", "NAMED_DATASETS", "cache_dir", "exact_knn",
           "load_dataset", "read_bin", "read_parquet_embeddings", "read_vecs", "recall_1_at_k", "recall_at_k",
           "write_ann_benchmarks", "write_bin", "write_vecs"]
