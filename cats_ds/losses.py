"""Label-smoothed cross entropy, summed per language."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cats_ds.data.manifest import PAD


def token_losses(logits: torch.Tensor, tgt: torch.Tensor, smoothing: float):
    """logits (B, T, V), tgt (B, T) -> (smoothed loss, nll), each (B, T), zero at padding.

    Smoothed loss = (1 - eps) * nll + eps * mean_v(-log p_v)."""
    lprobs = F.log_softmax(logits.float(), dim=-1)
    mask = tgt.ne(PAD)
    nll = -lprobs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    if smoothing > 0:
        smooth = -lprobs.mean(dim=-1)
        loss = (1.0 - smoothing) * nll + smoothing * smooth
    else:
        loss = nll
    return loss * mask, nll * mask


def per_language_sums(logits: torch.Tensor, tgt: torch.Tensor, langs: torch.Tensor, n_langs: int,
                      smoothing: float):
    """Sum of smoothed loss, nll and target tokens per language: three (n_langs,) tensors."""
    loss, nll = token_losses(logits, tgt, smoothing)
    z = loss.new_zeros(n_langs)
    loss_sum = z.index_add(0, langs, loss.sum(1))
    nll_sum = z.index_add(0, langs, nll.sum(1).detach())
    tok = z.index_add(0, langs, tgt.ne(PAD).sum(1).to(z.dtype))
    return loss_sum, nll_sum, tok
