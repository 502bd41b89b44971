"""Per-language gradients on ZeRO partitions -> Gram matrix (the CATS hook).

At a meta step the loop runs one forward+backward per language of the batch, each at a
forced accumulation boundary so DeepSpeed reduces it. Right after each backward this
rank's share of every parameter's gradient is copied into a row of a (K, n_local)
buffer and zeroed, so the next backward starts from nothing whatever DeepSpeed's
accumulation semantics are (ZeRO-0 accumulates into param.grad, ZeRO-1/2 in fp32
rebuild the partition, mixed precision accumulates into a flat fp32 partition).

Local dot products give a partial K x K Gram; ONE all_reduce (with the K loss sums and
token counts folded in) gives G. The update sum_n c_n g_n is written back into the
partition before engine.step(), so DeepSpeed's clipping and optimizer see the combined
gradient. Full per-language gradients are never gathered: extra memory is the
(K, |theta| / world) buffer, extra traffic K*K + 2K floats.

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


def gram_and_losses(grads: PartitionGrads, rows: torch.Tensor, loss_sums: torch.Tensor,
                    tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows: (K, n_local) captured partitions. Returns (G (K, K), per-language mean loss (K,)),
    both global, from ONE all_reduce of K*K + 2K floats."""
    k = rows.size(0)
    scale = grads.loss_scale()
    partial = partial_gram(rows, grads.gram_weights(rows.device)) / (scale * scale)  # (K, K)
    packed = torch.cat([partial.reshape(-1), loss_sums.double(), tokens.double()])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
    gram = packed[:k * k].view(k, k)
    losses = packed[k * k:k * k + k] / packed[k * k + k:].clamp(min=1)
    return gram, losses


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


def reference_rows(model: torch.nn.Module, plans, splits: dict, languages: list[str], tag_ids: list[int],
                   smoothing: float, gas: int, weight_by: str = "tokens"):
    """The single-process reference the partitioned path must equal (tests, benchmark):
    g_n = sum_m mix_n^(m) grad L_n^(m) / (gas S_n) on the GLOBAL batch of each micro-step
    plan (the average over the micro-steps that contain n, see plan_shares), by plain
    autograd on a full copy of the model. Returns (langs, rows (K, |theta|) float64,
    mean losses (K,) float64)."""
    from cats_ds.data.sampler import Plan, collate, target_tokens
    from cats_ds.training.losses import per_language_sums

    params = [p for p in model.parameters() if p.requires_grad]
    grads: dict[int, torch.Tensor] = {}
    sums: dict[int, list[float]] = {}
    shares = plan_shares(plans, splits, languages, weight_by)
    for plan in plans:
        tokens = target_tokens(plan, splits, languages)
        mix = plan_mix(plan, splits, languages, weight_by)
        for li, sents in zip(plan.langs, plan.sents):
            batch = collate(Plan([li], [sents]), splits, languages, tag_ids)
            logits = model(batch.src, batch.prev, batch.langs)
            loss_sum, _, tok = per_language_sums(logits, batch.tgt, batch.langs, len(languages), smoothing)
            g = torch.autograd.grad(loss_sum[li] / tokens[li], params, allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for x, p in zip(g, params)])
            flat = flat.double() * (mix[li] / (gas * shares[li]))
            grads[li] = flat if li not in grads else grads[li] + flat
            acc = sums.setdefault(li, [0.0, 0.0])
            acc[0] += float(loss_sum[li])
            acc[1] += float(tok[li])
    langs = sorted(grads)
    rows = torch.stack([grads[l] for l in langs])
    losses = torch.tensor([sums[l][0] / sums[l][1] for l in langs], dtype=torch.float64)
    return langs, rows, losses
