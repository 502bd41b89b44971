"""Language-family expert layers on DeepSpeed MoE (the one model file that knows DeepSpeed).

Every token of a sentence in language l goes to the expert of family(l) (cats_ds/model/families.py):
no learned gate, no capacity drops, no auxiliary loss. The pieces are DeepSpeed's own:

- `FamilyGate` takes the place of `TopKGate` inside DeepSpeed's `MOELayer`. It has no
  parameters; it reads each token's family id (passed as MOELayer's second input, the
  slot DeepSpeed calls `used_token`) and answers with the sparse-route contract of the
  MOELayer this project is built on (DeepSpeed 0.19: l_aux, capacity, E, indices,
  locations, gates, exp_counts); older MOELayers ask gates for dense (S, E, capacity)
  combine weights instead, and FamilyGate refuses them with a message. Capacity
  is the largest number of tokens any expert receives on any rank of the expert-parallel
  group (all-reduce MAX), so nothing is ever dropped and the all-to-all shapes agree.
- `FamilyMoE` subclasses `deepspeed.moe.layer.MoE`, so the engine finds it: it creates the
  expert-parallel groups (`set_deepspeed_parallelism`), marks expert parameters
  (`allreduce=False`, `group_name`) through DeepSpeed's `Experts`, reduces their gradients
  over the expert-data-parallel group, and writes one checkpoint file per expert
  (`layer_{i}_expert_{global id}_mp_rank_00_model_states.pt`). `param_groups` puts expert
  parameters into DeepSpeed's MoE optimizer groups, as ZeRO-1/2 require.

Placements (`experts.modules`; `all` = all three; `experts.side` picks encoder/decoder/both
for ffn and attn):
- ffn: one FeedForward per family.
- attn: self- and encoder-decoder attention. Attention's only parameters are its q, k, v
  and output projections; each becomes a per-family projection (cross-attention keys and
  values route by the sentence's family as well), which is exactly one attention module
  per family.
- out_embed: one output embedding (V x D) per family, initialized from the shared
  embedding; logits stay untied from the input embeddings, which remain shared.

Every expert starts as a copy of the dense module the same seed builds, and the gate
consumes no randomness, so an expert model's shared parameters equal the dense model's
and all its experts equal the dense module: before its first update it computes exactly
what the dense model computes (tests/test_experts.py).

Gradient scale: train.py multiplies each rank's loss by the data-parallel world size W to
undo DeepSpeed's averaging. For experts that stays exact with any ep_size: a rank's expert
gradient holds the tokens of its whole expert-parallel group (the all-to-all backward
brings them back), DeepSpeed sums it over the expert-data-parallel group (W / ep_size
ranks) and divides by W, not by W / ep_size (DeepSpeed PR 5681, engine
`_reduce_expert_gradients` and ZeRO-1/2 `average_tensor`), which leaves the gradient of
the global loss. Caveat: with ZeRO-0 and gradient clipping, DeepSpeed averages the
per-rank norms (which differ when ep_size > 1) instead of summing squares, so the clipping
factor is approximate there; ZeRO-1/2 compute the global norm.

Costs to know, with ep_size > 1 (MOELayer's all-to-all path): each expert runs on
`capacity` slots per rank of its group, so an expert layer computes E x capacity >= tokens
rows (families that are rare in a batch still cost a full slot block). MOELayer needs
equal input and output widths, so the out_embed layer pads its D-wide input to V (its
dispatch buffer and first all-to-all are V wide instead of D wide). Every rank of an
expert-parallel group must run the same number of forwards (each is an all-to-all): a
rank without data must still run one. With ep_size 1 there is nothing to exchange, and
FamilyMoE sorts the tokens by family and runs each expert on its own rows instead
(`FamilyMoE._grouped`): same parameters, same DeepSpeed groups, reduction and checkpoint
files, same outputs and gradients (tests/test_experts.py), without those two costs.

The number of families that hold the run's languages must be divisible by ep_size:
padding with never-routed experts would cost memory, optimizer state and a full
capacity block of compute per step for nothing, so it is an error naming both numbers.

Table 1 of the paper (expert ablation) as overrides of any recipe:
    All    experts.modules=[ffn,attn,out_embed]
    -Attn  experts.modules=[ffn,out_embed]
    -FFN   experts.modules=[attn,out_embed]
    -OE    experts.modules=[ffn,attn]
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
import torch.nn.functional as F
from deepspeed import comm as ds_comm
from deepspeed.comm import pg_utils
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from torch import nn

from cats_ds.config import ConfigError, ModelConfig
from cats_ds.model.transformer import Attention, FeedForward, Sublayers

MODULES = ("ffn", "attn", "out_embed")
"""Expert placements; `all` in experts.modules means all of them."""

TABLE1 = {"All": ["ffn", "attn", "out_embed"], "-Attn": ["ffn", "out_embed"],
          "-FFN": ["attn", "out_embed"], "-OE": ["ffn", "attn"]}
"""The paper's Table 1 ablation: experts.modules of each row."""

