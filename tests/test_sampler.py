"""Language sampler, length groups and rank shares on the prepared tiny corpus."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cats_ds.data.manifest import Manifest, load_split
from cats_ds.data.sampler import (LanguageSampler, chunk_by_budget, chunk_greedy, collate, split_by_length, target_tokens,
                                  temperature_probs)


@pytest.fixture(scope="module")
def splits(tiny_data):
    manifest = Manifest.load(tiny_data)
    return manifest, load_split(tiny_data, manifest, "train")


def test_temperature_probs():
    assert np.allclose(temperature_probs([100, 25], 1.0), [0.8, 0.2])
    assert np.allclose(temperature_probs([100, 25], 2.0), [2 / 3, 1 / 3])
    assert np.allclose(temperature_probs([100, 25, 0], math.inf), [0.5, 0.5, 0.0])


def test_chunks_respect_budget():
    cost = np.array([3, 9, 1, 4, 4, 30, 2])
    order = np.argsort(cost, kind="stable")
    chunks = chunk_by_budget(order, cost, 10)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(7))
    for c in chunks:
        assert len(c) * cost[c].max() <= 10 or len(c) == 1


def test_slot_frequencies_follow_temperature(splits):
    manifest, data = splits
    langs = manifest.languages
    s = LanguageSampler(data, langs, temperature=1.0, langs_per_batch=2, max_tokens=64, world_size=1, seed=3)
    counts = np.zeros(len(langs))
    for _ in range(3000):
        rng = np.random.default_rng([s.seed, 2, s.micro_step])
        for li in rng.choice(len(langs), size=2, replace=True, p=s.probs):
            counts[li] += 1
        s.micro_step += 1
    assert np.allclose(counts / counts.sum(), s.probs, atol=0.02)


def test_ranks_see_disjoint_shares_of_the_same_global_batch(splits):
    manifest, data = splits
    langs = manifest.languages
    one = LanguageSampler(data, langs, 5.0, 2, max_tokens=256, world_size=1, seed=1)
    two = LanguageSampler(data, langs, 5.0, 2, max_tokens=128, world_size=2, seed=1)
    for _ in range(20):
        p1, p2 = one.next_plan(), two.next_plan()
        assert p1.langs == p2.langs and all(np.array_equal(a, b) for a, b in zip(p1.sents, p2.sents))
        r0, r1 = p2.for_rank(0, 2), p2.for_rank(1, 2)
        for a, b, full in zip(r0.sents, r1.sents, p2.sents):
            assert not set(a.tolist()) & set(b.tolist())
            assert sorted(a.tolist() + b.tolist()) == sorted(full.tolist())


def test_length_groups_cover_the_plan_and_bound_padding(splits):
    manifest, data = splits
    langs = manifest.languages
    s = LanguageSampler(data, langs, 5.0, 3, max_tokens=200, world_size=1, seed=2)
    for _ in range(10):
        plan = s.next_plan()
        groups = split_by_length(plan, data, langs, 200)
        got = sorted((li, i) for g in groups for li, ss in zip(g.langs, g.sents) for i in ss.tolist())
        assert got == sorted((li, i) for li, ss in zip(plan.langs, plan.sents) for i in ss.tolist())
        for g in groups:
            batch = collate(g, data, langs, [4, 5, 6])
            n = len(batch)
            assert n == 1 or n * max(batch.src.size(1), batch.tgt.size(1)) <= 200
            assert (batch.prev[:, 0] == torch_tags(batch.langs)).all()  # the language tag leads
        assert sum(target_tokens(plan, data, langs).values()) == sum(
            int(data[langs[li]].tgt.sizes[ss].sum()) for li, ss in zip(plan.langs, plan.sents))


def torch_tags(langs):
    return langs + 4


def test_state_roundtrip_continues_identically(splits):
    manifest, data = splits
    langs = manifest.languages
    a = LanguageSampler(data, langs, 5.0, 2, 128, 1, seed=4)
    for _ in range(37):
        a.next_plan()
    b = LanguageSampler(data, langs, 5.0, 2, 128, 1, seed=4)
    b.load_state_dict(a.state_dict())
    for _ in range(50):  # across epoch boundaries of the small languages
        pa, pb = a.next_plan(), b.next_plan()
        assert pa.langs == pb.langs and all(np.array_equal(x, y) for x, y in zip(pa.sents, pb.sents))
    c = LanguageSampler(data, langs, 5.0, 2, 256, 1, seed=4)
    with pytest.raises(ValueError, match="max_tokens"):
        c.load_state_dict(a.state_dict())


def test_missing_language(splits):
    manifest, data = splits
    with pytest.raises(ValueError, match="no training data for language"):
        LanguageSampler(data, manifest.languages + ["zz"], 5.0, 2, 128, 1, seed=0)


def test_distinct_languages_and_meta_probabilities(splits):
    manifest, data = splits
    langs = manifest.languages
    s = LanguageSampler(data, langs, 1.0, 2, max_tokens=256, world_size=1, seed=4, distinct=True)
    plans = [s.next_plan() for _ in range(200)]
    assert all(len(p.langs) == 2 for p in plans)  # K distinct languages, every micro-batch
    low = langs.index(min(langs, key=lambda l: len(data[l])))
    only = np.zeros(len(langs))
    only[low] = 1.0
    assert all(s.next_plan(only).langs == [low] for _ in range(5))  # meta batches at their own probabilities
    s2 = LanguageSampler(data, langs, 1.0, 2, max_tokens=256, world_size=1, seed=4, distinct=False)
    assert any(len(s2.next_plan().langs) == 1 for _ in range(200))  # with replacement: repeats happen


def padded_fraction(plans, data, langs, side):
    real = padded = 0
    for plan in plans:
        sizes = np.concatenate([getattr(data[langs[li]], side).sizes[s] for li, s in zip(plan.langs, plan.sents)])
        real, padded = real + sizes.sum(), padded + len(sizes) * sizes.max()
    return 1 - real / padded


def test_length_pool_trains_exactly_the_drawn_sentences_with_less_padding(splits):
    manifest, data = splits
    langs = manifest.languages
    pooled = LanguageSampler(data, langs, 5.0, 2, max_tokens=64, world_size=2, seed=5, length_pool=8)
    direct = LanguageSampler(data, langs, 5.0, 2, max_tokens=64, world_size=2, seed=5)
    for _ in range(3):  # three pools
        draws = [direct.next_plan() for _ in range(8)]
        batch, drawn = pooled.next_batch()
        assert [(p.langs, [s.tolist() for s in p.sents]) for p in drawn] == \
            [(p.langs, [s.tolist() for s in p.sents]) for p in draws]  # the draws are the sampler's own
        batches = [batch]
        while True:
            state = pooled.state_dict()
            batch, more = pooled.next_batch()
            if more:  # the next pool began: put it back
                pooled.load_state_dict(state)
                break
            batches.append(batch)
        got = sorted((li, i) for p in batches for li, s in zip(p.langs, p.sents) for i in s.tolist())
        want = sorted((li, i) for p in draws for li, s in zip(p.langs, p.sents) for i in s.tolist())
        assert got == want  # every drawn sentence once, nothing else
        for p in batches:
            b = collate(p, data, langs, [4, 5, 6])
            assert len(b) == 1 or len(b) * max(b.src.size(1), b.tgt.size(1)) <= 128  # max_tokens x world
            assert p.langs == sorted(set(p.langs))
        assert padded_fraction(batches, data, langs, "tgt") < padded_fraction(draws, data, langs, "tgt")
        assert padded_fraction(batches, data, langs, "src") < padded_fraction(draws, data, langs, "src")


def test_length_pool_off_gives_the_draws(splits):
    manifest, data = splits
    a = LanguageSampler(data, manifest.languages, 5.0, 2, 128, 1, seed=6)
    b = LanguageSampler(data, manifest.languages, 5.0, 2, 128, 1, seed=6)
    for _ in range(5):
        plan, drawn = a.next_batch()
        ref = b.next_plan()
        assert drawn == [plan] and plan.langs == ref.langs
        assert all(np.array_equal(x, y) for x, y in zip(plan.sents, ref.sents))


def test_length_pool_state_resumes_mid_pool(splits):
    """A checkpoint inside a pool, with meta-step draws (next_plan) taken between pooled
    micro-batches, continues identically."""
    manifest, data = splits
    langs = manifest.languages
    a = LanguageSampler(data, langs, 5.0, 2, 128, 1, seed=7, length_pool=6)
    for i in range(6):
        a.next_batch() if i % 4 else a.next_plan()
    state = a.state_dict()
    assert state["pool"] is not None  # inside the first pool
    b = LanguageSampler(data, langs, 5.0, 2, 128, 1, seed=7, length_pool=6)
    b.load_state_dict(state)
    for i in range(40):
        pa, da = a.next_batch() if i % 3 else (a.next_plan(), [])
        pb, db = b.next_batch() if i % 3 else (b.next_plan(), [])
        assert pa.langs == pb.langs and all(np.array_equal(x, y) for x, y in zip(pa.sents, pb.sents))
        assert len(da) == len(db)
    c = LanguageSampler(data, langs, 5.0, 2, 128, 1, seed=7, length_pool=4)
    with pytest.raises(ValueError, match="length_pool"):
        c.load_state_dict(state)


def test_length_pool_groups_by_source_then_target(splits):
    """A pool's micro-batches are runs of its sentences sorted by source length (fairseq's
    order), so two micro-batches share at most one source length and a micro-batch spans
    few; within one source length the targets are sorted too (ascending at even, descending
    at odd source lengths). chunk_greedy keeps every chunk within budget."""
    manifest, data = splits
    langs = manifest.languages
    pooled = LanguageSampler(data, langs, 5.0, 2, max_tokens=64, world_size=1, seed=8, length_pool=16)
    batch, drawn = pooled.next_batch()
    batches = [batch] + [pooled.next_batch()[0] for _ in range(len(pooled._pool) - 1)]
    assert pooled._pool_pos == len(pooled._pool)

    def sizes(p, side):
        return np.concatenate([getattr(data[langs[li]], side).sizes[s] for li, s in zip(p.langs, p.sents)])

    spans = sorted((sizes(p, "src").min(), sizes(p, "src").max()) for p in batches)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # source intervals do not interleave
    for p in batches:
        src, tgt = sizes(p, "src"), sizes(p, "tgt")
        assert len(src) == 1 or len(src) * max(src.max(), tgt.max()) <= 64
        for length in np.unique(src):
            t = tgt[src == length]
            if len(t) > 2 and (t.max() - t.min()) > 0:  # a run of one source length spans a target interval
                others = np.concatenate([sizes(q, "tgt")[sizes(q, "src") == length] for q in batches if q is not p])
                assert not ((others > t.min()) & (others < t.max())).any()
    assert padded_fraction(batches, data, langs, "src") < 0.03


def test_chunk_greedy_budget_and_order():
    cost = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    order = np.arange(8)
    chunks = chunk_greedy(order, cost, budget=10)
    assert np.concatenate(chunks).tolist() == order.tolist()
    assert all(len(c) == 1 or len(c) * cost[c].max() <= 10 for c in chunks)
    assert [c.tolist() for c in chunks] == [[0, 1], [2, 3], [4], [5], [6], [7]]  # greedy, in order
