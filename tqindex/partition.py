"""The coarse quantizer of a partitioned index: k-means centroids, row assignment, list probing.

A partitioned index (`Index(partitions=nlist)`) keeps each row in the list of its nearest centroid
c and codes the residual x − c with the same rotation and codebooks as the flat index. A query's
score against a row of list L is then its score against the residual's codes plus one number per
(query, list): ⟨q, c_L⟩ for "ip" and "cosine", 2⟨q, c_L⟩ for "l2" (whose codes keep ‖x‖ itself, so
−‖q − x‖² = 2⟨q, c⟩ + 2⟨q, r̃⟩ − ‖x‖² − ‖q‖²). Lists are probed by the same score of their centroid.

The fit is seeded k-means: Lloyd iterations on a random sample of at most `max_sample` rows per
list, starting from sample rows drawn by the seed; a list left empty takes the sample row farthest
from its centroid. The fit is torch on the CPU; probing runs in the compiled kernels where built.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from . import native

__all__ = ["CoarseQuantizer", "MAX_PARTITIONS", "MIN_ROWS_PER_LIST", "fit_kmeans"]

#: Most lists a partitioned index may have (a bound a manifest is checked against too).
MAX_PARTITIONS = 1 << 20

#: Training needs at least this many sample rows per list (fewer leave lists without a real centroid).
MIN_ROWS_PER_LIST = 4
#: Queries a thread's share of a batch's probe gets at least.
_PROBE_QUERIES_PER_THREAD = 16
#: Rows per list the fit samples at most, as faiss. On DBpedia titles 1M × 384 with 1,024 lists, 256
#: rather than 64 raised recall@10 by 1.2 / 0.6 / 0.5 points at nprobe 32 / 64 / 128 and took the
#: build (add included) from 25 to 50 s on two cores; 20 iterations instead of 10 added 0.1 point.
DEFAULT_SAMPLE_PER_LIST = 256
#: Rows × lists per chunk of a distance computation (bounds its float32 temporary to 64 MiB).
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class CoarseQuantizer:
    """Fitted centroids and how they were fitted.

    centroids : (nlist, d) float32
    fit : what the manifest records (sample rows, iterations, seed, seconds)
    """

    centroids: torch.Tensor
    fit: dict

    def __post_init__(self):
        # Probing's operands, made once: Cᵀ (d, nlist) float32 and ‖c‖².
        c = self.centroids.numpy().astype(np.float32)
        object.__setattr__(self, "_centroids_t", np.ascontiguousarray(c.T))
        object.__setattr__(self, "_sq_norms", np.square(c, dtype=np.float32).sum(axis=1))

    @property
    def nlist(self) -> int:
        return self.centroids.shape[0]

    @property
    def centroids_t(self) -> np.ndarray:
        """Cᵀ (d, nlist) float32, C-contiguous: the probe's product operand."""
        return self._centroids_t

    @property
    def sq_norms(self) -> np.ndarray:
        """‖c‖² (nlist,) float32: what "l2" probing subtracts."""
        return self._sq_norms

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """(n,) int64: each row's nearest centroid by Euclidean distance (the shortest residual)."""
        return _nearest(x, self.centroids)

    def probe(self, q: torch.Tensor | np.ndarray, metric: str, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `nprobe` lists to scan per query, best first (ties to the lower list), and every list's
        score offset: what a list adds to every score of its rows, ⟨q, c⟩ (2⟨q, c⟩ for "l2"), which
        also ranks the lists (for "l2" less ‖c‖²: the nearest centroids). q: (nq, d) float32.

        Returns
        -------
        lists : (nq, nprobe) int64; offsets : (nq, nlist) float32
        """
        qs = np.ascontiguousarray(q.numpy() if isinstance(q, torch.Tensor) else q, dtype=np.float32)
        lists, offsets = self.probe_arrays(qs, metric, nprobe, native.enabled())
        return torch.from_numpy(lists), torch.from_numpy(offsets)

    def probe_arrays(self, qs: np.ndarray, metric: str, nprobe: int,
                     in_kernels: bool) -> tuple[np.ndarray, np.ndarray]:
        """`probe` of numpy queries qs (nq, d) float32, C-contiguous, as numpy arrays: in the kernels
        where `in_kernels`, else in numpy (the same lists and offsets)."""
        nprobe = min(nprobe, self.nlist)
        if in_kernels:
            # In the kernels: one call, the product summed as they sum it wherever a search probes; a
            # batch's queries in shares of the thread budget (on one core the probe kept the others idle).
            lists = np.empty((len(qs), nprobe), np.int64)
            offsets = np.empty((len(qs), self.nlist), np.float32)
            with native.thread_share() as share:
                native.kernels.probe(qs, self._centroids_t, self._sq_norms, lists, offsets, qs.shape[1], self.nlist,
                                     metric == "l2", max(1, min(share, len(qs) // _PROBE_QUERIES_PER_THREAD)))
            return lists, offsets
        offsets = qs @ self._centroids_t
        if metric == "l2":
            offsets *= 2
        key = offsets - self._sq_norms[None, :] if metric == "l2" else offsets  # l2: the nearest centroids
        # Best key first, ties to the lower list (a stable sort of every list), as the kernel orders them.
        top = np.argsort(-key, axis=1, kind="stable")[:, :nprobe]
        return np.ascontiguousarray(top, dtype=np.int64), offsets


def fit_kmeans(x: torch.Tensor, nlist: int, *, seed: int, iterations: int = 10,
               max_sample: int | None = None) -> CoarseQuantizer:
    """k-means with `nlist` centroids on (a seeded sample of) `x` (n, d) float32."""
    n = x.shape[0]
    if n < MIN_ROWS_PER_LIST * nlist:
        raise ValueError(f"training {nlist} lists needs at least {MIN_ROWS_PER_LIST * nlist} vectors "
                         f"({MIN_ROWS_PER_LIST} per list), got {n}")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    cap = (max_sample if max_sample is not None else DEFAULT_SAMPLE_PER_LIST) * nlist
    if n > cap:
        x = x[torch.randperm(n, generator=generator)[:cap]]
    sample = x.contiguous().float()
    centroids = sample[torch.randperm(len(sample), generator=generator)[:nlist]].clone()
    for _ in range(iterations):
        assign = _nearest(sample, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, sample)
        counts = torch.bincount(assign, minlength=nlist).to(sample.dtype)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if bool(empty.any()):
            # An empty list takes the sample rows farthest from their centroids, one each.
            far = (sample - centroids[assign]).square().sum(dim=1)
            rows = torch.topk(far, int(empty.sum())).indices
            centroids[torch.nonzero(empty)[:, 0]] = sample[rows]
    fit = {"sample_rows": int(len(sample)), "iterations": int(iterations), "seed": int(seed),
           "seconds": round(time.perf_counter() - started, 3)}
    return CoarseQuantizer(centroids.contiguous(), fit)


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n,) int64 nearest centroid by ‖x − c‖² = ‖c‖² − 2⟨x, c⟩ + const, in row chunks."""
    c_sq = centroids.square().sum(dim=1)
    rows = max(1, _CHUNK_ELEMENTS // max(1, centroids.shape[0]))
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for start in range(0, x.shape[0], rows):
        chunk = x[start:start + rows]
        out[start:start + len(chunk)] = torch.argmin(c_sq[None, :] - 2 * (chunk @ centroids.T), dim=1)
    return out
