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
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from cats_ds.analysis import analysis_step
from cats_ds.analysis.analyze import AnalysisError, check_settings
from cats_ds.analysis.similarity import param_group
from cats_ds.config import (GRAM_METHODS, Config, cats_start_note, config_yaml, distinct_languages,
                            draws_at_meta_steps, gram_kind, meta_interval, micro_step_tokens, tokens_per_update)
from cats_ds.data.manifest import Manifest, RawTextError, Vocab, load_split
from cats_ds.data.sampler import (Batch, LanguageSampler, Plan, collate, eval_plans, split_by_length,
                                  target_tokens, temperature_probs)
from cats_ds.inference.evaluate import EvalError
from cats_ds.inference.export import write_best_model
from cats_ds.model.build import model_from_config
from cats_ds.model.experts import param_groups
from cats_ds.model.transformer import Transformer
from cats_ds.runtime import host_malloc, preempt
from cats_ds.runtime.output import monitor, print0, split_monitors, write_events
from cats_ds.runtime.runlock import LockError, acquire, release
from cats_ds.training.checkpoint import (check_save_dir, free_space, needs_universal, prepare_save_dir, resume,
                                         save_checkpoint, save_numbered)
from cats_ds.training.grads import (HalfGrads, MetaGrams, PartitionGrads, grad_norms, half_grams, is_expert_param,
                                   split_slot)
from cats_ds.training.losses import per_language_sums
from cats_ds.training.state import TrainState
from cats_ds.training.validation import check_supported, dev_scores, load_dev_texts, mean_score
from cats_ds.weighting import make_weighting
from cats_ds.weighting.base import Weighting, mean_pairwise_cosine

class TrainError(Exception):
    """Bad setup (config, DeepSpeed JSON, data, checkpoint); the message says what and where."""


# --------------------------------------------------------------------------- helpers


def inverse_sqrt(cfg_train) -> callable:
    """Multiplier on train.lr: linear warmup from warmup_init_lr, then lr * sqrt(warmup / step)."""
    lr, init, warm = cfg_train.lr, cfg_train.warmup_init_lr, max(1, cfg_train.warmup_updates)

    def factor(step: int) -> float:
        if step < warm:
            return (init + (lr - init) * step / warm) / lr
        return math.sqrt(warm / step)

    return factor


def load_ds_config(path: str, world_size: int, cfg: Config) -> dict:
    """Read the DeepSpeed JSON and check it against the world size, the token budget and the
    config keys that depend on it (train.update_tokens, weighting.method with optimizer
    offload, eval.valid_every with ZeRO-3): the config checks that need the JSON."""
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
    want, have = cfg.train.update_tokens, tokens_per_update(cfg, world_size, gas)
    if want is not None and want != have:
        raise TrainError(f"train.update_tokens={want} but train.max_tokens={cfg.train.max_tokens} x "
                         f"gradient_accumulation_steps={gas} ({path}) x world_size={world_size} = {have}")
    try:
        check_supported(cfg, (ds.get("zero_optimization") or {}).get("stage", 0))  # dev translation with ZeRO-3
    except EvalError as e:
        raise TrainError(f"{path}: {e}") from None
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

    one_process_without_launcher()
    try:
        if get_accelerator().device_name() != "cpu":
            deepspeed.init_distributed()
            return
        deepspeed.init_distributed(dist_backend="gloo")
    except ImportError as e:  # DeepSpeed's MPI discovery (an mpirun without mpi4py)
        raise TrainError(f"cannot set up the ranks ({e}): start training with the deepspeed launcher, e.g. "
                         f"`deepspeed --num_gpus 2 launch/train.py --deepspeed_config ... --config ...`, or "
                         f"install mpi4py for mpirun") from None
    release_shm_workspace()


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def one_process_without_launcher() -> None:
    """`python launch/train.py ...` with no launcher: DeepSpeed would go looking for MPI
    (an mpi4py traceback). Train as rank 0 of 1 instead, and say how to start several
    ranks. Several SLURM tasks started without the launcher would each train alone on
    the same save_dir: refused."""
    if any(k in os.environ for k in LAUNCHER_ENV) or any(k in os.environ for k in MPI_ENV):
        return  # a launcher (torchrun, deepspeed, mpirun) set up the ranks
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")) or 1)
    if "SLURM_PROCID" in os.environ and tasks > 1:
        raise TrainError(f"launch/train.py was started as {tasks} SLURM tasks without the deepspeed launcher, so "
                         f"each would train alone; use launch/slurm/train.sbatch (one deepspeed launcher per node)")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    print("| not started by a launcher: training as one process (rank 0 of 1). For N ranks: "
          "`deepspeed --num_gpus N launch/train.py --deepspeed_config ... --config ...`, or the same command "
          "after `python launch/supervise.py` for an exit status that says how the ranks ended", flush=True)


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


