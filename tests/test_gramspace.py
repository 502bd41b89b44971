"""PCGrad, GradVac, CAGrad, Nash-MTL and IMTL-G from the Gram matrix alone
(cats_ds/weighting/gramspace.py) against straightforward implementations on the full
gradient vectors, written here from the papers; their null tests and config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cats_ds.config import CagradConfig, ConfigError, GradVacConfig, NashMtlConfig, load_config
from cats_ds.data.sampler import draw_languages, temperature_probs
from cats_ds.weighting import make_weighting
from cats_ds.weighting.gramspace import (CagradWeighting, GradVacWeighting, ImtlWeighting, NashMtlWeighting,
                                         PCGradWeighting, cagrad_dual_exact, cagrad_dual_iterative, pair_orders)

GETTEXT8 = {"de": 37435, "es": 39923, "it": 34572, "uk": 50319, "af": 3471, "cy": 3439, "is": 2455, "kk": 3082}
METHODS = ("pcgrad", "gradvac", "cagrad", "nashmtl", "imtl")


# --------------------------------------------------------------------------- references on full vectors


def ref_pcgrad(t: np.ndarray, orders) -> np.ndarray:
    """Yu et al. 2020, Algorithm 1, on vectors; the mean of the projected gradients."""
    out = []
    for i in range(len(t)):
        gi = t[i].copy()
        for j in orders[i]:
            dot = gi @ t[j]
            if dot < 0:
                gi = gi - dot / (t[j] @ t[j]) * t[j]
        out.append(gi)
    return np.mean(out, axis=0)


def ref_gradvac(t: np.ndarray, orders, target: np.ndarray, beta: float):
    """Wang et al. 2021, Algorithm 1, on vectors: the mean of the vaccinated gradients and
    the new targets."""
    target = target.copy()
    out = []
    for i in range(len(t)):
        gi = t[i].copy()
        for j in orders[i]:
            phi = gi @ t[j] / (np.linalg.norm(gi) * np.linalg.norm(t[j]))
            goal = phi if np.isnan(target[i, j]) else target[i, j]  # a pair's first step (init first)
            if phi < goal:
                gi = gi + np.linalg.norm(gi) * (goal * math.sqrt(1 - phi ** 2) - phi * math.sqrt(1 - goal ** 2)) / (
                    np.linalg.norm(t[j]) * math.sqrt(1 - goal ** 2)) * t[j]
                assert gi @ t[j] / (np.linalg.norm(gi) * np.linalg.norm(t[j])) == pytest.approx(goal, abs=1e-9)
            target[i, j] = (1 - beta) * goal + beta * phi
        out.append(gi)
    return np.mean(out, axis=0), target


def ref_cagrad(t: np.ndarray, c: float, rescale: int) -> np.ndarray:
    """Liu et al. 2021 from the PRIMAL: d maximizes min_i <t_i, d> over |d - g0| <= c |g0|.
    On a set A of tasks tied at the minimum, d = g0 + P_A^T v with P_A d = s 1 and
    |P_A^T v| = c |g0| (on the sphere): a quadratic in s; the largest s whose v >= 0 (the
    dual weights) and whose other tasks are >= s is the optimum (KKT, concave problem)."""
    k = len(t)
    g0 = t.mean(0)
    radius = c * np.linalg.norm(g0)
    best, best_s = None, -np.inf
    for mask in range(1, 2 ** k):
        active = [i for i in range(k) if mask >> i & 1]
        p = t[active]
        pp = p @ p.T
        try:
            inv = np.linalg.inv(pp)
        except np.linalg.LinAlgError:
            continue
        ones, base = np.ones(len(active)), p @ g0
        # v = inv (s 1 - base); v^T pp v = radius^2
        a2, a1, a0 = ones @ inv @ ones, -2 * ones @ inv @ base, base @ inv @ base - radius ** 2
        disc = a1 * a1 - 4 * a2 * a0
        if disc < 0:
            continue
        for s in ((-a1 + math.sqrt(disc)) / (2 * a2), (-a1 - math.sqrt(disc)) / (2 * a2)):
            v = inv @ (s * ones - base)
            if v.min() < -1e-12:
                continue
            d = g0 + p.T @ v
            if (t @ d).min() < s - 1e-9 * abs(s):
                continue
            if s > best_s:
                best, best_s = d, s
    return best / {0: 1.0, 1: 1 + c * c, 2: 1 + c}[rescale]


def ref_nash(t: np.ndarray) -> np.ndarray:
    """Navon et al. 2022: alpha > 0 with alpha_i <t_i, d> = 1, d = sum alpha_i t_i, by
    Newton's root finding on that residual (vectors); d is returned."""
    k = len(t)
    alpha = 1 / np.linalg.norm(t, axis=1) / math.sqrt(k)
    for _ in range(200):
        d = alpha @ t
        res = alpha * (t @ d) - 1
        if np.abs(res).max() < 1e-14:
            break
        jac = np.diag(t @ d) + alpha[:, None] * (t @ t.T)
        step = np.linalg.solve(jac, -res)
        lam = 1.0
        while (alpha + lam * step).min() <= 0:
            lam /= 2
        alpha = alpha + lam * step
    assert alpha.min() > 0 and np.abs(alpha * (t @ (alpha @ t)) - 1).max() < 1e-10
    return alpha @ t


