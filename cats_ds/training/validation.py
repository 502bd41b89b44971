"""Validation by translation during training (eval.valid_every): BLEU and chrF++ per
language on eval.valid_sentences dev sentences (the sample `evaluate.py --limit` takes:
the smallest sha256 of the English source), greedy or beam (eval.valid_beam), with
evaluate.py's batches, decoding and scoring.

Every rank decodes its share of the batches of all languages (evaluate.py's dealing by
size), rank 0 gathers the token ids, scores them against the raw dev text and broadcasts
the scores, so every rank takes the same best-checkpoint and early-stopping decisions.
The scores equal those of `evaluate.py --split dev --limit N eval.beam=B` on the saved
checkpoint in one process (tests/test_dev_translation.py).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from cats_ds.config import Config
from cats_ds.data.manifest import LangSplit, Manifest, load_texts
from cats_ds.inference.evaluate import (EvalError, corpus_scores, decode_batches, decode_chunk, limit_sample,
                                        prepare_command, share_batches, tokenizer_for)


class DevSample(NamedTuple):
    """The dev sentences one language is validated on."""

    picks: list[int]
    """Sentence indices (evaluate's `limit_sample` of eval.valid_sentences), in dev-set order."""
    refs: list[str]
    """Their raw references."""


def load_dev_texts(cfg: Config, manifest: Manifest, dev: dict[str, LangSplit]) -> dict[str, DevSample]:
    """The validation sample and its raw dev references of every language with dev data
    (read once, at start-up)."""
    out = {}
    for lang, data in dev.items():
        src, ref = load_texts(cfg.data.dir, manifest, "dev", lang, len(data), reprepare=prepare_command(cfg.data))
        picks = limit_sample(src, cfg.eval.valid_sentences)
        out[lang] = DevSample(picks, [ref[i] for i in picks])
    return out


def check_supported(cfg: Config, zero_stage: int) -> None:
    """Ranks decode different batches, so no forward may need the other ranks: refuse
    ZeRO-3 (parameters gathered per module). The stage is the DeepSpeed JSON's, so this
    check is here (training.loop.load_ds_config calls it); expert parallelism
    (experts.ep_size > 1, all-to-all) is a config check: Config.validate."""
    if cfg.eval.valid_every and zero_stage == 3:
        raise EvalError(f"eval.valid_every={cfg.eval.valid_every}: dev translation during training is not "
                        f"supported with ZeRO-3 (every forward needs all ranks); set eval.valid_every=0 and "
                        f"evaluate saved checkpoints with launch/evaluate.py --split dev")


@torch.no_grad()
def dev_scores(model: torch.nn.Module, cfg: Config, dev: dict[str, LangSplit], refs: dict[str, DevSample],
               languages: list[str], tag_ids: list[int], vocab, rank: int, world: int) -> dict[str, dict]:
    """{lang: {"bleu", "chrf", "n"}} on every rank. `model` must be in eval mode."""
    ecfg = dataclasses.replace(cfg.eval, beam=cfg.eval.valid_beam)
    langs = [lang for lang in languages if lang in dev and len(dev[lang])]
    counts = {lang: len(refs[lang].picks) for lang in langs}
    jobs = [(lang, chunk) for lang in langs for chunk in decode_batches(dev[lang], refs[lang].picks,
                                                                       ecfg.batch_tokens)]
    costs = [len(chunk) * int(dev[lang].src.sizes[chunk].max()) for lang, chunk in jobs]
    decoded: dict[tuple[str, int], list[int]] = {}
    for j in share_batches(jobs, costs, world)[rank]:
        lang, chunk = jobs[j]
        li = languages.index(lang)
        hyps = decode_chunk(model, dev[lang], chunk, tag_ids[li], li, ecfg)
        decoded.update(((lang, i), tokens) for i, tokens in zip(chunk.tolist(), hyps))
    scores = [None]
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(decoded, parts, dst=0)
        if rank == 0:
            for part in parts:
                decoded.update(part)
    if rank == 0:
        out = {}
        for lang in langs:
            hyps = [vocab.decode(decoded[(lang, i)]) for i in refs[lang].picks]
            s = corpus_scores(hyps, refs[lang].refs, tokenizer_for(lang, ecfg))
            out[lang] = {"bleu": s.bleu, "chrf": s.chrf, "n": counts[lang]}
        scores = [out]
    if world > 1:
        dist.broadcast_object_list(scores, src=0)
    return scores[0]


def mean_score(scores: dict[str, dict], metric: str) -> float:
    return float(np.mean([v[metric] for v in scores.values()])) if scores else float("nan")

