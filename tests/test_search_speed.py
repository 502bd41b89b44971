"""The sped-up beam search (issue 29: cross-attention keys/values once per sentence, the
candidates ranked from each beam's 2k best tokens) gives the hypotheses the previous
implementation gave (tests/old_search.py, kept verbatim): float32 and float64 small random
models, several beams, length penalties, </s> biases and a family-expert-style routing by
language, sentences finishing at different steps."""

from __future__ import annotations

import pytest
import torch

from cats_ds.inference import search
from cats_ds.model.transformer import Transformer

from old_search import old_beam_search
from test_search import TAGS, padded_batch, tiny_model


def random_batch(n: int, seed: int, vocab: int, max_len: int = 14):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len, (n,), generator=g).tolist()
    src = torch.zeros(n, max(lengths), dtype=torch.long)
    for i, m in enumerate(lengths):
        src[i, :m - 1] = torch.randint(7, vocab, (m - 1,), generator=g)
        src[i, m - 1] = 2  # </s>
    langs = torch.randint(0, len(TAGS), (n,), generator=g)
    return src, torch.tensor(TAGS)[langs], langs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eos_bias,beam,lenpen", [(2.0, 5, 1.0), (1.0, 4, 0.6), (0.0, 6, 1.0), (3.0, 2, 1.0)])
def test_hypotheses_unchanged_from_the_previous_implementation(dtype, eos_bias, beam, lenpen):
    model = tiny_model(eos_bias=eos_bias).to(dtype)
    batches = [tuple(padded_batch())] + [random_batch(12, seed, model.vocab_size) for seed in range(3)]
    for src, tags, langs in batches:
        kw = dict(beam=beam, lenpen=lenpen, max_len_a=1.2, max_len_b=4)
        got = search.beam_search(model, src, tags, langs, **kw)
        ref = old_beam_search(model, src, tags, langs, **kw)
        assert [[h.tokens for h in n] for n in got] == [[h.tokens for h in n] for n in ref]
        tol = 1e-5 if dtype == torch.float32 else 1e-9
        for g, r in zip(got, ref):
            assert [h.score for h in g] == pytest.approx([h.score for h in r], abs=tol)
            assert [h.positional for h in g] == [pytest.approx(h.positional, abs=tol) for h in r]


def test_cross_attention_is_cached_once_per_sentence():
    """Each decoder layer's cross-attention cache holds one row per unfinished sentence,
    not one per beam, while the self-attention cache holds one per beam."""
    model = tiny_model(eos_bias=-5.0)  # long hypotheses: nobody finishes early
    src, tags, langs = padded_batch()
    seen = []
    reorder = Transformer.reorder_caches

    def spy(caches, order, keys=("k", "v", "ck", "cv")):
        reorder(caches, order, keys)
        if "k" in keys:  # after each step's reordering of the beams
            seen.append((caches[0]["k"].size(0), caches[0]["ck"].size(0)))

    Transformer.reorder_caches = staticmethod(spy)
    try:
        search.beam_search(model, src, tags, langs, beam=3, max_len_a=1.0, max_len_b=2)
    finally:
        Transformer.reorder_caches = staticmethod(reorder)
    assert len(seen) > 2 and seen[0] == (3 * len(src), len(src))
    assert all(rows == 3 * sents for rows, sents in seen)
