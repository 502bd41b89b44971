"""Task-weighting methods on problems small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cats_ds.config import CatsConfig, GradNormConfig, MgdaConfig
from cats_ds.weighting.base import mean_pairwise_cosine
from cats_ds.weighting.cats import CatsWeighting
from cats_ds.weighting.gradnorm import GradNormWeighting
from cats_ds.weighting.mgda import MgdaWeighting, min_norm_simplex

D = 4


def quadratic_run(weighting, steps=3000, eta=0.05, seed=0):
    """3 quadratic tasks L_n = 1/2 (theta - t_n)^T H_n (theta - t_n); task 0 is 10x sharper.
    Each step samples K=2 of the 3 tasks (so the combined gradient never vanishes), feeds
    their losses and Gram matrix to the weighting and steps theta by sum_n c_n g_n.
    Returns the mean curvature proxy |sum_n c_n g_n|^2 over the last 500 steps."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    h = torch.tensor([[2.0] * D, [0.2] * D, [0.2] * D], dtype=torch.float64)
    target = torch.randn(3, D, dtype=torch.float64) * 0.5
    theta = torch.zeros(D, dtype=torch.float64)
    proxy = []
    for t in range(steps):
        batch = sorted(rng.choice(3, 2, replace=False).tolist())
        g = h[batch] * (theta - target[batch])
        losses = 0.5 * (h[batch] * (theta - target[batch]) ** 2).sum(1)
        gram = g @ g.T
        c = {b: 1.0 for b in batch} if weighting is None else weighting.update(t, batch, losses, gram, {})
        a = torch.tensor([c[b] for b in batch], dtype=torch.float64)
        proxy.append(float(a @ gram @ a))
        theta = theta - eta * (a @ g)
    return float(np.mean(proxy[-500:]))


@pytest.mark.parametrize("loss_term,lr", [(False, 0.05), (True, 0.01)])
def test_cats_turns_down_the_sharp_task(loss_term, lr):
    eps = 0.05
    cats = CatsWeighting(["sharp", "flat1", "flat2"],
                         CatsConfig(loss_term=loss_term, lr_alpha=lr, lr_lambda=lr, eps=eps, meta_every=[[None, 1]]))
    floor, lambda_c = [], []
    orig = cats.update

    def tracked(*a, **k):
        out = orig(*a, **k)
        floor.append(float(cats.alpha.min()))
        lambda_c.append(cats.lambda_c)
        return out

    cats.update = tracked
    proxy_cats = quadratic_run(cats)
    proxy_equal = quadratic_run(None)
    alpha = cats.alpha
    assert alpha[0] < 0.2 and alpha[0] < alpha[1] and alpha[0] < alpha[2]  # the sharp task is turned down
    assert proxy_cats < 0.5 * proxy_equal                                  # a flatter trajectory
    assert abs(float(alpha.sum()) - 3.0) < 0.05                            # sum alpha -> N
    assert min(floor) > eps - 0.3 and float(alpha.min()) > eps - 0.05      # the floor, up to the ascent lag
    assert max(lambda_c) > 0 and (cats.lambda_n >= 0).all()  # the curvature constraint was active


def test_cats_update_rule_by_hand():
    """One meta step, every term of dL/dalpha checked against the formula."""
    cfg = CatsConfig(loss_term=True, lr_alpha=0.1, lr_lambda=0.5, eps=0.1, meta_every=[[None, 1]])
    cats = CatsWeighting(["a", "b", "c"], cfg)
    cats.lambda_c, cats.lambda_s = 0.2, 0.3
    cats.lambda_n = torch.tensor([0.0, 0.0, 0.4], dtype=torch.float64)
    gram = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    losses = torch.tensor([1.5, 0.7], dtype=torch.float64)
    out = cats.update(0, [0, 2], losses, gram, {})
    # alpha = 1: G alpha_B = [2.5, 1.5]; sum alpha - N = 0
    grad = np.array([1.5 + 2 * 0.2 * 2.5, 0.0, 0.7 + 2 * 0.2 * 1.5 - 0.4])
    want = 1.0 - 0.1 * grad
    assert np.allclose(cats.alpha.numpy(), want)
    assert out == {0: pytest.approx(want[0]), 2: pytest.approx(want[2])}
    a_b = want[[0, 2]]
    curv = a_b @ gram.numpy() @ a_b
    assert cats.lambda_c == pytest.approx(max(0.0, 0.2 + 0.5 * (curv - 0.1)))
    assert cats.lambda_s == pytest.approx(0.3 + 0.5 * (want.sum() - 3) ** 2)
    assert np.allclose(cats.lambda_n.numpy(), np.maximum(0, [0, 0, 0.4] + 0.5 * (0.1 - want)))
    # the curvature term is |sum alpha g|^2 = alpha^T G alpha, not sum alpha^2 |g|^2
    assert cats.last["meta/curvature"] == pytest.approx(curv)