def _state_field(name: str) -> property:
    """Run.<name> reads and writes Run.state.<name>."""
    return property(lambda run: getattr(run.state, name), lambda run, value: setattr(run.state, name, value),
                    doc=f"run.state.{name} (TrainState)")


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
    state: TrainState = field(default_factory=TrainState)
    """The loop's progress: step, elapsed time, best/ and patience bookkeeping, the
    non-finite count (cats_ds/training/state.py); what a checkpoint saves of it is
    state.state_dict(). Run.step, Run.best_valid, ... read and write it."""
    log_path: Optional[Path] = None
    t_log: float = 0.0
    """Start of the current logging interval (tokens/s)."""
    acc: dict = field(default_factory=dict)
    grads: Optional[PartitionGrads] = None
    """This rank's gradient partition, for meta steps (Gram-based weighting only)."""
    dev_sampler: Optional[LanguageSampler] = None
    """Meta batches from dev (meta.data=dev)."""
    filler: Optional[Batch] = None
    """One real sentence run with weight 0 by a rank that got no sentences."""
    update_loss: float = 0.0
    """This rank's loss sum over the current update (non-finite check)."""
    last_good: str = "none yet"
    """The newest checkpoint saved (or resumed from) with finite losses, for error messages."""
    good_step: int = -1
    """The step of a checkpoint saved after validation (last_good)."""
    unconfirmed: Optional[str] = None
    """A checkpoint saved without validation (step_<n>/): last_good once the next update's loss is finite."""
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
    early_stop: bool = False
    timers: Optional[dict] = None
    """Seconds per phase of plain updates (data, forward, loss, backward, optimizer,
    logging), summed while it is a dict (`bench train`); None: not timed."""
    monitor: object = None
    """DeepSpeed's MonitorMaster for the JSON's monitor blocks (cats_ds/runtime/output.py), held
    here rather than by the engine so the engine writes no per-sample events of its own."""
    norm_grads: Optional[PartitionGrads] = None
    """The gradient partition the gradient norms are read from (run.grads when there is one)."""
    grad_norms: Optional[dict] = None
    """Gradient norms of the last update that logs (total "all" and per parameter group)."""
    last_valid: Optional[dict] = None
    """The last validation's train_log.jsonl record (mean_loss; bleu and chrf when translated)."""
    gram_log: Optional[dict] = None
    """The Gram diagnostics of the last meta step since the last log line (gram_diagnostics)."""

    step = _state_field("step")
    elapsed = _state_field("elapsed")
    t_start = _state_field("t_start")
    best_valid = _state_field("best_valid")
    best_score = _state_field("best_score")
    stale = _state_field("stale")
    nonfinite = _state_field("nonfinite")


