"""Run under `deepspeed --num_gpus W`: two updates through the real training setup of a
family-expert model, recording what tests/test_experts.py compares across ep_size and
world size (W=1 with ep_size 1 is the reference).

1. isolate: one update on a batch of ONE language (--isolate, its first --sentences
   training sentences): which parameters changed.
2. equal: one update on a batch of every language (its first --sentences training
   sentences each): the logits of every sentence (key "lang:id"), every parameter's
   full gradient right after the backward, the parameters after engine.step(), and
   the global gradient norm DeepSpeed computed for clipping.

Parameters are named with GLOBAL expert ids. Writes <out>.rank<r>.pt.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from cats_ds.data.manifest import PAD
from cats_ds.data.sampler import Plan, target_tokens
from cats_ds.model.experts import global_parameter_names
from cats_ds.training.loop import local_batch, scaled_loss
from cats_ds.training.losses import per_language_sums
from checkscript import setup_from_command_line


def snapshot(run, names) -> dict[str, torch.Tensor]:
    return {names[n]: p.detach().float().clone() for n, p in run.engine.module.named_parameters()}


def one_update(run, plan: Plan, names) -> tuple[dict, dict]:
    """forward + backward (+ gradients read) + step, exactly as train.plain_update does
    for one micro-batch. Returns (logits by sentence, full gradients by global name)."""
    tokens = target_tokens(plan, run.train_splits, run.languages)
    batch, live = local_batch(run, plan, run.train_splits)
    coeffs = run.weighting.coefficients(plan.langs, tokens)
    run.engine.set_gradient_accumulation_boundary(True)
    logits = run.engine(batch.src, batch.prev, batch.langs)  # (B, T, V)
    loss_sum, _, _ = per_language_sums(logits, batch.tgt, batch.langs, len(run.languages),
                                       run.cfg.train.label_smoothing)
    run.engine.backward(scaled_loss(run, loss_sum, coeffs, tokens) * float(live))
    grads = {}
    for n, p in run.engine.module.named_parameters():  # same order on every rank: collectives match
        g = safe_get_full_grad(p)
        grads[names[n]] = torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach().float().clone()
    run.engine.step()
    out = {}
    if live:
        lengths = batch.tgt.ne(PAD).sum(1)
        for row in range(len(batch)):
            key = f"{run.languages[int(batch.langs[row])]}:{int(batch.ids[row])}"
            out[key] = logits[row, :int(lengths[row])].detach().float().clone()
    return out, grads


def main():
    def add_arguments(ap):
        ap.add_argument("--isolate", help="language of the single-language update")
        ap.add_argument("--sentences", type=int, default=12, help="sentences per language in each update")

    args, cfg, run = setup_from_command_line(add_arguments)
    names = global_parameter_names(run.engine.module)

    li = run.languages.index(args.isolate)
    before = snapshot(run, names)
    one_update(run, Plan([li], [np.arange(args.sentences)]), names)
    after = snapshot(run, names)
    changed = {n: bool((after[n] != before[n]).any()) for n in before}

    every = Plan(list(range(len(run.languages))), [np.arange(args.sentences)] * len(run.languages))
    logits, grads = one_update(run, every, names)
    norm = run.engine.get_global_grad_norm()  # what clipping used (ZeRO-1/2; None for ZeRO-0)
    torch.save({"changed": changed, "logits": logits, "grads": grads, "params": snapshot(run, names),
                "grad_norm": None if norm is None else float(norm),
                "family_of": {lang: int(f) for lang, f in zip(run.languages, run.model.lang_family.tolist())}},
               f"{args.out}.rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main()