def ref_imtl(t: np.ndarray) -> np.ndarray:
    """Liu et al. ICLR 2021, IMTL-G's closed form: alpha_{2:K} = g_1 U^T (D U^T)^-1."""
    u = t / np.linalg.norm(t, axis=1, keepdims=True)
    d_rows, u_rows = t[0] - t[1:], u[0] - u[1:]
    rest = t[0] @ u_rows.T @ np.linalg.inv(d_rows @ u_rows.T)
    alpha = np.concatenate([[1 - rest.sum()], rest])
    return alpha @ t


def weighting(method: str, languages, seed: int = 7, **cfg):
    every = [[None, 1]]
    if method == "pcgrad":
        return PCGradWeighting(languages, every, seed=seed)
    if method == "gradvac":
        return GradVacWeighting(languages, GradVacConfig(**cfg), every, seed=seed)
    if method == "cagrad":
        return CagradWeighting(languages, CagradConfig(**cfg), every)
    if method == "nashmtl":
        return NashMtlWeighting(languages, NashMtlConfig(**cfg), every)
    return ImtlWeighting(languages, every)


def random_problem(rng, k: int, dim: int = 1000, common: float = 0.3):
    """K gradients of different norms with a common component (some pairs conflict),
    unequal shares S_n summing to 1 or (weight_by=language) to about 2."""
    g = rng.normal(size=(k, dim)) * rng.uniform(0.3, 3.0, size=(k, 1)) + common * rng.normal(size=dim)
    s = rng.uniform(0.5, 2.0, size=k)
    s *= (1.0 if rng.random() < 0.5 else 2.0) / s.sum()
    return g, s


# --------------------------------------------------------------------------- (a) G space == full vectors


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", range(2, 9))
def test_gram_coefficients_equal_the_full_gradient_method(method, k):
    """The update sum_n c_n g_n from G-space coefficients == the method on the full
    gradients t_n = K S_n g_n / S (module docstring), times S, to 1e-8 relative; PCGrad and
    GradVac over 4 consecutive meta steps of K of K+2 languages (GradVac's targets carry
    over, new pairs start), CAGrad at c = 0.5, 0.9, 0.2 and its three rescalings."""
    rng = np.random.default_rng(1000 * k + METHODS.index(method))
    langs = [f"l{i}" for i in range(k + 2)]
    w = weighting(method, langs)
    target = np.full((k + 2, k + 2), np.nan)  # gradvac.init=first
    for step in range(4 if method in ("gradvac", "pcgrad") else 1):
        g, s = random_problem(rng, k)
        batch = sorted(rng.choice(k + 2, size=k, replace=False).tolist())
        shares = {l: float(x) for l, x in zip(batch, s)}
        total = s.sum()
        t = (k * s / total)[:, None] * g
        if method == "pcgrad":
            want = total * ref_pcgrad(t, pair_orders(7, step, k))
        elif method == "gradvac":
            sub, new = ref_gradvac(t, pair_orders(7, step, k), target[np.ix_(batch, batch)], 0.01)
            want = total * sub
            target[np.ix_(batch, batch)] = new
        elif method == "cagrad":
            want = total * ref_cagrad(t, 0.5, 1)
        elif method == "nashmtl":
            want = total * ref_nash(t)
        else:
            want = total * ref_imtl(t)
        coeffs = w.update(step, batch, torch.zeros(k), torch.tensor(g @ g.T), shares)
        got = np.array([coeffs[l] for l in batch]) @ g
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < 1e-8, (step, err)
        assert w.scalars().get(f"{method}/unsolved") is None
        # between meta steps: w_n = c_n / S_n for the batch's languages, 1 for the others
        assert np.allclose([w.weight(l) for l in batch], [coeffs[l] / shares[l] for l in batch], rtol=1e-12)
        if method == "gradvac":
            assert np.allclose(w.target.numpy(), target, atol=1e-12, equal_nan=True)
    if method == "cagrad":  # another radius, and the other rescalings
        for c, rescale in ((0.9, 0), (0.2, 2)):
            w = weighting("cagrad", langs, c=c, rescale=rescale)
            coeffs = w.update(0, batch, torch.zeros(k), torch.tensor(g @ g.T), shares)
            got = np.array([coeffs[l] for l in batch]) @ g
            want = total * ref_cagrad(t, c, rescale)
            assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-8


