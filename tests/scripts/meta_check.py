"""Run under `deepspeed --num_gpus W`: one CATS meta step through the real training code,
checked against a single-process full-gradient reference built on every rank.

Writes <out>.rank<r>.json with the Gram matrices (plain G and split S from the halves of
each language's slot, and G of the whole slots as the reference computed before halves
existed), the loss and nll values and the largest parameter difference after the step.

With --methods m1,m2,...: instead, one meta step per method in turn (the engine and a
reference model with its own Adam go through the same sequence), each compared to the
reference step on sum_n c_n g_n with c from the method on the full-gradient Gram (plain or
split, as grads.gram resolves for it); a method listed again continues with its state;
writes <out>.rank<r>.json with a row per step."""

from __future__ import annotations

import json

import deepspeed
import torch
import torch.distributed as dist

from cats_ds.config import gram_kind
from cats_ds.model.transformer import build_model
from cats_ds.training.grads import MetaGrams, fold_halves, half_grams, plan_shares, reference_halves, reference_rows
from cats_ds.training.loop import meta_update, per_language_gradients, seed_everything
from cats_ds.weighting import make_weighting
from checkscript import setup_from_command_line


def main():
    def flags(ap):
        ap.add_argument("--methods", default=None)
        ap.add_argument("--sync", action="store_true", help="with --methods: before each step, load the engine's "
                        "current weights into the reference (bf16: compare Grams at the same point)")

    args, cfg, run = setup_from_command_line(flags)
    if args.methods:
        check_methods(args, cfg, run)
        return
    ref = build_and_load(cfg, run)  # the same seed gives the engine's initial weights
    sampler_state = run.sampler.state_dict()

    # 1) the Gram matrices from partitions == from full gradients
    plans = [run.sampler.next_plan() for _ in range(run.gas)]
    half = per_language_gradients(run, plans, run.train_splits, log=False)
    grams = half_grams(run.grads, half)
    langs, gram, losses = half.langs, grams.plain, grams.losses
    whole_langs, whole_rows, whole_losses = reference_rows(ref, plans, run.train_splits, run.languages, run.tag_ids,
                                                           cfg.train.label_smoothing, run.gas, cfg.meta.weight_by)
    ref_langs, ref_rows, ref_grams = reference(ref, plans, run, cfg)
    ref_gram, ref_losses = ref_grams.plain, ref_grams.losses
    run.engine.optimizer.zero_grad()
    for p in run.engine.module.parameters():
        p.grad = None

    # 2) one real meta step == a reference step on sum_n alpha_n L_n
    run.sampler.load_state_dict(sampler_state)
    lr = run.engine.get_lr()[0]
    meta_update(run)
    ref_weighting = make_weighting(cfg, run.languages, len(run.vocab))
    shares = plan_shares(plans, run.train_splits, run.languages, cfg.meta.weight_by)
    coeffs = ref_weighting.update(0, ref_langs, ref_losses, ref_grams.for_method(gram_kind(cfg)), shares,
                                  nll=ref_grams.nll)
    combo = torch.tensor([coeffs[l] for l in ref_langs], dtype=torch.float64) @ ref_rows
    params = [p for p in ref.parameters() if p.requires_grad]
    offset = 0
    for p in params:
        p.grad = combo[offset:offset + p.numel()].view_as(p).float().clone()
        offset += p.numel()
    clip = run.engine.gradient_clipping()
    if clip and clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt = torch.optim.Adam(params, lr=lr, betas=tuple(cfg.train.betas), eps=cfg.train.adam_eps)
    opt.step()
    with deepspeed.zero.GatheredParameters(list(run.engine.module.parameters()),
                                           enabled=run.engine.zero_optimization_stage() == 3):
        got = {k: v.detach().float().clone() for k, v in run.engine.module.named_parameters()}
    diff, scale = 0.0, 0.0
    per_param = {}
    for name, p in ref.named_parameters():
        assert got[name].shape == p.shape, (name, got[name].shape, p.shape)
        per_param[name] = float((got[name] - p.detach()).abs().max())
        diff = max(diff, per_param[name])
        scale = max(scale, float(p.detach().abs().max()))
    moved = max(float((p.detach() - q).abs().max()) for p, q in
                zip(ref.parameters(), [v for v in build_and_load(cfg, run).parameters()]))
    out = {"langs": langs, "ref_langs": ref_langs, "gram": gram.tolist(), "ref_gram": ref_gram.tolist(),
           "whole_langs": whole_langs, "whole_gram": (whole_rows @ whole_rows.T).tolist(),
           "whole_losses": whole_losses.tolist(),
           "split": grams.split.tolist(), "ref_split": ref_grams.split.tolist(),
           "noise": grams.noise.tolist(), "ref_noise": ref_grams.noise.tolist(),
           "agreement": grams.agreement.tolist(), "ref_agreement": ref_grams.agreement.tolist(),
           "rho": half.rho.tolist(), "nll": grams.nll.tolist(), "ref_nll": ref_grams.nll.tolist(),
           "losses": losses.tolist(), "ref_losses": ref_losses.tolist(), "param_diff": diff, "param_scale": scale,
           "param_moved": moved, "per_param": per_param, "coeffs": {str(k): v for k, v in coeffs.items()},
           "alpha": run.weighting.state_dict().get("alpha")}
    with open(f"{args.out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(out, f)


def check_methods(args, cfg, run):
    """A chain of meta steps, one per method, each against the reference step."""
    ref = build_and_load(cfg, run)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.0, betas=tuple(cfg.train.betas), eps=cfg.train.adam_eps)
    clip = run.engine.gradient_clipping()
    rows_out = []
    pairs = {}  # a method listed twice keeps its state (GradVac's targets)
    for method in args.methods.split(","):
        cfg.weighting.method = method
        if method not in pairs:
            pairs[method] = (make_weighting(cfg, run.languages, len(run.vocab)),
                             make_weighting(cfg, run.languages, len(run.vocab)))
        run.weighting, ref_weighting = pairs[method]
        state = run.sampler.state_dict()
        plans = [run.sampler.next_plan() for _ in range(run.gas)]
        run.sampler.load_state_dict(state)  # meta_update draws the same plans
        lr = run.engine.get_lr()[0]
        if args.sync:
            load_engine_weights(run, ref)
        before = [p.detach().clone() for p in params]
        seen = spy_on_update(run.weighting)
        meta_update(run)
        del run.weighting.update  # the class's method again
        ref_langs, ref_rows, ref_grams = reference(ref, plans, run, cfg)
        ref_losses, ref_gram = ref_grams.losses, ref_grams.for_method(gram_kind(cfg))
        shares = plan_shares(plans, run.train_splits, run.languages, cfg.meta.weight_by)
        coeffs = ref_weighting.update(run.step, ref_langs, ref_losses, ref_gram, shares, nll=ref_grams.nll)
        combo = torch.tensor([coeffs[l] for l in ref_langs], dtype=torch.float64) @ ref_rows
        offset = 0
        for p in params:
            p.grad = combo[offset:offset + p.numel()].view_as(p).float().clone()
            offset += p.numel()
        if clip and clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        got = dict(run.engine.module.named_parameters())
        diff = max(float((got[name].detach().float() - p.detach()).abs().max()) for name, p in ref.named_parameters())
        moved = max(float((p.detach() - b).abs().max()) for p, b in zip(params, before))
        rows_out.append({"method": method, "gram_kind": gram_kind(cfg),
                         "optimizer": type(run.engine.optimizer).__name__,
                         "langs": ref_langs, "param_diff": diff, "param_moved": moved,
                         "weights": [run.weighting.weight(l) for l in ref_langs],
                         "ref_weights": [ref_weighting.weight(l) for l in ref_langs],
                         "ref_coeffs": [coeffs[l] for l in ref_langs],
                         "shares": [shares[l] for l in ref_langs],
                         "gram": seen["gram"].tolist(), "ref_gram": ref_gram.tolist(),
                         "losses": seen["losses"].tolist(), "ref_losses": ref_losses.tolist(),
                         "nll": seen["nll"].tolist(), "ref_nll": ref_grams.nll.tolist()})
        run.step += 1
    with open(f"{args.out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(rows_out, f)


def reference(ref, plans, run, cfg):
    """The single-process reference of a meta step on the same halves: (langs, whole-slot
    rows g_n (K, |theta|), MetaGrams from the 2K half rows)."""
    langs, rows, rho, losses, nll = reference_halves(ref, plans, run.train_splits, run.languages, run.tag_ids,
                                                     cfg.train.label_smoothing, run.gas, cfg.meta.weight_by)
    k = len(langs)
    plain, split, noise, agreement = fold_halves(rows @ rows.T, rho)
    return langs, rows[:k] + rows[k:], MetaGrams(plain, split, noise, agreement, losses, nll)


def load_engine_weights(run, ref) -> None:
    """Copy the engine's weights (gathered under ZeRO-3, cast to fp32) into the reference."""
    params = list(run.engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=run.engine.zero_optimization_stage() == 3):
        got = {k: v.detach().float().clone() for k, v in run.engine.module.named_parameters()}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(got[name])


def spy_on_update(weighting) -> dict:
    """Record the Gram matrix, losses and nll the training code hands to weighting.update."""
    seen = {}
    update = weighting.update

    def spy(step, langs, losses, gram, shares, nll=None):
        seen.update(gram=gram.detach().clone(), losses=losses.detach().clone(), nll=nll.detach().clone())
        return update(step, langs, losses, gram, shares, nll=nll)

    weighting.update = spy
    return seen


def build_and_load(cfg, run):
    """The initial weights again (same seed), to measure how far the step moved them."""
    seed_everything(cfg.train.seed)
    return build_model(cfg.model, len(run.vocab))


if __name__ == "__main__":
    main()