_EXPERT_KEY = re.compile(r"(\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)(\.)")


def expert_modules(modules: list[str]) -> frozenset[str]:
    """experts.modules -> the set of placements (`all` expanded)."""
    out = set()
    for m in modules:
        if m == "all":
            out.update(MODULES)
        elif m in MODULES:
            out.add(m)
        else:
            raise ConfigError(f"experts.modules: unknown module {m!r}; choices: {', '.join(MODULES)}, all")
    return frozenset(out)


# --------------------------------------------------------------------------- gate


class FamilyGate(nn.Module):
    """Routes each token to the expert of its family; a drop-in for TopKGate in MOELayer.

    No parameters, no randomness, no auxiliary loss (l_aux is 0), nothing dropped."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(self, input: torch.Tensor, used_token: Optional[torch.Tensor] = None,
                sparse_routes: bool = False, use_tutel: bool = False):
        """input: (S, M) tokens (only its length and device are used); used_token: (S,)
        family id of each token. Returns MOELayer's sparse-route tuple:
        (l_aux, capacity, E, indices (1, S) int32, locations (1, S) int32,
        gates (1, S) fp32, exp_counts (E,))."""
        if not sparse_routes or use_tutel:
            raise RuntimeError("FamilyGate implements the sparse-route gate contract of DeepSpeed 0.19's MOELayer "
                               "(without Tutel); this MOELayer asked for "
                               f"sparse_routes={sparse_routes}, use_tutel={use_tutel}: upgrade DeepSpeed")
        if used_token is None or used_token.numel() != input.size(0):
            raise ValueError("FamilyGate needs the family id of every token as MOELayer's second input; got "
                             f"{None if used_token is None else tuple(used_token.shape)} for {input.size(0)} tokens")
        family = used_token.reshape(-1).long()  # (S,)
        onehot = F.one_hot(family, self.num_experts)  # (S, E); raises on an id >= E
        exp_counts = onehot.sum(0)  # (E,) tokens per expert on this rank
        # slot of each token in its expert's buffer: its rank among that expert's tokens
        locations = (onehot.cumsum(0) - 1).gather(1, family[:, None]).squeeze(1)  # (S,)
        capacity = exp_counts.max().clamp(min=1)
        if pg_utils.is_parallel(self.ep_group):
            # every rank of the group must use the same (E, capacity, M) buffers in the all-to-all
            ds_comm.all_reduce(capacity, op=ds_comm.ReduceOp.MAX, group=self.ep_group)
        gates = torch.ones(1, family.numel(), dtype=torch.float32, device=input.device)
        l_aux = torch.zeros((), dtype=torch.float32, device=input.device)
        return (l_aux, capacity, self.num_experts, family.to(torch.int32)[None], locations.to(torch.int32)[None],
                gates, exp_counts)


# --------------------------------------------------------------------------- the MoE layer


class FamilyMoE(MoE):
    """DeepSpeed MoE layer with one expert per family, routed by a family id per token.

    `expert` maps (..., width) -> (..., width) with width = max(in_features, out_features)
    (MOELayer keeps the width): inputs are zero-padded to it, outputs cut to out_features.
    With ep_size 1 the layer dispatches locally (`_grouped`) and the expert gets its
    unpadded (..., in_features) rows, so an expert must accept both widths.
    Each rank holds num_experts // ep_size copies of `expert` (its local experts).

    MoE.__init__ is not called because it always builds a learned TopKGate (whose random
    init would also shift every later initialization); the attributes it sets and that
    DeepSpeed reads (engine, checkpointing, set_deepspeed_parallelism) are set here."""

    def __init__(self, expert: nn.Module, num_experts: int, ep_size: int, in_features: int, out_features: int):
        nn.Module.__init__(self)
        if num_experts % ep_size:
            raise ConfigError(f"experts.ep_size={ep_size} does not divide the {num_experts} families of this run; "
                              f"use an ep_size that divides {num_experts}, or a family map with a multiple of "
                              f"{ep_size} families")
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        self.in_features, self.out_features = in_features, out_features
        self.width = max(in_features, out_features)
        self.local_dispatch = True
        """With ep_size 1, skip MOELayer's slot buffers (`_grouped`); False forces MOELayer."""
        experts = Experts(expert, self.num_local_experts, self.expert_group_name)
        self.deepspeed_moe = MOELayer(FamilyGate(num_experts), experts, self.expert_group_name, ep_size,
                                      self.num_local_experts)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by deepspeed.initialize: create (or join) the expert-parallel groups."""
        world = ds_comm.get_world_size()
        if world % self.ep_size:
            raise ConfigError(f"experts.ep_size={self.ep_size} does not divide the world size {world}")
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)

    def forward(self, x: torch.Tensor, family: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x: (..., in_features); family: (...) expert id per token. Returns (..., out_features)."""
        if self.ep_size > 1 and self.deepspeed_moe.ep_group is None:
            raise RuntimeError(f"expert layer with ep_size={self.ep_size} has no expert-parallel group: run it "
                               f"inside a DeepSpeed engine, or build the model with ep_size=1 on one process")
        lead = x.shape[:-1]
        if self.ep_size == 1 and self.local_dispatch:
            return self._grouped(x.reshape(-1, self.in_features), family.reshape(-1)).reshape(*lead, -1)
        h = x.reshape(-1, self.in_features)  # (S, in)
        if self.width > self.in_features:
            h = F.pad(h, (0, self.width - self.in_features))  # (S, width)
        out = self.deepspeed_moe(h, family.reshape(-1))  # (S, width)
        return out[:, :self.out_features].reshape(*lead, self.out_features)

    def _grouped(self, h: torch.Tensor, family: torch.Tensor) -> torch.Tensor:
        """ep_size 1: every expert is local, so the tokens are sorted by family and each
        expert runs on exactly its own rows (h (S, in) unpadded -> (S, out_features)).
        Per token this is MOELayer's computation (its gate weight is 1.0, an exact
        product), without the E x capacity buffers or the padding to max(in, out).
        Every expert runs, on zero rows if its family is absent, so each expert
        parameter gets a gradient (zeros) on every step, as under MOELayer."""
        experts = self.deepspeed_moe.experts.deepspeed_experts
        family = family.long()
        order = torch.argsort(family, stable=True)  # (S,) token indices, family by family
        counts = torch.bincount(family, minlength=self.num_experts)
        if counts.numel() > self.num_experts:
            raise ValueError(f"family id {int(family.max())} out of range for {self.num_experts} experts")
        pieces = h.index_select(0, order).split(counts.tolist())
        out = torch.cat([expert(piece)[:, :self.out_features] for expert, piece in zip(experts, pieces)])
        return out.new_empty(out.shape).index_copy(0, order, out)  # back to token order


