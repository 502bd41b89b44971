"""MGDA (the paper's Eq. 5): the min-norm point of the convex hull of the per-language
gradients, min_{lambda in simplex} lambda^T G lambda, from G alone.

Solved exactly for K <= 8 languages (every support: the equality-constrained QP on a
support is one small linear solve; the best candidate with lambda >= 0 is the optimum),
by Frank-Wolfe with exact line search (mgda.iters) above.

At a meta step the update is the min-norm direction itself, sum_B lambda_n S g_n with
S = sum_B S_n the batch's total share (1 with meta.weight_by=tokens), so its size is that
of a plain step. Between meta steps each language's weight w_n (init 1, coefficient
w_n * mix_n) holds the last meta step's lambda, redistributing the in-batch languages'
own mass: w_B <- (sum_B w_n) lambda. So sum w = N always and a weight is never scaled by
the number of languages of the batch that set it (the old K * lambda gave K-dependent,
stale weights: 2 lambda after a 2-language batch, 4 lambda after a 4-language one).
"""

from __future__ import annotations

import itertools

import torch

from cats_ds.config import MgdaConfig
from cats_ds.weighting.base import LanguageWeights, WeightingError
from cats_ds.weighting.registry import register_method

EXACT_MAX = 8
"""Largest K solved exactly (2^8 - 1 = 255 supports, each a <= 9 x 9 solve)."""


def min_norm_simplex(gram: torch.Tensor, iters: int = 200, tol: float = 1e-12) -> torch.Tensor:
    """Frank-Wolfe with exact line search for min_{lambda in simplex} lambda^T G lambda."""
    k = gram.size(0)
    lam = torch.full((k,), 1.0 / k, dtype=gram.dtype)
    for _ in range(iters):
        g_lam = gram @ lam
        t = int(torch.argmin(g_lam))
        v1 = float(lam @ g_lam)       # |sum lambda g|^2
        v12 = float(g_lam[t])          # <sum lambda g, g_t>
        v2 = float(gram[t, t])         # |g_t|^2
        denom = v1 + v2 - 2.0 * v12
        if denom <= tol:  # g_t already at the current point
            break
        gamma = min(1.0, max(0.0, (v1 - v12) / denom))
        if gamma <= tol:
            break
        lam = (1.0 - gamma) * lam
        lam[t] += gamma
    return lam


def min_norm_exact(gram: torch.Tensor) -> torch.Tensor:
    """The exact min-norm point for small K: on each support S, min lambda_S^T G_S lambda_S
    subject to 1^T lambda_S = 1 is the KKT system [[G_S, 1], [1^T, 0]] [lambda; -nu] = [0; 1];
    a singular system (affinely dependent gradients) is skipped, as some smaller support
    reaches the same point. Among candidates with lambda >= 0 the smallest objective wins."""
    g = gram.double()
    k = g.size(0)
    best, best_val = None, float("inf")
    scale = max(float(g.diagonal().abs().max()), 1e-300)
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            kkt = torch.zeros(size + 1, size + 1, dtype=torch.float64)
            kkt[:size, :size] = g[s][:, s] / scale
            kkt[:size, size] = 1.0
            kkt[size, :size] = 1.0
            rhs = torch.zeros(size + 1, dtype=torch.float64)
            rhs[size] = 1.0
            try:
                sol = torch.linalg.solve(kkt, rhs)
            except RuntimeError:  # singular
                continue
            lam_s = sol[:size]
            if not torch.isfinite(lam_s).all() or float(lam_s.min()) < -1e-12:
                continue
            lam = torch.zeros(k, dtype=torch.float64)
            lam[s] = lam_s.clamp(min=0)
            lam /= lam.sum()
            val = float(lam @ g @ lam)
            if val < best_val:
                best, best_val = lam, val
    if best is None:  # numerically every support failed: fall back on the iterative solver
        return min_norm_simplex(g, 1000)
    return best


@register_method("mgda")
class MgdaWeighting(LanguageWeights):
    floor = 0.0

    @classmethod
    def from_config(cls, cfg, languages, vocab_size=None):
        return cls(languages, cfg.mgda, cfg.meta.every, cfg.meta.weight_by)

    def __init__(self, languages: list[str], cfg: MgdaConfig, meta_every, weight_by: str = "tokens"):
        super().__init__(languages, meta_every, weight_by)
        self.cfg = cfg

    def update(self, step, langs, losses, gram, shares, nll=None):
        gram = gram.double().cpu()
        lam = min_norm_exact(gram) if len(langs) <= EXACT_MAX else min_norm_simplex(gram, self.cfg.iters)
        idx = torch.tensor(langs)
        # the min-norm point lies on the simplex: anything else is a numerical failure
        fix = (f"(sum lambda = {float(lam.sum()):.6g}, max |G| = {float(gram.abs().max()):.3g}, "
               f"mgda.iters={self.cfg.iters}). The Gram matrix is degenerate; check the losses and the data")
        full = torch.zeros(len(self.languages), dtype=torch.float64)
        full[idx] = lam
        self.refuse(step, full, -1e-9, 1 + 1e-9, "lambda", fix)
        if abs(float(lam.sum()) - 1.0) > 1e-6:
            raise WeightingError(f"mgda weights degenerate at step {step}: lambda sums to {float(lam.sum()):.6g}, "
                                 f"not 1 {fix}")
        self.w[idx] = float(self.w[idx].sum()) * lam
        self._record_gram(gram, lam)
        total = sum(shares[l] for l in langs)
        return {l: float(lam[i]) * total for i, l in enumerate(langs)}

    def floor_hint(self) -> str:
        return ("MGDA's min-norm point gives it no weight: its gradient lies beyond the other languages' "
                "(compare weighting.method=cats or gradnorm)")