def test_pcgrad_and_gradvac_touch_only_conflicts():
    """No conflicting pair (GradVac: targets at 0, or its first meta step): the update is
    the plain one, sum_n S_n g_n, and every weight stays 1."""
    rng = np.random.default_rng(0)
    g = np.abs(rng.normal(size=(4, 50)))  # positive entries: every cosine > 0
    shares = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}
    for method, cfg in (("pcgrad", {}), ("gradvac", {"init": "zero"}), ("gradvac", {})):
        w = weighting(method, ["a", "b", "c", "d"], **cfg)
        coeffs = w.update(0, [0, 1, 2, 3], torch.zeros(4), torch.tensor(g @ g.T), shares)
        assert coeffs == pytest.approx(shares, rel=1e-12) and w.w.tolist() == pytest.approx([1.0] * 4, rel=1e-12)


def test_pcgrad_by_hand():
    """g1 = (1, 0), g2 = (-1, 1): g1 -> g1 - (-1/2) g2 = (1/2, 1/2), g2 -> g2 - (-1) g1 = (0, 1);
    mean (1/4, 3/4) = g1 + 3/4 g2 (equal shares 1/2: weights 2 and 3/2)."""
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    w = weighting("pcgrad", ["a", "b"])
    coeffs = w.update(0, [0, 1], torch.zeros(2), g @ g.T, {0: 0.5, 1: 0.5})
    assert coeffs == pytest.approx({0: 1.0, 1: 0.75}, abs=1e-15)
    assert w.w.tolist() == pytest.approx([2.0, 1.5])


def test_cagrad_iterative_solver_for_large_batches():
    """K > 8 uses projected gradient: on K = 6 and 8 it reaches the exact dual's point."""
    rng = np.random.default_rng(3)
    for k in (6, 8):
        g, _ = random_problem(rng, k, dim=200)
        gram = torch.tensor(g @ g.T)
        exact, it = cagrad_dual_exact(gram, 0.5), cagrad_dual_iterative(gram, 0.5, 5000)
        assert np.abs((exact - it).numpy() @ g).max() < 1e-5 * np.abs(exact.numpy() @ g).max()
    w = weighting("cagrad", [f"l{i}" for i in range(10)])
    g, s = random_problem(rng, 10, dim=200)
    coeffs = w.update(0, list(range(10)), torch.zeros(10), torch.tensor(g @ g.T), dict(enumerate(s)))
    got = np.array([coeffs[i] for i in range(10)]) @ g
    t = (10 * s / s.sum())[:, None] * g
    want = s.sum() * ref_cagrad(t, 0.5, 1)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_nash_without_a_common_direction_keeps_the_weights():
    """t_1 = -t_2: G alpha = 1/alpha has no positive solution; the meta step keeps the
    weights, applies them, and counts it."""
    w = weighting("nashmtl", ["a", "b", "c"])
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    coeffs = w.update(0, [0, 2], torch.zeros(2), g @ g.T, {0: 0.5, 2: 0.5})
    assert coeffs == {0: 0.5, 2: 0.5} and w.scalars()["nashmtl/unsolved"] == 1.0
    assert "Newton" in w.unsolved_reason or "alpha" in w.unsolved_reason
    resumed = weighting("nashmtl", ["a", "b", "c"])
    resumed.load_state_dict(w.state_dict())
    assert resumed.scalars()["nashmtl/unsolved"] == 1.0 and torch.equal(resumed.w, w.w)