def test_cats_state_roundtrip_and_divergence_error():
    cats = CatsWeighting(["a", "b"], CatsConfig(meta_every=[[None, 1]]))
    cats.update(0, [0, 1], torch.tensor([1.0, 2.0]), torch.eye(2, dtype=torch.float64), {})
    other = CatsWeighting(["a", "b"], CatsConfig(meta_every=[[None, 1]]))
    other.load_state_dict(cats.state_dict())
    assert torch.equal(other.alpha, cats.alpha) and other.lambda_c == cats.lambda_c
    with pytest.raises(ValueError, match="languages"):
        CatsWeighting(["a", "x"], CatsConfig()).load_state_dict(cats.state_dict())
    with pytest.raises(FloatingPointError, match="cats.lr_alpha"):
        cats.update(1, [0, 1], torch.tensor([1.0, float("inf")]), torch.eye(2, dtype=torch.float64), {})


def test_meta_schedule():
    cats = CatsWeighting(["a"], CatsConfig(meta_every=[[4, 1], [10, 3], [None, 5]]))
    assert [s for s in range(20) if cats.is_meta_step(s)] == [0, 1, 2, 3, 6, 9, 10, 15]


def test_gradnorm_by_hand():
    gn = GradNormWeighting(["a", "b"], GradNormConfig(asymmetry=1.5, lr=0.1), [[None, 1]])
    gram = torch.diag(torch.tensor([9.0, 1.0], dtype=torch.float64))  # |g| = 3, 1
    # first step: loss ratios 1 -> target = mean(w|g|) = 2; sign(G - target) = (+, -)
    gn.update(0, [0, 1], torch.tensor([2.0, 1.0], dtype=torch.float64), gram, {})
    w1 = np.array([1 - 0.1 * 3, 1 + 0.1 * 1]) * 2 / 1.8
    assert np.allclose(gn.w.numpy(), w1)
    # second step: task a halved its loss -> r = (0.5, 1) / 0.75, target = mean * r^1.5
    out = gn.update(1, [0, 1], torch.tensor([1.0, 1.0], dtype=torch.float64), gram, {})
    gnorm = w1 * [3, 1]
    target = gnorm.mean() * (np.array([0.5, 1.0]) / 0.75) ** 1.5
    assert np.all(np.sign(gnorm - target) == [1, -1])
    w2 = (w1 - 0.1 * np.array([3, -1])) * 2 / (w1 - 0.1 * np.array([3, -1])).sum()
    assert np.allclose(gn.w.numpy(), w2) and out[0] == pytest.approx(w2[0])


def test_mgda_min_norm_by_hand():
    # g1 = (2, 0), g2 = (0, 1): min_l |l g1 + (1-l) g2|^2 = 4 l^2 + (1-l)^2 -> l = 0.2
    lam = min_norm_simplex(torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64), iters=200)
    assert np.allclose(lam.numpy(), [0.2, 0.8], atol=1e-6)
    # g1 = (1, 0), g2 = (0, 1), g3 = (1, 1): the hull's min-norm point is (1/2, 1/2)
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    lam = min_norm_simplex(g @ g.T, iters=500)
    assert np.allclose((lam @ g).numpy(), [0.5, 0.5], atol=5e-3) and lam[2] < 5e-3  # Frank-Wolfe: O(1/t)
    # one gradient inside the others' hull: all weight on it
    g = torch.tensor([[1.0, 0.0], [3.0, 0.5]], dtype=torch.float64)
    assert np.allclose(min_norm_simplex(g @ g.T).numpy(), [1.0, 0.0], atol=1e-9)
    mg = MgdaWeighting(["a", "b", "c"], MgdaConfig(iters=200), [[None, 1]])
    out = mg.update(0, [0, 2], None, torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64), {})
    assert out[0] == pytest.approx(0.4, abs=1e-5) and out[2] == pytest.approx(1.6, abs=1e-5)
    assert mg.coefficients([1], {}) == {1: 1.0}


def test_mean_pairwise_cosine():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    want = np.mean([0.0, 1 / np.sqrt(2), 1 / np.sqrt(2)])
    assert mean_pairwise_cosine(g @ g.T) == pytest.approx(want)
