"""The training loop around the DeepSpeed engine: setup -> resume -> fit -> validate.

Loss normalization is global: each language's loss L_n is the mean over ALL its target
tokens in the micro-step (every rank knows the global plan, so no communication), and
the local loss is multiplied by the data-parallel world size to undo DeepSpeed's
gradient averaging. Hence W ranks with budget B step exactly like 1 rank with W*B.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from cats_ds import preempt
from cats_ds.analysis import analysis_step
from cats_ds.config import GRAM_METHODS, Config, config_from_dict, distinct_languages
from cats_ds.data.manifest import Manifest, RawTextError, Vocab, load_split
from cats_ds.data.sampler import (Batch, LanguageSampler, Plan, collate, eval_plans, split_by_length,
                                  target_tokens, temperature_probs)
from cats_ds.grads import PartitionGrads, gram_and_losses, is_expert_param
from cats_ds.losses import per_language_sums
from cats_ds.model.build import model_from_config
from cats_ds.model.experts import param_groups
from cats_ds.model.transformer import Transformer
from cats_ds.weighting.base import Weighting, make_weighting

CHECKPOINT_META = "cats_ds.json"


class TrainError(Exception):
    """Bad setup (config, DeepSpeed JSON, data, checkpoint); the message says what and where."""


# --------------------------------------------------------------------------- helpers


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args) -> None:
    if is_rank0():
        print(*args, flush=True)


def inverse_sqrt(cfg_train) -> callable:
    """Multiplier on train.lr: linear warmup from warmup_init_lr, then lr * sqrt(warmup / step)."""
    lr, init, warm = cfg_train.lr, cfg_train.warmup_init_lr, max(1, cfg_train.warmup_updates)

    def factor(step: int) -> float:
        if step < warm:
            return (init + (lr - init) * step / warm) / lr
        return math.sqrt(warm / step)

    return factor


def load_ds_config(path: str, world_size: int, cfg: Config) -> dict:
    """Read the DeepSpeed JSON and check it against the world size and the token budget."""
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"DeepSpeed config not found: {path}")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}: not valid JSON: {e}") from None
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise TrainError(f"{path}: remove '{key}': the optimizer and LR schedule come from the "
                             f"experiment config (train.lr, train.betas, train.warmup_updates)")
    micro = ds.get("train_micro_batch_size_per_gpu")
    if micro != 1:
        raise TrainError(f"{path}: train_micro_batch_size_per_gpu must be 1 (got {micro!r}): one micro-batch "
                         f"is one token-budget batch of train.max_tokens={cfg.train.max_tokens} tokens")
    gas = ds.get("gradient_accumulation_steps", 1)
    if not isinstance(gas, int) or gas < 1:
        raise TrainError(f"{path}: gradient_accumulation_steps must be a positive integer, got {gas!r}")
    tbs = ds.get("train_batch_size")
    if tbs is not None and tbs != micro * gas * world_size:
        raise TrainError(f"{path}: train_batch_size={tbs} contradicts train_micro_batch_size_per_gpu={micro} x "
                         f"gradient_accumulation_steps={gas} x world_size={world_size} = {micro * gas * world_size}")
    want = cfg.train.update_tokens
    if want is not None and want != cfg.train.max_tokens * gas * world_size:
        raise TrainError(f"train.update_tokens={want} but train.max_tokens={cfg.train.max_tokens} x "
                         f"gradient_accumulation_steps={gas} ({path}) x world_size={world_size} = "
                         f"{cfg.train.max_tokens * gas * world_size}")
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if cfg.weighting.method in GRAM_METHODS and offload.get("device", "none") not in (None, "none"):
        # DeepSpeed's offload path computes the clipping norms during each backward and, from
        # the second micro-step on, accumulates into a CPU buffer that PartitionGrads never
        # reads or writes: the Gram and the update would be silently wrong
        raise TrainError(f"{path}: zero_optimization.offload_optimizer.device={offload.get('device')!r} is not "
                         f"supported with weighting.method={cfg.weighting.method} (its per-language gradients are "
                         f"read from and written to the GPU gradient partition, which optimizer offload bypasses); "
                         f"use a config without offload_optimizer, or weighting.method=temperature")
    if cfg.train.tensorboard and "tensorboard" not in ds:
        ds["tensorboard"] = {"enabled": True, "output_path": str(Path(cfg.train.save_dir) / "tensorboard"),
                             "job_name": ""}
    return ds


def init_distributed() -> None:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        deepspeed.init_distributed()
        return
    deepspeed.init_distributed(dist_backend="gloo")
    release_shm_workspace()


def release_shm_workspace() -> None:
    """DeepSpeed's CPU backend maps a 69 MB /dev/shm workspace per rank, named by master
    address, port and rank, for an inference all-reduce training never uses, and never
    unlinks it: every run on a new port leaked ~69 MB per rank until /dev/shm (RAM) was
    full. Once every rank has mapped its peers' workspaces (they do so inside
    init_distributed, hence the barrier), unlinking our own name frees it at exit."""
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    if os.path.exists(name):
        os.unlink(name)


# --------------------------------------------------------------------------- state


@dataclass
class Run:
    cfg: Config
    engine: object
    model: Transformer
    manifest: Manifest
    vocab: Vocab
    languages: list[str]
    train_splits: dict
    dev_splits: dict
    sampler: LanguageSampler
    weighting: Weighting
    device: torch.device
    rank: int
    world: int
    gas: int
    tag_ids: list[int]
    step: int = 0
    best_valid: float = float("inf")
    log_path: Optional[Path] = None
    elapsed: float = 0.0
    """Training seconds before this process (resumed runs)."""
    t_start: float = 0.0
    t_log: float = 0.0
    """Start of the current logging interval (tokens/s)."""
    acc: dict = field(default_factory=dict)
    grads: Optional[PartitionGrads] = None
    """This rank's gradient partition, for meta steps (Gram-based weighting only)."""
    dev_sampler: Optional[LanguageSampler] = None
    """Meta batches from dev (cats.meta_data=dev)."""
    filler: Optional[Batch] = None
    """One real sentence run with weight 0 by a rank that got no sentences."""
    update_loss: float = 0.0
    """This rank's loss sum over the current update (non-finite check)."""
    nonfinite: int = 0
    """Consecutive updates whose training loss was NaN or inf on some rank."""
    last_good: str = "none yet"
    """The newest checkpoint saved (or resumed from) with finite losses, for error messages."""
    stop_signal: bool = False
    """Some rank received SIGTERM/SIGUSR1 (agreed over all ranks after each update)."""
    requeue: bool = False
    """The run stopped on a signal after saving latest/: exit with preempt.REQUEUE_EXIT."""
    first_step: int = 0
    """The step this process started (or resumed) at: the pace of this session."""
    save_s: float = 0.0
    """Seconds the last validation + save took: the margin train.max_minutes leaves for the final one."""
    dev_refs: Optional[dict] = None
    """Raw dev references per language (eval.valid_every > 0)."""
    best_score: Optional[float] = None
    """Best value of train.best_metric so far (None before the first validation that measures it)."""
    stale: int = 0
    """Validations of train.best_metric in a row without improvement (train.patience)."""
    early_stop: bool = False


