"""The batched beam search as it was before issue 29's speed-ups (one encoder row, and
cross-attention keys/values, per beam; the candidates ranked over all k x V extensions),
kept verbatim as the reference `tests/test_search_speed.py` holds the current one to:
same hypotheses, same scores."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from cats_ds.data.manifest import EOS
from cats_ds.inference.search import (BANNED, Hypothesis, _check_inputs, _constrain, _hypotheses, _next_logprobs,
                                      max_lengths)
from cats_ds.model.transformer import Cache, Transformer


@torch.no_grad()
def old_beam_search(model: Transformer, src: torch.Tensor, tags: torch.Tensor, langs: Optional[torch.Tensor] = None,
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

    enc, enc_pad = model.encode(src, langs)  # (B, S, D), (B, S)
    rows = torch.arange(b, device=device).repeat_interleave(k)  # (B*k,) sentence of each row
    enc, enc_pad = enc.index_select(0, rows), enc_pad.index_select(0, rows)  # (B*k, S, D), (B*k, S)
    row_langs = None if langs is None else langs.index_select(0, rows)  # (B*k,)
    tokens = tags.index_select(0, rows)[:, None]  # (B*k, 1): tag, then generated tokens
    token_lp = enc.new_zeros(b * k, 0)  # (B*k, t) log-prob of each generated token
    # all beams of a sentence start identical: only beam 0 is live at the first step
    scores = enc.new_full((b, k), -torch.inf)
    scores[:, 0] = 0.0
    scores = scores.view(-1)  # (B*k,) running sum of log-probs

    active = torch.arange(b, device=device)  # (N,) original index of each unfinished sentence
    n_finished = torch.zeros(b, dtype=torch.long, device=device)  # (B,)
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    caches: Optional[list[Cache]] = [{} for _ in model.decoder_layers] if use_cache else None
    first = torch.arange(2 * k, device=device)  # candidate ranks

    for step in range(int(max_len.max())):
        n = active.numel()
        lprobs = _next_logprobs(model, tokens, enc, enc_pad, row_langs, caches, step)  # (N*k, V)
        at_max = max_len.index_select(0, active).eq(step + 1)  # (N,)
        lprobs = _constrain(lprobs, at_max.repeat_interleave(k), banned)
        vocab = lprobs.size(1)

        cand = (scores[:, None] + lprobs).view(n, k * vocab)  # (N, k*V)
        top, idx = cand.topk(2 * k, dim=1)  # (N, 2k), best first
        tok = idx % vocab  # (N, 2k)
        src_row = idx // vocab + (torch.arange(n, device=device) * k)[:, None]  # (N, 2k) row it extends
        top_lp = lprobs.view(n, k * vocab).gather(1, idx)  # (N, 2k) log-prob of the new token
        live = top.isfinite()
        is_eos = tok.eq(EOS) & live

        # finish </s> extensions ranked among the first k, while a sentence has room
        fin = is_eos[:, :k]  # (N, k)
        fin = fin & (n_finished.index_select(0, active)[:, None] + fin.cumsum(1) <= k)
        if fin.any():
            s_idx, c_idx = fin.nonzero(as_tuple=True)  # ordered by sentence, then rank
            r = src_row[s_idx, c_idx]
            hyps = _hypotheses(tokens[r, 1:], token_lp[r], top_lp[s_idx, c_idx], lenpen)
            for sent, hyp in zip(active[s_idx].tolist(), hyps):
                finished[sent].append(hyp)
            n_finished.index_add_(0, active, fin.sum(1))

        done = n_finished.index_select(0, active).ge(k) | max_len.index_select(0, active).le(step + 1)  # (N,)
        if done.all():
            break

        # continue with the first k extensions that do not end in </s>
        rank = torch.where(is_eos | ~live, first + 2 * k, first)  # (N, 2k): non-continuable last
        pick = rank.topk(k, dim=1, largest=False).indices  # (N, k)
        keep = (~done).nonzero().squeeze(1)  # (N',) sentences still decoding
        pick = pick.index_select(0, keep)
        order = src_row.index_select(0, keep).gather(1, pick).view(-1)  # (N'*k,) rows to extend
        new_tok = tok.index_select(0, keep).gather(1, pick).view(-1, 1)  # (N'*k, 1)
        new_lp = top_lp.index_select(0, keep).gather(1, pick).view(-1, 1)  # (N'*k, 1)
        new_scores = top.index_select(0, keep).gather(1, pick)  # (N', k)
        stale = is_eos.index_select(0, keep).gather(1, pick)  # fewer than k continuations: dead beams
        scores = new_scores.masked_fill(stale, -torch.inf).view(-1)  # (N'*k,)
        tokens = torch.cat([tokens.index_select(0, order), new_tok], dim=1)  # (N'*k, t+2)
        token_lp = torch.cat([token_lp.index_select(0, order), new_lp], dim=1)  # (N'*k, t+1)
        if keep.numel() < n:  # drop finished sentences; beams of one sentence share its encoder rows
            sent_rows = (keep[:, None] * k + torch.arange(k, device=device)).view(-1)  # (N'*k,)
            enc, enc_pad = enc.index_select(0, sent_rows), enc_pad.index_select(0, sent_rows)
            row_langs = None if row_langs is None else row_langs.index_select(0, sent_rows)
            active = active.index_select(0, keep)
        if caches is not None:
            Transformer.reorder_caches(caches, order)

    return [sorted(hyps, key=lambda h: -h.score)[:nbest] for hyps in finished]
