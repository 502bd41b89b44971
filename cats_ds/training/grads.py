"""Per-language gradients on ZeRO partitions -> Gram matrix (the CATS hook).

At a meta step the loop cuts each language's slot of the batch into two halves a, b of
disjoint sentences and about equal target tokens (`split_slot`) and runs one
forward+backward per half, each at a forced accumulation boundary so DeepSpeed reduces
it. Right after each backward this rank's share of every parameter's gradient is copied
into a row of a (2K, n_local) buffer and zeroed, so the next backward starts from
nothing whatever DeepSpeed's accumulation semantics are (ZeRO-0 accumulates into
param.grad, ZeRO-1/2 in fp32 rebuild the partition, mixed precision accumulates into a
flat fp32 partition).

Both halves are normalized by the WHOLE slot's target tokens, so row a + row b is
exactly the whole slot's gradient g_n. Local dot products give a partial 2K x 2K Gram Q
of the half rows; ONE all_reduce (with the K loss sums, nll sums and token counts folded
in) gives Q, and from it (`fold_halves`) both the plain Gram G[i, j] = <g_i, g_j> and the
split Gram S[i, j] = (<g_i^a, g_j^b> + <g_i^b, g_j^a>) / 2 of the per-half token means,
whose expectation is <E g_i, E g_j> (the noise of two independent halves cancels,
diagonal included). The update sum_n c_n g_n is written back into the partition before
engine.step(), so DeepSpeed's clipping and optimizer see the combined gradient. Full
per-language gradients are never gathered: extra memory is the (2K, |theta| / world)
buffer, extra traffic 4K*K + 3K floats.

Which fragment a rank owns:
  ZeRO-0      the whole (already averaged) param.grad; replicated on every rank of the
              parameter's data-parallel group, so its dot products are divided by that
              group's size before the all_reduce.
  ZeRO-1/2    the fragment DeepSpeed maps to this rank (param._hp_mapping).
  BF16_Optimizer  (bf16 with ZeRO-1 and fp32 gradient accumulation) keeps the WHOLE
              averaged gradient of every parameter in a flat fp32 buffer on every rank
              and computes its clipping norm over all of it: treated like ZeRO-0 (whole
              parameters, replicated), read from and written to that buffer. Capturing
              only the rank's own part would leave the other parts to be summed into the
              next language's all-reduce.
  ZeRO-3      deepspeed.utils.safe_get_local_grad / safe_set_local_grad.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist


def is_expert_param(param: torch.nn.Parameter) -> bool:
    """DeepSpeed marks MoE expert parameters with allreduce=False."""
    return hasattr(param, "allreduce") and not param.allreduce


@dataclass
class _Slot:
    name: str
    param: torch.nn.Parameter
    in_gram: bool
    replicas: int


class PartitionGrads:
    """This rank's writable share of every trainable parameter's gradient.

    Valid right after a backward at an accumulation boundary, before engine.step().
    `include(name, param)` decides which parameters enter the Gram matrix (all of them
    are captured and written back)."""

    def __init__(self, engine, include: Callable[[str, torch.nn.Parameter], bool] = lambda n, p: True):
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

        self.engine = engine
        self.stage = engine.zero_optimization_stage()
        world = dist.get_world_size() if dist.is_initialized() else 1
        self._bf16_grads: dict[int, torch.Tensor] = {}  # id(param) -> its fp32 gradient in the flat buffer
        if isinstance(engine.optimizer, BF16_Optimizer):
            opt = engine.optimizer
            for group, grads in zip(opt.bf16_groups, opt.fp32_groups_gradients):
                self._bf16_grads.update((id(p), g) for p, g in zip(group, grads))
        slots = []
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            replicas = 1
            if self.stage == 0 or self._bf16_grads:
                group = getattr(p, "group_name", None) if is_expert_param(p) else None
                replicas = _expert_dp_size(group) if group else world
            slots.append(_Slot(name, p, bool(include(name, p)), replicas))
        self.slots = slots
        self._layout: Optional[list[int]] = None
        self._weights: Optional[torch.Tensor] = None

    # ---------------------------------------------------------------- fragments

    def _fragment(self, p: torch.nn.Parameter) -> Optional[torch.Tensor]:
        """A flat view of the part of p's gradient this rank owns (None: owns none)."""
        if self._bf16_grads:
            return self._bf16_grads[id(p)].view(-1)
        if self.stage == 0:
            return None if p.grad is None else p.grad.view(-1)
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return None
        frag = mapping.get_lp_grad_fragment(p._index_in_param_group)
        addr = mapping.lp_fragment_address
        flat = frag.view(-1)
        if flat.numel() != addr.numel:  # BF16 optimizer: a buffer of the whole parameter
            flat = flat.narrow(0, addr.start, addr.numel)
        return flat

    def _read(self, slot: _Slot) -> Optional[torch.Tensor]:
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad

            g = safe_get_local_grad(slot.param)
            return None if g is None else g.reshape(-1)
        return self._fragment(slot.param)

    def _write(self, slot: _Slot, value: torch.Tensor) -> None:
        if self.stage == 3:
            from deepspeed.utils import safe_set_local_grad

            safe_set_local_grad(slot.param, value)
            return
        frag = self._fragment(slot.param)
        if frag is not None:
            frag.copy_(value)

    # ---------------------------------------------------------------- capture / write back

    def capture(self) -> torch.Tensor:
        """Copy this rank's gradient share into a new flat fp32 vector, then zero it."""
        parts, layout = [], []
        for slot in self.slots:
            g = self._read(slot)
            n = 0 if g is None else g.numel()
            layout.append(n)
            if n:
                parts.append(g.float().clone())
                self._write(slot, torch.zeros_like(g))
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            raise RuntimeError("the local gradient partition changed shape between backwards "
                               "(a parameter got no gradient on one language?)")
        return torch.cat(parts) if parts else torch.zeros(0)

    def write_back(self, flat: torch.Tensor) -> None:
        """Write a flat vector (the layout of capture()) into the gradient partition."""
        offset = 0
        for slot, n in zip(self.slots, self._layout):
            if n:
                g = self._read(slot)
                self._write(slot, flat[offset:offset + n].to(g.dtype).view_as(g))
                offset += n

    def gram_weights(self, device) -> torch.Tensor:
        """Per-element weight of the dot products: 0 outside the Gram's parameters,
        1 / replicas for fragments that several ranks hold (ZeRO-0)."""
        if self._weights is None:
            w = [torch.full((n,), (1.0 / s.replicas) if s.in_gram else 0.0)
                 for s, n in zip(self.slots, self._layout) if n]
            self._weights = torch.cat(w).to(device) if w else torch.zeros(0, device=device)
        return self._weights

    def loss_scale(self) -> float:
        """fp16 dynamic loss scale (1 for fp32/bf16): divided out before any dot product."""
        opt = self.engine.optimizer
        for attr in ("loss_scale", "cur_scale"):
            v = getattr(opt, attr, None)
            if isinstance(v, (int, float)) or torch.is_tensor(v):
                return float(v)
        return 1.0


