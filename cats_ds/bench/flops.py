"""Model FLOPs of a training update and the accelerator's peak: model FLOPs utilisation.

Counts the matrix products of the encoder-decoder forward (2 FLOPs per multiply-add) and
takes the backward as twice the forward (3x in all), on REAL tokens: padding is work the
hardware does but the model does not need, so it lowers MFU as it should. Attention
scores and weighted sums are counted over each batch's padded lengths (what the kernels
compute), the decoder's causal self-attention at full length (the usual convention).
Embedding lookups, norms, biases, softmax and the loss are left out (well under 1%).
"""

from __future__ import annotations

import os
from typing import Optional

# dense (no sparsity) tensor-core peaks in TFLOP/s by precision, from the vendors' data sheets
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},  # SXM
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},  # fp32 = TF32
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
}


def train_flops(model_cfg, vocab_size: int, src_tokens: float, tgt_tokens: float, src_len: int,
                tgt_len: int) -> float:
    """FLOPs of forward + backward over a batch with `src_tokens` / `tgt_tokens` real
    tokens whose padded lengths are src_len / tgt_len."""
    d, f = model_cfg.embed_dim, model_cfg.ffn_dim
    le, ld = model_cfg.encoder_layers, model_cfg.decoder_layers
    per_src = le * (4 * d * d + 2 * d * f + 2 * src_len * d)  # self-attention projections, FFN, scores
    per_src += ld * 2 * d * d  # cross-attention keys and values of every decoder layer
    per_tgt = ld * (6 * d * d + 2 * d * f + 2 * tgt_len * d + 2 * src_len * d)  # self + cross (q, out), FFN
    per_tgt += d * vocab_size  # output projection
    return 3 * 2 * (src_tokens * per_src + tgt_tokens * per_tgt)


def peak_flops(device_name: str, precision: str) -> Optional[float]:
    """FLOP/s of the accelerator at `precision` (bf16, fp16, fp32): PEAK_TFLOPS from the
    environment when set, else looked up by the device's name (None: unknown, e.g. a CPU)."""
    env = os.environ.get("PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    for key, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key.lower() in device_name.lower():
            return peaks[precision] * 1e12
    return None


def precision_of(ds: dict) -> str:
    """bf16, fp16 or fp32 from a DeepSpeed config."""
    if (ds.get("bf16") or {}).get("enabled"):
        return "bf16"
    if (ds.get("fp16") or {}).get("enabled"):
        return "fp16"
    return "fp32"
