"""Decoding: batched beam search, greedy search, and a forced-decoding re-scorer.

Conventions shared by all three:
  - every sentence's decoder starts from its own first token, the target-language tag
    `<2xx>` (`tags`, (B,)); `langs` (B,) are language indices the model routes family
    experts by (None is fine for a dense model);
  - a hypothesis is the generated tokens, ending in </s>; the tag is not part of it;
  - log-probabilities are the model's own (log-softmax over the whole vocabulary).
    Banned tokens (pad, unk, bos: none of them is ever a target) get -inf, and at a
    sentence's maximum length every token but </s> gets -inf, without renormalizing,
    so a hypothesis' score is exactly what `score` gives by teacher forcing;
  - the length of a hypothesis counts its tokens including </s>; finished hypotheses
    are ranked by sum log-prob / length^lenpen (fairseq's length penalty);
  - the longest hypothesis of a sentence is int(max_len_a * src_len + max_len_b) tokens
    (src_len counts the source's non-pad tokens, </s> included), at least 1 and at most
    model.max_positions (the tag plus all but the last token must fit the position table).

Beam search follows fairseq: at each step every sentence takes its 2*beam best
extensions over all its beams; an extension ending in </s> that ranks among the first
`beam` is finished, the first `beam` others continue. A sentence stops once it has
`beam` finished hypotheses or reaches its maximum length. Finished sentences leave the
batch (their rows are dropped from the decoder caches), so they cost nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from cats_ds.data.manifest import BOS, EOS, PAD, UNK
from cats_ds.model.transformer import Cache, Transformer

BANNED = (PAD, UNK, BOS)
"""Tokens never generated: pad and bos never occur in targets, unk is masked as usual."""


@dataclass
class Hypothesis:
    tokens: list[int]
    """Generated token ids, ending in </s> (the language tag is not included)."""
    score: float
    """logprob / len(tokens) ** lenpen: what n-best lists are sorted by."""
    logprob: float
    """Sum of the model's log-probabilities of `tokens`."""
    positional: list[float]
    """Log-probability of each token in `tokens`."""


def max_lengths(model: Transformer, src: torch.Tensor, max_len_a: float, max_len_b: int) -> torch.Tensor:
    """(B,) longest hypothesis per sentence, </s> included (see the module docstring)."""
    src_len = src.ne(model.pad_id).sum(1).double()  # (B,)
    limit = (max_len_a * src_len + max_len_b).floor().long()
    return limit.clamp(min=1, max=model.positions.size(0))


def _check_inputs(model: Transformer, src: torch.Tensor, tags: torch.Tensor) -> None:
    if model.training:
        raise ValueError("decoding with a model in training mode (dropout on): call model.eval() first")
    if src.dim() != 2 or tags.shape != (src.size(0),):
        raise ValueError(f"expected src (B, S) and tags (B,), got {tuple(src.shape)} and {tuple(tags.shape)}")


def _next_logprobs(model: Transformer, tokens: torch.Tensor, enc: torch.Tensor, enc_pad: torch.Tensor,
                   langs: Optional[torch.Tensor], caches: Optional[list[Cache]], step: int) -> torch.Tensor:
    """Log-probabilities of the next token after each row of `tokens` (R, t+1): (R, V).

    With caches only the newest token is fed (at position `step`); without, the whole
    prefix is recomputed (the reference path the cache is tested against)."""
    if caches is not None:
        logits = model.decode(tokens[:, -1:], enc, enc_pad, langs, caches, start=step)  # (R, 1, V)
    else:
        logits = model.decode(tokens, enc, enc_pad, langs)  # (R, t+1, V)
    logits = logits[:, -1]  # (R, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits, dim=-1)


def _constrain(lprobs: torch.Tensor, at_max: torch.Tensor, banned: Sequence[int]) -> torch.Tensor:
    """Ban tokens everywhere, and everything but </s> in rows at their maximum length.
    lprobs (R, V) is modified in place; at_max (R,) bool."""
    lprobs.index_fill_(1, torch.as_tensor(banned, dtype=torch.long, device=lprobs.device), -torch.inf)
    if at_max.any():
        eos = lprobs[at_max, EOS]  # (r,) a copy: advanced indexing
        lprobs[at_max] = -torch.inf
        lprobs[at_max, EOS] = eos
    return lprobs