def grad_norms(grads: PartitionGrads, group_of: Callable[[str, torch.nn.Parameter], str], device) -> dict[str, float]:
    """L2 norms of the full (all ranks') current gradient, per parameter group and in total
    ("all"), from this rank's partition (read right after the backward of an accumulation
    boundary, before engine.step(): the gradient the optimizer is about to use, before
    clipping, loss scale divided out). One all_reduce of one float per group."""
    names: list[str] = []
    for slot in grads.slots:
        group = group_of(slot.name, slot.param)
        if group not in names:
            names.append(group)
    sq = torch.zeros(len(names), dtype=torch.float64)
    for slot in grads.slots:
        g = grads._read(slot)
        if g is not None and g.numel():
            sq[names.index(group_of(slot.name, slot.param))] += float(g.double().pow(2).sum()) / slot.replicas
    if dist.is_initialized() and dist.get_world_size() > 1:
        sq = sq.to(device)
        dist.all_reduce(sq)
        sq = sq.cpu()
    scale = grads.loss_scale()
    norms = {name: float(v.sqrt()) / scale for name, v in zip(names, sq)}
    norms["all"] = float(sq.sum().sqrt()) / scale
    return norms


def _expert_dp_size(group_name: str) -> int:
    from deepspeed.utils import groups

    return dist.get_world_size(group=groups._get_expert_data_parallel_group(group_name))


def partial_gram(rows: torch.Tensor, weights: Optional[torch.Tensor] = None, block: int = 1 << 18) -> torch.Tensor:
    """sum_i w_i rows[:, i] rows[:, i]^T (w = 1 without weights), (K, K) float64, `block`
    columns at a time (bounded temporary memory).

    Float64 products and sums: an fp32 GEMM over millions of columns loses ~1e-5 of
    |g|^2 (measured on the gettext8 model), which is more than the Gram may be off."""
    k, n = rows.shape
    out = torch.zeros(k, k, dtype=torch.float64, device=rows.device)
    for a in range(0, n, block):
        cols = rows[:, a:a + block].double()  # (K, <=block)
        out += (cols if weights is None else cols * weights[a:a + block].double()) @ cols.T
    return out