# --------------------------------------------------------------------------- (c) the null test


@pytest.mark.parametrize("method", METHODS)
def test_identical_gradients_give_equal_weights(method):
    """Identical gradients (rank-one G) and equal shares (K distinct slots of equal
    tokens): every language of the batch gets the same weight w_n = c_n / S_n. With
    rank-one G the coefficients are not fixed by the update (any c with the same sum gives
    it); each method picks the symmetric one. w is 1 for PCGrad, GradVac, IMTL-G;
    (1 + c) / (1 + c^2) = 1.2 for CAGrad (d = (1 + c) g0, rescaled); sqrt(K) / |g| for
    Nash-MTL (|d| = sqrt(K) whatever |g|)."""
    g = np.tile(np.array([3.0, -1.0, 2.0]), (4, 1))
    shares = {0: 0.25, 2: 0.25, 3: 0.25, 5: 0.25}
    w = weighting(method, [f"l{i}" for i in range(6)])
    coeffs = w.update(0, [0, 2, 3, 5], torch.zeros(4), torch.tensor(g @ g.T), shares)
    ratio = np.array([coeffs[l] / shares[l] for l in shares])
    want = {"cagrad": 1.5 / 1.25, "nashmtl": 2 / np.linalg.norm(g[0])}.get(method, 1.0)
    assert np.allclose(ratio, want, rtol=1e-9), ratio
    assert [w.weight(l) for l in (1, 4)] == [1.0, 1.0]  # not in the batch: unchanged


def null_weights(method: str, steps: int = 1000, **cfg):
    """Mean weight per language over `steps` meta steps of the null stream (below)."""
    langs = list(GETTEXT8)
    p = temperature_probs(list(GETTEXT8.values()), 1.0)
    rng = np.random.default_rng(5)
    w = weighting(method, langs, **cfg)
    u = rng.normal(size=64) * 0.5
    sums, counts = np.zeros(8), np.zeros(8)
    for step in range(steps):
        batch = sorted(draw_languages(rng, p, 4, distinct=True))
        g = (u + rng.normal(size=(4, 64))) / 8
        tokens = rng.integers(900, 1100, size=4)
        shares = {b: float(x / tokens.sum()) for b, x in zip(batch, tokens)}
        w.update(step, batch, torch.zeros(4), torch.tensor(g @ g.T), shares)
        sums[batch] += [w.weight(b) for b in batch]
        counts[batch] += 1
    return w, sums / counts, counts


@pytest.mark.parametrize("method", METHODS)
def test_null_identical_languages_sampled_unequally(method):
    """The null test (docs/design.md, "Behaviour tests every weighting is held to"):
    gettext8's 8 languages, statistically identical (g_n = u + z_n,
    mean pairwise cosine ~0.2, so PCGrad/GradVac do see conflicts), drawn at gettext8's
    T=1 rates (de/es/it/uk ~12x af/cy/is/kk), K=4 distinct per meta batch, token shares
    from random token counts. Each meta step sets the batch's weights afresh, so the test
    is on their mean over 1000 meta steps: no Hi/Lo split (means within 5%), every
    language within 15% of the overall mean (the Lo languages' means are over ~120 meta
    steps, and GradVac's targets of their pairs over few observations: noisier)."""
    langs = list(GETTEXT8)
    w, mean, counts = null_weights(method)
    hi, lo = mean[:4].mean(), mean[4:].mean()
    print(f"{method}: mean weight per language {dict(zip(langs, mean.round(3)))}; meta steps per language "
          f"{counts.astype(int).tolist()}")
    assert counts[4:].min() > 80  # the Lo languages were in enough batches
    assert abs(hi - lo) < 0.05 * abs(mean.mean())
    assert np.abs(mean / mean.mean() - 1).max() < 0.15
    assert w.scalars().get(f"{method}/unsolved") is None


