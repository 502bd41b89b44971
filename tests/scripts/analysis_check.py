"""Run under `deepspeed --num_gpus W`: the in-training analysis (analysis_step) on ZeRO
partitions, checked against a single-process reference built on every rank.

After two real updates, analysis_step computes cos / gamma per parameter group from the
ranks' gradient partitions and lambda_max with languages spread over ranks. The reference
takes the engine's weights into a plain module and, in one process, computes each
language's full gradient on the same fixed batch, then cos / gamma of every parameter
group directly from the concatenated per-group gradients, split_cos of every group from the
token-mean gradients of the two halves of each language's batch (grads.split_slot), and
lambda_max by power iteration on that module. The four updates around the analysis are also run without it
(from a snapshot of the initial engine, sampler and RNG state): the losses must agree.

Writes <out>.rank<r>.json with both, the two loss sequences, and which groups this rank's
partition touches."""

from __future__ import annotations

import contextlib
import json
import math

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from cats_ds.analysis import analysis_step
from cats_ds.analysis.analyze import analysis_plan
from cats_ds.analysis.hessian import language_loss, top_eigenvalue
from cats_ds.analysis.similarity import param_group
from cats_ds.data.sampler import Plan, collate
from cats_ds.training.grads import split_slot
from cats_ds.model.transformer import build_model
from cats_ds.training.loop import per_language_gradients, train_step
from checkscript import setup_from_command_line


def reference(run, model):
    """{"pairs": {"a:b": {"cos": {group: v}, "gamma": {...}, "split_cos": {...}}}, "loss": {...},
    "lambda_max": {...}}"""
    acfg = run.cfg.analysis
    plan, splits, _ = analysis_plan(run.dev_splits, run.train_splits, run.languages, acfg.sentences)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    grads, halves, loss, lam = {}, {}, {}, {}

    def by_group(g) -> dict:
        out = {}
        for (name, _), x in zip(named, g):
            out.setdefault(param_group(name), []).append(x.detach().double().reshape(-1))
        out = {k: torch.cat(v) for k, v in out.items()}
        out["all"] = torch.cat([x.detach().double().reshape(-1) for x in g])
        return out

    for li, sents in zip(plan.langs, plan.sents):
        lang = run.languages[li]
        batch = collate(Plan([li], [sents]), splits, run.languages, run.tag_ids)
        value = language_loss(model, batch, li, len(run.languages), run.cfg.train.label_smoothing)
        g = torch.autograd.grad(value, params, create_graph=True)
        grads[lang] = by_group(g)
        halves[lang] = []
        for part in split_slot(sents, splits[lang].tgt.sizes):  # the token mean of each half
            half = collate(Plan([li], [part]), splits, run.languages, run.tag_ids)
            halves[lang].append(by_group(torch.autograd.grad(
                language_loss(model, half, li, len(run.languages), run.cfg.train.label_smoothing), params)))
        loss[lang] = float(value.detach())
        lam[lang] = top_eigenvalue(value, params, acfg.hessian_iters, acfg.hessian_tol, seed=li, grads=g).value
    pairs = {}
    langs = [run.languages[li] for li in plan.langs]
    split_cos = {}  # per group: S+ normalized, S_ij = (<a_i, b_j> + <b_i, a_j>) / 2, S+ its PSD projection
    for group in grads[langs[0]]:
        a = torch.stack([halves[lang][0][group] for lang in langs])
        b = torch.stack([halves[lang][1][group] for lang in langs])
        cross = (a @ b.T).numpy()
        w, v = np.linalg.eigh((cross + cross.T) / 2)
        psd = (v * np.clip(w, 0, None)) @ v.T
        d = np.sqrt(np.diag(psd))
        split_cos[group] = psd / np.outer(d, d)
    for i, a in enumerate(langs):
        for j, b in enumerate(langs[i + 1:], i + 1):
            cos, gamma = {}, {}
            for group, ga in grads[a].items():
                gb = grads[b][group]
                na, nb = float(ga.norm()), float(gb.norm())
                cos[group] = float(ga @ gb) / (na * nb)
                gamma[group] = 2 * na * nb / (na * na + nb * nb)
            pairs[f"{a}:{b}"] = {"cos": cos, "gamma": gamma,
                                 "split_cos": {group: float(m[i, j]) for group, m in split_cos.items()}}
    return {"pairs": pairs, "loss": loss, "lambda_max": lam}


def train_losses(run, steps: int) -> list[float]:
    """`steps` real updates; this rank's mean training loss of each."""
    out = []
    for _ in range(steps):
        train_step(run)
        sums = run.acc["sums"]
        out.append(float(sums[0].sum() / sums[2].sum().clamp(min=1)))
        run.acc = {}
    return out


def main():
    args, cfg, run = setup_from_command_line()
    torch.manual_seed(cfg.train.seed * 1000 + run.rank)

    # pass 1: four plain updates, from a snapshot of the initial state
    snapshot = f"{args.out}.snapshot"
    run.engine.save_checkpoint(snapshot, tag="init")
    sampler_state, rng = run.sampler.state_dict(), torch.get_rng_state()
    plain = train_losses(run, 4)
    run.engine.load_checkpoint(snapshot, tag="init")
    run.sampler.load_state_dict(sampler_state)
    torch.set_rng_state(rng)
    run.step = 0

    # pass 2: the same four updates with an analysis after the second
    analyzed = train_losses(run, 2)
    record = analysis_step(run, per_language_gradients)
    with torch.random.fork_rng(devices=[]):  # the reference must not move training's RNG either
        ref_model = build_model(cfg.model, len(run.vocab))
    source = run.engine.module
    gather = contextlib.nullcontext()
    if run.engine.zero_optimization_stage() == 3:  # ZeRO-3 modules hold empty placeholders
        gather = deepspeed.zero.GatheredParameters(list(source.parameters()))
    with gather:
        tensors = dict(source.named_parameters(remove_duplicate=False))
        ref_model.load_state_dict({k: tensors[k].detach().float().clone() for k in ref_model.state_dict()})
    ref = reference(run, ref_model.eval())
    analyzed += train_losses(run, 2)

    # which parameters this rank owns only a piece of, and which groups its partition spans
    partial, groups = [], set()
    for name, p in run.engine.module.named_parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            groups.add(param_group(name))
            if mapping.lp_fragment_address.numel < p.numel():
                partial.append(name)
    out = {"record": record, "ref": ref, "partial_params": partial, "partition_groups": sorted(groups),
           "finite": all(math.isfinite(v) for v in record["lambda_max"].values()),
           "losses_plain": plain, "losses_analyzed": analyzed}
    with open(f"{args.out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
