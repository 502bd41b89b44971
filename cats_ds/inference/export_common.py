"""What the export formats share (cats_ds/inference/ct2_export.py, hf_export.py): their
error, and the dense module one family runs through in a family-expert layer."""

from __future__ import annotations

from typing import Optional

import torch


class ExportError(Exception):
    """The checkpoint cannot be exported as asked; the message says why and what is supported."""


def _expert(module: torch.nn.Module, family: Optional[int]) -> torch.nn.Module:
    """`module` itself, or, for a family-expert layer, its expert of `family` (the module
    that family's tokens run through)."""
    from cats_ds.model.experts import ExpertFeedForward, ExpertOutputEmbedding, FamilyMoE

    if isinstance(module, (ExpertFeedForward, ExpertOutputEmbedding)):
        module = module.moe
    if not isinstance(module, FamilyMoE):
        return module
    if family is None:
        raise ExportError("a family-expert layer needs the family to export (export_ctranslate2 does it per family)")
    experts = module.deepspeed_moe.experts.deepspeed_experts
    if len(experts) != module.num_experts:
        raise ExportError(f"expert layer holds {len(experts)} of {module.num_experts} experts: load the model "
                          f"on one process (ep_size 1), as load_for_inference does")
    return experts[family]
