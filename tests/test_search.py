"""Beam search, greedy search and the forced-decoding scorer on a tiny random Transformer.

The model is float64 so that "same computation, different shapes" (cached vs. full
prefix, alone vs. in a padded batch) agrees to far below the 1e-5 tolerance. A constant
added to the </s> logit makes random weights stop at varied lengths.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from cats_ds.config import ModelConfig
from cats_ds.data.manifest import BOS, EOS, PAD, UNK
from cats_ds.inference import search
from cats_ds.model.transformer import Transformer

VOCAB = 40
TAGS = (4, 5, 6)  # language tags <2xx>
WORDS = 7  # first ordinary piece id
SRC_LENGTHS = (3, 9, 5, 7, 4, 8, 6)  # tokens incl. </s>


class Shifted(Transformer):
    """A Transformer whose logits get a constant shift per token plus a per-language one,
    so the language indices (`langs`, as expert routing gets them) change the output."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, shift: torch.Tensor):
        super().__init__(cfg, vocab_size)
        self.register_buffer("shift", shift, persistent=False)  # (V,)
        lang_shift = torch.randn(len(TAGS), vocab_size, generator=torch.Generator().manual_seed(2))
        self.register_buffer("lang_shift", lang_shift, persistent=False)  # (L, V)

    def decode(self, prev, enc, enc_pad, langs=None, caches=None, start=0) -> torch.Tensor:
        logits = super().decode(prev, enc, enc_pad, langs, caches, start)  # (B, T, V)
        return logits + self.shift + self.lang_shift[langs][:, None, :]


def tiny_model(eos_bias: float = 2.0, max_positions: int = 64, banned_bias: float = 0.0,
               vocab: int = VOCAB) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=32, ffn_dim=64, encoder_layers=2, decoder_layers=2, heads=4, dropout=0.0,
                      max_positions=max_positions)
    shift = torch.zeros(vocab)
    shift[EOS] = eos_bias
    shift[[PAD, UNK, BOS]] = banned_bias
    return Shifted(cfg, vocab, shift).double().eval()


def padded_batch(lengths=SRC_LENGTHS) -> "Batch":
    """src (B, S) right-padded random pieces + </s>, a mix of languages (B,), their tags (B,)."""
    g = torch.Generator().manual_seed(1)
    src = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n - 1] = torch.randint(WORDS, VOCAB, (n - 1,), generator=g)
        src[i, n - 1] = EOS
    langs = torch.arange(len(lengths)) % len(TAGS)
    return Batch(src, torch.tensor(TAGS)[langs], langs)


class Batch(NamedTuple):
    src: torch.Tensor
    tags: torch.Tensor
    langs: torch.Tensor

    def rows(self, idx) -> "Batch":
        return Batch(self.src[idx], self.tags[idx], self.langs[idx])


def pad_hyps(hyps: list[search.Hypothesis]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(h.tokens) for h in hyps], batch_first=True,
                                           padding_value=PAD)  # (R, T)


def well_formed(h: search.Hypothesis) -> bool:
    return (len(h.tokens) >= 1 and h.tokens[-1] == EOS and EOS not in h.tokens[:-1]
            and not {PAD, UNK, BOS} & set(h.tokens) and len(h.positional) == len(h.tokens))


def test_beam_one_equals_greedy():
    model, b = tiny_model(), padded_batch()
    greedy = search.greedy_search(model, *b, max_len_a=1.5, max_len_b=5)
    beam1 = search.beam_search(model, *b, beam=1, max_len_a=1.5, max_len_b=5)
    assert len({len(h.tokens) for h in greedy}) >= 3, "lengths should vary for this test to mean much"
    for g, (h,) in zip(greedy, beam1):
        assert g.tokens == h.tokens
        assert g.logprob == pytest.approx(h.logprob, abs=1e-9)
    assert [h[0].tokens for h in search.generate(model, *b, beam=1)] == \
           [h.tokens for h in search.greedy_search(model, *b)]


@pytest.mark.parametrize("lenpen,eos_bias", [(1.0, 2.0), (0.6, 2.0), (1.0, 5.0)])
def test_every_nbest_score_is_the_forced_decoding_score(lenpen, eos_bias):
    model, b = tiny_model(eos_bias=eos_bias), padded_batch()
    beam = 4
    nbest = search.beam_search(model, *b, beam=beam, lenpen=lenpen, max_len_a=1.5, max_len_b=5)
    assert len(nbest) == len(SRC_LENGTHS)
    flat, rows = [], []
    for i, hyps in enumerate(nbest):
        assert len(hyps) == beam
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == beam, "n-best entries are distinct"
        flat += hyps
        rows += [i] * beam
    assert len({len(h.tokens) for h in flat}) >= 4, "lengths should vary for this test to mean much"
    assert all(map(well_formed, flat))
    forced = search.token_logprobs(model, b.src[rows], pad_hyps(flat), b.tags[rows], b.langs[rows])  # (R, T)
    for r, h in enumerate(flat):
        n = len(h.tokens)
        assert h.logprob == pytest.approx(forced[r].sum().item(), abs=1e-5)
        assert h.score == pytest.approx(forced[r].sum().item() / n ** lenpen, abs=1e-5)
        assert h.positional == pytest.approx(forced[r, :n].tolist(), abs=1e-5)
    sums = search.score(model, b.src[rows], pad_hyps(flat), b.tags[rows], b.langs[rows])
    assert sums.tolist() == pytest.approx([h.logprob for h in flat], abs=1e-5)


