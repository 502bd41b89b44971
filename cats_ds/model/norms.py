"""Norm variants: `layernorm`, `layernorm_noaffine` (no gain, no bias: the paper's
"w/o LayerNorm"), `rmsnorm` (with gain) and `rmsnorm_noaffine`."""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("layernorm", "layernorm_noaffine", "rmsnorm", "rmsnorm_noaffine")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, affine: bool = True, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * self.weight if self.weight is not None else y


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "layernorm_noaffine":
        return nn.LayerNorm(dim, elementwise_affine=False)  # registers no parameters or buffers
    if kind == "rmsnorm":
        return RMSNorm(dim, affine=True)
    if kind == "rmsnorm_noaffine":
        return RMSNorm(dim, affine=False)
    raise ValueError(f"unknown norm '{kind}'; choices: {', '.join(NORMS)}")
