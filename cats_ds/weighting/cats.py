"""Curvature-Aware Task Scaling (Li & Gong, Eq. 6): the two updates described in
docs/design.md, section 4, "CATS as implemented".

Notation: N languages, alpha (init 1, sum N), B the distinct languages of the meta batch,
L_n their mean token losses, G their Gram matrix, f = alpha_B^T G alpha_B = |sum_B alpha_n g_n|^2
(never sum alpha_n^2 |g_n|^2). Between meta steps the loss coefficient is alpha_n * mix_n
(base.py), so alpha = 1 is the temperature baseline.

cats.update=mirror (default): exponentiated-gradient steps on dimensionless scores; only
the languages of B move and they keep their mass m_B = sum_B alpha_n, so how often a
language is sampled does not move the weights (the null test):

    f0  = (m_B / |B|)^2 1^T G 1                  curvature at equal weights, same mass
    s_c = m_B (G alpha_B)_n / f                  alpha-weighted mean 1 over B
    s_l = m_B Lbar_n / sum_B alpha_j Lbar_j      Lbar: EMA of L_n (cats.loss_ema)
    d_n = mu (s_l - 1) + lambda_c (s_c - 1)      mu = 1 with cats.loss_term, else 0
    alpha_B <- m_B softmax(log alpha_B - lr_alpha d)   (= alpha exp(-lr d) rescaled to m_B)
    floor at alpha_min, renormalize the rest to m_B (exact projection)
    lambda_c <- max(0, lambda_c + lr_lambda (f / f0 - kappa))    f at the new alpha

cats.update=lagrangian: the literal reading, with separate budget and floor and a signed
multiplier on the LINEAR sum violation:

    L_meta = [loss_term] sum_B alpha_n L_n + lambda_c (f - budget)
             + lambda_s (sum alpha - N) - sum_n lambda_n (alpha_n - alpha_min)
    alpha <- alpha - lr_alpha dL/dalpha        (all N languages: lambda_s and lambda_n act on all)
    lambda_c <- max(0, lambda_c + lr_lambda (f - budget));  lambda_s <- lambda_s + lr_lambda (sum alpha - N)
    lambda_n <- max(0, lambda_n + lr_lambda (alpha_min - alpha_n))     (at the new alpha)

Both compute in float64 tensors (no Python-float overflow) and refuse, before applying
it, an alpha that is non-finite or outside [0, N] (WeightingError: training stops with
the keys to change).
"""

from __future__ import annotations

import math

import torch

from cats_ds.config import CatsConfig
from cats_ds.weighting.base import Weighting, WeightingError


def floor_project(a: torch.Tensor, mass: float, floor: float) -> torch.Tensor:
    """Entries >= floor with sum = mass, the others scaled by one common factor (the
    KL projection that matches exponentiated-gradient steps). Needs mass >= len(a) * floor."""
    a = a * (mass / float(a.sum()))
    fixed = torch.zeros_like(a, dtype=torch.bool)
    while True:
        low = (a < floor) & ~fixed
        if not low.any():
            return a
        fixed |= low
        free = ~fixed
        out = torch.where(fixed, torch.full_like(a, floor), a)
        rest = mass - floor * int(fixed.sum())
        if free.any():
            out[free] = a[free] * (rest / float(a[free].sum()))
        a = out


