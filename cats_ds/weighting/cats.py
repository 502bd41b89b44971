"""Curvature-Aware Task Scaling (Li & Gong, Eq. 5-6): the two updates described in
docs/design.md, section 4, "CATS as implemented".

Notation: N languages, alpha (init 1, sum N), B the distinct languages of the meta batch,
L_n their per-language mean NLL, G their Gram matrix, f = alpha_B^T G alpha_B =
|sum_B alpha_n g_n|^2 (never sum alpha_n^2 |g_n|^2). Between meta steps the loss
coefficient is alpha_n * mix_n (base.py), so alpha = 1 is the temperature baseline of the
run's T; a CATS run defaults to T = inf, where alpha = 1 is the paper's alpha = 1/N.

cats.update=mirror (default): the paper's meta objective, the curvature tr(F) ~ f under a
budget that can be met, by exponentiated-gradient steps on dimensionless scores. Only the
languages of B move and they keep their mass m_B = sum_B alpha_n, so how often a language
is sampled does not move the weights (the null test):

    f0    = (m_B / |B|)^2 1^T G 1                curvature at equal weights, same mass
    f_min = min alpha_B^T G alpha_B over {sum_B alpha = m_B, alpha_n >= alpha_min}
    b     = f_min + kappa (f0 - f_min)           the budget, always attainable
    s_c   = m_B (G alpha_B)_n / f                alpha-weighted mean 1 over B
    s_l   = m_B Lbar_n / sum_B alpha_j Lbar_j    Lbar: EMA of L_n (cats.loss_ema)
    d_n   = lambda_c (s_c - 1) + sign mu (s_l - 1)
            (cats.loss_term: off: no loss score; descent: sign +1, favours the lowest-loss
            languages; ascent: sign -1, favours the highest-loss ones; mu = 1)
    alpha_B <- m_B softmax(log alpha_B - lr_alpha d)   (= alpha exp(-lr d) rescaled to m_B)
    floor at alpha_min, renormalize the rest to m_B (exact projection); a step that would
    change some log alpha_n by more than 0.5 is taken in sub-steps (mirror_step)
    lambda_c <- max(0, lambda_c + lr_lambda (min(f, f0) - b) / (f0 - f_min))
            f at the new alpha; unchanged when f0 = f_min (no alpha can violate the
            budget then). f above f0 counts as f0, so one meta step moves lambda_c by at
            most lr_lambda max(kappa, 1 - kappa): an alpha set by other meta batches can
            be far from this G's optimum while f0 - f_min is tiny, and the unclipped ratio
            then drives lambda_c up without bound (tests/test_weighting.py, random Grams).

cats.update=lagrangian: the literal reading, with separate budget and floor and a signed
multiplier on the LINEAR sum violation (sign as above, 0 for loss_term off):

    L_meta = sign sum_B alpha_n L_n + lambda_c (f - budget)
             + lambda_s (sum alpha - N) - sum_n lambda_n (alpha_n - alpha_min)
    alpha <- alpha - lr_alpha dL/dalpha        (all N languages: lambda_s and lambda_n act on all)
    lambda_c <- max(0, lambda_c + lr_lambda (f - budget));  lambda_s <- lambda_s + lr_lambda (sum alpha - N)
    lambda_n <- max(0, lambda_n + lr_lambda (alpha_min - alpha_n))     (at the new alpha)

Both compute in float64 tensors (no Python-float overflow) and refuse, before applying
it, an alpha that is non-finite or outside [0, N] (WeightingError: training stops with
the keys to change).
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np
import torch

from cats_ds.config import CatsConfig, MetaConfig, legacy_value
from cats_ds.weighting.base import Weighting, WeightingError
from cats_ds.weighting.registry import register_method

EXACT_MAX = 8
"""Largest |B| whose f_min is solved exactly (every free set: 2^8 - 1 = 255 small solves,
batched by size); above it, pairwise Frank-Wolfe."""
FMIN_ITERS = 1000
"""Pairwise Frank-Wolfe steps at most for f_min above EXACT_MAX (it stops earlier once the
optimality gap is below 1e-12 of the scale of G alpha), before the exact solve on its free set."""
SPAN_TOL = 1e-9
"""f0 - f_min at or below this fraction of f0 counts as 0: every alpha of mass m_B has the
curvature of equal weights (identical or orthogonal equal-norm gradients), lambda_c stays."""


def floor_project(a: torch.Tensor, mass: float, floor: float) -> torch.Tensor:
    """Entries >= floor with sum = mass, the others scaled by one common factor (the
    KL projection that matches exponentiated-gradient steps). Needs mass >= len(a) * floor."""
    return torch.from_numpy(_floor_project(a.double().cpu().numpy(), mass, floor))


def _floor_project(a: np.ndarray, mass: float, floor: float) -> np.ndarray:
    """floor_project on a float64 array."""
    a = a * (mass / float(a.sum()))
    fixed = np.zeros(a.shape, dtype=bool)
    while True:
        low = (a < floor) & ~fixed
        if not low.any():
            return a
        fixed |= low
        free = ~fixed
        out = np.where(fixed, floor, a)
        rest = mass - floor * int(fixed.sum())
        if free.any():
            out[free] = a[free] * (rest / float(a[free].sum()))
        a = out


def _feasible(cand: np.ndarray, mass: float, floor: float) -> np.ndarray:
    """Rows of `cand` moved onto {sum = mass, entries >= floor}: the excess over the floor
    clipped at 0 and rescaled to mass - K floor (rows that are already feasible up to
    rounding move by rounding only). A row whose excess is all 0 becomes equal weights."""
    k = cand.shape[-1]
    rest = mass - k * floor
    excess = np.clip(cand - floor, 0.0, None)
    total = excess.sum(-1, keepdims=True)
    ok = total > 0
    excess = np.where(ok, excess * (rest / np.where(ok, total, 1.0)), rest / k)
    return floor + excess


def _free_set_solutions(gs: np.ndarray, mass: float, floor: float, sup: np.ndarray) -> np.ndarray:
    """For each row of `sup` (S free sets F of one size), the alpha (S, K) that solves the
    equality-constrained QP min alpha^T G alpha, sum alpha = mass, alpha = floor off F: its
    KKT system [[G_FF, 1], [1^T, 0]] [alpha_F; -nu] = [-floor G_F,notF 1; mass - |notF| floor],
    solved by a pseudo-inverse (G may be singular: then its minimum-norm solution). At an
    extreme point of the optimal set the system is regular, so the optimum is among the
    solutions of its own free set."""
    n, size = sup.shape
    k = gs.shape[0]
    off = np.ones((n, k))
    off[np.arange(n)[:, None], sup] = 0.0
    kkt = np.zeros((n, size + 1, size + 1))
    kkt[:, :size, :size] = gs[sup[:, :, None], sup[:, None, :]]
    kkt[:, :size, size] = 1.0
    kkt[:, size, :size] = 1.0
    rhs = np.zeros((n, size + 1))
    rhs[:, :size] = -floor * np.take_along_axis(off @ gs, sup, 1)
    rhs[:, size] = mass - (k - size) * floor
    sol = np.einsum("sij,sj->si", np.linalg.pinv(kkt, rcond=1e-12), rhs)[:, :size]
    cand = np.full((n, k), floor)
    cand[np.arange(n)[:, None], sup] = sol
    return cand


def _best(gs: np.ndarray, mass: float, floor: float, cand: np.ndarray, best: np.ndarray) -> np.ndarray:
    """The lowest-curvature of `best` and the candidates that are feasible up to rounding
    (each moved exactly onto the feasible set first, so its value is that of a feasible alpha)."""
    good = np.isfinite(cand).all(1) & (cand.min(1) >= floor - 1e-9 * max(1.0, mass))
    if good.any():
        cand = np.concatenate([best[None], _feasible(cand[good], mass, floor)])
        best = cand[int(np.argmin(np.einsum("si,ij,sj->s", cand, gs, cand)))]
    return best


def min_curvature_exact(gram: torch.Tensor, mass: float, floor: float) -> tuple[float, torch.Tensor]:
    """(f_min, its alpha): min alpha^T G alpha over {sum alpha = mass, alpha >= floor}, by
    enumerating every free set F (alpha = floor off F; `_free_set_solutions`, batched by
    size) and keeping the best feasible solution. Equal weights are a candidate too, so
    f_min <= f0, and every value is that of a feasible alpha, so f_min is never below the
    true minimum (and equals it up to rounding)."""
    g = gram.double().cpu().numpy()
    k = g.shape[0]
    scale = max(float(np.abs(np.diag(g)).max()), 1e-300)
    gs = g / scale
    best = np.full(k, mass / k)
    if mass - k * floor > 1e-12 * max(1.0, mass):
        for size in range(1, k + 1):
            sup = np.array(list(itertools.combinations(range(k), size)))
            best = _best(gs, mass, floor, _free_set_solutions(gs, mass, floor, sup), best)
    return max(float(best @ g @ best), 0.0), torch.from_numpy(best.copy())


def min_curvature_iterative(gram: torch.Tensor, mass: float, floor: float,
                            iters: int = FMIN_ITERS) -> tuple[float, torch.Tensor]:
    """(f_min, its alpha) as min_curvature_exact, for large K: pairwise Frank-Wolfe from
    equal weights (move mass from the free language with the largest (G alpha)_n to the one
    with the smallest, by the exact line search of the quadratic) until that gap, the KKT
    conditions' violation, is below 1e-12 of the scale of G alpha, then a primal
    active-set method from the point it reached (`_active_set`), which settles the slow
    tail of Frank-Wolfe on singular G. Every iterate is feasible, so the value is never
    below the true minimum."""
    g = gram.double().cpu().numpy()
    k = g.shape[0]
    scale = max(float(np.abs(np.diag(g)).max()), 1e-300)
    gs = g / scale
    a = np.full(k, mass / k)
    if mass - k * floor > 1e-12 * max(1.0, mass):
        ga = gs @ a
        for _ in range(iters):
            t = int(np.argmin(ga))
            s = int(np.argmax(np.where(a > floor, ga, -np.inf)))
            gap = float(ga[s] - ga[t])
            if not gap > 1e-12 * mass:
                break
            curv = float(gs[t, t] + gs[s, s] - 2.0 * gs[t, s])
            room = float(a[s] - floor)
            step = room if curv <= 0 else min(room, gap / curv)
            a[t] += step
            a[s] = floor if step == room else a[s] - step
            ga += step * (gs[:, t] - gs[:, s])
        a = _active_set(gs, mass, floor, _feasible(a[None], mass, floor)[0], 4 * k)
    return max(float(a @ g @ a), 0.0), torch.from_numpy(a.copy())


def _active_set(gs: np.ndarray, mass: float, floor: float, a: np.ndarray, iters: int) -> np.ndarray:
    """Primal active-set method for min alpha^T G alpha, sum alpha = mass, alpha >= floor,
    from the feasible `a`: on the working set W (the languages above the floor) solve the
    equality-constrained QP (`_free_set_solutions`; for PSD G its KKT system is always
    consistent, so the pseudo-inverse gives a minimizer on W's face); if that minimizer
    leaves the floor, step towards it until the first language reaches the floor and drop
    it from W (the curvature falls along the way); else move there and add the floored
    language whose (G alpha)_n is furthest below the free ones' common value, if any
    (its multiplier is negative); stop when none is. Returns the lowest-curvature feasible
    point visited."""
    tol = 1e-12 * max(1.0, mass)
    work = a > floor + tol
    best, best_val = a, float(a @ gs @ a)
    for _ in range(iters):
        if not work.any():
            break
        x = _free_set_solutions(gs, mass, floor, np.flatnonzero(work)[None])[0]
        if not np.isfinite(x).all():
            break
        d = x - a
        low = work & (x < floor - tol)
        if low.any():
            t = min(1.0, float(np.min((a[low] - floor) / -d[low])))
            a = a + t * d
            work &= a > floor + tol
            a = np.where(work, a, floor)
        else:
            a = x
            ga = gs @ a
            nu = float(ga[work].mean())
            lag = np.where(work, np.inf, ga - nu)
            if float(lag.min()) >= -1e-12 * max(1.0, abs(nu)):
                a = _feasible(a[None], mass, floor)[0]
                val = float(a @ gs @ a)
                return a if val <= best_val else best
            work[int(np.argmin(lag))] = True
        a = _feasible(a[None], mass, floor)[0]
        val = float(a @ gs @ a)
        if val < best_val:
            best, best_val = a, val
    return best


def min_curvature(gram: torch.Tensor, mass: float, floor: float) -> tuple[float, torch.Tensor]:
    """f_min of the mirror update: exact up to EXACT_MAX languages, pairwise Frank-Wolfe above."""
    if gram.size(0) <= EXACT_MAX:
        return min_curvature_exact(gram, mass, floor)
    return min_curvature_iterative(gram, mass, floor)


SUBSTEP = 0.5
"""Largest lr * rate of one sub-step of the mirror step (see mirror_step)."""
MAX_SUBSTEPS = 64
"""Sub-steps at most in one mirror step; a longer step is cut there."""


def mirror_step(a: np.ndarray, direction, lr: float, mass: float, floor: float) -> np.ndarray:
    """alpha <- alpha exp(-lr d(alpha)), rescaled to `mass` and floored (floor_project).
    `direction(alpha)` returns (d, rate), rate an upper scale of how fast d changes with
    log alpha (lambda_c max s_c + mu max s_l: the scores are ratios, so a change of log alpha
    by x moves s - 1 by about x s). When lr * rate exceeds SUBSTEP the step is taken as
    n = ceil(lr rate / SUBSTEP) sub-steps of lr / n, each with (d, rate) at the current
    alpha (the same G and loss EMA), i.e. along the flow d log alpha / dt = -d: one explicit
    step that large would jump past the minimum of the curvature, towards the simplex vertex
    of the smallest (G alpha)_n, where f can exceed f0 and lambda_c then rises without end.
    At most MAX_SUBSTEPS sub-steps (a step beyond that is cut; with the curvature term
    dominant alpha is then close to the min-norm point). A step with lr * rate <= SUBSTEP
    is the single step of the formula."""
    left = lr
    for _ in range(MAX_SUBSTEPS):
        d, rate = direction(a)
        if not (np.isfinite(d).all() and math.isfinite(rate)):
            return np.full_like(a, np.nan)
        if rate <= 0.0 or left <= 0.0 or not np.any(d):
            break
        n = max(1, math.ceil(left * rate / SUBSTEP - 1e-12))
        eta = left / n
        with np.errstate(divide="ignore"):
            logits = np.log(a) - eta * d
        w = np.exp(logits - logits.max())
        a = _floor_project(mass * w / w.sum(), mass, floor)
        left -= eta
    return a


LOSS_SIGN = {"off": 0.0, "descent": 1.0, "ascent": -1.0}
"""cats.loss_term -> the sign of the loss score in the alpha step (descent lowers
sum_B alpha_n L_n: weight goes to the lowest-loss languages; ascent the reverse)."""


def loss_sign(loss_term) -> float:
    """LOSS_SIGN of a cats.loss_term value; the old booleans still read (true: descent,
    false: off), anything else is a ValueError naming the values."""
    value = legacy_value("cats.loss_term", loss_term)
    if value not in LOSS_SIGN:
        raise ValueError(f"cats.loss_term: {loss_term!r} is not one of {', '.join(map(repr, LOSS_SIGN))}")
    return LOSS_SIGN[value]


@register_method("cats")
class CatsWeighting(Weighting):
    @classmethod
    def from_config(cls, cfg, languages, vocab_size=None):
        return cls(languages, cfg.cats, cfg.meta.every, cfg.meta.weight_by)

    def __init__(self, languages: list[str], cfg: CatsConfig, meta_every: Optional[list] = None,
                 weight_by: str = "tokens"):
        """meta_every, weight_by: meta.every (None: its default) and meta.weight_by."""
        super().__init__(languages, MetaConfig().every if meta_every is None else meta_every, weight_by)
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
        self.loss_sign = loss_sign(cfg.loss_term)

    def floor_hint(self) -> str:
        return (f"If that is not intended, lower cats.lr_alpha (now {self.cfg.lr_alpha:g}) or raise cats.alpha_min "
                f"(now {self.cfg.alpha_min:g})")

    def weight(self, lang):
        return float(self.alpha[lang])

    # ---------------------------------------------------------------- lagrangian

    def meta_gradient(self, langs: list[int], losses: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """lagrangian: dL_meta/dalpha for all N languages at the current alpha and multipliers
        (`losses`: the per-language losses of the loss term, NLL when the loop gives it)."""
        n = len(self.languages)
        idx = torch.tensor(langs)
        a_b = self.alpha[idx]
        grad = torch.zeros(n, dtype=torch.float64)
        per_lang = 2.0 * self.lambda_c * (gram @ a_b)
        sign = self.loss_sign
        if sign:
            per_lang = per_lang + sign * losses
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
        f0 = (mass / k) ** 2 * float(gram.sum())
        f_min = min(min_curvature(gram, mass, c.alpha_min)[0], f0)
        span = f0 - f_min
        budget = f_min + c.kappa * span
        loss_avg = self.loss_avg.clone()
        seen = ~torch.isnan(loss_avg[idx])
        prev = loss_avg[idx]
        loss_avg[idx] = torch.where(seen, c.loss_ema * prev + (1 - c.loss_ema) * losses, losses)
        sign, lbar, lambda_c = self.loss_sign, loss_avg[idx].numpy(), self.lambda_c
        g = gram.numpy()

        def direction(a: np.ndarray) -> tuple[np.ndarray, float]:
            d, rate = np.zeros(k), 0.0
            denom = float(a @ lbar)
            if sign and denom > 0:
                s_l = mass * lbar / denom
                d += sign * (s_l - 1.0)
                rate += float(s_l.max())
            ga = g @ a
            fa = float(a @ ga)
            if lambda_c and fa > 0:
                s_c = mass * ga / fa
                d += lambda_c * (s_c - 1.0)
                rate += lambda_c * float(np.abs(s_c).max())
            return d, rate

        new_b = torch.from_numpy(mirror_step(a_b.numpy(), direction, c.lr_alpha, mass, c.alpha_min))
        alpha = self.alpha.clone()
        alpha[idx] = new_b
        self._check(step, alpha, gram)
        curvature = float(new_b @ gram @ new_b)
        if math.isfinite(span) and math.isfinite(curvature) and span > SPAN_TOL * abs(f0):
            lambda_c = max(0.0, lambda_c + c.lr_lambda * (min(curvature, f0) - budget) / span)
        ok = f0 > 0 and math.isfinite(f0)
        return {"alpha": alpha, "lambda_c": lambda_c, "loss_avg": loss_avg, "curvature": curvature,
                "curvature_ratio": curvature / f0 if ok else float("nan"),
                "fmin_ratio": f_min / f0 if ok else float("nan"),
                "budget_ratio": budget / f0 if ok else float("nan")}

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

    def update(self, step, langs, losses, gram, shares, nll: Optional[torch.Tensor] = None):
        """`losses`: the training losses of B (label-smoothed); `nll`: their plain mean NLL,
        which the loss term uses when the loop passes it (else `losses`)."""
        losses = (nll if nll is not None else losses).double().cpu()
        gram = gram.double().cpu()
        new = (self._mirror if self.cfg.update == "mirror" else self._lagrangian)(step, langs, losses, gram)
        self.alpha = new["alpha"]
        self.lambda_c = new["lambda_c"]
        if "lambda_s" in new:
            self.lambda_s, self.lambda_n = new["lambda_s"], new["lambda_n"]
        if "loss_avg" in new:
            self.loss_avg = new["loss_avg"]
        if "curvature_ratio" in new:
            self.last["cats/curvature_ratio"] = new["curvature_ratio"]
        for key in ("fmin_ratio", "budget_ratio"):
            if key in new:
                self.last[f"cats/{key}"] = new[key]
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
