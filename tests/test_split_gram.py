"""The split Gram (grads.gram): halves of a slot, G and S from the halves' Gram, the PSD
projection, the default per method, and what a meta step logs. The multi-rank checks
against a one-process reference on the same halves are in test_grads.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cats_ds.config import ConfigError, gram_kind, load_config
from cats_ds.training.grads import MetaGrams, fold_halves, psd_project, split_slot

from helpers import ds_config, launch, read_log, write_json


def test_split_slot_cuts_disjoint_halves_of_about_equal_tokens():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 40, size=500)
    for n in (2, 3, 7, 40, 200):
        sents = np.sort(rng.choice(500, size=n, replace=False))
        sents = sents[np.argsort(sizes[sents], kind="stable")]  # as a slot of a plan: ascending by length
        a, b = split_slot(sents, sizes)
        assert len(a) and len(b) and not set(a) & set(b) and sorted(np.concatenate([a, b])) == sorted(sents)
        assert list(a) == [s for s in sents if s in set(a)]  # each half in the slot's order
        assert abs(int(sizes[a].sum()) - int(sizes[b].sum())) <= int(sizes[sents].max())
        a2, b2 = split_slot(sents.copy(), sizes)
        assert np.array_equal(a, a2) and np.array_equal(b, b2)  # deterministic
    a, b = split_slot(np.array([7]), sizes)  # one sentence: half b is empty
    assert list(a) == [7] and len(b) == 0
    a, b = split_slot(np.array([1, 2, 3, 4]), np.array([0, 5, 5, 5, 5]))  # equal lengths alternate
    assert list(a) == [1, 3] and list(b) == [2, 4]


def _halves(rng, k=3, d=50, rho_a=(0.5, 0.3, 0.6)):
    """Per-half token means m_a, m_b (K, d), rho (K, 2) and the captured rows (2K, d)."""
    rho = torch.tensor([[r, 1 - r] for r in rho_a[:k]], dtype=torch.float64)
    m_a = torch.tensor(rng.normal(size=(k, d)))
    m_b = torch.tensor(rng.normal(size=(k, d)))
    rows = torch.cat([m_a * rho[:, :1], m_b * rho[:, 1:]])
    return m_a, m_b, rho, rows


def test_fold_halves_plain_is_the_whole_slot_gram_and_split_the_cross_terms():
    m_a, m_b, rho, rows = _halves(np.random.default_rng(1))
    plain, split, noise, agreement = fold_halves(rows @ rows.T, rho)
    whole = rows[:3] + rows[3:]  # g_n = (t_a g_a + t_b g_b) / (t_a + t_b)
    assert torch.allclose(whole, rho[:, :1] * m_a + rho[:, 1:] * m_b)
    assert torch.allclose(plain, whole @ whole.T, rtol=1e-12)
    cross = m_a @ m_b.T
    assert torch.allclose(split, (cross + cross.T) / 2, rtol=1e-12)
    assert torch.allclose(noise, ((m_a - m_b) ** 2).sum(1) / 4, rtol=1e-12)
    cos = (m_a * m_b).sum(1) / (m_a.norm(dim=1) * m_b.norm(dim=1))
    assert torch.allclose(agreement, cos, rtol=1e-12)
    # equal halves: S_nn = G_nn - v_n exactly
    m_a, m_b, rho, rows = _halves(np.random.default_rng(2), rho_a=(0.5, 0.5, 0.5))
    plain, split, noise, _ = fold_halves(rows @ rows.T, rho)
    assert torch.allclose(split.diagonal(), plain.diagonal() - noise, rtol=1e-10)
    # batched over parameter groups (the analysis): the same per group
    q = torch.stack([rows @ rows.T, 2 * rows @ rows.T])
    batched = fold_halves(q, rho)
    assert torch.allclose(batched[1][1], 2 * split) and torch.allclose(batched[0][0], plain)


def test_split_is_unbiased_where_plain_is_inflated_by_noise():
    """Two halves with independent noise around a fixed per-language gradient mu_n (noise
    4x the signal, as measured on single slots): S averages to the signal Gram mu mu^T,
    diagonal included, while G's diagonal carries the noise, which v estimates."""
    rng = np.random.default_rng(3)
    k, d, trials = 3, 2000, 40
    mu = rng.normal(size=(k, d))
    mu[1] += 0.8 * mu[0]  # some alignment between languages 0 and 1
    signal = mu @ mu.T
    sigma = 2.0 * np.sqrt(np.diag(signal).mean() / d)  # |noise of one half|^2 = 4 |mu|^2
    rho = torch.full((k, 2), 0.5, dtype=torch.float64)
    sums = {"plain": 0.0, "split": 0.0, "noise": 0.0}
    for _ in range(trials):
        g_a = mu + sigma * rng.normal(size=(k, d))
        g_b = mu + sigma * rng.normal(size=(k, d))
        rows = torch.tensor(np.concatenate([0.5 * g_a, 0.5 * g_b]))
        plain, split, noise, _ = fold_halves(rows @ rows.T, rho)
        sums["plain"] += plain.numpy() / trials
        sums["split"] += split.numpy() / trials
        sums["noise"] += noise.numpy() / trials
    scale = np.abs(signal).max()
    assert np.abs(sums["split"] - signal).max() < 0.05 * scale
    inflation = np.diag(sums["plain"]) - np.diag(signal)  # E |g|^2 = |mu|^2 + (|noise| / 2)^2 per half pair
    assert (inflation > 0.8 * np.diag(signal)).all()
    assert np.allclose(sums["noise"], inflation, rtol=0.1)
    off = ~np.eye(k, dtype=bool)
    assert np.abs(sums["plain"][off] - signal[off]).max() < 0.05 * scale  # off-diagonal: unbiased either way
    cos_plain = sums["plain"][0, 1] / np.sqrt(sums["plain"][0, 0] * sums["plain"][1, 1])
    cos_split = sums["split"][0, 1] / np.sqrt(sums["split"][0, 0] * sums["split"][1, 1])
    cos_true = signal[0, 1] / np.sqrt(signal[0, 0] * signal[1, 1])
    assert abs(cos_split - cos_true) < 0.05 and cos_plain < 0.5 * cos_true  # noise hides the alignment in G


