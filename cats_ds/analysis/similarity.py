"""Per-language gradient similarity by parameter group (the paper's Figures 2 bottom, 4, 5).

For languages i, j and a parameter group q (E.SA, E.FC, ..., see GROUPS):

    cos_q(i, j)   = <g_i, g_j>_q / (|g_i|_q |g_j|_q)                 direction similarity
    gamma_q(i, j) = 2 |g_i|_q |g_j|_q / (|g_i|_q^2 + |g_j|_q^2)      magnitude similarity

Both come from the per-language Gram matrix restricted to the group,
G_q = (rows * mask_q) @ rows.T, whose diagonal holds the squared norms. One batch's
gradient is partly noise, which G_q's diagonal carries: cos_q is biased toward 0. So each
language's analysis batch is also cut into two halves (cats_ds.grads.split_slot) and

    split_cos_q(i, j) = S+_q[i, j] / sqrt(S+_q[i, i] S+_q[j, j])

with S_q the split Gram of the two halves' token-mean gradients (grads.fold_halves: its
expectation is the Gram of the expected gradients, the noise cancels) and S+_q its
projection onto the PSD cone; reported beside cos (gamma stays plain). `rows` is
(K, n_local): this rank's share of every language's gradient, flat in the layout of
PartitionGrads.capture() (cats_ds/training/grads.py) or of a plain module's parameters. A group's
boundaries may fall anywhere inside a ZeRO flat partition: the layout is per parameter,
so each rank masks the fragments it owns, and ONE all_reduce of n_groups*K*K floats
(plus 2K for the losses) gives every G_q. Full gradients are never gathered.

Pairs are aggregated by the corpus' resource groups (Hi / Mid / Lo, from the training
pair counts and eval.lo_max / eval.hi_min) into pair types HiHi, HiLo, LoLo (and HiMid,
MidMid, MidLo where a corpus has Mid languages).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from cats_ds.data.groups import group_for
from cats_ds.training.grads import is_expert_param, partial_gram

if TYPE_CHECKING:
    from cats_ds.data.manifest import Manifest
    from cats_ds.training.grads import PartitionGrads

GROUPS: tuple[str, ...] = ("Emb", "E.SA", "E.FC", "E.LN", "D.SA", "D.EA", "D.FC", "D.LN", "experts", "other")
"""Parameter groups, in the order of the heatmap rows. Emb: the (tied) token embeddings;
E/D: encoder/decoder; SA: self-attention, EA: encoder(cross)-attention, FC: feed-forward,
LN: LayerNorm (per-layer norms and the final enc_norm/dec_norm). Family-expert parameters
fall into the group of the module they replace (an expert FFN in the decoder is D.FC);
an expert parameter outside those modules (e.g. per-family output embeddings) is
`experts`, any other unmatched parameter `other`."""
ALL = "all"
"""Pseudo-group: every parameter (the sum of all G_q)."""
RESOURCE_ORDER = ("Hi", "Mid", "Lo")
PAIR_TYPES = ("HiHi", "HiMid", "HiLo", "MidMid", "MidLo", "LoLo")

_PATTERNS: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), g) for p, g in (
    (r"^(embed|dec_embed)\.", "Emb"),
    (r"^encoder_layers\.\d+\.self_attn\.", "E.SA"),
    (r"^encoder_layers\.\d+\.ffn\.", "E.FC"),
    (r"^encoder_layers\.\d+\.norm\d*\.", "E.LN"),
    (r"^enc_norm\.", "E.LN"),
    (r"^decoder_layers\.\d+\.self_attn\.", "D.SA"),
    (r"^decoder_layers\.\d+\.cross_attn\.", "D.EA"),
    (r"^decoder_layers\.\d+\.ffn\.", "D.FC"),
    (r"^decoder_layers\.\d+\.norm\d*\.", "D.LN"),
    (r"^dec_norm\.", "D.LN"),
))


class AnalysisError(ValueError):
    """An analysis setting or input is wrong; the message names the key or file."""


def param_group(name: str, expert: bool = False) -> str:
    """The parameter group of a parameter, from its name in cats_ds.model.transformer."""
    for pattern, group in _PATTERNS:
        if pattern.match(name):
            return group
    return "experts" if expert else "other"


def group_sizes(module: torch.nn.Module) -> dict[str, int]:
    """Number of trainable parameters per group (ZeRO-3: the full, not the local, size)."""
    sizes = {g: 0 for g in GROUPS}
    for name, p in module.named_parameters():
        if p.requires_grad:
            sizes[param_group(name, is_expert_param(p))] += int(getattr(p, "ds_numel", p.numel()))
    return sizes


# --------------------------------------------------------------------------- layouts and Grams


@dataclass(frozen=True)
class Segment:
    """Columns [start, start + length) of a gradient row belong to GROUPS[group]; their
    dot products count with `weight` (1 / replicas when several ranks hold the same
    fragment, as ZeRO-0 does)."""
    start: int
    length: int
    group: int
    weight: float


def partition_segments(grads: "PartitionGrads") -> list[Segment]:
    """The group layout of rows captured by `grads` (valid after its first capture())."""
    if grads._layout is None:
        raise RuntimeError("PartitionGrads has no layout yet: capture() a gradient first")
    segments, offset = [], 0
    for slot, n in zip(grads.slots, grads._layout):
        if n:
            group = GROUPS.index(param_group(slot.name, is_expert_param(slot.param)))
            segments.append(Segment(offset, n, group, 1.0 / slot.replicas))
            offset += n
    return _merge(segments)


def module_segments(module: torch.nn.Module) -> list[Segment]:
    """The group layout of a row holding a plain module's full gradient, concatenated in
    named_parameters() order (trainable parameters only, tied ones once)."""
    segments, offset = [], 0
    for name, p in module.named_parameters():
        if p.requires_grad:
            segments.append(Segment(offset, p.numel(), GROUPS.index(param_group(name, is_expert_param(p))), 1.0))
            offset += p.numel()
    return _merge(segments)


def _merge(segments: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in segments:
        last = out[-1] if out else None
        if last and last.group == s.group and last.weight == s.weight and last.start + last.length == s.start:
            out[-1] = Segment(last.start, last.length + s.length, s.group, s.weight)
        else:
            out.append(s)
    return out


def group_grams(rows: torch.Tensor, segments: Sequence[Segment], block: int = 1 << 20) -> torch.Tensor:
    """rows (K, n) -> this rank's partial Gram per group, (len(GROUPS), K, K) float64.

    Products are taken in float64, `block` columns at a time (bounded temporary memory)."""
    k = rows.size(0)
    width = sum(s.length for s in segments)
    if width != rows.size(1):
        raise RuntimeError(f"gradient rows have {rows.size(1)} columns but the layout covers {width}")
    out = torch.zeros(len(GROUPS), k, k, dtype=torch.float64, device=rows.device)
    for s in segments:
        out[s.group] += s.weight * partial_gram(rows[:, s.start:s.start + s.length], block=block)
    return out


def reduce_grams(partial: torch.Tensor, loss_sums: torch.Tensor, tokens: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the partial per-group Grams (Q, R, R) (R = K rows, or 2K half rows) and the
    local loss sums / target tokens (K,) over ranks with ONE all_reduce. Returns (G (Q, R,
    R), mean token loss (K,)), on CPU."""
    q, r, _ = partial.shape
    k = loss_sums.numel()
    packed = torch.cat([partial.reshape(-1), loss_sums.to(partial).reshape(-1), tokens.to(partial).reshape(-1)])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
    packed = packed.cpu()
    n = q * r * r
    grams = packed[:n].view(q, r, r)
    losses = packed[n:n + k] / packed[n + k:].clamp(min=1)
    return grams, losses


