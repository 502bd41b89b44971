"""The training path's fused label-smoothed cross entropy against the autograd reference."""

from __future__ import annotations

import pytest
import torch

from cats_ds.training.losses import per_language_sums


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_loss_matches_autograd_values_and_gradients(smoothing):
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 11) * 3  # the loss runs in fp32 (logits.float())
    tgt = torch.randint(1, 11, (5, 7))
    tgt[0, 3:] = 0  # padding
    tgt[2, 5:] = 0
    langs = torch.tensor([0, 2, 2, 1, 0])
    coeff = torch.tensor([0.5, 1.5, 2.0])  # per-language weights, as scaled_loss applies
    out, grads = [], []
    for fused in (False, True):
        x = logits.clone().requires_grad_()
        sums = per_language_sums(x, tgt, langs, 3, smoothing, fused=fused)
        (sums[0] * coeff).sum().backward()
        out.append(sums)
        grads.append(x.grad)
    for a, b in zip(*out):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[1][0, 3:].abs().max() == 0  # no gradient from padding
    assert out[1][2].tolist() == [10.0, 7.0, 12.0]  # target tokens per language


def test_fused_loss_refuses_a_double_backward():
    x = torch.randn(2, 3, 5, requires_grad=True)
    loss = per_language_sums(x, torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 0]), 1, 0.1, fused=True)[0]
    (g,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_fused_loss_refuses_a_second_backward_through_the_same_graph():
    """The backward reuses the saved log-probabilities as its gradient buffer: a second
    backward (retain_graph) must fail loudly, not run on a consumed buffer."""
    x = torch.randn(2, 3, 5, requires_grad=True)
    loss = per_language_sums(x, torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 0]), 1, 0.1, fused=True)[0]
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()
