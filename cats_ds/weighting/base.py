"""The one interface every task-weighting method implements.

The training loop calls it at one named point. Every micro-batch it asks `coefficients`
for the per-language loss weights c_n of the combined loss sum_n c_n L_n (one backward):
c_n = w_n * mix_n, with w_n the method's weight (CATS: alpha_n; 1 for temperature) and
mix_n the sampled mix (`meta.weight_by`: tokens_n / tokens, or 1 per language).

On a meta step (`is_meta_step`) it instead runs two backwards per language (the halves
of its slot), builds the K x K Gram matrix G of the per-language gradients g_n (on ZeRO
partitions, cats_ds/training/grads.py; plain or split, `grads.gram`) and calls
`update(step, langs, losses, G, shares, nll=nll)`, whose returned coefficients combine
the g_n into the update, before `engine.step()`. g_n is the gradient
of language n's loss averaged over the micro-steps that contain it (weighted by mix_n
there), and shares[n] = S_n = (1/gas) sum_m mix_n^(m), so that sum_n S_n g_n is exactly
the update a plain step with w = 1 would make. If G or the losses are not finite (fp16
overflow), the loop calls `skip` instead: the weights stay, the update still happens.
"""

from __future__ import annotations

from typing import Optional

import torch

from cats_ds.config import meta_interval
from cats_ds.weighting.registry import register_method


class WeightingError(FloatingPointError):
    """A meta step would put a weight outside its valid range (non-finite, or degenerate:
    CATS' alpha outside [0, N], GradNorm's renormalization crushing or inflating every
    weight, MGDA's lambda off the simplex): training stops there, before the weight is
    used, with exit code 2; the message names the method, the language, the value and the
    keys to change."""


FLOOR_WARN_META_STEPS = 50
"""A weight that sits at its method's floor (`Weighting.floor`) for this many meta steps
in a row gets a warning, once: that language barely trains any more."""