def _hypotheses(prefix: torch.Tensor, prefix_lp: torch.Tensor, last_lp: torch.Tensor,
                lenpen: float) -> list[Hypothesis]:
    """Finished hypotheses from rows: prefix (R, t) generated tokens before </s>,
    prefix_lp (R, t) their log-probs, last_lp (R,) the log-prob of the closing </s>."""
    eos = prefix.new_full((prefix.size(0), 1), EOS)  # (R, 1)
    tokens = torch.cat([prefix, eos], dim=1).tolist()  # (R, t+1)
    positional = torch.cat([prefix_lp, last_lp[:, None]], dim=1)  # (R, t+1)
    sums = positional.sum(1).tolist()
    length_norm = float(prefix.size(1) + 1) ** lenpen
    return [Hypothesis(tokens=tok, score=s / length_norm, logprob=s, positional=pos)
            for tok, s, pos in zip(tokens, sums, positional.tolist())]


@torch.no_grad()
def beam_search(model: Transformer, src: torch.Tensor, tags: torch.Tensor, langs: Optional[torch.Tensor] = None,
                *, beam: int = 5, lenpen: float = 1.0, max_len_a: float = 1.2, max_len_b: int = 10,
                nbest: Optional[int] = None, use_cache: bool = True,
                banned: Sequence[int] = BANNED) -> list[list[Hypothesis]]:
    """Beam search over a padded batch.

    src: (B, S) right-padded source ids; tags: (B,) first decoder token of each
    sentence (its `<2xx>` tag); langs: (B,) language indices for expert routing.
    Returns, per sentence in input order, its best `nbest` (default: `beam`) finished
    hypotheses, best first. use_cache=False recomputes the whole prefix at every step.
    """
    _check_inputs(model, src, tags)
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    nbest = beam if nbest is None else min(nbest, beam)
    b, k, device = src.size(0), beam, src.device
    if b == 0:
        return []
    max_len = max_lengths(model, src, max_len_a, max_len_b)  # (B,)

    # one encoder row per sentence: the decoder's cross-attention takes each sentence's k
    # beams (consecutive rows) as a group, so its keys and values are computed and cached
    # once per sentence and move only when sentences leave the batch
    enc, enc_pad = model.encode(src, langs)  # (B, S, D), (B, S)
    rows = torch.arange(b, device=device).repeat_interleave(k)  # (B*k,) sentence of each row
    row_langs = None if langs is None else langs.index_select(0, rows)  # (B*k,)
    tokens = tags.index_select(0, rows)[:, None]  # (B*k, 1): tag, then generated tokens
    token_lp = enc.new_zeros(b * k, 0)  # (B*k, t) log-prob of each generated token
    # all beams of a sentence start identical: only beam 0 is live at the first step
    scores = enc.new_full((b, k), -torch.inf)
    scores[:, 0] = 0.0
    scores = scores.view(-1)  # (B*k,) running sum of log-probs

    active = torch.arange(b, device=device)  # (N,) original index of each unfinished sentence
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    caches: Optional[list[Cache]] = [{} for _ in model.decoder_layers] if use_cache else None
    first = torch.arange(2 * k, device=device)  # candidate ranks

    act_max = max_len  # (N,) maximum length of each unfinished sentence
    act_fin = torch.zeros(b, dtype=torch.long, device=device)  # (N,) its finished hypotheses
    base = torch.arange(b, device=device)[:, None] * k  # (N, 1) its first row
    for step in range(int(max_len.max())):
        n = active.numel()
        if step == 0 and caches is not None:  # all beams of a sentence are its tag: decode one row each
            lprobs = _next_logprobs(model, tokens[::k], enc, enc_pad, langs, caches, 0)  # (B, V)
            lprobs = lprobs.index_select(0, rows)  # (B*k, V): beam 0 live, the others -inf in `scores`
            Transformer.reorder_caches(caches, rows, ("k", "v"))
        else:
            lprobs = _next_logprobs(model, tokens, enc, enc_pad, row_langs, caches, step)  # (N*k, V)
        at_max = act_max.eq(step + 1)  # (N,)
        lprobs = _constrain(lprobs, at_max.repeat_interleave(k), banned)
        vocab = lprobs.size(1)

        # a sentence's 2k best extensions are among the 2k best tokens of each of its beams:
        # rank those (k * 2k per sentence) instead of all k * V
        row_lp, row_tok = lprobs.topk(min(2 * k, vocab), dim=1)  # (N*k, c), c = 2k
        c = row_lp.size(1)
        cand = (scores[:, None] + row_lp).view(n, k * c)  # (N, k*c)
        top, idx = cand.topk(2 * k, dim=1)  # (N, 2k), best first
        tok = row_tok.view(n, k * c).gather(1, idx)  # (N, 2k)
        src_row = idx // c + base  # (N, 2k) row it extends
        top_lp = row_lp.view(n, k * c).gather(1, idx)  # (N, 2k) log-prob of the new token
        live = top.isfinite()
        is_eos = tok.eq(EOS) & live

        # finish </s> extensions ranked among the first k, while a sentence has room
        fin = is_eos[:, :k]  # (N, k)
        fin = fin & (act_fin[:, None] + fin.cumsum(1) <= k)
        if fin.any():
            s_idx, c_idx = fin.nonzero(as_tuple=True)  # ordered by sentence, then rank
            r = src_row[s_idx, c_idx]
            hyps = _hypotheses(tokens[r, 1:], token_lp[r], top_lp[s_idx, c_idx], lenpen)
            for sent, hyp in zip(active[s_idx].tolist(), hyps):
                finished[sent].append(hyp)
            act_fin = act_fin + fin.sum(1)
            done = act_fin.ge(k) | act_max.le(step + 1)  # (N,)
        else:
            done = act_max.le(step + 1)
        shrink = bool(done.any())
        if shrink and done.all():
            break

        # continue with the first k extensions that do not end in </s>
        rank = torch.where(is_eos | ~live, first + 2 * k, first)  # (N, 2k): non-continuable last
        pick = rank.topk(k, dim=1, largest=False).indices  # (N, k)
        if shrink:  # sentences still decoding
            keep = (~done).nonzero().squeeze(1)  # (N',)
            pick, src_row, tok, top_lp, top, is_eos = (x.index_select(0, keep) for x in (pick, src_row, tok, top_lp,
                                                                                          top, is_eos))
        order = src_row.gather(1, pick).view(-1)  # (N'*k,) rows to extend
        new_tok = tok.gather(1, pick).view(-1, 1)  # (N'*k, 1)
        new_lp = top_lp.gather(1, pick).view(-1, 1)  # (N'*k, 1)
        stale = is_eos.gather(1, pick)  # fewer than k continuations: dead beams
        scores = top.gather(1, pick).masked_fill(stale, -torch.inf).view(-1)  # (N'*k,)
        tokens = torch.cat([tokens.index_select(0, order), new_tok], dim=1)  # (N'*k, t+2)
        token_lp = torch.cat([token_lp.index_select(0, order), new_lp], dim=1)  # (N'*k, t+1)
        if shrink:  # drop finished sentences: their encoder rows and cross-attention caches
            sent_rows = (keep[:, None] * k + torch.arange(k, device=device)).view(-1)  # (N'*k,)
            enc, enc_pad = enc.index_select(0, keep), enc_pad.index_select(0, keep)
            row_langs = None if row_langs is None else row_langs.index_select(0, sent_rows)
            active, act_max, act_fin = active.index_select(0, keep), act_max.index_select(0, keep), \
                act_fin.index_select(0, keep)
            base = base[:keep.numel()]
            if caches is not None:
                Transformer.reorder_caches(caches, keep, ("ck", "cv"))
        if caches is not None:  # beams of one sentence stay in its block of k rows
            Transformer.reorder_caches(caches, order, ("k", "v"))

    return [sorted(hyps, key=lambda h: -h.score)[:nbest] for hyps in finished]