def setup(cfg: Config, ds_config_path: str) -> Run:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = load_ds_config(ds_config_path, world, cfg)
    prepare_save_dir(cfg, rank)
    if needs_universal(cfg, world, ds):  # a ZeRO-1/2 checkpoint saved on another number of ranks
        ds.setdefault("checkpoint", {})["load_universal"] = True
    try:
        manifest = Manifest.load(cfg.data.dir)
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(str(e)) from None
    languages = cfg.data.languages or list(manifest.languages)
    for lang in languages:
        if lang not in manifest.languages:
            raise TrainError(f"data.languages: unknown language '{lang}'; prepared corpus "
                             f"{cfg.data.dir} has: {', '.join(manifest.languages)}")
    if cfg.analysis.every:
        from cats_ds.analysis.analyze import AnalysisError, check_settings

        try:
            check_settings(cfg, languages)  # fail now, not at the first analysis
        except (AnalysisError, ValueError) as e:
            raise TrainError(str(e)) from None
    vocab = Vocab(cfg.data.dir, manifest.languages)
    try:
        train_splits = load_split(cfg.data.dir, manifest, "train", languages)
        dev_splits = load_split(cfg.data.dir, manifest, "dev", languages)
        test_splits = load_split(cfg.data.dir, manifest, "test", languages)
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(f"{e}: the prepared data in data.dir={cfg.data.dir} is damaged; rebuild it with "
                         f"`python launch/prepare.py --config <recipe> --force`") from None
    check_lengths({"train": train_splits, "dev": dev_splits, "test": test_splits}, cfg)

    seed_everything(cfg.train.seed)
    model = model_from_config(cfg, len(vocab), languages)
    # family-expert parameters go to DeepSpeed's MoE groups (reduced over the expert-data-parallel group)
    optimizer = make_optimizer(param_groups(model), cfg, ds)
    factor = inverse_sqrt(cfg.train)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
    sampler = LanguageSampler(train_splits, languages, cfg.sampling.temperature, cfg.sampling.langs_per_batch,
                              cfg.train.max_tokens, world, cfg.train.seed, distinct=distinct_languages(cfg))
    run = Run(cfg=cfg, engine=engine, model=model, manifest=manifest, vocab=vocab, languages=languages,
              train_splits=train_splits, dev_splits=dev_splits, sampler=sampler,
              weighting=make_weighting(cfg, languages, len(vocab)), device=torch.device(get_accelerator().device_name()),
              rank=rank, world=world, gas=engine.gradient_accumulation_steps(),
              tag_ids=[vocab.lang_ids[l] for l in languages])
    run.filler = collate(Plan([0], [np.array([0])]), train_splits, languages, run.tag_ids).to(run.device)
    if cfg.weighting.method != "temperature":
        shared_only = cfg.cats.params == "shared"
        run.grads = PartitionGrads(engine, include=lambda name, p: not (shared_only and is_expert_param(p)))
        if cfg.cats.meta_data == "dev":
            run.dev_sampler = LanguageSampler(dev_splits, languages, 1.0, 1, cfg.train.max_tokens, world,
                                              cfg.train.seed, allow_missing=True)
    if cfg.eval.valid_every:
        from cats_ds.dev_translation import check_supported, load_dev_texts
        from cats_ds.evaluate import EvalError

        try:
            check_supported(cfg, engine.zero_optimization_stage())
            run.dev_refs = load_dev_texts(cfg, manifest, dev_splits)
        except (EvalError, RawTextError) as e:
            raise TrainError(str(e)) from None
    run.log_path = Path(cfg.train.save_dir) / "train_log.jsonl"
    if rank == 0:
        Path(cfg.train.save_dir).mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"| model {n_params / 1e6:.2f}M parameters | {len(languages)} languages | world {world} | "
           f"ZeRO {engine.zero_optimization_stage()} | accumulation {run.gas} | "
           f"{cfg.train.max_tokens * run.gas * world} tokens per update")
    print0("| sampling p: " + " ".join(f"{l}={p:.3f}" for l, p in zip(languages, sampler.probs))
           + (f" | {cfg.sampling.langs_per_batch} distinct languages per micro-batch (token share = inclusion "
              f"probability / K, flatter than p)" if sampler.distinct else ""))
    return run


def check_lengths(splits: dict[str, dict], cfg: Config) -> None:
    """Every prepared sentence (</s> included; the decoder input has the same length) must
    fit model.max_positions: fail at start-up, not at the first validation or evaluation."""
    limit = cfg.model.max_positions
    for split, by_lang in splits.items():
        for lang, data in by_lang.items():
            for side, shard in (("en", data.src), (lang, data.tgt)):
                if len(shard) and int(shard.sizes.max()) > limit:
                    i = int(shard.sizes.argmax())
                    raise TrainError(
                        f"model.max_positions={limit}, but sentence {i + 1} of the prepared {split} split of en-{lang} "
                        f"({side} side, {split}.en-{lang}.{side}.bin in data.dir={cfg.data.dir}) has "
                        f"{int(shard.sizes[i])} tokens ({int((shard.sizes > limit).sum())} sentences are longer than "
                        f"{limit}): raise model.max_positions to {int(shard.sizes.max())}, or re-run prepare with "
                        f"data.max_tokens_per_side={limit}, which drops longer pairs")


def make_optimizer(groups, cfg: Config, ds: dict):
    """Adam from the experiment config. With optimizer offload in the DeepSpeed JSON, ZeRO
    requires DeepSpeed's CPU Adam (same update rule, built on first use)."""
    kwargs = dict(lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.adam_eps,
                  weight_decay=cfg.train.weight_decay)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in (None, "none"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=False, **kwargs)
    return torch.optim.Adam(groups, **kwargs)


def seed_everything(seed: int) -> None:
    """Same seed on every rank, so every rank builds identical initial weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_dropout(seed: int, rank: int) -> None:
    """Each rank's dropout stream, once the weights are built: a function of train.seed
    and the rank (the sampler is seeded by train.seed too; tests/test_seeds.py)."""
    torch.manual_seed(seed * 1000 + rank)


# --------------------------------------------------------------------------- one update


def forward_sums(run: Run, batch: Batch):
    logits = run.engine(batch.src, batch.prev, batch.langs)
    return per_language_sums(logits, batch.tgt, batch.langs, len(run.languages), run.cfg.train.label_smoothing)


def scaled_loss(run: Run, loss_sum: torch.Tensor, coeffs: dict[int, float], tokens: dict[int, int]) -> torch.Tensor:
    """sum_n c_n * (local loss sum_n / global tokens_n), times the DP world size that
    DeepSpeed's gradient averaging divides by."""
    idx = torch.tensor(list(coeffs), device=loss_sum.device)
    w = torch.tensor([coeffs[l] / tokens[l] for l in coeffs], device=loss_sum.device, dtype=loss_sum.dtype)
    return (loss_sum[idx] * w).sum() * run.world


