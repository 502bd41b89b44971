"""GradNorm (Chen et al., 2018) from the Gram matrix alone.

Task weights w (init 1, sum N). At a meta step, over the K languages of the batch:
gradient norms G_n = w_n |g_n| = w_n sqrt(G[n, n]); loss ratios r_n = L_n / L_n(0);
target_n = mean(G) * (r_n / mean(r))^asymmetry, held constant. The loss
sum_n |G_n - target_n| is minimized by one SGD step on w, then w is renormalized so
that sum w = N, every weight at least FLOOR (an exact projection, cats.floor_project).
Between meta steps the loss coefficient is w_n * mix_n (base.py).

Blow-ups are refused (WeightingError, before the weights are used): a step that is not
finite, or one that changes the weights' total by more than a factor RENORM_LIMIT
either way, so that the renormalization would crush (or inflate) every weight, those of
the languages outside the meta batch too (gradnorm.lr=1e30 left them at 1e-30).

L_n(0) is the loss at step 0 (the first meta step) for every language: the measured
loss for the languages of that batch, log V (a uniform prediction over the vocabulary)
for the others, not the first loss seen hundreds of updates later.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from cats_ds.config import GradNormConfig
from cats_ds.weighting.base import LanguageWeights, WeightingError
from cats_ds.weighting.cats import floor_project
from cats_ds.weighting.registry import register_method

FLOOR = 1e-6
"""The smallest GradNorm weight."""
RENORM_LIMIT = 2.0
"""Largest factor by which one meta step may change the sum of the weights before the
renormalization to N (beyond it the step is a blow-up, not a gradient step)."""


@register_method("gradnorm")
class GradNormWeighting(LanguageWeights):
    floor = FLOOR

    @classmethod
    def from_config(cls, cfg, languages, vocab_size=None):
        return cls(languages, cfg.gradnorm, cfg.meta.every, vocab_size, cfg.meta.weight_by)

    def __init__(self, languages: list[str], cfg: GradNormConfig, meta_every, vocab_size: Optional[int] = None,
                 weight_by: str = "tokens"):
        super().__init__(languages, meta_every, weight_by)
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.initial_loss = torch.full((len(languages),), float("nan"), dtype=torch.float64)

    def update(self, step, langs, losses, gram, shares, nll=None):
        idx = torch.tensor(langs)
        losses, gram = losses.double().cpu(), gram.double().cpu()
        if torch.isnan(self.initial_loss).all():  # the first meta step: L_n(0) for every language
            if len(langs) < len(self.languages):
                if self.vocab_size is None:
                    raise ValueError("GradNorm needs the vocabulary size for L_n(0) = log V of the languages "
                                     "not in the first meta batch")
                self.initial_loss.fill_(math.log(self.vocab_size))
            self.initial_loss[idx] = losses
        norms = gram.diagonal().clamp(min=0).sqrt()  # |g_n|
        w = self.w[idx]
        gnorm = w * norms  # G_W^(n)
        ratio = losses / self.initial_loss[idx]
        target = gnorm.mean() * (ratio / ratio.mean()) ** self.cfg.asymmetry
        grad = torch.sign(gnorm - target) * norms  # d/dw_n sum |G_n - target_n|
        n = len(self.languages)
        new = self.w.clone()
        new[idx] = w - self.cfg.lr * grad
        settings = (f"gradnorm.lr={self.cfg.lr:g}, gradnorm.asymmetry={self.cfg.asymmetry:g}, "
                    f"max |g_n|={float(norms.max()):.3g}")
        self.refuse(step, new, -math.inf, math.inf, "weight", f"({settings}). Lower gradnorm.lr")
        total = float(new.clamp(min=FLOOR).sum())
        if not (n / RENORM_LIMIT <= total <= n * RENORM_LIMIT):
            raise WeightingError(
                f"gradnorm weights degenerate at step {step}: one meta step moved the weights' sum from {n} to "
                f"{total:.4g}, so renormalizing it to {n} would scale every weight by {n / total:.3g} (the languages "
                f"outside the meta batch too; allowed: a factor within {1 / RENORM_LIMIT:g}..{RENORM_LIMIT:g}) "
                f"({settings}). Lower gradnorm.lr")
        self.w = floor_project(new.clamp(min=FLOOR), n, FLOOR)
        self._record_gram(gram, self.w[idx])
        return {l: self.weight(l) * shares[l] for l in langs}

    def floor_hint(self) -> str:
        return f"If that is not intended, lower gradnorm.lr (now {self.cfg.lr:g}) or gradnorm.asymmetry"

    def state_dict(self):
        return {**super().state_dict(), "initial_loss": self.initial_loss.tolist()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.initial_loss = torch.tensor(state["initial_loss"], dtype=torch.float64)