def split_slot(sents: np.ndarray, tgt_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut one language slot of a GLOBAL plan (sentence ids `sents`; `tgt_sizes`: target
    tokens of every sentence of the language's split) into halves a, b: disjoint, together
    the slot, with about equal target tokens (longest first, each to the half with fewer
    tokens so far, ties to a; they differ by at most one sentence), each in the slot's order.
    A function of the ids and their lengths only, so every rank cuts the same halves; each
    half is then dealt to the ranks like any plan (a rank with none of a half's sentences
    runs the filler at weight 0: it adds nothing and counts no tokens). A slot of one
    sentence has an empty half b."""
    sizes = np.asarray(tgt_sizes)[sents].astype(np.int64)
    to_b = np.zeros(len(sents), dtype=bool)
    t_a = t_b = 0
    for i in np.argsort(-sizes, kind="stable").tolist():
        if t_a <= t_b:
            t_a += int(sizes[i])
        else:
            to_b[i] = True
            t_b += int(sizes[i])
    return sents[~to_b], sents[to_b]


@dataclass
class HalfGrads:
    """What a meta step's backwards leave on one rank (train.per_language_gradients)."""
    langs: list[int]
    """The K distinct languages of the meta batch, ascending."""
    rows: torch.Tensor
    """(2K, n_local): rows[k] = g_k^a' and rows[K + k] = g_k^b', the captured half
    gradients of langs[k] divided by S_n, each normalized by the whole slot's tokens, so
    g_n = rows[k] + rows[K + k] is today's whole-slot gradient."""
    rho: torch.Tensor
    """(K, 2) float64: rho_n^h = sum_m (mix_n^(m) / gas) (tokens of half h / tokens of the
    slot) / S_n, the token fraction of each half (rho^a + rho^b = 1). The per-half token
    mean is g_n^h = rows / rho_n^h (0 for an empty half, rho 0)."""
    loss_sums: torch.Tensor
    """(K,) float64: this rank's smoothed loss sums."""
    nll_sums: torch.Tensor
    """(K,) float64: this rank's un-smoothed token NLL sums."""
    tokens: torch.Tensor
    """(K,) float64: this rank's target tokens."""
    shares: dict
    """{n: S_n} (base.py)."""

    def whole(self) -> torch.Tensor:
        """(K, n_local): the whole slots' g_n."""
        k = len(self.langs)
        return self.rows[:k] + self.rows[k:]

    def combine(self, coeffs: dict[int, float]) -> torch.Tensor:
        """sum_n c_n g_n, flat (n_local,), in the layout of PartitionGrads.capture()."""
        c = torch.tensor([coeffs[l] for l in self.langs], dtype=self.rows.dtype, device=self.rows.device)
        return torch.cat([c, c]) @ self.rows


@dataclass
class MetaGrams:
    """The global quantities of a meta step, the same on every rank (float64, CPU)."""
    plain: torch.Tensor
    """G (K, K): <g_i, g_j> of the whole slots' gradients."""
    split: torch.Tensor
    """S (K, K), symmetric, NOT projected: (<g_i^a, g_j^b> + <g_i^b, g_j^a>) / 2 of the
    per-half token means, unbiased for <E g_i, E g_j>. A language with an empty half (a
    slot of one sentence) has no second estimate: its row and column are G's."""
    noise: torch.Tensor
    """v (K,): |g_n^a - g_n^b|^2 / 4, the noise part of G's diagonal (G_nn - S_nn when the
    halves have equal tokens); nan without two halves."""
    agreement: torch.Tensor
    """r (K,): cos(g_n^a, g_n^b) (nan without two non-zero halves)."""
    losses: torch.Tensor
    """(K,) mean (label-smoothed) token loss."""
    nll: torch.Tensor
    """(K,) mean un-smoothed token NLL."""

    def for_method(self, kind: str) -> torch.Tensor:
        """The K x K matrix the weighting gets under grads.gram=`kind`: G, or S projected onto
        the PSD cone (`psd_project`; a non-finite S is passed on as it is, for the loop's
        finite check)."""
        if kind == "plain":
            return self.plain
        if kind != "split":
            raise ValueError(f"grads.gram: {kind!r} is not one of 'plain', 'split'")
        return psd_project(self.split) if bool(torch.isfinite(self.split).all()) else self.split


def psd_project(m: torch.Tensor) -> torch.Tensor:
    """The nearest (Frobenius) symmetric positive semi-definite matrix: eigenvalues of the
    symmetric part clipped at 0 (symmetric eigh in float64). Works on (..., K, K)."""
    m = m.double()
    sym = (m + m.transpose(-1, -2)) / 2
    w, v = torch.linalg.eigh(sym)
    out = (v * w.clamp(min=0).unsqueeze(-2)) @ v.transpose(-1, -2)
    return (out + out.transpose(-1, -2)) / 2


def fold_halves(q: torch.Tensor, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q (..., 2K, 2K), the Gram of the half rows (HalfGrads.rows: a rows, then b rows) and
    rho (K, 2) -> (G, S, v, r) of MetaGrams, (..., K, K), (..., K, K), (..., K), (..., K).

    G = Qaa + Qab + Qba + Qbb (g_n = row a + row b); with the per-half token means
    g^h = row h / rho^h: S = (X + X^T) / 2, X[i, j] = <g_i^a, g_j^b> = Qab[i, j] / (rho_i^a
    rho_j^b); v_n = |g_n^a - g_n^b|^2 / 4; r_n = Qab[n, n] / sqrt(Qaa[n, n] Qbb[n, n]).
    An empty half (rho 0) divides nothing: its mean is taken as 0, and that language's row
    and column of S are G's (MetaGrams.split)."""
    q = q.double()
    rho = rho.double().to(q.device)
    k = rho.size(0)
    qaa, qab, qba, qbb = q[..., :k, :k], q[..., :k, k:], q[..., k:, :k], q[..., k:, k:]
    plain = qaa + qab + qba + qbb
    inv = torch.where(rho > 0, 1.0 / rho.clamp(min=1e-300), torch.zeros_like(rho))
    ia, ib = inv[:, 0], inv[:, 1]
    x = qab * ia[:, None] * ib[None, :]
    split = (x + x.transpose(-1, -2)) / 2
    missing = (rho <= 0).any(dim=1)
    if bool(missing.any()):
        split[..., missing, :] = plain[..., missing, :]
        split[..., :, missing] = plain[..., :, missing]
    daa, dbb, dab = (d.diagonal(dim1=-2, dim2=-1) for d in (qaa, qbb, qab))
    noise = (daa * ia * ia + dbb * ib * ib - 2 * dab * ia * ib) / 4
    noise = torch.where(missing, torch.full_like(noise, float("nan")), noise)
    prod = daa * dbb
    agreement = torch.where(prod > 0, dab / prod.clamp(min=1e-300).sqrt(), torch.full_like(dab, float("nan")))
    return plain, split, noise, agreement


def half_grams(grads: PartitionGrads, half: HalfGrads) -> MetaGrams:
    """The meta step's MetaGrams from this rank's half rows: the partial 2K x 2K Gram, the
    K loss sums, nll sums and token counts in ONE all_reduce of 4K*K + 3K floats."""
    k = len(half.langs)
    scale = grads.loss_scale()
    partial = partial_gram(half.rows, grads.gram_weights(half.rows.device)) / (scale * scale)  # (2K, 2K)
    sums = torch.cat([half.loss_sums, half.nll_sums, half.tokens]).double().to(partial.device)
    packed = torch.cat([partial.reshape(-1), sums])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
    packed = packed.cpu()
    n = 4 * k * k
    q = packed[:n].view(2 * k, 2 * k)
    loss_sums, nll_sums, tokens = packed[n:].view(3, k)
    plain, split, noise, agreement = fold_halves(q, half.rho)
    tokens = tokens.clamp(min=1)
    return MetaGrams(plain, split, noise, agreement, loss_sums / tokens, nll_sums / tokens)


def plan_mix(plan, splits: dict, languages: list[str], weight_by: str) -> dict[int, float]:
    """mix_n of one micro-step plan (weighting/base.py): tokens_n / tokens, or 1 per language."""
    from cats_ds.data.sampler import target_tokens

    tokens = target_tokens(plan, splits, languages)
    if weight_by == "language":
        return {li: 1.0 for li in tokens}
    total = sum(tokens.values())
    return {li: t / total for li, t in tokens.items()}


def plan_shares(plans, splits: dict, languages: list[str], weight_by: str) -> dict[int, float]:
    """S_n = (1/gas) sum_m mix_n^(m) over an update's micro-step plans."""
    shares: dict[int, float] = {}
    for plan in plans:
        for li, m in plan_mix(plan, splits, languages, weight_by).items():
            shares[li] = shares.get(li, 0.0) + m / len(plans)
    return shares


def _language_gradient(model, params, plan, li: int, tokens: int, splits, languages, tag_ids, smoothing: float):
    """Reference helper: the float64 flat gradient of language li's loss sum over `plan`
    divided by `tokens`, by plain autograd, with that loss, NLL and token sums."""
    from cats_ds.data.sampler import collate
    from cats_ds.training.losses import per_language_sums

    batch = collate(plan, splits, languages, tag_ids)
    logits = model(batch.src, batch.prev, batch.langs)
    loss_sum, nll_sum, tok = per_language_sums(logits, batch.tgt, batch.langs, len(languages), smoothing)
    g = torch.autograd.grad(loss_sum[li] / tokens, params, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for x, p in zip(g, params)])
    return flat.double(), loss_sum, nll_sum, tok


def reference_rows(model: torch.nn.Module, plans, splits: dict, languages: list[str], tag_ids: list[int],
                   smoothing: float, gas: int, weight_by: str = "tokens"):
    """The single-process reference the partitioned path must equal (tests, benchmark):
    g_n = sum_m mix_n^(m) grad L_n^(m) / (gas S_n) on the GLOBAL batch of each micro-step
    plan (the average over the micro-steps that contain n, see plan_shares), by plain
    autograd on a full copy of the model. Returns (langs, rows (K, |theta|) float64,
    mean losses (K,) float64)."""
    from cats_ds.data.sampler import Plan, target_tokens

    params = [p for p in model.parameters() if p.requires_grad]
    grads: dict[int, torch.Tensor] = {}
    sums: dict[int, list[float]] = {}
    shares = plan_shares(plans, splits, languages, weight_by)
    for plan in plans:
        tokens = target_tokens(plan, splits, languages)
        mix = plan_mix(plan, splits, languages, weight_by)
        for li, sents in zip(plan.langs, plan.sents):
            flat, loss_sum, _, tok = _language_gradient(model, params, Plan([li], [sents]), li, tokens[li], splits,
                                                        languages, tag_ids, smoothing)
            flat = flat * (mix[li] / (gas * shares[li]))
            grads[li] = flat if li not in grads else grads[li] + flat
            acc = sums.setdefault(li, [0.0, 0.0])
            acc[0] += float(loss_sum[li])
            acc[1] += float(tok[li])
    langs = sorted(grads)
    rows = torch.stack([grads[l] for l in langs])
    losses = torch.tensor([sums[l][0] / sums[l][1] for l in langs], dtype=torch.float64)
    return langs, rows, losses


def reference_halves(model: torch.nn.Module, plans, splits: dict, languages: list[str], tag_ids: list[int],
                     smoothing: float, gas: int, weight_by: str = "tokens"):
    """reference_rows for the halves (`split_slot` of each global slot): the single-process
    HalfGrads.rows and rho by plain autograd on a full copy of the model. Returns (langs,
    rows (2K, |theta|) float64: the a rows, then the b rows, each normalized by the whole
    slot's tokens, rho (K, 2), mean losses (K,), mean nll (K,))."""
    from cats_ds.data.sampler import Plan, target_tokens

    params = [p for p in model.parameters() if p.requires_grad]
    width = sum(p.numel() for p in params)
    grads: dict[int, torch.Tensor] = {}
    rho: dict[int, list[float]] = {}
    sums: dict[int, list[float]] = {}
    shares = plan_shares(plans, splits, languages, weight_by)
    for plan in plans:
        tokens = target_tokens(plan, splits, languages)
        mix = plan_mix(plan, splits, languages, weight_by)
        for li, sents in zip(plan.langs, plan.sents):
            sizes = splits[languages[li]].tgt.sizes
            rows = grads.setdefault(li, torch.zeros(2, width, dtype=torch.float64))
            for h, part in enumerate(split_slot(sents, sizes)):
                rho.setdefault(li, [0.0, 0.0])[h] += mix[li] / gas * int(sizes[part].sum()) / tokens[li]
                if not len(part):
                    continue
                flat, loss_sum, nll_sum, tok = _language_gradient(model, params, Plan([li], [part]), li, tokens[li],
                                                                  splits, languages, tag_ids, smoothing)
                rows[h] += flat * (mix[li] / gas)
                acc = sums.setdefault(li, [0.0, 0.0, 0.0])
                acc[0] += float(loss_sum[li])
                acc[1] += float(nll_sum[li])
                acc[2] += float(tok[li])
    langs = sorted(grads)
    rows = torch.cat([torch.stack([grads[l][h] / shares[l] for l in langs]) for h in (0, 1)])
    rho_t = torch.tensor([[rho[l][0] / shares[l], rho[l][1] / shares[l]] for l in langs], dtype=torch.float64)
    losses = torch.tensor([sums[l][0] / sums[l][2] for l in langs], dtype=torch.float64)
    nll = torch.tensor([sums[l][1] / sums[l][2] for l in langs], dtype=torch.float64)
    return langs, rows, rho_t, losses, nll
