"""Top-k selection with padding: the one merge every scan path, rerank and exact kNN use.

Scores are "higher is better" throughout (l2 paths negate squared distances first). A missing
result is score −inf with position −1, and any −inf score is reported as position −1, so removed
rows and padding look the same to the caller.
"""

from __future__ import annotations

import numpy as np
import torch

from . import native

__all__ = ["topk_padded", "topk_ordered", "merge_topk", "empty_topk"]


def empty_topk(nq: int, k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(nq, k) scores of −inf and positions of −1."""
    return (torch.full((nq, k), -torch.inf, dtype=torch.float32, device=device),
            torch.full((nq, k), -1, dtype=torch.int64, device=device))


def topk_padded(scores: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row, padded to k columns.

    Parameters
    ----------
    scores : (nq, m) float32, higher is better, −inf for no row
    positions : (nq, m) int64, aligned with `scores`
    k : int ≥ 1

    Returns
    -------
    scores (nq, k) float32 descending, −inf padding; positions (nq, k) int64, −1 where the score is −inf
    """
    nq, m = scores.shape
    take = min(k, m)
    best, order = torch.topk(scores, take, dim=1)
    best_pos = torch.gather(positions, 1, order)
    if take < k:
        pad_s, pad_p = empty_topk(nq, k - take, scores.device)
        best, best_pos = torch.cat([best, pad_s], 1), torch.cat([best_pos, pad_p], 1)
    return best, best_pos.masked_fill(torch.isneginf(best), -1)


def topk_ordered(scores: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_padded` (CPU tensors) with ties broken by position, the lower first: the order the
    native heaps keep, so merging partial answers gives the same result however rows were split.
    In the compiled kernels where built (a few microseconds), else in numpy."""
    s = np.ascontiguousarray(scores.numpy(), dtype=np.float32)
    p = np.ascontiguousarray(positions.numpy(), dtype=np.int64)
    nq, m = s.shape
    out_s = np.empty((nq, k), np.float32)
    out_p = np.empty((nq, k), np.int64)
    if native.kernels is not None:
        native.kernels.select(s, p, out_s, out_p)
        return torch.from_numpy(out_s), torch.from_numpy(out_p)
    take = min(k, m)
    order = np.lexsort((p, -s), axis=1)[:, :take]   # score descending, then position ascending
    out_s[:], out_p[:] = -np.inf, -1
    out_s[:, :take], out_p[:, :take] = np.take_along_axis(s, order, 1), np.take_along_axis(p, order, 1)
    out_p[np.isneginf(out_s)] = -1
    return torch.from_numpy(out_s), torch.from_numpy(out_p)


def merge_topk(parts: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top k of several partial answers (each (scores, positions) of shape (nq, m_i))."""
    scores = torch.cat([s for s, _ in parts], dim=1)
    positions = torch.cat([p for _, p in parts], dim=1)
    return topk_padded(scores, positions, k)
