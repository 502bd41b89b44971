"""Label-smoothed cross entropy, summed per language."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from cats_ds.data.manifest import PAD


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Per-token smoothed loss and nll with one hand-written backward,
    d loss / d logits = softmax - (1 - eps) onehot(y) - eps / V, built in one (N, V)
    buffer: autograd through log_softmax, gather and mean materializes three (N, V)
    gradients and sums them. Once differentiable: Hessian-vector products use the
    unfused path. The backward turns the saved log-probabilities into that gradient in
    place (no second (N, V) buffer: 5-6% of a 3000-token CPU step); a second backward
    through the same graph (retain_graph) is therefore refused by autograd's version check."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tgt: torch.Tensor, smoothing: float):
        lprobs = torch.log_softmax(logits, dim=-1)  # (N, V)
        nll = -lprobs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        loss = (1.0 - smoothing) * nll - smoothing * lprobs.mean(dim=-1) if smoothing > 0 else nll.clone()
        ctx.save_for_backward(lprobs, tgt)
        ctx.smoothing = smoothing
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss: torch.Tensor, g_nll):
        lprobs, tgt = ctx.saved_tensors
        eps = ctx.smoothing
        grad = lprobs.exp_()  # softmax, in the saved buffer: lprobs is not needed again
        if eps > 0:
            grad.sub_(eps / lprobs.size(-1))
        grad.scatter_add_(-1, tgt.unsqueeze(-1), grad.new_full((tgt.numel(), 1), -(1.0 - eps)))
        return grad.mul_(g_loss.unsqueeze(-1)), None, None


def token_losses(logits: torch.Tensor, tgt: torch.Tensor, smoothing: float, fused: bool = False):
    """logits (B, T, V), tgt (B, T) -> (smoothed loss, nll), each (B, T), zero at padding.

    Smoothed loss = (1 - eps) * nll + eps * mean_v(-log p_v). fused: the training path's
    one-buffer backward (_SmoothedCrossEntropy); same values, not twice differentiable."""
    mask = tgt.ne(PAD)
    if fused:
        b, t, v = logits.shape
        loss, nll = _SmoothedCrossEntropy.apply(logits.float().reshape(b * t, v), tgt.reshape(-1), smoothing)
        return loss.view(b, t) * mask, nll.view(b, t) * mask
    lprobs = F.log_softmax(logits.float(), dim=-1)
    nll = -lprobs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    if smoothing > 0:
        smooth = -lprobs.mean(dim=-1)
        loss = (1.0 - smoothing) * nll + smoothing * smooth
    else:
        loss = nll
    return loss * mask, nll * mask


def per_language_sums(logits: torch.Tensor, tgt: torch.Tensor, langs: torch.Tensor, n_langs: int,
                      smoothing: float, fused: bool = False):
    """Sum of smoothed loss, nll and target tokens per language: three (n_langs,) tensors."""
    loss, nll = token_losses(logits, tgt, smoothing, fused)
    z = loss.new_zeros(n_langs)
    loss_sum = z.index_add(0, langs, loss.sum(1))
    nll_sum = z.index_add(0, langs, nll.sum(1).detach())
    tok = z.index_add(0, langs, tgt.ne(PAD).sum(1).to(z.dtype))
    return loss_sum, nll_sum, tok
