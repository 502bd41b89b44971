"""Gradient-surgery and bargaining methods from the Gram matrix alone: PCGrad, GradVac,
CAGrad, Nash-MTL, IMTL-G.

Each returns an update sum_n c_n g_n whose coefficients depend only on G (and, for
GradVac, its own state), so on ZeRO partitions it costs one K x K all_reduce like CATS.
Everything is computed in float64 on the K x K matrices.

The task gradients. A meta step gives per-language gradients g_n with shares S_n (base.py),
the plain update being sum_n S_n g_n, and S = sum_B S_n (1 with meta.weight_by=tokens).
Every method here sees the K task gradients t_n = a_n g_n with a_n = K S_n / S, so that
mean_n t_n = (sum_n S_n g_n) / S (with the equal shares that distinct-language batches
nearly have, t_n = g_n), computes its update d = sum_n beta_n t_n in its paper's scale
for the mean loss, and the meta step applies S d: c_n = S beta_n a_n. So with no conflict
PCGrad and GradVac, and CAGrad at c = 0, are exactly the plain update.

Inner products of linear combinations come from G: if u = sum_k C[i, k] t_k then
|u|^2 = C[i] G C[i]^T and <u, t_j> = (C G)[i, j]; G_t = diag(a) G diag(a).

Between meta steps. Each language keeps the weight w_n = c_n / S_n = K beta_n of the last
meta step it was in (init 1), and the loss is sum_n w_n mix_n L_n (base.py): the same
linear combination of the per-language gradients the method chose, applied to the
current ones. The papers apply the method every step: `meta.every: [[null, 1]]`.
Weights can be negative (PCGrad/GradVac subtract other languages' gradients; IMTL-G's
alpha is not sign-constrained) and, for Nash-MTL, far from 1 (its update has norm
sqrt(K) whatever the gradient scale); they are kept as the method gave them.

A meta step whose problem has no solution (Nash-MTL when the languages have no common
ascent direction) keeps the weights and applies them, like `skip`, and counts
`<method>/unsolved`. A non-finite result from a finite G is a numerical failure, not a
missing solution: refused (WeightingError, the weighting contract of base.py).
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np
import torch

from cats_ds.config import CagradConfig, GradVacConfig, NashMtlConfig
from cats_ds.weighting.base import LanguageWeights
from cats_ds.weighting.registry import register_method

EXACT_MAX = 8
"""Largest K for which CAGrad's dual is solved exactly (every support, closed form)."""


class Unsolved(ArithmeticError):
    """The method's small problem has no (finite) solution at this meta step."""


def pair_orders(seed: int, step: int, k: int) -> list[list[int]]:
    """For each i of K, the other indices in a random order, a function of (seed, step)
    only: every rank draws the same, and a resumed run the same as an uninterrupted one."""
    rng = np.random.default_rng([seed, step])
    return [[int(j) for j in rng.permutation([j for j in range(k) if j != i])] for i in range(k)]


# --------------------------------------------------------------------------- solvers on G