class CatsWeighting(Weighting):
    name = "cats"

    def __init__(self, languages: list[str], cfg: CatsConfig):
        super().__init__(languages, cfg.meta_every, cfg.weight_by)
        self.cfg = cfg
        n = len(languages)
        self.alpha = torch.ones(n, dtype=torch.float64)
        self.lambda_c = 0.0
        self.lambda_s = 0.0
        self.lambda_n = torch.zeros(n, dtype=torch.float64)
        self.loss_avg = torch.full((n,), float("nan"), dtype=torch.float64)
        """mirror: Lbar, the EMA of each language's meta-batch loss (nan: not seen yet)."""
        self.meta_steps = 0
        self.floor = cfg.alpha_min

    def floor_hint(self) -> str:
        return (f"If that is not intended, lower cats.lr_alpha (now {self.cfg.lr_alpha:g}) or raise cats.alpha_min "
                f"(now {self.cfg.alpha_min:g})")

    def weight(self, lang):
        return float(self.alpha[lang])

    # ---------------------------------------------------------------- lagrangian

    def meta_gradient(self, langs: list[int], losses: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """lagrangian: dL_meta/dalpha for all N languages at the current alpha and multipliers."""
        n = len(self.languages)
        idx = torch.tensor(langs)
        a_b = self.alpha[idx]
        grad = torch.zeros(n, dtype=torch.float64)
        per_lang = 2.0 * self.lambda_c * (gram @ a_b)
        if self.cfg.loss_term:
            per_lang = per_lang + losses
        grad[idx] += per_lang
        grad += self.lambda_s
        grad -= self.lambda_n
        return grad

    def _lagrangian(self, step, langs, losses, gram) -> dict:
        c, n = self.cfg, len(self.languages)
        alpha = self.alpha - c.lr_alpha * self.meta_gradient(langs, losses, gram)
        self._check(step, alpha, gram)
        a_b = alpha[torch.tensor(langs)]
        curvature = a_b @ gram @ a_b
        f0 = (float(self.alpha[torch.tensor(langs)].sum()) / len(langs)) ** 2 * float(gram.sum())
        return {"alpha": alpha, "curvature_ratio": float(curvature) / f0 if f0 > 0 else float("nan"),
                "lambda_c": max(0.0, self.lambda_c + c.lr_lambda * (float(curvature) - c.budget)),
                "lambda_s": self.lambda_s + c.lr_lambda * (float(alpha.sum()) - n),
                "lambda_n": (self.lambda_n + c.lr_lambda * (c.alpha_min - alpha)).clamp(min=0.0),
                "curvature": float(curvature)}

    # ---------------------------------------------------------------- mirror

    def _mirror(self, step, langs, losses, gram) -> dict:
        c = self.cfg
        idx = torch.tensor(langs)
        a_b = self.alpha[idx]
        mass, k = float(a_b.sum()), len(langs)
        f = float(a_b @ gram @ a_b)
        f0 = (mass / k) ** 2 * float(gram.sum())
        d = torch.zeros(k, dtype=torch.float64)
        loss_avg = self.loss_avg.clone()
        seen = ~torch.isnan(loss_avg[idx])
        prev = loss_avg[idx]
        loss_avg[idx] = torch.where(seen, c.loss_ema * prev + (1 - c.loss_ema) * losses, losses)
        if c.loss_term:
            lbar = loss_avg[idx]
            denom = float(a_b @ lbar)
            if denom > 0:
                d += mass * lbar / denom - 1.0
        if f > 0:
            d += self.lambda_c * (mass * (gram @ a_b) / f - 1.0)
        logits = torch.log(a_b) - c.lr_alpha * d
        new_b = floor_project(mass * torch.softmax(logits, 0), mass, c.alpha_min)
        alpha = self.alpha.clone()
        alpha[idx] = new_b
        self._check(step, alpha, gram)
        curvature = float(new_b @ gram @ new_b)
        ratio = curvature / f0 if f0 > 0 else float("nan")
        lambda_c = self.lambda_c if not math.isfinite(ratio) else max(0.0, self.lambda_c + c.lr_lambda * (ratio - c.kappa))
        return {"alpha": alpha, "lambda_c": lambda_c, "loss_avg": loss_avg, "curvature": curvature,
                "curvature_ratio": ratio}

    # ---------------------------------------------------------------- common

    def _check(self, step: int, alpha: torch.Tensor, gram: torch.Tensor) -> None:
        """Refuse a non-finite alpha or one outside [0, N] before it is used."""
        n = len(self.languages)
        bad = ~torch.isfinite(alpha) | (alpha < 0) | (alpha > n)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise WeightingError(
                f"CATS alpha out of range at step {step}: alpha/{self.languages[i]} would be {float(alpha[i]):.4g} "
                f"(allowed: finite, in [0, N={n}]; cats.update={self.cfg.update}, cats.lr_alpha={self.cfg.lr_alpha}, "
                f"cats.lr_lambda={self.cfg.lr_lambda}, lambda_c={self.lambda_c:.3g}, lambda_s={self.lambda_s:.3g}, "
                f"max |G|={float(gram.abs().max()):.3g}). Lower cats.lr_alpha / cats.lr_lambda"
                + (", raise cats.budget, or use cats.update=mirror" if self.cfg.update == "lagrangian" else ""))

    def update(self, step, langs, losses, gram, shares, nll=None):
        losses, gram = losses.double().cpu(), gram.double().cpu()
        new = (self._mirror if self.cfg.update == "mirror" else self._lagrangian)(step, langs, losses, gram)
        self.alpha = new["alpha"]
        self.lambda_c = new["lambda_c"]
        if "lambda_s" in new:
            self.lambda_s, self.lambda_n = new["lambda_s"], new["lambda_n"]
        if "loss_avg" in new:
            self.loss_avg = new["loss_avg"]
        if "curvature_ratio" in new:
            self.last["cats/curvature_ratio"] = new["curvature_ratio"]
        self.meta_steps += 1
        a_b = self.alpha[torch.tensor(langs)]
        self._record_gram(gram, a_b)
        return {l: self.weight(l) * shares[l] for l in langs}

    def scalars(self):
        out = dict(self.last)
        out.update({f"alpha/{l}": float(a) for l, a in zip(self.languages, self.alpha)})
        out.update({"cats/lambda_c": self.lambda_c, "cats/alpha_sum": float(self.alpha.sum())})
        if self.cfg.update == "lagrangian":
            out.update({"cats/lambda_s": self.lambda_s, "cats/lambda_n_mean": float(self.lambda_n.mean())})
        return out

    def state_dict(self):
        return {"alpha": self.alpha.tolist(), "lambda_c": self.lambda_c, "lambda_s": self.lambda_s,
                "lambda_n": self.lambda_n.tolist(), "loss_avg": self.loss_avg.tolist(),
                "meta_steps": self.meta_steps, "skipped": self.skipped, "update": self.cfg.update,
                "languages": self.languages}

    def load_state_dict(self, state):
        if state["languages"] != self.languages:
            raise ValueError(f"CATS state is for languages {state['languages']}, not {self.languages}")
        saved = state.get("update", "lagrangian")
        if saved != self.cfg.update:
            raise ValueError(f"CATS state was written by cats.update={saved}, this run has cats.update={self.cfg.update}")
        self.alpha = torch.tensor(state["alpha"], dtype=torch.float64)
        self.lambda_c, self.lambda_s = float(state["lambda_c"]), float(state["lambda_s"])
        self.lambda_n = torch.tensor(state["lambda_n"], dtype=torch.float64)
        if "loss_avg" in state:
            self.loss_avg = torch.tensor(state["loss_avg"], dtype=torch.float64)
        self.meta_steps = int(state["meta_steps"])
        self.skipped = int(state.get("skipped", 0))
        if self.skipped:
            self.last["meta/skipped"] = float(self.skipped)