def local_batch(run: Run, plan: Plan, splits: dict) -> tuple[Batch, bool]:
    """This rank's share of a global plan. A rank with no sentences (a language with fewer
    sentences than ranks) still runs forward/backward, on one filler sentence with weight 0,
    so every rank joins DeepSpeed's collectives."""
    mine = plan.for_rank(run.rank, run.world)
    if sum(len(s) for s in mine.sents) == 0:
        return run.filler, False
    return collate(mine, splits, run.languages, run.tag_ids).to(run.device), True


def forward_plan(run: Run, plan: Plan, splits: dict):
    """Forward this rank's share of a global plan, in length groups (one forward each, one
    backward later). Returns per-language (loss sum with graph, nll sum, tokens) and
    whether this rank had any sentence; filler forwards enter the loss with weight 0."""
    loss_sum = nll_sum = tok = None
    any_live = False
    for group in split_by_length(plan, splits, run.languages, run.cfg.train.max_tokens * run.world):
        batch, live = local_batch(run, group, splits)
        ls, ns, tk = forward_sums(run, batch)
        if not live:
            ls, ns, tk = ls * 0.0, ns * 0.0, tk * 0.0
        any_live |= live
        loss_sum = ls if loss_sum is None else loss_sum + ls
        nll_sum = ns if nll_sum is None else nll_sum + ns
        tok = tk if tok is None else tok + tk
    return loss_sum, nll_sum, tok, any_live


def next_plans(run: Run, meta: bool = False) -> list[Plan]:
    """The gas micro-batch plans of one update; a meta step's are drawn at
    cats.meta_temperature when that is set."""
    probs = None
    if meta and run.cfg.cats.meta_temperature is not None:
        probs = temperature_probs(run.sampler.sizes, run.cfg.cats.meta_temperature)
    plans = [run.sampler.next_plan(probs) for _ in range(run.gas)]
    for plan in plans:
        count_slots(run, plan)
    return plans


def plain_update(run: Run, plans: Optional[list[Plan]] = None) -> None:
    """gas micro-batches, one backward of sum_n c_n L_n each, then the optimizer step."""
    for m, plan in enumerate(plans or next_plans(run)):
        tokens = target_tokens(plan, run.train_splits, run.languages)
        coeffs = run.weighting.coefficients(plan.langs, tokens)
        run.engine.set_gradient_accumulation_boundary(m == run.gas - 1)
        loss_sum, nll_sum, tok, live = forward_plan(run, plan, run.train_splits)
        run.engine.backward(scaled_loss(run, loss_sum, coeffs, tokens))
        run.engine.step()
        if live:
            accumulate(run, loss_sum.detach(), nll_sum, tok)


def per_language_gradients(run: Run, plans: list[Plan], splits: dict, log: bool):
    """One forward+backward per language of each micro-batch plan, each captured from
    this rank's gradient partition (cats_ds/grads.py). Micro-step m contributes
    mix_n^(m) grad L_n^(m) / gas (mix: weighting.mix; DeepSpeed divides by gas); the sum
    over m is S_n g_n with S_n = sum_m mix_n^(m) / gas, so g_n is language n's gradient
    averaged over the micro-steps that contain it and sum_n S_n g_n is the plain update at
    weight 1. Returns (langs, rows g_n (K, n_local), local loss sums (K,), local target
    tokens (K,), shares {n: S_n})."""
    rows: dict[int, torch.Tensor] = {}
    n = len(run.languages)
    loss_sums = torch.zeros(n, dtype=torch.float64)
    toks = torch.zeros(n, dtype=torch.float64)
    shares: dict[int, float] = {}
    for plan in plans:
        tokens = target_tokens(plan, splits, run.languages)
        mix = run.weighting.mix(plan.langs, tokens)
        for li, m in mix.items():
            shares[li] = shares.get(li, 0.0) + m / run.gas
        for li, sents in zip(plan.langs, plan.sents):
            run.engine.set_gradient_accumulation_boundary(True)
            loss_sum, nll_sum, tok, live = forward_plan(run, Plan([li], [sents]), splits)
            run.engine.backward(scaled_loss(run, loss_sum, {li: mix[li]}, tokens))
            g = run.grads.capture()
            rows[li] = g if li not in rows else rows[li] + g
            if live:
                loss_sums += loss_sum.detach().double().cpu()
                toks += tok.double().cpu()
                if log:
                    accumulate(run, loss_sum.detach(), nll_sum, tok)
    langs = sorted(rows)
    idx = torch.tensor(langs)
    return langs, torch.stack([rows[l] / shares[l] for l in langs]), loss_sums[idx], toks[idx], shares


def meta_update(run: Run) -> None:
    """A meta step: per-language gradients -> G -> weighting.update -> sum_n c_n g_n
    written into the partition -> engine.step(). Meta batches are the training batches
    (the paper's Algorithm 1) unless cats.meta_data=dev."""
    plans = next_plans(run, meta=True)
    if run.cfg.cats.meta_data == "dev":
        # dev gradients only steer the weights; the update is a plain one on the train plans
        meta_plans = [run.dev_sampler.plan_for(p.langs) for p in plans]
        langs, rows, loss_sums, toks, shares = per_language_gradients(run, meta_plans, run.dev_splits, log=False)
        gram, losses = gram_and_losses(run.grads, rows, loss_sums, toks)
        weighting_update(run, langs, losses, gram, shares)
        del rows
        plain_update(run, plans)
        return
    langs, rows, loss_sums, toks, shares = per_language_gradients(run, plans, run.train_splits, log=True)
    gram, losses = gram_and_losses(run.grads, rows, loss_sums, toks)
    coeffs = weighting_update(run, langs, losses, gram, shares)
    combo = torch.tensor([coeffs[l] for l in langs], dtype=rows.dtype) @ rows  # (n_local,)
    run.grads.write_back(combo)
    for m in range(run.gas):
        run.engine.set_gradient_accumulation_boundary(m == run.gas - 1)
        run.engine.step()


def weighting_update(run: Run, langs, losses, gram, shares) -> dict[int, float]:
    """weighting.update, or weighting.skip when G or the losses are not finite (fp16
    overflow, e.g. at step 0's initial loss scale): the weights stay, the training step
    goes ahead and DeepSpeed's loss scaler handles the overflow. G and the losses come
    out of one all_reduce, so every rank holds the same values and takes the same branch
    (a non-finite partial on any rank makes the sum non-finite on all)."""
    if not (torch.isfinite(gram).all() and torch.isfinite(losses).all()):
        print0(f"| step {run.step}: non-finite Gram matrix or losses; the {run.weighting.name} weights are not "
               f"updated at this meta step")
        return run.weighting.skip(run.step, langs, shares)
    return run.weighting.update(run.step, langs, losses, gram, shares)