def reference_beam_search(model, src: torch.Tensor, tag: int, lang: int, beam: int, lenpen: float,
                          max_len: int) -> list[tuple[list[int], float]]:
    """One sentence, no cache, no batching: the fairseq rule spelled out step by step.
    Returns (tokens, score) of the finished hypotheses, best first."""
    enc, pad = model.encode(src[None], torch.tensor([lang]))
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    for step in range(max_len):
        cands = []
        for toks, lp in beams:
            prev = torch.tensor([[tag] + toks])
            lprobs = torch.log_softmax(model.decode(prev, enc, pad, torch.tensor([lang]))[0, -1], -1)
            for v, lp_v in enumerate(lprobs.tolist()):
                if v in (PAD, UNK, BOS) or (step + 1 == max_len and v != EOS):
                    continue
                cands.append((toks + [v], lp + lp_v))
        cands = sorted(cands, key=lambda c: -c[1])[:2 * beam]
        for toks, lp in cands[:beam]:
            if toks[-1] == EOS and len(finished) < beam:
                finished.append((toks, lp / len(toks) ** lenpen))
        beams = [c for c in cands if c[0][-1] != EOS][:beam]
        if len(finished) >= beam:
            break
    return sorted(finished, key=lambda f: -f[1])


@pytest.mark.parametrize("eos_bias,beam,lenpen", [(1.0, 6, 1.0), (0.0, 4, 1.0), (2.0, 4, 0.5)])
def test_batched_beam_search_equals_the_reference(eos_bias, beam, lenpen):
    """(These settings are ones where dropping a beam or over-filling the finished list
    changes some result: the random model's n-best lists are otherwise robust to both.)"""
    model, b = tiny_model(eos_bias=eos_bias), padded_batch()
    max_len = search.max_lengths(model, b.src, 1.0, 3).tolist()
    got = search.beam_search(model, *b, beam=beam, lenpen=lenpen, max_len_a=1.0, max_len_b=3)
    for i, n in enumerate(SRC_LENGTHS):
        ref = reference_beam_search(model, b.src[i, :n], int(b.tags[i]), int(b.langs[i]), beam, lenpen,
                                    max_len[i])
        assert [h.tokens for h in got[i]] == [toks for toks, _ in ref], f"sentence {i}"
        assert [h.score for h in got[i]] == pytest.approx([sc for _, sc in ref], abs=1e-9)


@pytest.mark.parametrize("beam", [1, 3])
def test_cached_decoding_equals_recomputing_the_prefix(beam):
    model, b = tiny_model(), padded_batch()
    kw = dict(beam=beam, lenpen=1.0, max_len_a=1.5, max_len_b=5)
    cached = search.beam_search(model, *b, use_cache=True, **kw)
    full = search.beam_search(model, *b, use_cache=False, **kw)
    for x, y in zip(cached, full):
        assert [h.tokens for h in x] == [h.tokens for h in y]
        assert [h.score for h in x] == pytest.approx([h.score for h in y], abs=1e-9)
    g_cached = search.greedy_search(model, *b, use_cache=True)
    g_full = search.greedy_search(model, *b, use_cache=False)
    assert [h.tokens for h in g_cached] == [h.tokens for h in g_full]


def test_sentence_alone_equals_sentence_in_padded_batch():
    model, b = tiny_model(), padded_batch()
    batched = search.beam_search(model, *b, beam=3, max_len_a=1.5, max_len_b=5)
    greedy = search.greedy_search(model, *b, max_len_a=1.5, max_len_b=5)
    for i, n in enumerate(SRC_LENGTHS):
        one = b.rows(slice(i, i + 1))
        one = one._replace(src=one.src[:, :n])  # no padding at all
        alone = search.beam_search(model, *one, beam=3, max_len_a=1.5, max_len_b=5)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]], f"sentence {i}"
        assert [h.score for h in alone] == pytest.approx([h.score for h in batched[i]], abs=1e-9)
        assert search.greedy_search(model, *one, max_len_a=1.5, max_len_b=5)[0].tokens == greedy[i].tokens


