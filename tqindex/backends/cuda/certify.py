"""The tensor-core paths' certificate: when approximate (fp16) scores give exact top-k results.

Tensor-core scores are approximate; their error is at most E per query (`error_bound`). The best
`keep(k)` approximate candidates are rescored exactly, and the answer is certified when the k-th
exact score is at least E above every approximate score left out (`certified`): no row left out can
then beat it. Queries that fail are rescanned exactly by the caller.
"""

from __future__ import annotations

import torch

__all__ = ["keep", "error_bound", "candidates", "certified"]


def keep(k: int) -> int:
    """Approximate candidates rescored exactly per query: the more, the likelier the certificate
    holds (the k-th exact score must clear the best one left out by the error bound)."""
    return 2 * k + 48


def error_bound(rotated: torch.Tensor, *, cmax: float, scale_max: float, ynorm_max: float, l2: bool,
                extra_rel: float = 0.0) -> torch.Tensor:
    """Per query (nq,), a bound on |approximate − exact| score of any row.

    fp16 keeps 11 significant bits: q_j/max|q| and each centroid are each off by at most 2^-11
    relative (2^-25 absolute below the normal range), so each product by < 2^-10 + 2^-22
    relative plus the absolute terms; fp32 accumulation of d products adds < d·2^-23 of
    Σ|q_j c_j| (2^-22 here, allowing truncating adders). Σ|q_j c_j| ≤ min(‖q‖₁·max|c|,
    ‖q‖₂·max‖ỹ‖); scores are multiplied by the row's scale ≤ S (doubled for l2). A factor 2
    covers the remaining roundings; `extra_rel` adds a relative term (the GEMM path's fp16 output).

    Parameters
    ----------
    rotated : (nq, d) float32, Πq
    cmax : the largest |value| a coordinate can decode to; ynorm_max : the largest ‖ỹ‖ of a row
    scale_max : the largest per-row scale S
    """
    d = rotated.shape[1]
    absq = rotated.abs()
    q1, qmax = absq.sum(dim=1), absq.amax(dim=1)
    # Σ_j |q_j c_j| ≤ min(‖q‖₁ max|c|, ‖q‖₂ max‖ỹ‖) (Cauchy-Schwarz for the second).
    mass = torch.minimum(q1 * cmax, torch.linalg.vector_norm(rotated, dim=1) * ynorm_max)
    per_row = (2.0 ** -10 + (d + 2) * 2.0 ** -22 + extra_rel) * mass + q1 * 2.0 ** -25 + d * cmax * qmax * 2.0 ** -25
    return 2.0 * (2 if l2 else 1) * scale_max * per_row


def candidates(approx: torch.Tensor, positions: torch.Tensor, tau: torch.Tensor, k: int):
    """The best `keep(k)` approximate candidates per query and the best approximate score left out.

    Parameters
    ----------
    approx : (nq, cap) float32 approximate scores (−inf for empty slots); positions : (nq, cap) int64
    tau : (nq,) the threshold below which rows were not emitted at all

    Returns
    -------
    positions (nq, keep) int64 (−1 where none), left_out (nq,) float32
    """
    cap = approx.shape[1]
    count = min(cap, keep(k))
    top = torch.topk(approx, min(cap, count + 1), dim=1)
    cand_s, cand_i = top.values[:, :count], top.indices[:, :count]
    cand_p = torch.gather(positions, 1, cand_i).masked_fill(torch.isneginf(cand_s), -1)
    # The best approximate score left out: the (keep+1)-th candidate, or τ below which nothing was emitted.
    left_out = top.values[:, count] if top.values.shape[1] > count else torch.full_like(tau, -torch.inf)
    return cand_p, torch.maximum(left_out, tau)


def certified(best_exact: torch.Tensor, left_out: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """(nq,) bool: the k-th exact score (last column of `best_exact`) clears every row left out."""
    return best_exact[:, -1] >= left_out + err