def train_step(run: Run) -> None:
    """One optimizer update; the weighting hook decides whether it is a meta step."""
    if run.weighting.is_meta_step(run.step):
        meta_update(run)
    else:
        plain_update(run)
    run.step += 1
    check_finite_update(run)


def check_finite_update(run: Run) -> None:
    """Stop after train.max_nonfinite consecutive updates whose training loss was NaN or
    inf on any rank (all ranks agree through one all_reduce of a flag). DeepSpeed's fp16
    loss scaler skips updates whose GRADIENTS overflow; their losses are finite, so those
    skips never count. A non-finite loss means the weights (or the data) are broken:
    the scaler would skip the update too, lowering the scale to no avail.
    The same all_reduce (MAX) carries the stop-signal flag (cats_ds/preempt.py), so every
    rank learns at the same update boundary that some rank got SIGTERM/SIGUSR1."""
    flags = torch.tensor([0.0 if math.isfinite(run.update_loss) else 1.0, float(preempt.requested.is_set())])
    run.update_loss = 0.0
    if run.world > 1:
        flags = flags.to(run.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, signalled = flags.tolist()
    run.stop_signal = signalled > 0
    run.nonfinite = run.nonfinite + 1 if bad > 0 else 0
    limit = run.cfg.train.max_nonfinite
    if run.nonfinite >= limit:
        first = run.step - run.nonfinite + 1
        raise TrainError(f"training loss is NaN or inf at {run.nonfinite} consecutive updates (steps {first}-{run.step}, "
                         f"train.max_nonfinite={limit}): stopped at step {run.step} without saving a checkpoint. "
                         f"Last good checkpoint: {run.last_good}. Lower train.lr (now {run.cfg.train.lr:g}) or check "
                         f"the data and the checkpoint files, then resume from it")


def _acc(run: Run) -> dict:
    if not run.acc:
        n = len(run.languages)
        run.acc.update(sums=torch.zeros(3, n, dtype=torch.float64), slots=np.zeros(n))
    return run.acc


def accumulate(run: Run, loss_sum, nll_sum, tok) -> None:
    sums = torch.stack([loss_sum.double().cpu(), nll_sum.double().cpu(), tok.double().cpu()])
    _acc(run)["sums"] += sums
    run.update_loss += float(sums[0].sum())


def count_slots(run: Run, plan: Plan) -> None:
    slots = _acc(run)["slots"]
    for li in plan.langs:
        slots[li] += 1


# --------------------------------------------------------------------------- logging / validation


def all_reduce_sum(t: torch.Tensor, device) -> torch.Tensor:
    t = t.to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.cpu()


def log_train(run: Run) -> None:
    a = run.acc
    sums = all_reduce_sum(a["sums"].clone(), run.device)
    now = time.time()
    elapsed, run.t_log = max(now - run.t_log, 1e-9), now
    loss_l = sums[0] / sums[2].clamp(min=1)
    tok = float(sums[2].sum())
    record = {"step": run.step, "loss": float(sums[0].sum() / max(tok, 1)), "nll": float(sums[1].sum() / max(tok, 1)),
              "lr": run.engine.get_lr()[0], "tokens_per_s": tok / elapsed,
              "loss_lang": {l: float(loss_l[i]) for i, l in enumerate(run.languages) if sums[2][i] > 0}}
    record["weighting"] = run.weighting.scalars()
    slots = a["slots"] / max(a["slots"].sum(), 1)
    events = [("train/loss", record["loss"], run.step), ("train/nll", record["nll"], run.step),
              ("train/lr", record["lr"], run.step), ("train/tokens_per_s", record["tokens_per_s"], run.step)]
    events += [(f"loss/en-{l}", v, run.step) for l, v in record["loss_lang"].items()]
    events += [(f"sampling/freq/{l}", float(slots[i]), run.step) for i, l in enumerate(run.languages)]
    events += [(k, float(v), run.step) for k, v in record["weighting"].items()]
    write_events(run, events)
    eta, line = progress(run)
    record["eta_s"] = eta
    print0(f"| step {run.step:6d} | loss {record['loss']:.4f} | nll {record['nll']:.4f} | "
           f"lr {record['lr']:.3g} | {record['tokens_per_s']:.0f} tok/s{line}")
    write_log(run, {"kind": "train", **record})
    run.acc = {}


def progress(run: Run) -> tuple[Optional[float], str]:
    """(seconds left, " | 40/1000 (4.0%) | 0:03:12 elapsed | ETA 1:16:48 (max_updates)"):
    the average pace so far (resumed sessions included) toward train.max_updates, or toward
    train.max_minutes when that comes first."""
    cfg = run.cfg.train
    if not run.t_start or run.step <= 0:
        return None, ""
    elapsed = run.elapsed + time.time() - run.t_start
    left, limit = (cfg.max_updates - run.step) * elapsed / run.step, "max_updates"
    if cfg.max_minutes is not None and cfg.max_minutes * 60 - elapsed < left:
        left, limit = max(cfg.max_minutes * 60 - elapsed, 0.0), "max_minutes"

    def clock(sec: float) -> str:
        return f"{int(sec // 3600)}:{int(sec % 3600 // 60):02d}:{int(sec % 60):02d}"

    return left, (f" | {run.step}/{cfg.max_updates} ({100 * run.step / cfg.max_updates:.1f}%) | "
                  f"{clock(elapsed)} elapsed | ETA {clock(left)} ({limit})")


def write_events(run: Run, events: list) -> None:
    monitor = getattr(run.engine, "monitor", None)
    if monitor is not None and monitor.enabled:
        monitor.write_events(events)


def write_log(run: Run, record: dict) -> None:
    if run.rank == 0:
        with open(run.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


@torch.no_grad()
def validate(run: Run) -> dict[str, dict[str, float]]:
    """Per-language validation loss and nll over the whole dev split (all ranks share it)."""
    run.engine.eval()
    n = len(run.languages)
    sums = torch.zeros(3, n, dtype=torch.float64)
    plans = eval_plans(run.dev_splits, run.languages, run.cfg.train.max_tokens, run.rank, run.world)
    # with expert parallelism every forward is an all-to-all: a rank dealt fewer plans runs
    # the filler sentence (not counted) until every rank has run the same number of forwards
    rounds = torch.tensor([len(plans)], device=run.device)
    if run.world > 1:
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
    for i in range(int(rounds.item())):
        if i >= len(plans):
            forward_sums(run, run.filler)
            continue
        batch = collate(plans[i], run.dev_splits, run.languages, run.tag_ids).to(run.device)
        loss_sum, nll_sum, tok = forward_sums(run, batch)
        sums += torch.stack([loss_sum.double().cpu(), nll_sum.double().cpu(), tok.double().cpu()])
    run.engine.train()
    sums = all_reduce_sum(sums, run.device)
    return {l: {"loss": float(sums[0, i] / sums[2, i]), "nll": float(sums[1, i] / sums[2, i])}
            for i, l in enumerate(run.languages) if sums[2, i] > 0}


def log_valid(run: Run, res: dict, scores: Optional[dict] = None) -> float:
    mean = float(np.mean([v["loss"] for v in res.values()])) if res else float("nan")
    events = [(f"valid_loss/en-{l}", v["loss"], run.step) for l, v in res.items()]
    events += [(f"valid_nll/en-{l}", v["nll"], run.step) for l, v in res.items()]
    events.append(("valid/mean_loss", mean, run.step))
    record = {"kind": "valid", "step": run.step, "mean_loss": mean, "langs": res}
    if scores is not None:
        from cats_ds.dev_translation import mean_score

        for metric in ("bleu", "chrf"):
            events += [(f"{metric}/en-{l}", v[metric], run.step) for l, v in scores.items()]
            record[metric] = mean_score(scores, metric)
            events.append((f"valid/mean_{metric}", record[metric], run.step))
        record["scores"] = scores
    write_events(run, events)
    print0(f"| valid step {run.step} | mean loss {mean:.4f} | " +
           " ".join(f"{l} {v['loss']:.3f}" for l, v in res.items()))
    if scores is not None:
        print0(f"| valid step {run.step} | dev BLEU {record['bleu']:.2f} chrF++ {record['chrf']:.2f} "
               f"(beam {run.cfg.eval.valid_beam}, first {run.cfg.eval.valid_sentences} sentences) | "
               + " ".join(f"{l} {v['bleu']:.1f}/{v['chrf']:.1f}" for l, v in scores.items()))
    write_log(run, record)
    return mean


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: Run, name: str, valid_loss: Optional[float], scores: Optional[dict] = None) -> None:
    """Write <save_dir>/<name>/ atomically: DeepSpeed writes <name>.tmp, then rank 0 swaps.
    `scores`: the dev BLEU / chrF++ of this step, if measured (kept in cats_ds.json)."""
    save_dir = Path(run.cfg.train.save_dir)
    tmp = f"{name}.tmp"
    client = {"step": run.step, "best_valid": run.best_valid, "best_score": run.best_score, "stale": run.stale,
              "sampler": run.sampler.state_dict(),
              "dev_sampler": run.dev_sampler.state_dict() if run.dev_sampler else None,
              "weighting": run.weighting.state_dict(), "elapsed": run.elapsed + time.time() - run.t_start}
    run.engine.save_checkpoint(str(save_dir), tag=tmp, client_state=client, save_latest=False)
    rng = {"torch": torch.get_rng_state(), "numpy": numpy_rng_to_tensors(np.random.get_state()),
           "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, save_dir / tmp / f"rng_rank{run.rank}.pt")
    dist.barrier()
    if run.rank == 0:
        # written once every rank has written its files: a .tmp with cats_ds.json is complete
        meta = {"step": run.step, "valid_loss": valid_loss, "config": run.cfg.to_dict(),
                "languages": run.languages, "manifest_fingerprint": run.manifest.fingerprint,
                "vocab_size": len(run.vocab), "world_size": run.world,
                "zero_stage": run.engine.zero_optimization_stage()}
        if scores is not None:
            from cats_ds.dev_translation import mean_score

            meta["valid_scores"] = {"bleu": mean_score(scores, "bleu"), "chrf": mean_score(scores, "chrf"),
                                    "languages": scores, "beam": run.cfg.eval.valid_beam,
                                    "sentences": run.cfg.eval.valid_sentences}
        meta_tmp = save_dir / tmp / f"{CHECKPOINT_META}.tmp"
        meta_tmp.write_text(json.dumps(meta, indent=1))
        os.replace(meta_tmp, save_dir / tmp / CHECKPOINT_META)
        final, old = save_dir / name, save_dir / f"{name}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(save_dir / tmp, final)
        if old.exists():
            shutil.rmtree(old)
    dist.barrier()
    if name == "latest":
        run.last_good = f"{save_dir / name} (step {run.step})"


def numpy_rng_to_tensors(state: tuple) -> tuple:
    """np.random.get_state() with its key array as a tensor, so the RNG file loads with
    torch.load(weights_only=True) (a numpy array would need unpickling)."""
    name, keys, pos, has_gauss, gauss = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def numpy_rng_from_tensors(state: tuple) -> tuple:
    name, keys, pos, has_gauss, gauss = state
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss


STEP_PREFIX = "step_"


def save_numbered(run: Run) -> None:
    """train.save_every: <save_dir>/step_<n>/ every N updates (same atomic save as best/
    and latest/), then train.keep_last: rank 0 removes all but the newest N of them."""
    cfg = run.cfg.train
    if not cfg.save_every or run.step % cfg.save_every or run.nonfinite:
        return  # never a numbered checkpoint of an update whose loss was NaN or inf
    save_checkpoint(run, f"{STEP_PREFIX}{run.step}", None)
    if cfg.keep_last and run.rank == 0:
        for old in numbered_checkpoints(cfg.save_dir)[:-cfg.keep_last]:
            shutil.rmtree(old)


def numbered_checkpoints(save_dir: str | Path) -> list[Path]:
    """The step_<n>/ checkpoints in save_dir (those with cats_ds.json), oldest first."""
    found = [p for p in Path(save_dir).glob(f"{STEP_PREFIX}*")
             if p.name[len(STEP_PREFIX):].isdigit() and (p / CHECKPOINT_META).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def read_checkpoint_meta(path: str | Path) -> dict:
    p = Path(path) / CHECKPOINT_META
    if not p.is_file():
        raise FileNotFoundError(f"{path} is not a cats_ds checkpoint (no {CHECKPOINT_META})")
    return json.loads(p.read_text())


CHECKPOINT_NAMES = ("latest", "best")

RESUME_MAY_CHANGE = ("data.", "eval.", "analysis.", "experts.ep_size", "train.save_dir", "train.max_updates",
                     "train.max_minutes", "train.log_every", "train.valid_every", "train.resume", "train.overwrite",
                     "train.tensorboard", "train.lr", "train.warmup_updates", "train.warmup_init_lr",
                     "train.max_nonfinite", "train.save_every", "train.keep_last", "train.patience")
"""Config keys (or section prefixes) a resumed run may change. data.* is checked through
the manifest fingerprint and the language list, experts.ep_size by its own message,
train.lr and the warmup are applied to the restored schedule (`apply_lr_schedule`).
Any other change (model shape, weighting, sampling, max_tokens, optimizer, seed, ...) is
refused before DeepSpeed loads anything."""


def _complete(folder: Path) -> bool:
    return (folder / CHECKPOINT_META).is_file()


def recover_interrupted_saves(save_dir: Path) -> list[str]:
    """Finish or undo saves a crash interrupted (rank 0 only). save_checkpoint writes
    <name>.tmp (cats_ds.json last, once every rank's files are in), renames <name> to
    <name>.old, <name>.tmp to <name>, and deletes <name>.old. Whatever the crash point,
    the newest complete folder becomes <name>: a complete .tmp, else <name>, else .old;
    incomplete leftovers are deleted. Returns what was done, for the log."""
    done = []
    for name in CHECKPOINT_NAMES:
        final, tmp, old = save_dir / name, save_dir / f"{name}.tmp", save_dir / f"{name}.old"
        if _complete(tmp):
            if final.exists():
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
            os.replace(tmp, final)
            done.append(f"{final} <- {tmp.name} (step {read_checkpoint_meta(final)['step']}; a save was "
                        f"interrupted after writing it)")
        elif not final.exists() and _complete(old):
            os.replace(old, final)
            done.append(f"{final} <- {old.name} (step {read_checkpoint_meta(final)['step']}; a save was "
                        f"interrupted before writing {tmp.name})")
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
    for leftover in save_dir.glob(f"{STEP_PREFIX}*.tmp"):  # a numbered save cut short: the previous ones stand
        shutil.rmtree(leftover)
    return done


def prepare_save_dir(cfg: Config, rank: int) -> None:
    """Before a run writes into train.save_dir: recover interrupted saves, and refuse to
    start from step 0 over existing checkpoints unless train.overwrite=true (which then
    deletes them and train_log.jsonl, so nothing of the old run is mixed in)."""
    save_dir = Path(cfg.train.save_dir)
    if rank == 0 and save_dir.is_dir():
        for line in recover_interrupted_saves(save_dir):
            print0(f"| recovered {line}")
    dist.barrier()
    r = cfg.train.resume
    fresh = r == "none" or (r == "auto" and not _complete(save_dir / "latest"))
    existing = [save_dir / n for n in CHECKPOINT_NAMES if _complete(save_dir / n)] + numbered_checkpoints(save_dir)
    if not fresh or not existing:
        return
    found = ", ".join(f"{p} (step {read_checkpoint_meta(p)['step']})" for p in existing)
    if not cfg.train.overwrite:
        raise TrainError(f"train.save_dir={save_dir} already holds checkpoints: {found}; train.resume={r} would "
                         f"start from step 0 and replace them. Set train.overwrite=true to replace them, "
                         f"train.resume=auto to continue, or choose another train.save_dir")
    if rank == 0:
        for p in existing:
            shutil.rmtree(p)
        (save_dir / "train_log.jsonl").unlink(missing_ok=True)
        print0(f"| train.overwrite=true: deleted {found} and train_log.jsonl")
    dist.barrier()


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_settings(saved: dict, current: dict, also: tuple = ()) -> list[str]:
    """Keys (outside RESUME_MAY_CHANGE and `also`) whose value differs between the config a
    checkpoint was trained with and this run's, as "key: old -> new". Keys only one side
    knows (a checkpoint from an older version) are not compared."""
    old, new = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(old.keys() & new.keys()):
        if key in RESUME_MAY_CHANGE or key in also or any(key.startswith(k) for k in RESUME_MAY_CHANGE
                                                          if k.endswith(".")):
            continue
        if json.dumps(old[key]) != json.dumps(new[key]):
            diffs.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return diffs


def apply_lr_schedule(run: Run) -> None:
    """After DeepSpeed restored the LambdaLR state (its base_lrs hold the OLD train.lr;
    the lambda is this run's, since a plain function is not saved), put this run's train.lr
    and warmup in force from the restored step on."""
    sched = run.engine.lr_scheduler
    groups = sched.optimizer.param_groups
    factor = inverse_sqrt(run.cfg.train)
    sched.lr_lambdas = [factor] * len(groups)
    sched.base_lrs = [run.cfg.train.lr] * len(groups)
    lr = run.cfg.train.lr * factor(sched.last_epoch)
    for group in groups:
        group["initial_lr"] = run.cfg.train.lr
        group["lr"] = lr
    sched._last_lr = [lr] * len(groups)


def unreadable_files(folder: Path) -> list[str]:
    """The .pt files of a checkpoint torch cannot load, with the reason (error path only)."""
    bad = []
    for f in sorted(folder.glob("*.pt")):
        try:
            torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # any failure to unpickle means the file is damaged
            bad.append(f"{f} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return bad


def resume(run: Run) -> None:
    """Continue from train.resume: DeepSpeed state, client state (step, sampler, weighting,
    best/patience bookkeeping) and per-rank RNG. On another world size (ZeRO-1/2 through a
    universal checkpoint, see needs_universal) the sampler continues only when
    train.max_tokens x world size is unchanged (else refused, naming the value to set),
    and the per-rank RNG streams are reseeded from train.seed, the step and the rank."""
    r = run.cfg.train.resume
    if r == "none":
        return
    path = Path(run.cfg.train.save_dir) / "latest" if r == "auto" else Path(r)
    if not (path / CHECKPOINT_META).is_file():
        if r == "auto":
            return
        raise TrainError(f"train.resume={r}: no checkpoint at {path} (expected {CHECKPOINT_META} inside)")
    try:
        meta = read_checkpoint_meta(path)
    except json.JSONDecodeError as e:
        raise TrainError(f"{path / CHECKPOINT_META}: not valid JSON ({e}); resume from another checkpoint "
                         f"(train.resume=<path>)") from None
    if meta["vocab_size"] != len(run.vocab) or meta["manifest_fingerprint"] != run.manifest.fingerprint:
        raise TrainError(f"{path}: checkpoint was trained on data with vocab {meta['vocab_size']} / fingerprint "
                         f"{meta['manifest_fingerprint'][:12]}, but {run.cfg.data.dir} has vocab {len(run.vocab)} / "
                         f"{run.manifest.fingerprint[:12]}")
    if meta["languages"] != run.languages:
        raise TrainError(f"{path}: checkpoint languages {meta['languages']} != configured {run.languages}")
    saved_ep = meta["config"]["experts"]["ep_size"]
    if run.cfg.experts.modules and saved_ep != run.cfg.experts.ep_size:
        raise TrainError(f"{path}: checkpoint has experts.ep_size={saved_ep}, this run "
                         f"experts.ep_size={run.cfg.experts.ep_size}; resume with the same ep_size")
    same_world = meta["world_size"] == run.world
    # on another world size train.max_tokens may change so that the sampler's global batch stays the same
    keeps_batch = meta["config"]["train"]["max_tokens"] * meta["world_size"] == run.cfg.train.max_tokens * run.world
    diffs = changed_settings(meta["config"], run.cfg.to_dict(), () if same_world or not keeps_batch
                             else ("train.max_tokens",))
    if diffs:
        raise TrainError(f"{path}: this run changes settings the checkpoint was trained with: {'; '.join(diffs)}. "
                         f"A resumed run may change only "
                         f"{', '.join(k + '*' if k.endswith('.') else k for k in RESUME_MAY_CHANGE)}. "
                         f"Resume with the saved values, or start afresh (another train.save_dir, or "
                         f"train.resume=none train.overwrite=true)")
    failure = None
    load_dir, tag = path.parent, path.name
    universal = run.engine.load_universal_checkpoint()  # set by setup (needs_universal)
    if universal:
        converted = to_universal(run, path, meta["world_size"])
        load_dir, tag = converted.parent, converted.name
    try:
        load_path, client = run.engine.load_checkpoint(str(load_dir), tag=tag)
    except Exception as e:  # DeepSpeed's torch.load errors do not name the file
        bad = unreadable_files(path)
        failure = (f"{path}: DeepSpeed could not load the checkpoint ({type(e).__name__}: {e}); "
                   + (f"damaged file(s): {'; '.join(bad)}. " if bad else "")
                   + "Resume from another checkpoint (train.resume=<path>, e.g. the best/ folder) or start afresh")
    rng_file = path / f"rng_rank{run.rank}.pt"
    if failure is None and rng_file.is_file() and same_world:
        try:
            rng = torch.load(rng_file, weights_only=True)  # tensors, ints and tuples only: no pickle code runs
            torch.set_rng_state(rng["torch"])
            np.random.set_state(numpy_rng_from_tensors(rng["numpy"]))
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        except Exception as e:  # truncated, overwritten or not an RNG file at all
            failure = (f"{rng_file}: damaged RNG state ({type(e).__name__}: {e}); delete the file to resume with "
                       f"reseeded dropout, or resume from another checkpoint")
    # each rank reads its own files: the others must not train on without them
    failed = torch.tensor([float(failure is not None)])
    if run.world > 1:
        failed = failed.to(run.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failure is not None:
        raise TrainError(failure)
    if failed.item() > 0:
        raise TrainError(f"{path}: another rank could not load its part of the checkpoint (its error names the "
                         f"file)")
    if universal and run.rank == 0:  # every rank has loaded it (the all_reduce above): used once
        shutil.rmtree(path.parent / f"{path.name}{UNIVERSAL_SUFFIX}")
    if load_path is None:
        raise TrainError(f"DeepSpeed could not load the checkpoint at {path}")
    apply_lr_schedule(run)
    run.step = int(client["step"])
    run.best_valid = float(client["best_valid"])
    # checkpoints from before train.best_metric: their best/ was chosen by loss
    run.best_score = client.get("best_score", run.best_valid if math.isfinite(run.best_valid) else None)
    run.stale = int(client.get("stale", 0))
    run.elapsed = float(client.get("elapsed", 0.0))
    try:
        run.sampler.load_state_dict(client["sampler"])
    except ValueError as e:
        if same_world:
            raise TrainError(f"{path}: {e}") from None
        saved_tokens = meta["config"]["train"]["max_tokens"]
        total = saved_tokens * meta["world_size"]
        hint = (f"resume with train.max_tokens={total // run.world}" if total % run.world == 0 else
                f"no train.max_tokens gives it on {run.world} ranks; resume on a number of ranks that divides {total}")
        raise TrainError(f"{path}: the world size changed ({meta['world_size']} -> {run.world} ranks) and with it the "
                         f"global batch the sampler plans (train.max_tokens x world size: {saved_tokens} x "
                         f"{meta['world_size']} = {total} tokens, now {run.cfg.train.max_tokens} x {run.world} = "
                         f"{run.cfg.train.max_tokens * run.world}): {hint}, so the run continues with the same "
                         f"batches") from None
    if run.dev_sampler is not None and client.get("dev_sampler"):
        run.dev_sampler.load_state_dict(client["dev_sampler"])
    run.weighting.load_state_dict(client["weighting"])
    if not (rng_file.is_file() and same_world):
        why = (f"world size changed ({meta['world_size']} -> {run.world})" if not same_world
               else f"no {rng_file.name} in {path}")
        print0(f"| warning: {why}; dropout RNG reseeded")
        torch.manual_seed(run.cfg.train.seed * 1000 + run.step * 10 + run.rank)
    run.last_good = f"{path} (step {run.step})"
    print0(f"| resumed from {path} at step {run.step}")


UNIVERSAL_SUFFIX = ".universal"


def resume_path(cfg: Config) -> Optional[Path]:
    """The checkpoint train.resume points at, if it holds cats_ds.json (resume() explains a missing one)."""
    r = cfg.train.resume
    if r == "none":
        return None
    path = Path(cfg.train.save_dir) / "latest" if r == "auto" else Path(r)
    return path if (path / CHECKPOINT_META).is_file() else None


def needs_universal(cfg: Config, world: int, ds: dict) -> bool:
    """Whether the checkpoint to resume from was saved by ZeRO-1/2 on another number of
    ranks: its optimizer partitions then load through a DeepSpeed universal checkpoint
    (`to_universal`, DeepSpeed's `checkpoint.load_universal`). Decided before the engine
    is built, since DeepSpeed reads that setting at initialization. Expert (family MoE)
    and ZeRO-3 checkpoints are refused here, before DeepSpeed loads anything."""
    path = resume_path(cfg)
    if path is None:
        return False
    try:
        meta = read_checkpoint_meta(path)
    except (json.JSONDecodeError, OSError):
        return False  # resume() names the damaged file
    saved, stage = meta.get("world_size"), meta.get("zero_stage", 0)
    if saved == world or not stage:
        return False  # same world, or ZeRO-0: the full optimizer state is in the model-state file
    where = f"{path} was saved by {saved} ranks with ZeRO-{stage}; this run has {world}"
    if meta["config"]["experts"]["modules"]:
        raise TrainError(f"{where}. Checkpoints with family experts (experts.modules="
                         f"{meta['config']['experts']['modules']}) resume only on the world size they were saved "
                         f"with: DeepSpeed's universal checkpoints do not reshard MoE expert parameters. Supported on "
                         f"another world size: dense models with ZeRO-0, 1 or 2; resume with {saved} ranks")
    if stage == 3:
        raise TrainError(f"{where}. ZeRO-3 checkpoints resume only on the world size they were saved with "
                         f"(supported on another world size: ZeRO-0, 1 or 2); resume with {saved} ranks")
    current = (ds.get("zero_optimization") or {}).get("stage", 0)
    if current not in (1, 2):
        raise TrainError(f"{where}, and a DeepSpeed JSON with ZeRO stage {current}: a ZeRO-{stage} checkpoint "
                         f"resumes on another world size through a universal checkpoint, which loads into ZeRO "
                         f"stage 1 or 2 only; use such a JSON")
    return True


def to_universal(run: Run, path: Path, saved_world: int) -> Path:
    """Convert the ZeRO-1/2 checkpoint `path` (saved on saved_world ranks) into a DeepSpeed
    universal checkpoint <path>.universal/ (deepspeed.checkpoint.ds_to_universal: every
    parameter's fp32 weights and Adam moments, whole, under zero/<name>/), which any world
    size loads with `checkpoint.load_universal`. Rank 0 converts, the others wait;
    resume() deletes the folder once every rank has loaded it."""
    import argparse
    import contextlib
    import io

    out = path.parent / f"{path.name}{UNIVERSAL_SUFFIX}"
    failure = ""
    if run.rank == 0:
        tmp = path.parent / f"{out.name}.tmp"
        for leftover in (out, tmp):
            if leftover.exists():
                shutil.rmtree(leftover)
        print0(f"| world size changed ({saved_world} -> {run.world} ranks): converting {path} into a DeepSpeed "
               f"universal checkpoint {out}")
        from deepspeed.checkpoint import ds_to_universal

        args = argparse.Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                ds_to_universal.main(args)
            os.replace(tmp, out)
        except Exception as e:  # DeepSpeed's converter raises assorted errors; report them with its log
            failure = (f"{path}: converting to a DeepSpeed universal checkpoint failed ({type(e).__name__}: {e}); "
                       f"converter output: {log.getvalue()[-2000:]}")
        finally:
            (path.parent / "latest_universal").unlink(missing_ok=True)  # the converter's pointer file
    flag = [failure]
    if run.world > 1:
        dist.broadcast_object_list(flag, src=0)
    if flag[0]:
        raise TrainError(flag[0] if run.rank == 0 else f"{path}: rank 0 could not convert the checkpoint")
    return out


# --------------------------------------------------------------------------- main loop


def time_is_up(elapsed: float, limit_s: float, update_s: float, log_every: int, save_s: float) -> bool:
    """train.max_minutes, checked every log_every updates: stop now if another log_every
    updates (at this session's pace update_s) plus a final validation and save (as long as
    the last one took, save_s) would end past the limit, so the final save fits inside it."""
    return elapsed + log_every * update_s + save_s > limit_s


def should_stop(run: Run) -> bool:
    """Time budget, decided on rank 0 and shared so every rank stops at the same step."""
    limit = run.cfg.train.max_minutes
    if limit is None:
        return False
    now = time.time()
    update_s = (now - run.t_start) / max(run.step - run.first_step, 1)
    flag = torch.tensor([float(time_is_up(run.elapsed + now - run.t_start, limit * 60, update_s,
                                          run.cfg.train.log_every, run.save_s))])
    if run.world > 1:
        flag = flag.to(run.device)
        dist.broadcast(flag, 0)
    return bool(flag.item())


def translate_dev(run: Run) -> dict[str, dict]:
    """BLEU / chrF++ per language on the dev subset (cats_ds/dev_translation.py)."""
    from cats_ds.dev_translation import dev_scores

    run.engine.eval()
    scores = dev_scores(run.engine.module, run.cfg, run.dev_splits, run.dev_refs, run.languages, run.tag_ids,
                        run.vocab, run.rank, run.world)
    run.engine.train()
    return scores


def is_better(metric: str, value: float, best: Optional[float]) -> bool:
    """Lower loss, higher BLEU / chrF++; anything beats no value yet."""
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def validate_and_save(run: Run, final: bool = False) -> None:
    """Validation loss (and, every eval.valid_every updates and at the end, dev BLEU /
    chrF++), best/ by train.best_metric, latest/, and the train.patience count."""
    t0 = time.time()
    res = validate(run)
    every = run.cfg.eval.valid_every
    scores = translate_dev(run) if every and (run.step % every == 0 or final) else None
    mean = log_valid(run, res, scores)
    broken = [lang for lang, v in res.items() if not math.isfinite(v["loss"])]
    if broken:  # never write a broken model over a good checkpoint
        raise TrainError(f"validation loss is NaN or inf at step {run.step} (en-{', en-'.join(broken)}): stopped "
                         f"without saving a checkpoint. Last good checkpoint: {run.last_good}. Lower train.lr "
                         f"(now {run.cfg.train.lr:g}) or check the data and the checkpoint files, then resume from it")
    run.best_valid = min(run.best_valid, mean)
    metric = run.cfg.train.best_metric
    if metric == "loss" or scores is not None:
        from cats_ds.dev_translation import mean_score

        value = mean if metric == "loss" else mean_score(scores, metric)
        if is_better(metric, value, run.best_score):
            run.best_score, run.stale = value, 0
            save_checkpoint(run, "best", mean, scores)
        else:
            run.stale += 1
        patience = run.cfg.train.patience
        if patience and run.stale >= patience:
            run.early_stop = True
            print0(f"| early stop: mean {metric} did not improve on {run.best_score:.4f} in {run.stale} validations "
                   f"(train.patience={patience})")
    save_checkpoint(run, "latest", mean, scores)
    run.save_s = time.time() - t0
    run.t_log += run.save_s  # tokens/s counts training time only


def save_on_signal(run: Run, saved: bool) -> None:
    """Some rank got SIGTERM/SIGUSR1 (cats_ds/preempt.py): save latest/ at this update
    (unless the scheduled validation just did) and mark the run for a requeue. After a
    non-finite update the previous latest/ stands: the requeued run redoes the updates since."""
    signals = ",".join(dict.fromkeys(preempt.received)) or "a signal on another rank"
    if run.nonfinite:
        print0(f"| {signals} at step {run.step}: the last update's loss was NaN or inf, latest/ is not replaced "
               f"(last good checkpoint: {run.last_good})")
    elif not saved:  # (validate_and_save at this step wrote latest/ already)
        t0 = time.time()
        save_checkpoint(run, "latest", None)
        run.save_s = max(run.save_s, time.time() - t0)
    run.requeue = True
    print0(f"| {signals}: stopped at step {run.step}, latest/ saved; exit {preempt.REQUEUE_EXIT} (requeue)")


def fit(run: Run) -> None:
    cfg = run.cfg.train
    while run.step < cfg.max_updates:
        train_step(run)
        if run.step % cfg.log_every == 0 or run.stop_signal:
            log_train(run)
        if run.cfg.analysis.every and run.step % run.cfg.analysis.every == 0:
            analysis_step(run)
        stop = run.step % cfg.log_every == 0 and should_stop(run)
        scheduled = run.step % cfg.valid_every == 0 or run.step == cfg.max_updates or stop
        if scheduled:
            validate_and_save(run, final=run.step == cfg.max_updates or stop)
        save_numbered(run)
        if run.stop_signal:
            save_on_signal(run, saved=scheduled)
            return
        if stop:
            print0(f"| time budget of {cfg.max_minutes} minutes reached at step {run.step}")
            break
        if run.early_stop:
            break
    print0(f"| done at step {run.step}; best mean valid loss {run.best_valid:.4f}")


def train(cfg: Config, ds_config_path: str) -> Run:
    """The whole run; run.requeue tells the caller it stopped on SIGTERM/SIGUSR1 (exit
    with preempt.REQUEUE_EXIT)."""
    preempt.install()  # before setup: a signal during start-up is honoured after the first update
    run = setup(cfg, ds_config_path)
    seed_dropout(cfg.train.seed, run.rank)
    run.t_start = time.time()
    resume(run)
    run.first_step = run.step
    run.t_start = run.t_log = time.time()
    fit(run)
    return run


def load_config_from_checkpoint(path: str | Path) -> Config:
    return config_from_dict(read_checkpoint_meta(path)["config"])
