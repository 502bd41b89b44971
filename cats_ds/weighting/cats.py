"""Curvature-Aware Task Scaling (Li & Gong, Eq. 6), exactly as DESIGN.md states it.

    L_meta = sum_{n in B} alpha_n L_n + lambda_c (alpha_B^T G alpha_B - eps)
             + lambda_s (sum_n alpha_n - N)^2 - sum_n lambda_n (alpha_n - eps)

alpha goes DOWN its gradient (SGD); the multipliers go UP theirs (projected ascent),
evaluated at the updated alpha. The curvature term is |sum_n alpha_n g_n|^2 =
alpha_B^T G alpha_B, not sum_n alpha_n^2 |g_n|^2.
"""

from __future__ import annotations

import torch

from cats_ds.config import CatsConfig
from cats_ds.weighting.base import Weighting


class CatsWeighting(Weighting):
    name = "cats"

    def __init__(self, languages: list[str], cfg: CatsConfig):
        super().__init__(languages, cfg.meta_every)
        self.cfg = cfg
        n = len(languages)
        self.alpha = torch.ones(n, dtype=torch.float64)
        self.lambda_c = 0.0
        self.lambda_s = 0.0
        self.lambda_n = torch.zeros(n, dtype=torch.float64)
        self.meta_steps = 0

    def coefficients(self, langs, tokens):
        return {l: float(self.alpha[l]) for l in langs}

    def meta_gradient(self, langs: list[int], losses: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """dL_meta/dalpha for all N languages at the current alpha and multipliers."""
        n = len(self.languages)
        idx = torch.tensor(langs)
        a_b = self.alpha[idx]
        grad = torch.zeros(n, dtype=torch.float64)
        per_lang = 2.0 * self.lambda_c * (gram @ a_b)
        if self.cfg.loss_term:
            per_lang = per_lang + losses
        grad[idx] += per_lang
        grad += 2.0 * self.lambda_s * (float(self.alpha.sum()) - n)
        grad -= self.lambda_n
        return grad

    def update(self, step, langs, losses, gram, tokens):
        c, n = self.cfg, len(self.languages)
        losses, gram = losses.double().cpu(), gram.double().cpu()
        alpha = self.alpha - c.lr_alpha * self.meta_gradient(langs, losses, gram)
        if not torch.isfinite(alpha).all():
            raise FloatingPointError(
                f"CATS alpha diverged at step {step} (lambda_c={self.lambda_c:.3g}, lambda_s={self.lambda_s:.3g}, "
                f"max |G|={float(gram.abs().max()):.3g}): lower cats.lr_alpha / cats.lr_lambda or raise cats.eps")
        self.alpha = alpha
        a_b = self.alpha[torch.tensor(langs)]
        curvature = float(a_b @ gram @ a_b)
        self.lambda_c = max(0.0, self.lambda_c + c.lr_lambda * (curvature - c.eps))
        self.lambda_s = self.lambda_s + c.lr_lambda * (float(self.alpha.sum()) - n) ** 2
        self.lambda_n = (self.lambda_n + c.lr_lambda * (c.eps - self.alpha)).clamp(min=0.0)
        self.meta_steps += 1
        self._record_gram(gram, a_b)
        return self.coefficients(langs, tokens)

    def scalars(self):
        out = dict(self.last)
        out.update({f"alpha/{l}": float(a) for l, a in zip(self.languages, self.alpha)})
        out.update({"cats/lambda_c": self.lambda_c, "cats/lambda_s": self.lambda_s,
                    "cats/lambda_n_mean": float(self.lambda_n.mean()), "cats/alpha_sum": float(self.alpha.sum())})
        return out

    def state_dict(self):
        return {"alpha": self.alpha.tolist(), "lambda_c": self.lambda_c, "lambda_s": self.lambda_s,
                "lambda_n": self.lambda_n.tolist(), "meta_steps": self.meta_steps, "languages": self.languages}

    def load_state_dict(self, state):
        if state["languages"] != self.languages:
            raise ValueError(f"CATS state is for languages {state['languages']}, not {self.languages}")
        self.alpha = torch.tensor(state["alpha"], dtype=torch.float64)
        self.lambda_c, self.lambda_s = float(state["lambda_c"]), float(state["lambda_s"])
        self.lambda_n = torch.tensor(state["lambda_n"], dtype=torch.float64)
        self.meta_steps = int(state["meta_steps"])