def pcgrad_matrix(gram: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """PCGrad (Yu et al., 2020) in Gram space: row i of the returned C gives the projected
    t_i^PC = sum_k C[i, k] t_k. For each i, for j in orders[i]: if <t_i^PC, t_j> < 0,
    t_i^PC -= <t_i^PC, t_j> / |t_j|^2 t_j (always off the ORIGINAL t_j)."""
    k = gram.size(0)
    coef = torch.eye(k, dtype=torch.float64)
    for i in range(k):
        for j in orders[i]:
            dot = float(coef[i] @ gram[:, j])
            if dot < 0:
                coef[i, j] -= dot / float(gram[j, j])
    return coef


def gradvac_matrix(gram: torch.Tensor, orders: list[list[int]], target: torch.Tensor,
                   beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GradVac (Wang et al., 2021) in Gram space. For each i, for j in orders[i]:
    phi = cos(t_i^PS, t_j) (a nan target, a pair not seen yet, becomes phi); if
    phi < target[i, j], add
    |t_i^PS| (phi^ sqrt(1 - phi^2) - phi sqrt(1 - phi^^2)) / (|t_j| sqrt(1 - phi^^2)) t_j
    (phi^ = target[i, j]), which makes cos(t_i^PS, t_j) = phi^ exactly; then
    target[i, j] <- (1 - beta) target[i, j] + beta phi. Returns (C, new target)."""
    k = gram.size(0)
    coef = torch.eye(k, dtype=torch.float64)
    target = target.clone()
    for i in range(k):
        for j in orders[i]:
            norm_i = math.sqrt(max(float(coef[i] @ gram @ coef[i]), 0.0))
            norm_j = math.sqrt(max(float(gram[j, j]), 0.0))
            if norm_i == 0.0 or norm_j == 0.0:  # a zero gradient has no direction to align
                continue
            phi = min(1.0, max(-1.0, float(coef[i] @ gram[:, j]) / (norm_i * norm_j)))
            goal = float(target[i, j])
            if math.isnan(goal):  # the pair's first meta step (gradvac.init=first): its own cosine
                goal = phi
            if phi < goal < 1.0:
                root = math.sqrt(1.0 - goal * goal)
                coef[i, j] += norm_i * (goal * math.sqrt(1.0 - phi * phi) - phi * root) / (norm_j * root)
            target[i, j] = (1.0 - beta) * goal + beta * phi
    return coef, target


def cagrad_dual_exact(gram: torch.Tensor, c: float) -> Optional[torch.Tensor]:
    """CAGrad's dual (Liu et al., 2021): min over the simplex of
    F(w) = w^T G b + c |g0| sqrt(w^T G w), b = 1/K (g0 = mean t, |g0|^2 = b^T G b).

    On a support S where it is differentiable, the KKT conditions with r = |g_w| read
    G_S w_S = (r / rho) (mu 1 - q_S), 1^T w_S = 1, w^T G w = r^2 (rho = c |g0|, q = G b).
    With H = G_S^-1: rho^2 = (mu 1 - q)^T H (mu 1 - q), a quadratic in mu whose larger
    root gives r = rho / sqrt(disc) > 0. A candidate with w_S >= 0 and
    dF/dw_j = q_j + rho (G w)_j / r >= mu off the support is the optimum (F is convex);
    the best of them is returned, None when no support qualifies (singular G_S)."""
    k = gram.size(0)
    g = gram.numpy() / max(float(gram.diagonal().max()), 1e-300)  # the minimizer is invariant to scaling G
    q = g.mean(1)                                                 # G b
    rho = c * math.sqrt(max(float(q.mean()), 0.0))                # c |g0|, |g0|^2 = b^T G b
    candidates: list[tuple[float, np.ndarray]] = []  # numpy: ~10x less overhead than torch at this size
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            g_s = g[np.ix_(s, s)]
            try:
                chol = np.linalg.cholesky(g_s)
            except np.linalg.LinAlgError:
                continue
            if chol.diagonal().min() ** 2 < 1e-12 * g_s.diagonal().max():  # (nearly) singular: a
                continue                                                     # smaller support reaches it
            h = np.linalg.inv(g_s)
            qs = q[s]
            h1, hq = h.sum(1), h @ qs
            a_, b_, c_ = float(h1.sum()), float(h1 @ qs), float(qs @ hq)
            disc = b_ * b_ - a_ * (c_ - rho * rho)
            if not (a_ > 0 and disc > 0):
                continue
            mu = (b_ + math.sqrt(disc)) / a_
            w_s = (mu * h1 - hq) / math.sqrt(disc)  # = H (mu 1 - q_S) r / rho, r = rho / sqrt(disc)
            if not np.isfinite(w_s).all() or w_s.min() < -1e-10:
                continue
            w = np.zeros(k)
            w[s] = np.clip(w_s, 0, None)
            w /= w.sum()
            gw = g @ w
            norm = math.sqrt(max(float(w @ gw), 0.0))
            if norm == 0.0:
                continue
            grad = q + rho * gw / norm
            if (grad - grad[s].mean()).min() < -1e-9 * max(1.0, abs(mu)):
                continue
            candidates.append((float(w @ q) + rho * norm, w))
    if not candidates:
        return None
    # F is convex, so its minimizers form a convex set: the mean of the tied candidates
    # is one (with rank-one G, identical gradients, every vertex ties: uniform w)
    best_val = min(v for v, _ in candidates)
    tied = [w for v, w in candidates if v <= best_val + 1e-12 * max(1.0, abs(best_val))]
    return torch.tensor(np.mean(tied, axis=0), dtype=torch.float64)


def cagrad_dual_iterative(gram: torch.Tensor, c: float, iters: int) -> torch.Tensor:
    """The same dual for K > EXACT_MAX: projected gradient with backtracking (Armijo)."""
    k = gram.size(0)
    g = gram / max(float(gram.diagonal().max()), 1e-300)
    b = torch.full((k,), 1.0 / k, dtype=torch.float64)
    q = g @ b
    rho = c * math.sqrt(max(float(b @ g @ b), 0.0))

    def value(w):
        return float(w @ q) + rho * math.sqrt(max(float(w @ g @ w), 0.0))

    w, step = b.clone(), 1.0
    val = value(w)
    for _ in range(iters):
        norm = math.sqrt(max(float(w @ g @ w), 1e-300))
        grad = q + rho * (g @ w) / norm
        while step > 1e-20:
            cand = simplex_projection(w - step * grad)
            new = value(cand)
            if new <= val - 1e-4 * float(grad @ (w - cand)):
                break
            step *= 0.5
        if step <= 1e-20 or float((cand - w).abs().max()) < 1e-15:
            break
        w, val, step = cand, new, step * 2.0
    return w


def simplex_projection(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the probability simplex (sort-based)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0)
    idx = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u * idx > css - 1).max())
    theta = (css[rho] - 1) / (rho + 1)
    return (v - theta).clamp(min=0)


def cagrad_beta(gram: torch.Tensor, c: float, rescale: int, iters: int) -> torch.Tensor:
    """d = g0 + (c |g0| / |g_w|) g_w over the t's, rescaled by 1 (rescale 0), 1 / (1 + c^2)
    (1) or 1 / (1 + c) (2): its coefficients beta."""
    k = gram.size(0)
    b = torch.full((k,), 1.0 / k, dtype=torch.float64)
    if c == 0.0:
        return b
    w = cagrad_dual_exact(gram, c) if k <= EXACT_MAX else None
    if w is None:
        w = cagrad_dual_iterative(gram, c, iters)
    norm_w = math.sqrt(max(float(w @ gram @ w), 0.0))
    norm_0 = math.sqrt(max(float(b @ gram @ b), 0.0))
    if norm_w == 0.0:
        raise Unsolved("the mean gradient's worst-case direction is zero")
    beta = b + (c * norm_0 / norm_w) * w
    return beta / {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]


def nash_alpha(gram: torch.Tensor, max_iters: int = 100, tol: float = 1e-12) -> torch.Tensor:
    """Nash-MTL (Navon et al., 2022): the alpha > 0 with G alpha = 1 / alpha.

    That is the stationary point of the strictly convex f(alpha) = alpha^T G alpha / 2 -
    sum log alpha_n over alpha > 0 (Hessian G + diag(1 / alpha^2)), found by damped Newton
    on G / s (s = mean diagonal; alpha = alpha' / sqrt(s)) and accepted only when
    max |alpha_n (G alpha)_n - 1| < 1e-10. Raises Unsolved when f has no minimizer (no
    common ascent direction, e.g. t_1 = -t_2) or Newton does not converge."""
    s = float(gram.diagonal().mean())
    if not s > 0:
        raise Unsolved("all gradients are zero")
    g = gram / s
    diag = g.diagonal().clamp(min=1e-12)
    alpha = 1.0 / diag.sqrt()

    def f(x):
        return 0.5 * float(x @ g @ x) - float(torch.log(x).sum())

    val = f(alpha)
    for _ in range(max_iters):
        residual = alpha * (g @ alpha) - 1.0
        if float(residual.abs().max()) < tol:
            break
        grad = g @ alpha - 1.0 / alpha
        hess = g + torch.diag(1.0 / alpha ** 2)
        try:
            step = -torch.linalg.solve(hess, grad)
        except RuntimeError:  # alpha ran off to infinity: f is unbounded below
            raise Unsolved("G alpha = 1/alpha has no positive solution") from None
        t = 1.0
        # Newton decrement: below 1e-10 f cannot resolve the decrease in float64; the full
        # step is then in the quadratic-convergence region and taken as it is
        small = -float(grad @ step) < 1e-10
        while True:
            cand = alpha + t * step
            if bool((cand > 0).all()):
                new = f(cand)
                if small or new <= val + 1e-4 * t * float(grad @ step):
                    break
            t *= 0.5
            if t < 1e-30:
                raise Unsolved("Newton made no progress")
        alpha, val = cand, new
    if not float((alpha * (g @ alpha) - 1.0).abs().max()) < 1e-10:
        raise Unsolved(f"G alpha = 1/alpha not reached in {max_iters} Newton steps")
    return alpha / math.sqrt(s)


def imtl_alpha(gram: torch.Tensor) -> torch.Tensor:
    """IMTL-G (Liu et al., ICLR 2021): the alpha with sum 1 whose d = sum alpha_n t_n has
    equal projections on every unit gradient u_n. The paper's closed form,
    alpha_{2:K} = g_1 U^T (D U^T)^-1 with D, U the rows g_1 - g_n, u_1 - u_n, solves the
    same conditions as G alpha = lambda |t| (<d, t_n> / |t_n| = lambda for all n) with
    1^T alpha = 1, which is the bordered system solved here (least squares, min-norm
    when the gradients are linearly dependent: identical gradients give uniform alpha)."""
    k = gram.size(0)
    g = gram / max(float(gram.diagonal().max()), 1e-300)
    norms = g.diagonal().clamp(min=0).sqrt()
    system = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    system[:k, :k] = g
    system[:k, k] = -norms
    system[k, :k] = 1.0
    rhs = torch.zeros(k + 1, 1, dtype=torch.float64)
    rhs[k] = 1.0
    sol = torch.linalg.lstsq(system, rhs, rcond=1e-12, driver="gelsd").solution[:k, 0]
    return sol


# --------------------------------------------------------------------------- the weightings


class GramSpaceWeighting(LanguageWeights):
    """The convention of the module docstring; subclasses give beta (d = sum beta_n t_n)."""

    unsolved_reason: Optional[str] = None
    """Why the last unsolved meta step had no solution."""

    def update(self, step, langs, losses, gram, shares, nll=None):
        gram = gram.double().cpu()
        k = len(langs)
        idx = torch.tensor(langs)
        s = torch.tensor([shares[l] for l in langs], dtype=torch.float64)
        total = float(s.sum())
        a = k * s / total
        gram_t = gram * a[:, None] * a[None, :]
        try:
            beta = self.beta(step, langs, gram_t)
        except Unsolved as e:
            key = f"{self.name}/unsolved"
            self.last[key] = self.last.get(key, 0.0) + 1.0
            self.unsolved_reason = f"step {step}: {e}"
            return {l: self.weight(l) * shares[l] for l in langs}
        new = self.w.clone()
        new[idx] = k * beta
        self.refuse(step, new, -math.inf, math.inf, "weight",
                    f"(max |G| = {float(gram.abs().max()):.3g}, {k} languages in the meta batch). The method's solver "
                    f"failed numerically; check the losses and the data, or use another weighting.method")
        coeffs = total * beta * a
        self.w[idx] = k * beta
        self._record_gram(gram, coeffs)
        return {l: float(coeffs[i]) for i, l in enumerate(langs)}

    def beta(self, step: int, langs: list[int], gram_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self):
        return {**super().state_dict(), "unsolved": self.last.get(f"{self.name}/unsolved", 0.0)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if state.get("unsolved"):
            self.last[f"{self.name}/unsolved"] = float(state["unsolved"])


@register_method("pcgrad")
class PCGradWeighting(GramSpaceWeighting):
    """PCGrad: the mean of the projected t_i^PC (random order per i from train.seed and
    the step). No hyperparameters."""

    @classmethod
    def from_config(cls, cfg, languages, vocab_size=None):
        return cls(languages, cfg.meta.every, cfg.meta.weight_by, cfg.train.seed)

    def __init__(self, languages, meta_every, weight_by: str = "tokens", seed: int = 1):
        super().__init__(languages, meta_every, weight_by)
        self.seed = seed

    def beta(self, step, langs, gram_t):
        k = len(langs)
        return pcgrad_matrix(gram_t, pair_orders(self.seed, step, k)).sum(0) / k


@register_method("gradvac")
class GradVacWeighting(GramSpaceWeighting):
    """GradVac: the mean of the vaccinated t_i^PS, with a cosine target per ordered pair of
    languages (N x N), EMA rate gradvac.beta, starting at the pair's first observed cosine
    (gradvac.init=first) or at 0 (zero: the first meta steps act like PCGrad)."""

    @classmethod
    def from_config(cls, cfg, languages, vocab_size=None):
        return cls(languages, cfg.gradvac, cfg.meta.every, cfg.meta.weight_by, cfg.train.seed)

    def __init__(self, languages, cfg: GradVacConfig, meta_every, weight_by: str = "tokens", seed: int = 1):
        super().__init__(languages, meta_every, weight_by)
        self.cfg = cfg
        self.seed = seed
        n = len(languages)
        self.target = torch.full((n, n), float("nan") if cfg.init == "first" else 0.0, dtype=torch.float64)

    def beta(self, step, langs, gram_t):
        k = len(langs)
        idx = torch.tensor(langs)
        coef, target = gradvac_matrix(gram_t, pair_orders(self.seed, step, k),
                                      self.target[idx][:, idx], self.cfg.beta)
        beta = coef.sum(0) / k
        if bool(torch.isfinite(beta).all()):
            self.target[idx[:, None], idx[None, :]] = target
        return beta

    def state_dict(self):
        return {**super().state_dict(), "target": self.target.tolist()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.target = torch.tensor(state["target"], dtype=torch.float64)


@register_method("cagrad")
class CagradWeighting(GramSpaceWeighting):
    """CAGrad: d = g0 + (c |g0| / |g_w*|) g_w* (rescaled), w* from the dual on G."""

    @classmethod
    def from_config(cls, cfg, languages, vocab_size=None):
        return cls(languages, cfg.cagrad, cfg.meta.every, cfg.meta.weight_by)

    def __init__(self, languages, cfg: CagradConfig, meta_every, weight_by: str = "tokens"):
        super().__init__(languages, meta_every, weight_by)
        self.cfg = cfg

    def beta(self, step, langs, gram_t):
        return cagrad_beta(gram_t, self.cfg.c, self.cfg.rescale, self.cfg.iters)


@register_method("nashmtl")
class NashMtlWeighting(GramSpaceWeighting):
    """Nash-MTL: d = sum alpha_n t_n with G alpha = 1 / alpha (|d| = sqrt(K)). Scale-free:
    the same d from the g_n as from the t_n."""

    @classmethod
    def from_config(cls, cfg, languages, vocab_size=None):
        return cls(languages, cfg.nashmtl, cfg.meta.every, cfg.meta.weight_by)

    def __init__(self, languages, cfg: NashMtlConfig, meta_every, weight_by: str = "tokens"):
        super().__init__(languages, meta_every, weight_by)
        self.cfg = cfg

    def beta(self, step, langs, gram_t):
        return nash_alpha(gram_t, self.cfg.iters)


@register_method("imtl")
class ImtlWeighting(GramSpaceWeighting):
    """IMTL-G: d = sum alpha_n t_n, sum alpha = 1, equal projections on the unit gradients.
    No hyperparameters."""

    @classmethod
    def from_config(cls, cfg, languages, vocab_size=None):
        return cls(languages, cfg.meta.every, cfg.meta.weight_by)

    def beta(self, step, langs, gram_t):
        return imtl_alpha(gram_t)
