"""GradNorm (Chen et al., 2018) from the Gram matrix alone.

Task weights w (init 1, sum N). At a meta step, over the K languages of the batch:
gradient norms G_n = w_n |g_n| = w_n sqrt(G[n, n]); loss ratios r_n = L_n / L_n(0);
target_n = mean(G) * (r_n / mean(r))^asymmetry, held constant. The loss
sum_n |G_n - target_n| is minimized by one SGD step on w, then w is renormalized so
that sum w = N. Between meta steps the loss coefficient is w_n * mix_n (base.py).

L_n(0) is the loss at step 0 (the first meta step) for every language: the measured
loss for the languages of that batch, log V (a uniform prediction over the vocabulary)
for the others, not the first loss seen hundreds of updates later.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from cats_ds.config import GradNormConfig
from cats_ds.weighting.base import LanguageWeights


class GradNormWeighting(LanguageWeights):
    name = "gradnorm"

    def __init__(self, languages: list[str], cfg: GradNormConfig, meta_every, vocab_size: Optional[int] = None,
                 weight_by: str = "tokens"):
        super().__init__(languages, meta_every, weight_by)
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.initial_loss = torch.full((len(languages),), float("nan"), dtype=torch.float64)

    def update(self, step, langs, losses, gram, shares):
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
        new = self.w.clone()
        new[idx] = (w - self.cfg.lr * grad).clamp(min=1e-6)
        self.w = new * (len(self.languages) / new.sum())
        self._record_gram(gram, self.w[idx])
        return {l: self.weight(l) * shares[l] for l in langs}

    def state_dict(self):
        return {**super().state_dict(), "initial_loss": self.initial_loss.tolist()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.initial_loss = torch.tensor(state["initial_loss"], dtype=torch.float64)