def setup(cfg: Config, ds_config_path: str) -> Run:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if get_accelerator().device_name() == "cpu":  # before the model and data take memory
        print0(f"| {host_malloc.configure(cfg.train.host_malloc)}")
    check_save_dir(cfg.train.save_dir, rank, world)  # a folder every rank can write into, or a named error
    lock_save_dir(cfg, rank, world)
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
    engine_ds, monitor_blocks = split_monitors(ds)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=engine_ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
    note = cats_start_note(cfg)
    if note:
        print0(f"| {note}")
    sampler = LanguageSampler(train_splits, languages, cfg.sampling.temperature, cfg.sampling.langs_per_batch,
                              cfg.train.max_tokens, world, cfg.train.seed, distinct=distinct_languages(cfg),
                              length_pool=cfg.sampling.length_pool if token_weighted(cfg) else 0)
    run = Run(cfg=cfg, engine=engine, model=model, manifest=manifest, vocab=vocab, languages=languages,
              train_splits=train_splits, dev_splits=dev_splits, sampler=sampler,
              weighting=make_weighting(cfg, languages, len(vocab)), device=torch.device(get_accelerator().device_name()),
              rank=rank, world=world, gas=engine.gradient_accumulation_steps(),
              tag_ids=[vocab.lang_ids[l] for l in languages], monitor=monitor(monitor_blocks))
    run.filler = collate(Plan([0], [np.array([0])]), train_splits, languages, run.tag_ids).to(run.device)
    if cfg.weighting.method in GRAM_METHODS:
        shared_only = cfg.meta.params == "shared"
        run.grads = PartitionGrads(engine, include=lambda name, p: not (shared_only and is_expert_param(p)))
        if cfg.meta.data == "dev":
            run.dev_sampler = LanguageSampler(dev_splits, languages, 1.0, 1, cfg.train.max_tokens, world,
                                              cfg.train.seed, allow_missing=True)
    if cfg.eval.valid_every:
        try:
            run.dev_refs = load_dev_texts(cfg, manifest, dev_splits)
        except (EvalError, RawTextError) as e:
            raise TrainError(str(e)) from None
    run.log_path = Path(cfg.train.save_dir) / "train_log.jsonl"
    if rank == 0:
        Path(cfg.train.save_dir).mkdir(parents=True, exist_ok=True)
        write_run_config(cfg, ds, ds_config_path)
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"| model {n_params / 1e6:.2f}M parameters | {len(languages)} languages | world {world} | "
           f"ZeRO {engine.zero_optimization_stage()} | accumulation {run.gas} | "
           f"{tokens_per_update(cfg, world, run.gas)} tokens per update")
    print0("| sampling p: " + " ".join(f"{l}={p:.3f}" for l, p in zip(languages, sampler.probs))
           + (f" | {cfg.sampling.langs_per_batch} distinct languages per micro-batch (token share = inclusion "
              f"probability / K, flatter than p)" if sampler.distinct else ""))
    return run


def lock_save_dir(cfg: Config, rank: int, world: int) -> None:
    """One training per train.save_dir (cats_ds/runtime/runlock.py): rank 0 takes <save_dir>/train.lock
    before anything is written there; every rank raises its refusal."""
    error = ""
    if rank == 0:
        try:
            acquire(cfg.train.save_dir, log=print0)
        except LockError as e:
            error = str(e)
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise TrainError(error)


RUN_CONFIG = "config.yaml"
RUN_DS_CONFIG = "ds_config.json"


def write_run_config(cfg: Config, ds: dict, ds_config_path: str) -> None:
    """Rank 0, at every start: the resolved experiment config as `<save_dir>/config.yaml`
    (every key, its doc and its default; `--config` reads it back) and the DeepSpeed JSON
    as DeepSpeed got it (`ds_config.json`: blocks this project added included), and the
    config printed. A resumed run rewrites them with the settings of this session."""
    save_dir = Path(cfg.train.save_dir)
    (save_dir / RUN_CONFIG).write_text(config_yaml(cfg, header=(
        f"Resolved experiment config of the run in {save_dir} (written by cats_ds at its start; a resumed run rewrites "
        f"it).\nTrain again with: deepspeed launch/train.py --deepspeed_config {save_dir / RUN_DS_CONFIG} --config "
        f"{save_dir / RUN_CONFIG}")), encoding="utf-8")
    (save_dir / RUN_DS_CONFIG).write_text(json.dumps(ds, indent=1), encoding="utf-8")
    print0(f"| config ({save_dir / RUN_CONFIG}; DeepSpeed JSON from {ds_config_path}: {save_dir / RUN_DS_CONFIG}):\n"
           + config_yaml(cfg, docs=False).rstrip())


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


def token_weighted(cfg: Config) -> bool:
    """Whether the plain-step loss weights every target token by its language alone
    (c_n = w_n tokens_n / tokens: temperature, or meta.weight_by=tokens): only then may
    length pooling regroup sentences across draws without changing the objective.
    meta.weight_by=language (c_n = w_n on the language's mean loss) depends on how many of
    its tokens share a micro-batch, so it trains on the draws."""
    return cfg.weighting.method == "temperature" or cfg.meta.weight_by == "tokens"


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