@torch.no_grad()
def greedy_search(model: Transformer, src: torch.Tensor, tags: torch.Tensor, langs: Optional[torch.Tensor] = None,
                  *, lenpen: float = 1.0, max_len_a: float = 1.2, max_len_b: int = 10, use_cache: bool = True,
                  banned: Sequence[int] = BANNED) -> list[Hypothesis]:
    """Arg-max decoding with the same constraints as beam_search; one hypothesis per
    sentence, in input order (equal to beam_search with beam=1)."""
    _check_inputs(model, src, tags)
    b, device = src.size(0), src.device
    if b == 0:
        return []
    max_len = max_lengths(model, src, max_len_a, max_len_b)  # (B,)
    enc, enc_pad = model.encode(src, langs)  # (B, S, D), (B, S)
    row_langs = langs
    tokens = tags[:, None]  # (B, 1)
    token_lp = enc.new_zeros(b, 0)  # (B, t)
    active = torch.arange(b, device=device)  # (N,) original index of each row
    out: list[Optional[Hypothesis]] = [None] * b
    caches: Optional[list[Cache]] = [{} for _ in model.decoder_layers] if use_cache else None

    for step in range(int(max_len.max())):
        lprobs = _next_logprobs(model, tokens, enc, enc_pad, row_langs, caches, step)  # (N, V)
        lprobs = _constrain(lprobs, max_len.index_select(0, active).eq(step + 1), banned)
        lp, tok = lprobs.max(dim=1)  # (N,), (N,)
        done = tok.eq(EOS)  # at its maximum length a sentence can only pick </s>
        if done.any():
            d = done.nonzero().squeeze(1)
            hyps = _hypotheses(tokens[d, 1:], token_lp[d], lp[d], lenpen)
            for sent, hyp in zip(active[d].tolist(), hyps):
                out[sent] = hyp
        keep = (~done).nonzero().squeeze(1)  # (N',)
        if keep.numel() == 0:
            break
        tokens = torch.cat([tokens, tok[:, None]], dim=1).index_select(0, keep)  # (N', t+2)
        token_lp = torch.cat([token_lp, lp[:, None]], dim=1).index_select(0, keep)  # (N', t+1)
        if keep.numel() < active.numel():
            enc, enc_pad = enc.index_select(0, keep), enc_pad.index_select(0, keep)
            row_langs = None if row_langs is None else row_langs.index_select(0, keep)
            active = active.index_select(0, keep)
            if caches is not None:
                Transformer.reorder_caches(caches, keep)
    assert all(h is not None for h in out), "every sentence ends at its maximum length at the latest"
    return out  # type: ignore[return-value]