def test_gradvac_zero_init_fails_the_null_test_for_long():
    """What gradvac.init=first avoids: with targets starting at 0 a pair's target
    reaches the true mean cosine (~0.2 here) only after ~1/beta of the pair's OWN meta
    steps, so after 400 meta steps the Hi-Hi pairs are vaccinated toward 0.2 and the
    rarely drawn Lo pairs still barely (mean Hi weight 1.08, Lo 1.02, printed)."""
    _, mean, _ = null_weights("gradvac", steps=400, init="zero")
    print(f"gradvac init=zero: Hi mean {mean[:4].mean():.3f}, Lo mean {mean[4:].mean():.3f}")
    assert mean[:4].mean() - mean[4:].mean() > 0.04


# --------------------------------------------------------------------------- state, schedule, config


def test_weights_between_meta_steps_and_schedule():
    """M = 3: the weights set at a meta step are the loss coefficients' w_n until the next
    meta step (c_n = w_n mix_n); M = 1 makes every step a meta step."""
    cfg = load_config(None, ["weighting.method=imtl", "meta.every=[[null, 3]]"])
    w = make_weighting(cfg, ["a", "b", "c"])
    assert [s for s in range(7) if w.is_meta_step(s)] == [0, 3, 6]
    g = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    coeffs = w.update(0, [0, 2], torch.zeros(2), g @ g.T, {0: 0.5, 2: 0.5})
    # equal projections on (1, 0) and (0, 1): d = (x, x) = alpha_a (2, 0) + alpha_c (0, 1), sum 1
    assert coeffs == pytest.approx({0: 1 / 3, 2: 2 / 3}, abs=1e-12)
    assert w.coefficients([0, 1, 2], {0: 10, 1: 20, 2: 10}) == pytest.approx(
        {0: (2 / 3) * 0.25, 1: 0.5, 2: (4 / 3) * 0.25}, abs=1e-12)
    every = make_weighting(load_config(None, ["weighting.method=imtl", "meta.every=[[null, 1]]"]), ["a"])
    assert all(every.is_meta_step(s) for s in range(5))


def test_gradvac_state_roundtrip_and_resume_order():
    rng = np.random.default_rng(2)
    w = weighting("gradvac", ["a", "b", "c"])
    g = rng.normal(size=(3, 20))
    w.update(0, [0, 1, 2], torch.zeros(3), torch.tensor(g @ g.T), {0: 0.3, 1: 0.3, 2: 0.4})
    other = weighting("gradvac", ["a", "b", "c"])
    other.load_state_dict(w.state_dict())
    assert torch.allclose(other.target, w.target, equal_nan=True) and torch.equal(other.w, w.w)
    assert not w.target[0, 1].isnan() and w.target[0, 0].isnan()  # seen pairs have a target
    g = rng.normal(size=(3, 20))
    args = (1, [0, 1, 2], torch.zeros(3), torch.tensor(g @ g.T), {0: 0.3, 1: 0.3, 2: 0.4})
    assert w.update(*args) == other.update(*args)  # same (seed, step): same random order
    assert pair_orders(1, 5, 4) == pair_orders(1, 5, 4) != pair_orders(1, 6, 4)
    assert all(sorted(o) == [j for j in range(4) if j != i] for i, o in enumerate(pair_orders(1, 5, 4)))


def test_config_sections_and_errors():
    cfg = load_config(None, ["weighting.method=cagrad"])
    assert (cfg.gradvac.beta, cfg.cagrad.c, cfg.cagrad.rescale) == (0.01, 0.5, 1)
    for method in METHODS:
        cfg = load_config(None, [f"weighting.method={method}"])
        assert make_weighting(cfg, ["a", "b"]).name == method
    for override, message in (("gradvac.beta=0", r"gradvac.beta must be in \(0, 1\], got 0.0"),
                              ("cagrad.c=1.0", r"cagrad.c must be in \[0, 1\), got 1.0"),
                              ("cagrad.rescale=3", r"cagrad.rescale: 3 is not one of 0, 1, 2"),
                              ("nashmtl.iters=0", r"nashmtl.iters must be >= 1, got 0"),
                              ("cagrad.radius=0.4", r"unknown config key 'cagrad.radius'")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