class Weighting:
    name = "base"
    """weighting.method (set by @register_method)."""
    floor: Optional[float] = None
    """The lowest weight the method gives a language (None: no floor); see floor_warnings."""

    @classmethod
    def from_config(cls, cfg, languages: list[str], vocab_size: Optional[int] = None) -> "Weighting":
        """The instance make_weighting builds for a run: the method's own config section, the
        shared meta-step keys (meta.every, meta.weight_by), train.seed if it draws random
        numbers; vocab_size for a method that needs it."""
        raise NotImplementedError(f"{cls.__qualname__}.from_config")

    def __init__(self, languages: list[str], meta_every: Optional[list] = None, weight_by: str = "tokens"):
        if weight_by not in ("tokens", "language"):
            raise ValueError(f"meta.weight_by: {weight_by!r} is not one of 'tokens', 'language'")
        self.languages = languages
        self.meta_every = meta_every
        self.weight_by = weight_by
        self.last: dict[str, float] = {}
        self.skipped = 0
        self.at_floor = [0] * len(languages)
        """Meta steps in a row each language's weight has been at the floor (this process)."""
        self.floor_warned: set[int] = set()

    def is_meta_step(self, step: int) -> bool:
        """Whether update `step` (0-based) needs per-language gradients and their Gram."""
        return self.meta_every is not None and step % meta_interval(self.meta_every, step) == 0

    def mix(self, langs: list[int], tokens: dict[int, int]) -> dict[int, float]:
        """mix_n of one micro-batch: tokens_n / tokens (weight_by tokens) or 1 (language)."""
        if self.weight_by == "language":
            return {l: 1.0 for l in langs}
        return token_share(langs, tokens)

    def weight(self, lang: int) -> float:
        """w_n: the method's own weight of language n (1 unless a subclass keeps one)."""
        return 1.0

    def coefficients(self, langs: list[int], tokens: dict[int, int]) -> dict[int, float]:
        """c_n = w_n * mix_n of sum_n c_n L_n for the languages of this micro-batch
        (L_n: the language's mean token loss in it)."""
        return {l: self.weight(l) * m for l, m in self.mix(langs, tokens).items()}

    def update(self, step: int, langs: list[int], losses: torch.Tensor, gram: torch.Tensor,
               shares: dict[int, float], nll: Optional[torch.Tensor] = None) -> dict[int, float]:
        """Meta step: losses[i] = L_{langs[i]} (label-smoothed mean token loss), G[i, j] =
        <g_langs[i], g_langs[j]> (float64; the plain or the split Gram, grads.gram),
        shares[n] = S_n (module docstring), nll[i] the mean un-smoothed token NLL of
        langs[i] in the meta batch (None when the caller has none). Returns the c_n that
        combine the g_n into this update (w_n * S_n unless the method says otherwise)."""
        raise NotImplementedError

    def skip(self, step: int, langs: list[int], shares: dict[int, float]) -> dict[int, float]:
        """A meta step whose G or losses are not finite: leave the weights as they are and
        combine the g_n with the current ones (DeepSpeed's loss scaler then skips or takes
        the optimizer step as it would without the meta step)."""
        self.skipped += 1
        self.last["meta/skipped"] = float(self.skipped)
        return {l: self.weight(l) * shares[l] for l in langs}

    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars of the current state (alpha/xx, ...) and of the last meta step."""
        return dict(self.last)

    def weights(self) -> torch.Tensor:
        """w_n of every language (float64), for the floor count."""
        return torch.tensor([self.weight(i) for i in range(len(self.languages))], dtype=torch.float64)

    def refuse(self, step: int, values: torch.Tensor, low: float, high: float, what: str, fix: str) -> None:
        """WeightingError naming the first language whose new weight (`values`, one per
        language) is non-finite or outside [low, high]; `fix`: the settings to change."""
        bad = ~torch.isfinite(values) | (values < low) | (values > high)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise WeightingError(f"{self.name} weights out of range at step {step}: {what}/{self.languages[i]} would be "
                                 f"{float(values[i]):.4g} (allowed: finite, in [{low:g}, {high:g}]). {fix}")

    def floor_warnings(self) -> list[str]:
        """After a meta step: count, per language, the meta steps in a row its weight has sat
        at the floor; a warning line (once per language and process) when a count reaches
        FLOOR_WARN_META_STEPS. The training loop prints them."""
        if self.floor is None:
            return []
        w = self.weights()
        out = []
        for i, v in enumerate(w.tolist()):
            self.at_floor[i] = self.at_floor[i] + 1 if v <= self.floor + 1e-9 * max(1.0, abs(self.floor)) else 0
            if self.at_floor[i] >= FLOOR_WARN_META_STEPS and i not in self.floor_warned:
                self.floor_warned.add(i)
                out.append(f"{self.name}: the weight of {self.languages[i]} has sat at its floor {self.floor:g} for "
                           f"{self.at_floor[i]} meta steps in a row: that language barely trains. {self.floor_hint()}")
        return out

    def floor_hint(self) -> str:
        return ""

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

    def __init__(self, languages: list[str], meta_every, weight_by: str = "tokens"):
        super().__init__(languages, meta_every, weight_by)
        self.w = torch.ones(len(languages), dtype=torch.float64)

    def weight(self, lang):
        return float(self.w[lang])

    def scalars(self):
        out = dict(self.last)
        out.update({f"weight/{l}": float(v) for l, v in zip(self.languages, self.w)})
        return out

    def state_dict(self):
        return {"w": self.w.tolist(), "languages": self.languages, "skipped": self.skipped}

    def load_state_dict(self, state):
        if state["languages"] != self.languages:
            raise ValueError(f"{self.name} state is for languages {state['languages']}, not {self.languages}")
        self.w = torch.tensor(state["w"], dtype=torch.float64)
        self.skipped = int(state.get("skipped", 0))


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


@register_method("temperature")
class TemperatureWeighting(Weighting):
    """Static: the token-mean loss of the sampled batch (the sampler's temperature does
    the weighting), c_n = tokens_n / tokens."""

    @classmethod
    def from_config(cls, cfg, languages, vocab_size=None):
        return cls(languages)
