"""Run under `deepspeed --num_gpus W`: training where rank 0's partial Gram matrix of the
first meta step is poisoned with inf (as an fp16 overflow would), so the all-reduced G
is non-finite on every rank. Writes <out>.rank<r>.json: alpha after that step, whether
the step still moved the parameters, and the step counter after fit()."""

from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist

import cats_ds.training.grads as grads
from cats_ds.training.loop import fit, train_step
from checkscript import setup_from_command_line


def main():
    args, cfg, run = setup_from_command_line()
    clean = grads.partial_gram
    calls = {"n": 0}

    def poisoned(rows, weights=None, block=1 << 18):
        out = clean(rows, weights, block)
        calls["n"] += 1
        if calls["n"] == 1 and dist.get_rank() == 0:  # one rank only: the all_reduce spreads it
            out[0, 0] = float("inf")
        return out

    grads.partial_gram = poisoned
    torch.manual_seed(cfg.train.seed * 1000 + run.rank)
    run.t_start = run.t_log = time.time()
    before = [p.detach().clone() for p in run.engine.module.parameters()]
    assert run.weighting.is_meta_step(0)
    train_step(run)
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(run.engine.module.parameters(), before))
    alpha0 = run.weighting.state_dict()["alpha"]
    fit(run)
    out = {"alpha_after_skip": alpha0, "moved": moved, "step": run.step,
           "alpha_end": run.weighting.state_dict()["alpha"], "skipped": run.weighting.skipped,
           "meta_steps": run.weighting.meta_steps}
    with open(f"{args.out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