class _Phase:
    def __init__(self, timers: dict, name: str):
        self.timers, self.name = timers, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timers[self.name] = self.timers.get(self.name, 0.0) + time.perf_counter() - self.t0


def phase(run: Run, name: str):
    """Add the time of a `with` block to run.timers[name] when the run is being timed."""
    return nullcontext() if run.timers is None else _Phase(run.timers, name)


def forward_sums(run: Run, batch: Batch):
    with phase(run, "forward"):
        logits = run.engine(batch.src, batch.prev, batch.langs)
    with phase(run, "loss"):
        return per_language_sums(logits, batch.tgt, batch.langs, len(run.languages), run.cfg.train.label_smoothing,
                                 fused=True)


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
    with phase(run, "data"):
        groups = split_by_length(plan, splits, run.languages, micro_step_tokens(run.cfg, run.world))
    for group in groups:
        with phase(run, "data"):
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
    meta.temperature when that is set."""
    probs = None
    if meta and run.cfg.meta.temperature is not None:
        probs = temperature_probs(run.sampler.sizes, run.cfg.meta.temperature)
    plans = [run.sampler.next_plan(probs) for _ in range(run.gas)]
    for plan in plans:
        count_slots(run, plan)
    return plans


def draws_as_drawn(cfg: Config, step: int) -> bool:
    """Whether update `step` trains on the sampler's draws as drawn rather than on
    length-pooled micro-batches: the steps of meta.every when
    sampling.draws_at_meta_steps is on (by default for the Gram-based methods, whose meta
    steps need the draws). A temperature run pools every update unless it sets it, as CATS'
    alpha = 1 reference does (then both train on the same batches at every update)."""
    return draws_at_meta_steps(cfg) and step % meta_interval(cfg.meta.every, step) == 0


def next_batches(run: Run) -> list[Plan]:
    """The micro-batches of a plain update: length-pooled (sampler.next_batch), except at
    the meta-step schedule (draws_as_drawn); the slots of the draws are counted when they
    are drawn."""
    if draws_as_drawn(run.cfg, run.step):
        return next_plans(run)
    plans = []
    for _ in range(run.gas):
        plan, drawn = run.sampler.next_batch()
        for d in drawn:
            count_slots(run, d)
        plans.append(plan)
    return plans


def plain_update(run: Run, plans: Optional[list[Plan]] = None) -> None:
    """gas micro-batches, one backward of sum_n c_n L_n each, then the optimizer step."""
    with phase(run, "data"):
        plans = plans or next_batches(run)
    for m, plan in enumerate(plans):
        with phase(run, "data"):
            tokens = target_tokens(plan, run.train_splits, run.languages)
            coeffs = run.weighting.coefficients(plan.langs, tokens)
        run.engine.set_gradient_accumulation_boundary(m == run.gas - 1)
        loss_sum, nll_sum, tok, live = forward_plan(run, plan, run.train_splits)
        with phase(run, "loss"):
            loss = scaled_loss(run, loss_sum, coeffs, tokens)
        with phase(run, "backward"):
            run.engine.backward(loss)
        if m == run.gas - 1:
            with phase(run, "logging"):
                measure_grad_norms(run)
        with phase(run, "optimizer"):
            run.engine.step()
        if live:
            with phase(run, "logging"):
                accumulate(run, loss_sum.detach(), nll_sum, tok)


def per_language_gradients(run: Run, plans: list[Plan], splits: dict, log: bool) -> HalfGrads:
    """Two forward+backwards per language slot of each micro-batch plan, one per half
    (grads.split_slot: disjoint sentences, about equal target tokens), each captured from
    this rank's gradient partition (cats_ds/training/grads.py). Both halves are normalized by the
    whole slot's target tokens, so half a + half b is the slot's gradient. Micro-step m
    contributes mix_n^(m) grad L_n^(m) / gas (mix: weighting.mix; DeepSpeed divides by
    gas); the sum over m is S_n g_n with S_n = sum_m mix_n^(m) / gas, so g_n is language
    n's gradient averaged over the micro-steps that contain it and sum_n S_n g_n is the
    plain update at weight 1. A half without sentences (a slot of one sentence) runs no
    backward on any rank: its row stays 0 and its rho 0. Returns HalfGrads (rows (2K,
    n_local), rho, this rank's loss / nll / token sums, shares {n: S_n})."""
    langs = sorted({li for plan in plans for li in plan.langs})
    k, n = len(langs), len(run.languages)
    pos = {li: i for i, li in enumerate(langs)}
    rows: Optional[torch.Tensor] = None
    rho = torch.zeros(k, 2, dtype=torch.float64)
    sums = torch.zeros(3, n, dtype=torch.float64)  # loss, nll, tokens
    shares: dict[int, float] = {}
    for plan in plans:
        tokens = target_tokens(plan, splits, run.languages)
        mix = run.weighting.mix(plan.langs, tokens)
        for li, m in mix.items():
            shares[li] = shares.get(li, 0.0) + m / run.gas
        for li, sents in zip(plan.langs, plan.sents):
            sizes = splits[run.languages[li]].tgt.sizes
            for h, part in enumerate(split_slot(sents, sizes)):
                rho[pos[li], h] += mix[li] / run.gas * int(sizes[part].sum()) / tokens[li]
                if not len(part):  # the same on every rank (global plan)
                    continue
                run.engine.set_gradient_accumulation_boundary(True)
                loss_sum, nll_sum, tok, live = forward_plan(run, Plan([li], [part]), splits)
                run.engine.backward(scaled_loss(run, loss_sum, {li: mix[li]}, tokens))
                g = run.grads.capture()
                if rows is None:
                    rows = torch.zeros(2 * k, g.numel(), dtype=g.dtype, device=g.device)
                rows[h * k + pos[li]] += g
                del g
                if live:
                    sums += torch.stack([loss_sum.detach().double().cpu(), nll_sum.double().cpu(), tok.double().cpu()])
                    if log:
                        accumulate(run, loss_sum.detach(), nll_sum, tok)
    share = torch.tensor([shares[l] for l in langs], dtype=torch.float64)
    rows /= torch.cat([share, share]).to(rows)[:, None]
    idx = torch.tensor(langs)
    return HalfGrads(langs, rows, rho / share[:, None], sums[0, idx], sums[1, idx], sums[2, idx], shares)


def meta_update(run: Run) -> None:
    """A meta step: per-language half gradients -> G and S -> weighting.update on the one
    grads.gram picks -> sum_n c_n g_n (whole slots) written into the partition ->
    engine.step(). Meta batches are the training batches (the paper's Algorithm 1) unless
    meta.data=dev."""
    plans = next_plans(run, meta=True)
    if run.cfg.meta.data == "dev":
        # dev gradients only steer the weights; the update is a plain one on the train plans
        meta_plans = [run.dev_sampler.plan_for(p.langs) for p in plans]
        half = per_language_gradients(run, meta_plans, run.dev_splits, log=False)
        meta_weighting(run, half)
        del half
        plain_update(run, plans)
        return
    half = per_language_gradients(run, plans, run.train_splits, log=True)
    coeffs = meta_weighting(run, half)
    run.grads.write_back(half.combine(coeffs))
    del half
    measure_grad_norms(run)
    for m in range(run.gas):
        run.engine.set_gradient_accumulation_boundary(m == run.gas - 1)
        run.engine.step()


def meta_weighting(run: Run, half: HalfGrads) -> dict[int, float]:
    """The meta step's one all_reduce (grads.half_grams), its diagnostics kept for the next
    log line, and weighting_update on the Gram grads.gram picks (the plain G or the PSD
    projection of the split S, MetaGrams.for_method) with the mean losses and nll.
    Returns the c_n."""
    grams = half_grams(run.grads, half)
    run.gram_log = gram_diagnostics(run, half.langs, grams)
    return weighting_update(run, half.langs, grams.losses, grams.for_method(gram_kind(run.cfg)), half.shares,
                            nll=grams.nll)


def weighting_update(run: Run, langs, losses, gram, shares, nll=None) -> dict[int, float]:
    """weighting.update, or weighting.skip when G or the losses are not finite (fp16
    overflow, e.g. at step 0's initial loss scale): the weights stay, the training step
    goes ahead and DeepSpeed's loss scaler handles the overflow. G and the losses come
    out of one all_reduce, so every rank holds the same values and takes the same branch
    (a non-finite partial on any rank makes the sum non-finite on all). nll: the mean
    un-smoothed token NLL per language, passed on to the method."""
    if not (torch.isfinite(gram).all() and torch.isfinite(losses).all()):
        print0(f"| step {run.step}: non-finite Gram matrix or losses; the {run.weighting.name} weights are not "
               f"updated at this meta step")
        return run.weighting.skip(run.step, langs, shares)
    coeffs = run.weighting.update(run.step, langs, losses, gram, shares, nll=nll)  # WeightingError: exit 2
    for line in run.weighting.floor_warnings():
        print0(f"| warning: step {run.step}: {line}")
    return coeffs


def gram_diagnostics(run: Run, langs, grams: MetaGrams) -> dict:
    """What a meta step logs about its Gram matrices (train_log.jsonl "gram", TensorBoard
    gram/...): the kind the weighting got; per language r = cos(g^a, g^b) (half agreement)
    and noise_share = v / G_nn (the part of |g_n|^2 that is noise); the mean over distinct
    in-batch pairs of the plain cosine G_ij / sqrt(G_ii G_jj) and of the split cosine
    S+_ij / sqrt(S+_ii S+_jj), S+ the PSD projection of S; and that split cosine matrix."""

    names = [run.languages[l] for l in langs]
    out: dict = {"step": run.step, "kind": gram_kind(run.cfg)}
    if not (torch.isfinite(grams.plain).all() and torch.isfinite(grams.split).all()):
        return out
    psd = grams.for_method("split")
    diag = grams.plain.diagonal()
    out["r"] = {l: float(v) for l, v in zip(names, grams.agreement) if math.isfinite(float(v))}
    out["noise_share"] = {l: float(v / d) for l, v, d in zip(names, grams.noise, diag)
                          if math.isfinite(float(v)) and float(d) > 0}
    for key, value in (("plain_cos_mean", mean_pairwise_cosine(grams.plain)),
                       ("split_cos_mean", mean_pairwise_cosine(psd))):
        if math.isfinite(value):  # (nan with one language)
            out[key] = value
    norms = psd.diagonal().clamp(min=0).sqrt()
    cos = psd / (norms[:, None] * norms[None, :]).clamp(min=1e-300)
    out["split_cos"] = {a: {b: float(cos[i, j]) for j, b in enumerate(names)} for i, a in enumerate(names)}
    return out


def logs_this_update(run: Run) -> bool:
    """Whether the update now running ends with a log line (fit logs after run.step += 1)."""
    return (run.step + 1) % run.cfg.train.log_every == 0


def measure_grad_norms(run: Run) -> None:
    """At the accumulation boundary of an update that logs, before engine.step(): the
    gradient norm the optimizer sees (before clipping), in total and per parameter group
    (cats_ds.analysis.similarity.param_group: Emb, E.SA, E.FC, ..., experts); logged as
    train/grad_norm and train/grad_norm/<group>."""
    if not logs_this_update(run):
        return
    if run.norm_grads is None:
        run.norm_grads = run.grads or PartitionGrads(run.engine)
    run.grad_norms = grad_norms(run.norm_grads, lambda name, p: param_group(name, is_expert_param(p)), run.device)


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
    The same all_reduce (MAX) carries the stop-signal flag (cats_ds/runtime/preempt.py), so every
    rank learns at the same update boundary that some rank got SIGTERM/SIGUSR1."""
    flags = torch.tensor([0.0 if math.isfinite(run.update_loss) else 1.0, float(preempt.requested.is_set())])
    run.update_loss = 0.0
    if run.world > 1:
        flags = flags.to(run.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, signalled = flags.tolist()
    run.stop_signal = signalled > 0
    if run.unconfirmed is not None:  # saved after the previous update: its weights gave a finite loss (or not)
        if bad == 0:
            run.last_good = run.unconfirmed
        run.unconfirmed = None
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
    if run.grad_norms is not None:
        record["grad_norm"] = run.grad_norms
        run.grad_norms = None
    if run.gram_log is not None:
        record["gram"] = run.gram_log
        run.gram_log = None
    slots = a["slots"] / max(a["slots"].sum(), 1)
    events = [("train/loss", record["loss"], run.step), ("train/nll", record["nll"], run.step),
              ("train/lr", record["lr"], run.step), ("perf/tokens_per_s", record["tokens_per_s"], run.step)]
    events += [(f"train/loss/en-{l}", v, run.step) for l, v in record["loss_lang"].items()]
    for group, v in record.get("grad_norm", {}).items():
        events.append(("train/grad_norm" if group == "all" else f"train/grad_norm/{group}", v, run.step))
    if a["slots"].sum() > 0:  # length-pooled draws happen once per pool, not every interval
        events += [(f"weighting/sampled/{l}", float(slots[i]), run.step) for i, l in enumerate(run.languages)]
    events += [(f"weighting/{k}", float(v), run.step) for k, v in record["weighting"].items()]
    events += gram_events(record.get("gram"), run.step)
    write_events(run, events)
    eta, line = progress(run)
    record["eta_s"] = eta
    print0(f"| step {run.step:6d} | loss {record['loss']:.4f} | nll {record['nll']:.4f} | "
           f"lr {record['lr']:.3g} | {record['tokens_per_s']:.0f} tok/s{line}")
    write_log(run, {"kind": "train", **record})
    run.acc = {}


def gram_events(gram: Optional[dict], step: int) -> list[tuple[str, float, int]]:
    """TensorBoard scalars of a meta step's Gram diagnostics: gram/r/<lang>,
    gram/noise_share/<lang>, gram/plain_cos_mean, gram/split_cos_mean (finite values only)."""
    if not gram:
        return []
    events = [(f"gram/{key}/{lang}", v, step) for key in ("r", "noise_share") for lang, v in gram.get(key, {}).items()]
    events += [(f"gram/{key}", gram[key], step) for key in ("plain_cos_mean", "split_cos_mean") if key in gram]
    return [(tag, float(v), s) for tag, v, s in events if math.isfinite(float(v))]


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


def write_log(run: Run, record: dict) -> None:
    if run.rank == 0:
        try:
            with open(run.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full or vanished disk: named (the launcher then stops the other ranks)
            raise TrainError(f"{run.log_path}: cannot write the training log at step {run.step}: {e.strerror} "
                             f"({free_space(run.log_path.parent)}). Free space in train.save_dir="
                             f"{run.cfg.train.save_dir} (or choose another), then resume from the last good "
                             f"checkpoint, {run.last_good}") from None


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
    events = [(f"valid/loss/en-{l}", v["loss"], run.step) for l, v in res.items()]
    events += [(f"valid/nll/en-{l}", v["nll"], run.step) for l, v in res.items()]
    events.append(("valid/mean_loss", mean, run.step))
    record = {"kind": "valid", "step": run.step, "mean_loss": mean, "langs": res}
    if scores is not None:
        for metric in ("bleu", "chrf"):
            events += [(f"valid/{metric}/en-{l}", v[metric], run.step) for l, v in scores.items()]
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
    run.last_valid = record
    return mean


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
    """BLEU / chrF++ per language on the dev subset (cats_ds/training/validation.py)."""
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
    """Some rank got SIGTERM/SIGUSR1 (cats_ds/runtime/preempt.py): save latest/ at this update
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
            analysis_step(run, per_language_gradients)
        stop = run.step % cfg.log_every == 0 and should_stop(run)
        scheduled = run.step % cfg.valid_every == 0 or run.step == cfg.max_updates or stop
        if scheduled:
            validate_and_save(run, final=run.step == cfg.max_updates or stop)
        save_numbered(run)
        if run.stop_signal and not (stop or run.early_stop or run.step == cfg.max_updates):  # else: a normal end
            save_on_signal(run, saved=scheduled)
            return
        if stop:
            print0(f"| time budget of {cfg.max_minutes} minutes reached at step {run.step}")
            break
        if run.early_stop:
            break
    print0(f"| done at step {run.step}; best mean valid loss {run.best_valid:.4f}")
    write_hparams(run)


HPARAM_KEYS = ("weighting.method", "sampling.temperature", "sampling.langs_per_batch", "train.lr", "train.max_tokens",
               "train.max_updates", "train.warmup_updates", "train.seed", "model.embed_dim", "model.encoder_layers",
               "model.decoder_layers", "model.norm", "model.prenorm", "experts.modules")
"""Settings always in the TensorBoard hparams table; every other setting appears when it
differs from its default."""
HPARAM_METRICS = ("hparams/valid_loss", "hparams/best_valid_loss", "hparams/dev_bleu", "hparams/dev_chrf",
                  "hparams/test_bleu", "hparams/test_chrf")
"""The hparams table's metric columns: the final validation (dev loss; BLEU / chrF++ when
eval.valid_every translates), and the test scores `evaluate` adds when it scores a
checkpoint of the run on the whole test split."""


def hparam_values(run: Run) -> dict:
    """{section.key: value} for the hparams table (scalars; lists and None as text), plus
    the world size and accumulation steps."""
    default = Config().to_dict()
    values = {}
    for section, fields in run.cfg.to_dict().items():
        for key, value in fields.items():
            name = f"{section}.{key}"
            if name in HPARAM_KEYS or value != default[section][key]:
                values[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    values.update({"world_size": run.world, "gradient_accumulation_steps": run.gas})
    return values


def write_hparams(run: Run) -> None:
    """Rank 0, at the end of training, when the TensorBoard monitor is on: the settings
    and the final dev scores in TensorBoard's HPARAMS tab (one session per run folder)."""
    writer = getattr(getattr(run.monitor, "tb_monitor", None), "summary_writer", None)
    if writer is None or run.rank != 0:
        return
    from torch.utils.tensorboard.summary import hparams

    last = run.last_valid or {}
    metrics = {"hparams/valid_loss": last.get("mean_loss"), "hparams/best_valid_loss": run.best_valid,
               "hparams/dev_bleu": last.get("bleu"), "hparams/dev_chrf": last.get("chrf")}
    metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    exp, ssi, sei = hparams(hparam_values(run), {k: 0.0 for k in HPARAM_METRICS})
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)
    write_events(run, [(k, v, run.step) for k, v in metrics.items()])


def train(cfg: Config, ds_config_path: str) -> Run:
    """The whole run; run.requeue tells the caller it stopped on SIGTERM/SIGUSR1 (exit
    with preempt.REQUEUE_EXIT)."""
    preempt.install()  # before setup: a signal during start-up is honoured after the first update
    run = None
    try:
        try:
            run = setup(cfg, ds_config_path)
            seed_dropout(cfg.train.seed, run.rank)
            run.t_start = time.time()
            resume(run, inverse_sqrt(cfg.train))
            run.first_step = run.step
            run.t_start = run.t_log = time.time()
            fit(run)
        finally:  # done, stopped by a signal, or an error every rank raised outside a collective
            close_tensorboard(run)
            shutdown_distributed()
        if run.rank == 0 and not run.requeue:
            write_best_model(cfg.train.save_dir)  # still under the save_dir lock
    finally:
        release()  # <save_dir>/train.lock (rank 0)
    return run


def close_tensorboard(run: Optional[Run]) -> None:
    """Rank 0: write out and close the TensorBoard event file DeepSpeed's monitor holds open
    (launched ranks leave without the interpreter's teardown: cats_ds/runtime/rank_exit.py)."""
    writer = getattr(getattr(getattr(run, "monitor", None), "tb_monitor", None), "summary_writer", None)
    if writer is not None:
        writer.close()


def shutdown_distributed() -> None:
    """Destroy the process group (and DeepSpeed's references to its groups) while the
    interpreter is fully alive. Left to interpreter shutdown, gloo's worker threads were
    torn down in whatever order exit chose, and now and then a rank ended in "terminate
    called without an active exception" (SIGABRT; the launcher exits 250) instead of its
    own exit status: seen once in 14 runs of a 2-rank start that refused a damaged
    checkpoint (pytorch/pytorch#190489 reports the same for a missing destroy). That made it
    rarer, not impossible (two finished 2-rank trainings of one CI run still aborted after
    it): launched processes now also leave without the teardown (runtime/rank_exit.py)."""
    import deepspeed.comm as ds_dist

    if ds_dist.is_initialized():
        ds_dist.destroy_process_group()

