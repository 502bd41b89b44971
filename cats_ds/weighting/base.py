"""The one interface every task-weighting method implements.

The training loop calls it at one named point. Every update it asks `coefficients` for
the per-language loss weights c_n of the combined loss sum_n c_n L_n (one backward).
On a meta step (`is_meta_step`) it instead runs one backward per language, builds the
K x K Gram matrix G of the per-language gradients (on ZeRO partitions, cats_ds/grads.py)
and calls `update(step, langs, losses, G)`, whose returned coefficients combine the
per-language gradients into the update, before `engine.step()`.
"""

from __future__ import annotations

from typing import Optional

import torch

from cats_ds.config import meta_interval


class Weighting:
    name = "base"

    def __init__(self, languages: list[str], meta_every: Optional[list] = None):
        self.languages = languages
        self.meta_every = meta_every
        self.last: dict[str, float] = {}

    def is_meta_step(self, step: int) -> bool:
        """Whether update `step` (0-based) needs per-language gradients and their Gram."""
        return self.meta_every is not None and step % meta_interval(self.meta_every, step) == 0

    def coefficients(self, langs: list[int], tokens: dict[int, int]) -> dict[int, float]:
        """c_n of sum_n c_n L_n for the languages of this batch (L_n: mean token loss)."""
        raise NotImplementedError

    def update(self, step: int, langs: list[int], losses: torch.Tensor, gram: torch.Tensor,
               tokens: dict[int, int]) -> dict[int, float]:
        """Meta step: losses[i] = L_{langs[i]}, G[i, j] = <g_langs[i], g_langs[j]> (float64).
        Returns the c_n that combine the per-language gradients into this update."""
        raise NotImplementedError

    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars of the current state (alpha/xx, ...) and of the last meta step."""
        return dict(self.last)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def _record_gram(self, gram: torch.Tensor, weights: torch.Tensor) -> None:
        self.last["meta/curvature"] = float(weights @ gram @ weights)
        self.last["meta/mean_cos"] = mean_pairwise_cosine(gram)


class LanguageWeights(Weighting):
    """A weight per language (init 1) that the loss uses between meta steps: the state
    GradNorm and MGDA share."""

    def __init__(self, languages: list[str], meta_every):
        super().__init__(languages, meta_every)
        self.w = torch.ones(len(languages), dtype=torch.float64)

    def coefficients(self, langs, tokens):
        return {l: float(self.w[l]) for l in langs}

    def scalars(self):
        out = dict(self.last)
        out.update({f"weight/{l}": float(v) for l, v in zip(self.languages, self.w)})
        return out

    def state_dict(self):
        return {"w": self.w.tolist(), "languages": self.languages}

    def load_state_dict(self, state):
        if state["languages"] != self.languages:
            raise ValueError(f"{self.name} state is for languages {state['languages']}, not {self.languages}")
        self.w = torch.tensor(state["w"], dtype=torch.float64)


def mean_pairwise_cosine(gram: torch.Tensor) -> float:
    """Mean of cos(g_i, g_j) over i < j, from the Gram matrix alone (nan for K < 2)."""
    k = gram.size(0)
    if k < 2:
        return float("nan")
    norms = gram.diagonal().clamp(min=1e-30).sqrt()
    cos = gram / (norms[:, None] * norms[None, :])
    iu = torch.triu_indices(k, k, offset=1)
    return float(cos[iu[0], iu[1]].mean())


def token_share(langs: list[int], tokens: dict[int, int]) -> dict[int, float]:
    total = sum(tokens[l] for l in langs)
    return {l: tokens[l] / total for l in langs}


class TemperatureWeighting(Weighting):
    """Static: the token-mean loss of the sampled batch (the sampler's temperature does
    the weighting), c_n = tokens_n / tokens."""

    name = "temperature"

    def coefficients(self, langs, tokens):
        return token_share(langs, tokens)


def make_weighting(cfg, languages: list[str]) -> Weighting:
    """cfg.weighting.method -> instance. A plain dict, no registry."""
    from cats_ds.weighting.cats import CatsWeighting
    from cats_ds.weighting.gradnorm import GradNormWeighting
    from cats_ds.weighting.mgda import MgdaWeighting

    builders = {
        "temperature": lambda: TemperatureWeighting(languages),
        "cats": lambda: CatsWeighting(languages, cfg.cats),
        "gradnorm": lambda: GradNormWeighting(languages, cfg.gradnorm, cfg.cats.meta_every),
        "mgda": lambda: MgdaWeighting(languages, cfg.mgda, cfg.cats.meta_every),
    }
    return builders[cfg.weighting.method]()