def set_local_dispatch(model: nn.Module, local: bool) -> None:
    """Choose the ep_size-1 dispatch of every expert layer in `model`: local (sorted by
    family, the default) or DeepSpeed's MOELayer (what ep_size > 1 computes)."""
    for m in model.modules():
        if isinstance(m, FamilyMoE):
            m.local_dispatch = local


def _token_families(route: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """route (B,) family per sentence -> (B, T) family per token of x (B, T, D)."""
    if route is None:
        raise ValueError("a family-expert sublayer needs `route`, the family id of every sentence")
    return route[:, None].expand(x.shape[0], x.shape[1])


# --------------------------------------------------------------------------- sublayers


class ExpertFeedForward(nn.Module):
    """One FeedForward per family, each a copy of `dense`."""

    def __init__(self, dense: FeedForward, num_experts: int, ep_size: int, dim: int):
        super().__init__()
        self.moe = FamilyMoE(dense, num_experts, ep_size, dim, dim)

    def forward(self, x: torch.Tensor, route: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.moe(x, _token_families(route, x))


class ExpertAttention(Attention):
    """Attention with per-family q/k/v/output projections (one attention module per family).

    Built as a dense Attention first (same initialization, same random draws), whose
    projections then become the experts' common starting point. Attention.forward is
    shared; only the projections route."""

    def __init__(self, dim: int, heads: int, dropout: float, num_experts: int, ep_size: int):
        super().__init__(dim, heads, dropout)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self, name, FamilyMoE(getattr(self, name), num_experts, ep_size, dim, dim))

    def _project(self, name: str, x: torch.Tensor, route: Optional[torch.Tensor]) -> torch.Tensor:
        return getattr(self, name)(x, _token_families(route, x))  # (B, T, D), every token by its family


class _VocabProjection(nn.Module):
    """One family's output embedding: (..., width) -> (..., width) logits, width = max(D, V);
    reads the first D input features (the rest is MOELayer padding) and pads logits to width."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())  # (V, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vocab, dim = self.weight.shape
        logits = F.linear(x[..., :dim], self.weight)  # (..., V)
        width = x.shape[-1]
        return F.pad(logits, (0, width - vocab)) if width > vocab else logits


class ExpertOutputEmbedding(nn.Module):
    """Per-family output projection D -> V, every family starting from the shared embedding."""

    def __init__(self, embed: nn.Embedding, num_experts: int, ep_size: int):
        super().__init__()
        vocab, dim = embed.weight.shape
        self.moe = FamilyMoE(_VocabProjection(embed.weight), num_experts, ep_size, dim, vocab)

    def forward(self, x: torch.Tensor, route: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, T, D) decoder states -> (B, T, V) logits."""
        return self.moe(x, _token_families(route, x))


class ExpertSublayers(Sublayers):
    """Sublayers with family experts where experts.modules/side ask for them, dense elsewhere."""

    def __init__(self, cfg: ModelConfig, modules: frozenset[str], side: str, num_experts: int, ep_size: int):
        super().__init__(cfg)
        self.modules, self.side = modules, side
        self.num_experts, self.ep_size = num_experts, ep_size

    def _wants(self, module: str, side: str) -> bool:
        return module in self.modules and self.side in (side, "both")

    def attn(self, side: str, kind: str) -> nn.Module:
        if not self._wants("attn", side):
            return super().attn(side, kind)
        c = self.cfg
        return ExpertAttention(c.embed_dim, c.heads, c.attention_dropout, self.num_experts, self.ep_size)

    def ffn(self, side: str) -> nn.Module:
        dense = super().ffn(side)
        if not self._wants("ffn", side):
            return dense
        return ExpertFeedForward(dense, self.num_experts, self.ep_size, self.cfg.embed_dim)

    def out_proj(self, embed: nn.Embedding) -> Optional[nn.Module]:
        if "out_embed" not in self.modules:  # out_embed sits on the decoder whatever experts.side says
            return None
        return ExpertOutputEmbedding(embed, self.num_experts, self.ep_size)


# --------------------------------------------------------------------------- helpers for the trainer


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Optimizer parameter groups: one group for a dense model; with experts, the shared
    group plus DeepSpeed's MoE groups (`moe: True`, one per expert-parallel size), which
    ZeRO-1/2 partition over the expert-data-parallel group instead of the data-parallel one."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not any(is_moe_param(p) for p in params):
        return [{"params": params}]
    return split_params_into_different_moe_groups_for_optimizer({"params": params, "name": "shared"})


def global_parameter_names(model: nn.Module) -> dict[str, str]:
    """Local parameter name -> name with the GLOBAL expert id, the id DeepSpeed's expert
    checkpoint files use (identity for shared parameters, and for all with ep_size 1)."""
    from deepspeed.utils import groups

    out = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FamilyMoE)}
    for name, _ in model.named_parameters():
        out[name] = name
        m = _EXPERT_KEY.search(name)
        if not m:
            continue
        owner = layers[name[:m.start()]]  # the FamilyMoE this expert parameter belongs to
        rank = groups._get_expert_parallel_rank(owner.expert_group_name) if owner.ep_size > 1 else 0
        gid = rank * owner.num_local_experts + int(m.group(2))
        out[name] = name[:m.start()] + m.group(1) + str(gid) + m.group(3) + name[m.end():]
    return out