def test_empty_half_divides_nothing():
    """A slot of one sentence (rho^b = 0): S takes that language's row and column from G,
    v and r are nan, nothing is inf."""
    m_a, m_b, rho, rows = _halves(np.random.default_rng(4))
    rho[1] = torch.tensor([1.0, 0.0])
    rows[3 + 1] = 0.0
    rows[1] = m_a[1]
    plain, split, noise, agreement = fold_halves(rows @ rows.T, rho)
    assert torch.isfinite(plain).all() and torch.isfinite(split).all()
    assert torch.equal(split[1], plain[1]) and torch.equal(split[:, 1], plain[:, 1])
    cross = m_a @ m_b.T
    assert torch.allclose(split[0, 2], (cross[0, 2] + cross[2, 0]) / 2)
    assert torch.isnan(noise[1]) and torch.isnan(agreement[1]) and torch.isfinite(noise[[0, 2]]).all()


def test_psd_projection():
    m = torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    assert torch.allclose(psd_project(m), torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.normal(size=(4, 4)))
    s = (x + x.T) / 2
    p = psd_project(s)
    w, v = torch.linalg.eigh(s)
    assert torch.allclose(p, p.T) and torch.linalg.eigvalsh(p).min() > -1e-12
    assert torch.allclose(p, v @ torch.diag(w.clamp(min=0)) @ v.T)  # eigenvalues clipped at 0, vectors kept
    psd = x @ x.T
    assert torch.allclose(psd_project(psd), psd)  # already PSD: unchanged
    assert torch.allclose(psd_project(torch.stack([s, psd])), torch.stack([p, psd]))  # batched
    grams = MetaGrams(psd, s, torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4))
    assert grams.for_method("plain") is psd and torch.allclose(grams.for_method("split"), p)
    bad = s.clone()
    bad[0, 0] = float("inf")  # passed on for the loop's finite check (weighting.skip)
    assert torch.isinf(MetaGrams(psd, bad, *[torch.zeros(4)] * 4).for_method("split")).any()


def test_gram_default_per_method_and_override():
    for method in ("mgda", "pcgrad", "gradvac", "cagrad", "nashmtl", "imtl", "gradnorm"):
        assert gram_kind(load_config(None, [f"weighting.method={method}"])) == "split", method
        assert gram_kind(load_config(None, [f"weighting.method={method}", "grads.gram=plain"])) == "plain"
    assert load_config(None, []).grads.gram is None
    assert gram_kind(load_config(None, ["weighting.method=cats"])) == "plain"
    assert gram_kind(load_config(None, ["weighting.method=cats", "grads.gram=split"])) == "split"
    with pytest.raises(ConfigError, match=r"grads.gram: 'both' is not one of 'plain', 'split'"):
        load_config(None, ["grads.gram=both"])
    with pytest.raises(ConfigError, match=r"unknown config key 'grads.gramm'.*did you mean 'gram'"):
        load_config(None, ["grads.gramm=split"])


def test_gram_events_are_the_logged_diagnostics():
    from cats_ds.training.loop import gram_events

    gram = {"step": 4, "kind": "split", "r": {"aa": 0.2, "bb": float("nan")}, "noise_share": {"aa": 0.7},
            "plain_cos_mean": 0.1, "split_cos_mean": 0.4, "split_cos": {"aa": {"aa": 1.0}}}
    assert sorted(gram_events(gram, 5)) == [("gram/noise_share/aa", 0.7, 5), ("gram/plain_cos_mean", 0.1, 5),
                                            ("gram/r/aa", 0.2, 5), ("gram/split_cos_mean", 0.4, 5)]
    assert gram_events(None, 5) == []


def test_meta_steps_log_the_gram_diagnostics(tmp_path, tiny_recipe):
    """A short pcgrad run (split by default) and the same with grads.gram=plain: the log
    records after meta steps carry the half agreement per language, both mean cosines and
    the split cosine matrix; the weighting got the kind the config resolves to."""
    ds = write_json(tmp_path / "z1.json", ds_config(1))
    for name, extra in (("split", {}), ("plain", {"grads": {"gram": "plain"}})):
        recipe = tiny_recipe(name, weighting={"method": "pcgrad"}, sampling={"langs_per_batch": 3},
                             meta={"every": [[None, 2]]}, train={"max_updates": 4}, **extra)
        launch(["launch/train.py", "--deepspeed_config", ds, "--config", recipe], 2)
        log = read_log(tmp_path / name)
        assert [r["step"] for r in log] == [1, 2, 3, 4]
        assert [("gram" in r) for r in log] == [True, False, True, False]  # meta steps 0 and 2, logged after them
        for r in log[::2]:
            gram = r["gram"]
            assert gram["kind"] == name and gram["step"] == r["step"] - 1
            langs = sorted(gram["split_cos"])
            assert len(langs) == 3 and sorted(gram["r"]) == langs and sorted(gram["noise_share"]) == langs
            assert all(-1 <= v <= 1 for v in gram["r"].values())
            assert all(v >= 0 for v in gram["noise_share"].values())
            assert -1 <= gram["split_cos_mean"] <= 1 and -1 <= gram["plain_cos_mean"] <= 1
            assert all(abs(gram["split_cos"][a][a] - 1) < 1e-9 for a in langs)
