"""Top Hessian eigenvalue of one language's loss by power iteration (the paper's Figure 2 top).

    lambda_max = the eigenvalue of largest magnitude of H = d^2 L_n / d theta^2, sign kept

L_n is the mean (label-smoothed, as in training) token loss of language n on its fixed
analysis batch, at the current weights, dropout off. Power iteration needs only
Hessian-vector products, Hv = d/dtheta <dL/dtheta, v>, i.e. a double backward through
the graph of dL/dtheta (built once with create_graph=True, reused every iteration):

    v_0 ~ N(0, I) / norm (a fixed seed, from a private generator: the global RNG, which
    drives training's dropout, is untouched)
    lambda_t = <v_{t-1}, H v_{t-1}>,   v_t = H v_{t-1} / |H v_{t-1}|

stopping after `iters` products or once |lambda_t - lambda_{t-1}| <= tol * |lambda_t| and
the eigen-residual |H v - lambda_t v| <= sqrt(tol) * |lambda_t| (the residual check catches
a dominant pair +-lambda, where the Rayleigh quotient stalls at a meaningless value while
v flips between two directions). The error of lambda_t shrinks like
(|lambda_2| / |lambda_1|)^(2t), so the result says how many products it took and whether
it met the tolerance; figures mark unconverged values.

Runs in ONE process on a plain nn.Module with torch.autograd.grad (never .backward(), so
no DeepSpeed gradient hooks fire). PyTorch's fused CPU attention kernels have no double
backward; the forward runs under the MATH attention backend, which does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cats_ds.data.sampler import Batch
from cats_ds.training.losses import per_language_sums

Vectors = list[torch.Tensor]


@dataclass
class HessianResult:
    value: float
    """lambda_max: the Rayleigh quotient at the last iteration (sign kept)."""
    iters: int
    """Hessian-vector products computed."""
    converged: bool
    """The relative change and the residual met the tolerance (or H v was exactly 0)."""
    history: list[float] = field(default_factory=list)
    """lambda_t of every iteration."""


def language_loss(model: torch.nn.Module, batches: Batch | Sequence[Batch], lang_index: int, n_langs: int,
                  smoothing: float) -> torch.Tensor:
    """Mean token loss of language `lang_index` over one or several batches (length
    buckets of one fixed set of sentences, so little compute goes to padding), through
    an attention backend that supports double backward."""
    total = count = None
    for batch in [batches] if isinstance(batches, Batch) else batches:
        with sdpa_kernel(SDPBackend.MATH):
            logits = model(batch.src, batch.prev, batch.langs)  # (B, T, V)
        loss_sum, _, tok = per_language_sums(logits, batch.tgt, batch.langs, n_langs, smoothing)
        total = loss_sum[lang_index] if total is None else total + loss_sum[lang_index]
        count = tok[lang_index] if count is None else count + tok[lang_index]
    if total is None or float(count) == 0:
        raise ValueError(f"the batches have no target tokens of language index {lang_index}")
    return total / count


def _dot(a: Vectors, b: Vectors) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def power_iteration(hvp: Callable[[Vectors], Vectors], like: Sequence[torch.Tensor], iters: int, tol: float,
                    seed: int = 0) -> HessianResult:
    """Dominant eigenvalue of the symmetric operator `hvp` over tensors shaped like `like`."""
    if iters < 1:
        raise ValueError(f"analysis.hessian_iters must be >= 1, got {iters}")
    if tol < 0:
        raise ValueError(f"analysis.hessian_tol must be >= 0, got {tol}")
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in like]
    norm = math.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    history: list[float] = []
    for _ in range(iters):
        hv = hvp(v)
        lam = _dot(v, hv)
        history.append(lam)
        norm = math.sqrt(_dot(hv, hv))
        if norm == 0.0:
            return HessianResult(0.0, len(history), True, history)
        # |Hv - lam v|^2 = |Hv|^2 - lam^2 for |v| = 1: the eigen-residual
        residual = math.sqrt(max(norm * norm - lam * lam, 0.0))
        if len(history) > 1 and abs(lam - history[-2]) <= tol * abs(lam) and residual <= math.sqrt(tol) * abs(lam):
            return HessianResult(lam, len(history), True, history)
        v = [x / norm for x in hv]
    return HessianResult(history[-1], len(history), False, history)


def top_eigenvalue(loss: torch.Tensor, params: Sequence[torch.Tensor], iters: int, tol: float, seed: int = 0,
                   grads: Optional[Sequence[torch.Tensor]] = None) -> HessianResult:
    """lambda_max of the Hessian of a scalar `loss` with respect to `params`.

    grads: dloss/dparams already taken with create_graph=True (saves one backward when
    the caller also wants the gradient)."""
    if grads is None:
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # H v = d/dtheta sum_p <g_p, v_p>; a g_p that does not depend on theta adds nothing
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        raise ValueError("the loss's gradient does not depend on the parameters (no graph for a double backward)")

    def hvp(v: Vectors) -> Vectors:
        out = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[v[i] for i in live],
                                  retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(out, params)]

    return power_iteration(hvp, params, iters, tol, seed)
