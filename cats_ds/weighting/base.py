"""The one interface every task-weighting method implements.

The training loop calls it at one named point. Every update it asks `coefficients` for
the per-language loss weights c_n of the combined loss sum_n c_n L_n (one backward).
On a meta step (`is_meta_step`) it instead runs one backward per language, builds the
K x K Gram matrix G of the per-language gradients (on ZeRO partitions, cats_ds/grads.py)
and calls `update(step, langs, losses, G)`, whose returned coefficients combine the
per-language gradients into the update, before `engine.step()`.
"""

from __future__ import annotations

import torch


class Weighting:
    name = "base"

    def __init__(self, languages: list[str]):
        self.languages = languages

    def is_meta_step(self, step: int) -> bool:
        """Whether update `step` needs per-language gradients and their Gram matrix."""
        return False

    def coefficients(self, langs: list[int], tokens: dict[int, int]) -> dict[int, float]:
        """c_n of sum_n c_n L_n for the languages of this batch (L_n: mean token loss)."""
        raise NotImplementedError

    def update(self, step: int, langs: list[int], losses: dict[int, float], gram: torch.Tensor,
               tokens: dict[int, int]) -> dict[int, float]:
        """Meta step: G[i, j] = <g_langs[i], g_langs[j]>. Returns the c_n that combine the
        per-language gradients into this update."""
        raise NotImplementedError

    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars describing the current state (e.g. alpha/xx)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TemperatureWeighting(Weighting):
    """Static: the token-mean loss of the sampled batch (the data sampler's temperature
    does the weighting), c_n = tokens_n / tokens."""

    name = "temperature"

    def coefficients(self, langs, tokens):
        total = sum(tokens[l] for l in langs)
        return {l: tokens[l] / total for l in langs}


def token_share(langs: list[int], tokens: dict[int, int]) -> dict[int, float]:
    total = sum(tokens[l] for l in langs)
    return {l: tokens[l] / total for l in langs}


def make_weighting(cfg, languages: list[str]) -> Weighting:
    """cfg.weighting.method -> instance. A plain dict, no registry."""
    builders = {"temperature": lambda: TemperatureWeighting(languages)}
    return builders[cfg.weighting.method]()
