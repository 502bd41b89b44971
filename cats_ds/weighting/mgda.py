"""MGDA (the paper's Eq. 5): the min-norm point of the convex hull of the per-language
gradients, min_{lambda in simplex} lambda^T G lambda, by Frank-Wolfe on G alone.

The update uses K * lambda_n (so the uniform point gives weights 1, like alpha's
scale); between meta steps each language keeps its last weight (init 1).
"""

from __future__ import annotations

import torch

from cats_ds.config import MgdaConfig
from cats_ds.weighting.base import LanguageWeights


def min_norm_simplex(gram: torch.Tensor, iters: int = 50, tol: float = 1e-10) -> torch.Tensor:
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


class MgdaWeighting(LanguageWeights):
    name = "mgda"

    def __init__(self, languages: list[str], cfg: MgdaConfig, meta_every):
        super().__init__(languages, meta_every)
        self.cfg = cfg

    def update(self, step, langs, losses, gram, tokens):
        gram = gram.double().cpu()
        lam = min_norm_simplex(gram, self.cfg.iters)
        self.w[torch.tensor(langs)] = lam * len(langs)
        self._record_gram(gram, lam)
        return self.coefficients(langs, tokens)