def split_cos(split: torch.Tensor) -> np.ndarray:
    """S (..., K, K) -> S+_ij / sqrt(S+_ii S+_jj), S+ the PSD projection of S; NaN where a
    diagonal entry of S+ is 0 (no signal left, or a group without parameters)."""
    from cats_ds.training.grads import psd_project

    cos, _ = cos_gamma(psd_project(split))
    return cos


def cos_gamma(gram: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """G (..., K, K) -> (cos, gamma), each (..., K, K); NaN where a gradient is zero."""
    g = gram.double().cpu().numpy()
    d = np.diagonal(g, axis1=-2, axis2=-1)  # (..., K) squared norms
    di, dj = d[..., :, None], d[..., None, :]
    prod = np.sqrt(np.clip(di * dj, 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(prod > 0, g / prod, np.nan)
        gamma = np.where(di + dj > 0, 2.0 * prod / (di + dj), np.nan)
    return cos, gamma


# --------------------------------------------------------------------------- pairs and resource groups


def resource_groups(manifest: "Manifest", languages: Iterable[str], lo_max: int, hi_min: int,
                    named: Optional[dict[str, list[str]]] = None) -> dict[str, str]:
    """Hi / Mid / Lo of each language: by name (eval.groups, `named`) when given, else by its
    training pairs (eval.lo_max, eval.hi_min)."""
    return {lang: group_for(lang, manifest.train_pairs(lang), lo_max, hi_min, named) for lang in languages}


def pair_type(a: str, b: str) -> str:
    """('Lo', 'Hi') -> 'HiLo': the two resource groups in Hi, Mid, Lo order."""
    x, y = sorted((a, b), key=RESOURCE_ORDER.index)
    return x + y


def parse_pairs(pairs: Sequence[str] | str, languages: Sequence[str], key: str = "analysis.pairs"
                ) -> list[tuple[str, str]]:
    """["de:af", "uk:kk"] or "de:af,uk:kk" -> [("de", "af"), ("uk", "kk")]; empty -> every
    pair of `languages` (in their order). Unknown languages are an error naming them."""
    items = [p for p in (pairs.split(",") if isinstance(pairs, str) else pairs) if p.strip()]
    if not items:
        return [(a, b) for i, a in enumerate(languages) for b in languages[i + 1:]]
    out = []
    for item in items:
        parts = [x.strip() for x in item.split(":")]
        if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise AnalysisError(f"{key}: '{item}' is not a pair of two different languages like 'de:af'")
        for lang in parts:
            if lang not in languages:
                raise AnalysisError(f"{key}: unknown language '{lang}' in '{item}'; "
                                    f"the model's languages: {', '.join(languages)}")
        out.append((parts[0], parts[1]))
    return out


def _num(x: float) -> Optional[float]:
    """JSON-safe float (None for NaN)."""
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _mean(values: np.ndarray) -> Optional[float]:
    """Mean of the finite values (None if there are none)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def summarize(langs: Sequence[str], grams: torch.Tensor, sizes: dict[str, int], resource: dict[str, str],
              pairs: Sequence[tuple[str, str]], split: Optional[torch.Tensor] = None) -> dict:
    """The similarity part of an analysis record.

    langs: the K languages of the Gram's rows; grams: global (len(GROUPS), K, K);
    sizes: parameters per group (groups without any are left out); pairs: the pairs to
    report one by one; split: the split Grams S_q (len(GROUPS), K, K), if any. Pair
    types average over ALL pairs of the K languages.

    Returns {"param_groups": {group: n}, "pairs": {"a:b": {"type", "cos": {group: v},
    "gamma": {...}, "split_cos": {...}}}, "pair_types": {"HiLo": {"n": pairs, "cos": {...},
    "gamma": {...}, "split_cos": {...}}}} with group keys in GROUPS order plus "all"
    (split_cos only with `split`; its "all" projects the summed S)."""
    present = [i for i, g in enumerate(GROUPS) if sizes.get(g, 0) > 0]
    names = [GROUPS[i] for i in present] + [ALL]
    stacked = torch.cat([grams[present], grams.sum(0, keepdim=True)])  # (len(names), K, K)
    cos, gamma = cos_gamma(stacked)
    measures = {"cos": cos, "gamma": gamma}
    if split is not None:
        measures["split_cos"] = split_cos(torch.cat([split[present], split.sum(0, keepdim=True)]))
    index = {lang: i for i, lang in enumerate(langs)}

    def values(arr: np.ndarray, i: int, j: int) -> dict[str, Optional[float]]:
        return {name: _num(arr[q, i, j]) for q, name in enumerate(names)}

    out_pairs = {}
    for a, b in pairs:
        i, j = index[a], index[b]
        out_pairs[f"{a}:{b}"] = {"type": pair_type(resource[a], resource[b]),
                                 **{m: values(arr, i, j) for m, arr in measures.items()}}
    by_type: dict[str, list[tuple[int, int]]] = {}
    for i in range(len(langs)):
        for j in range(i + 1, len(langs)):
            by_type.setdefault(pair_type(resource[langs[i]], resource[langs[j]]), []).append((i, j))
    types = {}
    for t in sorted(by_type, key=PAIR_TYPES.index):
        ii, jj = map(list, zip(*by_type[t]))
        types[t] = {"n": len(ii), **{m: {name: _mean(arr[q, ii, jj]) for q, name in enumerate(names)}
                                     for m, arr in measures.items()}}
    return {"param_groups": {GROUPS[i]: int(sizes[GROUPS[i]]) for i in present},
            "pairs": out_pairs, "pair_types": types}
