"""Encoder-decoder Transformer for one-to-many translation.

A plain nn.Module: it knows nothing of ranks or DeepSpeed. The target-language tag
`<2xx>` is the first decoder input token. Sublayers take `route`, the (B,) family id of
each sentence, which only family-expert sublayers (model/experts.py) read.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cats_ds.config import ModelConfig
from cats_ds.model.norms import make_norm

Cache = dict  # per-layer incremental state: {"k": (B, H, t, hd), "v": ..., "ck": ..., "cv": ...}


def sinusoidal_positions(n: int, dim: int) -> torch.Tensor:
    """(n, dim) table: sin on the first half of the channels, cos on the second."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000.0) / max(half - 1, 1)))
    ang = torch.arange(n, dtype=torch.float)[:, None] * freq[None, :]
    table = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(n, 1)], dim=1)
    return table


class Attention(nn.Module):
    """Multi-head attention; self-attention may be causal and cached step by step."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def _project(self, name: str, x: torch.Tensor, route: Optional[torch.Tensor]) -> torch.Tensor:
        """Apply projection `name` (q_proj, k_proj, v_proj, out_proj) to x (B, T, D);
        family-expert attention routes it by `route` instead."""
        return getattr(self, name)(x)

    def forward(self, x: torch.Tensor, kv: Optional[torch.Tensor] = None,
                key_pad: Optional[torch.Tensor] = None, causal: bool = False,
                cache: Optional[Cache] = None, route: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, T, D). kv: encoder output for cross-attention (None: self-attention).
        key_pad: (B, S) True at padding keys. cache: dict updated in place when decoding.

        Cross-attention also takes kv (and key_pad) with one row per group of B / kv rows
        of x (beam search: the beams of a sentence, consecutive rows): the encoder keys and
        values are then computed and cached once per sentence, and the group's queries
        attend to them together, as extra query positions."""
        group = 1 if kv is None else x.size(0) // kv.size(0)
        if kv is not None and group * kv.size(0) != x.size(0):
            raise ValueError(f"cross-attention over {kv.size(0)} encoder rows from {x.size(0)} decoder rows")
        q = self._split(self._project("q_proj", x, route))
        if kv is None:  # self-attention
            k, v = self._split(self._project("k_proj", x, route)), self._split(self._project("v_proj", x, route))
            if cache is not None:
                if "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        elif cache is not None and "ck" in cache:  # encoder keys are fixed while decoding
            k, v = cache["ck"], cache["cv"]
        else:  # encoder states (B, S, D), routed by the family of the sentence they belong to
            kv_route = route if route is None or group == 1 else route[::group]
            k, v = self._split(self._project("k_proj", kv, kv_route)), self._split(self._project("v_proj", kv, kv_route))
            if cache is not None:
                cache["ck"], cache["cv"] = k, v
        mask = None
        if key_pad is not None:
            mask = ~key_pad[:, None, None, :]  # (B, 1, 1, S): True = attend
        if causal and x.size(1) > 1:
            t_q, t_k = q.size(2), k.size(2)
            tri = torch.ones(t_q, t_k, dtype=torch.bool, device=x.device).tril(t_k - t_q)
            mask = tri if mask is None else mask & tri
        b, h, t, hd = q.shape
        if group > 1:  # (B, H, T, hd) -> (B / group, H, group * T, hd): a sentence's beams together
            q = q.view(b // group, group, h, t, hd).transpose(1, 2).reshape(b // group, h, group * t, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        if group > 1:
            out = out.view(b // group, h, group, t, hd).transpose(1, 2).reshape(b, h, t, hd)
        return self._project("out_proj", out.transpose(1, 2).reshape(b, t, -1), route)


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, activation: str, activation_dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.act = F.relu if activation == "relu" else F.gelu
        self.drop = activation_dropout
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.xavier_uniform_(self.fc2.weight)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, route: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.fc2(F.dropout(self.act(self.fc1(x)), self.drop, self.training))


class Sublayers:
    """Builds the swappable parts of a layer; experts.py supplies a family-expert version."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def attn(self, side: str, kind: str) -> nn.Module:  # kind: "self" | "cross"
        return Attention(self.cfg.embed_dim, self.cfg.heads, self.cfg.attention_dropout)

    def ffn(self, side: str) -> nn.Module:
        c = self.cfg
        return FeedForward(c.embed_dim, c.ffn_dim, c.activation, c.activation_dropout)

    def out_proj(self, embed: nn.Embedding) -> Optional[nn.Module]:
        return None  # None: logits from the (tied) embedding matrix


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, parts: Sublayers):
        super().__init__()
        self.self_attn = parts.attn("encoder", "self")
        self.ffn = parts.ffn("encoder")
        self.norm1 = make_norm(cfg.norm, cfg.embed_dim)
        self.norm2 = make_norm(cfg.norm, cfg.embed_dim)
        self.prenorm, self.dropout = cfg.prenorm, cfg.dropout

    def _res(self, x, fn, norm):
        if self.prenorm:
            return x + F.dropout(fn(norm(x)), self.dropout, self.training)
        return norm(x + F.dropout(fn(x), self.dropout, self.training))

    def forward(self, x, pad, route):
        x = self._res(x, lambda h: self.self_attn(h, key_pad=pad, route=route), self.norm1)
        return self._res(x, lambda h: self.ffn(h, route=route), self.norm2)


class DecoderLayer(EncoderLayer):
    def __init__(self, cfg: ModelConfig, parts: Sublayers):
        nn.Module.__init__(self)
        self.self_attn = parts.attn("decoder", "self")
        self.cross_attn = parts.attn("decoder", "cross")
        self.ffn = parts.ffn("decoder")
        self.norm1 = make_norm(cfg.norm, cfg.embed_dim)
        self.norm2 = make_norm(cfg.norm, cfg.embed_dim)
        self.norm3 = make_norm(cfg.norm, cfg.embed_dim)
        self.prenorm, self.dropout = cfg.prenorm, cfg.dropout

    def forward(self, x, enc, enc_pad, route, cache: Optional[Cache] = None):
        x = self._res(x, lambda h: self.self_attn(h, causal=True, cache=cache, route=route), self.norm1)
        x = self._res(x, lambda h: self.cross_attn(h, kv=enc, key_pad=enc_pad, cache=cache, route=route),
                      self.norm2)
        return self._res(x, lambda h: self.ffn(h, route=route), self.norm3)


class Transformer(nn.Module):
    """Encoder-decoder Transformer over one joint vocabulary.

    `lang_family` maps a language index to the family id that expert sublayers route by
    (all zeros for a dense model).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int = 0,
                 parts: Optional[Sublayers] = None, lang_family: Optional[list[int]] = None):
        super().__init__()
        parts = parts or Sublayers(cfg)
        self.cfg, self.pad_id, self.vocab_size = cfg, pad_id, vocab_size
        d = cfg.embed_dim
        self.embed = nn.Embedding(vocab_size, d, padding_idx=pad_id)
        nn.init.normal_(self.embed.weight, mean=0.0, std=d ** -0.5)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()
        self.dec_embed = self.embed
        if not cfg.share_embeddings:
            self.dec_embed = nn.Embedding(vocab_size, d, padding_idx=pad_id)
            nn.init.normal_(self.dec_embed.weight, mean=0.0, std=d ** -0.5)
        self.register_buffer("positions", sinusoidal_positions(cfg.max_positions, d), persistent=False)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg, parts) for _ in range(cfg.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg, parts) for _ in range(cfg.decoder_layers))
        self.enc_norm = make_norm(cfg.norm, d) if cfg.prenorm else nn.Identity()
        self.dec_norm = make_norm(cfg.norm, d) if cfg.prenorm else nn.Identity()
        self.out_proj = parts.out_proj(self.dec_embed)
        self.routed = lang_family is not None
        fam = torch.tensor(lang_family if self.routed else [], dtype=torch.long)
        self.register_buffer("lang_family", fam, persistent=False)

    def route(self, langs: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """(B,) family id per sentence for expert sublayers; None in a dense model."""
        if not self.routed:
            return None
        if langs is None:
            raise ValueError("a model with family experts needs the language of every sentence")
        return self.lang_family[langs]

    def _embed(self, table: nn.Embedding, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        t = tokens.size(1)
        if start + t > self.positions.size(0):
            raise ValueError(f"sequence of {start + t} tokens exceeds model.max_positions={self.positions.size(0)}")
        emb = table(tokens)  # (B, T, D) in the parameters' dtype
        # the sum is taken in fp32 and rounded once to the parameters' dtype: under bf16 the
        # sinusoids (kept fp32: DeepSpeed casts parameters, not buffers) would otherwise
        # promote the activations back to fp32 ahead of bf16 LayerNorm weights
        x = (emb.float() * math.sqrt(self.cfg.embed_dim) + self.positions[start:start + t].float()).to(emb.dtype)
        return F.dropout(x, self.cfg.dropout, self.training)

    def encode(self, src: torch.Tensor, langs: Optional[torch.Tensor] = None):
        """src: (B, S) right-padded. Returns (enc (B, S, D), pad mask (B, S))."""
        pad = src.eq(self.pad_id)
        route = self.route(langs)
        x = self._embed(self.embed, src)
        for layer in self.encoder_layers:
            x = layer(x, pad, route)
        return self.enc_norm(x), pad

    def decode(self, prev: torch.Tensor, enc: torch.Tensor, enc_pad: torch.Tensor,
               langs: Optional[torch.Tensor] = None, caches: Optional[list[Cache]] = None,
               start: int = 0) -> torch.Tensor:
        """prev: (B, T) decoder inputs starting with the language tag. With `caches`
        (one dict per layer), prev holds only the new tokens, at positions start.. .
        Returns logits (B, T, V)."""
        route = self.route(langs)
        x = self._embed(self.dec_embed, prev, start)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, enc, enc_pad, route, None if caches is None else caches[i])
        x = self.dec_norm(x)
        if self.out_proj is not None:
            return self.out_proj(x, route=route)
        return F.linear(x, self.dec_embed.weight)

    def forward(self, src: torch.Tensor, prev: torch.Tensor, langs: Optional[torch.Tensor] = None) -> torch.Tensor:
        enc, pad = self.encode(src, langs)
        return self.decode(prev, enc, pad, langs)

    @staticmethod
    def reorder_caches(caches: list[Cache], order: torch.Tensor, keys: tuple[str, ...] = ("k", "v", "ck", "cv")) -> None:
        """Select rows `order` of the cached tensors `keys` (beam search bookkeeping: the
        self-attention keys "k", "v" per decoder row, the cross-attention ones "ck", "cv"
        per encoder row)."""
        for cache in caches:
            for key in keys:
                if key in cache:
                    cache[key] = cache[key].index_select(0, order)


def build_model(cfg: ModelConfig, vocab_size: int, parts_factory: Optional[Callable[[ModelConfig], Sublayers]] = None,
                lang_family: Optional[list[int]] = None) -> Transformer:
    parts = parts_factory(cfg) if parts_factory else Sublayers(cfg)
    return Transformer(cfg, vocab_size, parts=parts, lang_family=lang_family)