def generate(model: Transformer, src: torch.Tensor, tags: torch.Tensor, langs: Optional[torch.Tensor] = None,
             *, beam: int = 5, lenpen: float = 1.0, max_len_a: float = 1.2, max_len_b: int = 10,
             nbest: int = 1) -> list[list[Hypothesis]]:
    """n-best lists per sentence: greedy search for beam 1 (the same result, less
    bookkeeping), beam search otherwise."""
    if beam == 1:
        hyps = greedy_search(model, src, tags, langs, lenpen=lenpen, max_len_a=max_len_a, max_len_b=max_len_b)
        return [[h] for h in hyps]
    return beam_search(model, src, tags, langs, beam=beam, lenpen=lenpen, max_len_a=max_len_a,
                       max_len_b=max_len_b, nbest=nbest)


@torch.no_grad()
def token_logprobs(model: Transformer, src: torch.Tensor, hyp: torch.Tensor, tags: torch.Tensor,
                   langs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Teacher-forced log-probability of every hypothesis token: (B, T), 0 at padding.

    src: (B, S) right-padded; hyp: (B, T) generated tokens (ending in </s>), right-padded
    with pad; tags: (B,) the first decoder token of each sentence."""
    prev = torch.cat([tags[:, None], hyp[:, :-1]], dim=1)  # (B, T): tag + all but the last token
    enc, enc_pad = model.encode(src, langs)
    logits = model.decode(prev, enc, enc_pad, langs)  # (B, T, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    lprobs = F.log_softmax(logits, dim=-1).gather(-1, hyp[..., None]).squeeze(-1)  # (B, T)
    return lprobs.masked_fill(hyp.eq(model.pad_id), 0.0)


def score(model: Transformer, src: torch.Tensor, hyp: torch.Tensor, tags: torch.Tensor,
          langs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,) sum of teacher-forced log-probabilities of each hypothesis (see token_logprobs)."""
    return token_logprobs(model, src, hyp, tags, langs).sum(1)
