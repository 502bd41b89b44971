"""The model a config describes: the one builder training and checkpoint loading share."""

from __future__ import annotations

from typing import Optional, Sequence

from cats_ds.config import Config
from cats_ds.model.families import load_family_map
from cats_ds.model.transformer import Transformer, build_model


def model_from_config(cfg: Config, vocab_size: int, languages: Sequence[str],
                      ep_size: Optional[int] = None,
                      families: Optional[tuple[list[str], list[int]]] = None) -> Transformer:
    """A dense Transformer, or one with family experts when `experts.modules` is set.

    `languages[i]` is language index i of the batches (`Batch.langs`); with experts, the
    family map (`experts.families`, default `default`) turns each into a family id, and
    every family that holds one of `languages` gets an expert. `ep_size` overrides
    `experts.ep_size`: 1 keeps every expert on this process (inference, conversion).
    Deterministic given the torch seed; builds nothing distributed (the DeepSpeed engine
    creates the expert-parallel groups). `families`: (family names, family id of each
    language) to use instead of reading the family map (a model folder stores them)."""
    if not cfg.experts.modules:
        return build_model(cfg.model, vocab_size)
    from cats_ds.model.experts import ExpertSublayers, expert_modules

    modules = expert_modules(cfg.experts.modules)
    if families is None:
        families = load_family_map(cfg.experts.families or "default").assign(languages)
    families, lang_family = families
    ep = cfg.experts.ep_size if ep_size is None else ep_size
    parts = ExpertSublayers(cfg.model, modules, cfg.experts.side, len(families), ep)
    return Transformer(cfg.model, vocab_size, parts=parts, lang_family=lang_family)