def test_languages_route_each_sentence():
    """Each sentence decodes with its own tag and language: permuting the batch permutes the output."""
    model, b = tiny_model(), padded_batch()
    perm = torch.randperm(len(SRC_LENGTHS), generator=torch.Generator().manual_seed(3))
    ref = search.beam_search(model, *b, beam=2)
    got = search.beam_search(model, *b.rows(perm), beam=2)
    assert [[h.tokens for h in hyps] for hyps in got] == [[h.tokens for h in ref[i]] for i in perm.tolist()]
    other = search.beam_search(model, b.src, b.tags, (b.langs + 1) % len(TAGS), beam=2)
    assert [[h.tokens for h in hyps] for hyps in other] != [[h.tokens for h in hyps] for hyps in ref]


def test_max_length_is_respected_and_eos_forced():
    model, b = tiny_model(eos_bias=-30.0), padded_batch()  # </s> never wanted
    nbest = search.beam_search(model, *b, beam=3, max_len_a=0.5, max_len_b=2)
    for n, hyps in zip(SRC_LENGTHS, nbest):
        assert all(map(well_formed, hyps))
        assert {len(h.tokens) for h in hyps} == {int(0.5 * n + 2)}  # every beam ran to the limit
    for n, h in zip(SRC_LENGTHS, search.greedy_search(model, *b, max_len_a=0.5, max_len_b=2)):
        assert well_formed(h) and len(h.tokens) == int(0.5 * n + 2)
    # the cap from the position table: tag + all generated tokens but </s> must fit
    short = tiny_model(eos_bias=-30.0, max_positions=max(SRC_LENGTHS) + 1)
    for hyps in search.beam_search(short, *b, beam=2, max_len_a=0.0, max_len_b=100):
        assert {len(h.tokens) for h in hyps} == {max(SRC_LENGTHS) + 1}
    # with a normal model nothing exceeds the limit either
    for n, hyps in zip(SRC_LENGTHS, search.beam_search(tiny_model(), *b, beam=4, max_len_a=1.0, max_len_b=1)):
        assert all(well_formed(h) and len(h.tokens) <= n + 1 for h in hyps)


def test_banned_tokens_are_never_generated():
    model, b = tiny_model(banned_bias=20.0), padded_batch()  # the model would love pad/unk/bos
    for hyps in search.beam_search(model, *b, beam=3, max_len_a=1.0, max_len_b=3):
        assert all(map(well_formed, hyps))
    assert all(map(well_formed, search.greedy_search(model, *b, max_len_a=1.0, max_len_b=3)))


def test_fewer_continuations_than_beams():
    """Vocabulary of </s> and 3 tags only: at most 3 live extensions for 5 beams. Dead
    beams must neither crash nor leak into the n-best lists."""
    model, b = tiny_model(eos_bias=1.0, vocab=WORDS), padded_batch()
    b = b._replace(src=b.src.where(b.src < WORDS, torch.tensor(TAGS[0])))
    nbest = search.beam_search(model, *b, beam=5, max_len_a=0.0, max_len_b=4)
    flat = [h for hyps in nbest for h in hyps]
    assert all(map(well_formed, flat))
    rows = [i for i, hyps in enumerate(nbest) for _ in hyps]
    forced = search.score(model, b.src[rows], pad_hyps(flat), b.tags[rows], b.langs[rows])
    assert forced.tolist() == pytest.approx([h.logprob for h in flat], abs=1e-5)
    for i, n in enumerate(SRC_LENGTHS):
        ref = reference_beam_search(model, b.src[i, :n], int(b.tags[i]), int(b.langs[i]), 5, 1.0, 4)
        assert [h.tokens for h in nbest[i]] == [toks for toks, _ in ref], f"sentence {i}"


def test_finished_sentences_leave_the_batch():
    model, b = tiny_model(), padded_batch()
    rows_per_step = []
    decode = model.decode

    def recording_decode(prev, *args, **kwargs):
        rows_per_step.append(prev.size(0))
        return decode(prev, *args, **kwargs)

    model.decode = recording_decode
    search.beam_search(model, *b, beam=3, max_len_a=1.5, max_len_b=5)
    # the first step decodes one row per sentence (its beams are all its tag), then beam rows
    assert rows_per_step[:2] == [len(SRC_LENGTHS), 3 * len(SRC_LENGTHS)]
    assert rows_per_step[1:] == sorted(rows_per_step[1:], reverse=True) and rows_per_step[-1] < rows_per_step[1]


def test_refuses_a_model_in_training_mode():
    model, b = tiny_model(), padded_batch()
    with pytest.raises(ValueError, match="model.eval"):
        search.beam_search(model.train(), *b)
