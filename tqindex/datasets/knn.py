"""Exact k-nearest-neighbour ground truth and recall measures (for benchmarks and tests)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["exact_knn", "recall_at_k", "recall_1_at_k", "METRIC_ALIASES"]

METRIC_ALIASES = {"angular": "cosine", "cosine": "cosine", "euclidean": "l2", "l2": "l2", "ip": "ip", "dot": "ip",
                  "inner_product": "ip"}
_GT_BLOCK_BYTES = 256 << 20


def exact_knn(database, queries: np.ndarray, k: int, metric: str, *, block_rows: int | None = None):
    """Exact top-k by brute force in blocks (memory bounded by the block, not by n).

    Parameters
    ----------
    database : (n, d) array, or an iterable of (b, d) blocks
    queries : (nq, d) array
    k : int
    metric : "ip", "cosine" or "l2"

    Returns
    -------
    ids : (nq, k) int64, best first; ties broken by the smaller id
    scores : (nq, k) float32; similarity (ip/cosine) or squared distance (l2)
    """
    metric = METRIC_ALIASES[metric]
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).double()
    if metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
    nq, d = q.shape
    rows = block_rows or max(1024, _GT_BLOCK_BYTES // (8 * (nq + d)))
    blocks = (database[i:i + rows] for i in range(0, len(database), rows)) if hasattr(database, "__getitem__") \
        else database
    best = torch.full((nq, k), -torch.inf, dtype=torch.float64)
    best_ids = torch.full((nq, k), -1, dtype=torch.int64)
    offset = 0
    for block in blocks:
        x = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).double()
        if metric == "cosine":
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
        s = q @ x.T
        if metric == "l2":
            s = 2 * s - x.square().sum(1)[None, :] - q.square().sum(1)[:, None]
        ids = torch.arange(offset, offset + len(x)).expand(nq, -1)
        merged = torch.cat([best, s], 1)
        merged_ids = torch.cat([best_ids, ids], 1)
        # Stable ordering: sort by id first, then stably by score, so equal scores keep id order.
        by_id = torch.argsort(merged_ids, dim=1)
        merged, merged_ids = torch.gather(merged, 1, by_id), torch.gather(merged_ids, 1, by_id)
        order = torch.argsort(-merged, dim=1, stable=True)[:, :k]
        best, best_ids = torch.gather(merged, 1, order), torch.gather(merged_ids, 1, order)
        offset += len(x)
    scores = -best if metric == "l2" else best
    return best_ids.numpy(), scores.float().numpy()


def recall_at_k(found: np.ndarray, gt_ids: np.ndarray, k: int, gt_scores: np.ndarray | None = None,
                metric: str = "ip", *, tie_eps: float = 1e-6) -> float:
    """Mean intersection recall@k: |found[:k] ∩ true top-k| / k.

    Tie-aware when `gt_scores` is given: every ground-truth row scoring within `tie_eps` (relative)
    of the true k-th counts as a true top-k row (ann-benchmarks counts ties the same way), while
    still at most k hits are counted per query.
    """
    found = np.asarray(found)[:, :k]
    if gt_scores is None:
        allowed = [set(row[:k].tolist()) for row in gt_ids]
    else:
        sign = -1.0 if METRIC_ALIASES[metric] == "l2" else 1.0
        s = sign * np.asarray(gt_scores, dtype=np.float64)
        kth = s[:, k - 1:k]
        ok = s >= kth - tie_eps * np.maximum(np.abs(kth), 1e-12)
        allowed = [set(ids[mask].tolist()) for ids, mask in zip(gt_ids, ok)]
    hits = [min(k, len(set(f.tolist()) & a)) for f, a in zip(found, allowed)]
    return float(np.mean(hits) / k)


def recall_1_at_k(found: np.ndarray, gt_ids: np.ndarray, k: int) -> float:
    """Recall@1@k: fraction of queries whose true nearest neighbour is among the first k found."""
    found = np.asarray(found)[:, :k]
    return float(np.mean([gt[0] in f for f, gt in zip(found, gt_ids)]))

