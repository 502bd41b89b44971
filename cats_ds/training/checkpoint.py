"""Checkpoints on training's side: atomic saves, interrupted-save recovery, the save_dir
checks, resume checks and resuming on another world size (DeepSpeed universal
checkpoints). The folder format, and loading a checkpoint without a DeepSpeed engine,
are cats_ds/checkpoints.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.distributed as dist

from cats_ds.checkpoints import (CHECKPOINT_META, STEP_PREFIX, CheckpointError, load_states, numbered_checkpoints,
                                 optimizer_state_classes, read_meta)
from cats_ds.config import METHODS, Config, micro_step_tokens, upgrade_legacy
from cats_ds.runtime.output import print0
from cats_ds.training.state import client_state, read_client_state, rng_state, set_rng_state
from cats_ds.training.validation import mean_score

if TYPE_CHECKING:
    from cats_ds.training.loop import Run




def save_checkpoint(run: Run, name: str, valid_loss: Optional[float], scores: Optional[dict] = None) -> None:
    """Write <save_dir>/<name>/ atomically: DeepSpeed writes <name>.tmp, then rank 0 swaps.
    `scores`: the dev BLEU / chrF++ of this step, if measured (kept in cats_ds.json).

    A write that fails on any rank (no space left, a read-only or vanished folder, a quota)
    does not end that rank inside DeepSpeed's save, whose barriers the others wait in: it is
    recorded (`_guard_writes`), the ranks agree after the save, rank 0 removes the partial
    <name>.tmp, and every rank raises CheckpointError naming the folder, the file and the
    cause. <name>/ keeps its previous contents."""
    save_dir = Path(run.cfg.train.save_dir)
    tmp = f"{name}.tmp"
    failures = _guard_writes(run.engine)
    failures.clear()
    client = client_state(run)
    try:
        run.engine.save_checkpoint(str(save_dir), tag=tmp, client_state=client, save_latest=False)
    except (OSError, RuntimeError) as e:  # a write _guard_writes does not cover (another DeepSpeed version)
        failures.append((save_dir / tmp, e))
    if not failures:
        rng_path = save_dir / tmp / f"rng_rank{run.rank}.pt"
        try:
            torch.save(rng_state(), rng_path)
        except (OSError, RuntimeError) as e:
            failures.append((rng_path, e))
    _agree_on_save(run, save_dir, name, failures)  # (every rank's files are written: the barrier)
    if run.rank == 0:
        # written once every rank has written its files: a .tmp with cats_ds.json is complete
        meta = {"step": run.step, "valid_loss": valid_loss, "config": run.cfg.to_dict(),
                "languages": run.languages, "manifest_fingerprint": run.manifest.fingerprint,
                "vocab_size": len(run.vocab), "world_size": run.world,
                "zero_stage": run.engine.zero_optimization_stage(), "elapsed_s": client["train"]["elapsed"]}
        if scores is not None:
            meta["valid_scores"] = {"bleu": mean_score(scores, "bleu"), "chrf": mean_score(scores, "chrf"),
                                    "languages": scores, "beam": run.cfg.eval.valid_beam,
                                    "sentences": run.cfg.eval.valid_sentences}
        meta_tmp = save_dir / tmp / f"{CHECKPOINT_META}.tmp"
        try:
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
        except OSError as e:  # a complete .tmp stays for recover_interrupted_saves
            failures.append((Path(e.filename) if e.filename else save_dir / tmp, e))
    _agree_on_save(run, save_dir, name, failures)
    if name != "best":
        note_saved(run, save_dir / name, validated=valid_loss is not None)


def note_saved(run: Run, path: Path, validated: bool) -> None:
    """Keep run.last_good, the checkpoint a NaN stop names to resume from: one saved after
    a validation is good now; one saved without (step_<n>/, latest/ on a signal) holds the
    weights after update n, whose loss nobody computed yet: it becomes last_good when
    update n+1's loss is finite on every rank (train.py check_finite_update)."""
    where = f"{path} (step {run.step})"
    if validated:
        run.last_good, run.good_step = where, run.step
    elif run.step > run.good_step:  # (step_<n>/ at a validated step: latest/ is the same weights)
        run.unconfirmed = where


def _guard_writes(engine) -> list:
    """The list a failed checkpoint write of `engine` is recorded in, as (path, exception),
    instead of raising in the middle of DeepSpeed's save_checkpoint: a rank that left it
    there would leave the others waiting in its barriers. Guards the writes DeepSpeed makes
    there: its checkpoint engine's save (torch.save of each states file) and makedirs, and
    the copy of zero_to_fp32.py into save_dir. Installed once per engine."""
    failures = getattr(engine, "_cats_save_failures", None)
    if failures is not None:
        return failures
    failures = []

    def guard(write, path_arg: int):
        def guarded(*args, **kwargs):
            try:
                return write(*args, **kwargs)
            except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
                path = kwargs.get("path", args[path_arg] if len(args) > path_arg else "?")
                failures.append((Path(path), e))
        return guarded

    ckpt_engine = engine.checkpoint_engine
    ckpt_engine.save = guard(ckpt_engine.save, 1)  # save(state_dict, path)
    ckpt_engine.makedirs = guard(ckpt_engine.makedirs, 0)
    if hasattr(engine, "_copy_recovery_script"):
        engine._copy_recovery_script = guard(engine._copy_recovery_script, 0)
    engine._cats_save_failures = failures
    return failures


def write_failure_cause(folder: Path, error: Exception) -> str:
    """Why a write into `folder` failed, in words: the OS error (e.g. "No space left on
    device"). torch.save reports only "PytorchStreamWriter failed writing file ...", so then
    a 1 MiB probe file is written into the folder to learn the OS error."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    probe = folder / f".cats_ds_write_probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            for _ in range(16):
                f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.strerror or text
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return text


def free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2 ** 20:.1f} MiB free there now"
    except OSError:
        return "free space unknown"


def _agree_on_save(run: Run, save_dir: Path, name: str, failures: list) -> None:
    """All ranks: share whether a write of this save failed on some rank (one all_reduce of
    a flag, also the barrier between the phases of the save) and, if so, why (one
    all_gather). On a failure rank 0 removes the partial <name>.tmp, and every rank raises
    CheckpointError."""
    if not any_rank(bool(failures), run.world, run.device):
        return
    mine = ""
    if failures:
        path, error = failures[0]
        folder = next((p for p in (path.parent, save_dir / f"{name}.tmp", save_dir) if p.is_dir()), save_dir)
        mine = (f"rank {run.rank} could not write {path}: {write_failure_cause(folder, error)} "
                f"({free_space(folder)})")
    reports = [r for r in gather_reports(mine, run.world) if r]
    tmp, final = save_dir / f"{name}.tmp", save_dir / name
    if run.rank == 0 and tmp.exists() and not _complete(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    if run.world > 1:
        dist.barrier()  # the partial folder is gone before any rank exits (the launcher then stops the rest)
    kept = (f"{final} keeps its previous contents (step {read_meta(final)['step']})" if _complete(final)
            else f"there is no previous {final}")
    partial = f"the partial {tmp} was removed" if not tmp.exists() else f"{tmp} is kept for the next start to finish"
    causes = "; ".join(([mine] if mine else []) + [r for r in reports if r != mine])  # this rank's first
    raise CheckpointError(f"saving {final} at step {run.step} failed: {causes}. {kept}; {partial}. Free space in "
                          f"train.save_dir={save_dir} (or choose another train.save_dir, copying the checkpoints "
                          f"over), then resume: train.resume=auto continues from the last good checkpoint, "
                          f"{run.last_good}")


def any_rank(flag: bool, world: int, device=None) -> bool:
    """Whether `flag` is set on some rank (one all_reduce, MAX; a barrier too)."""
    t = torch.tensor([float(flag)])
    if world > 1:
        if device is None:
            from deepspeed.accelerator import get_accelerator

            device = torch.device(get_accelerator().device_name())
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


def gather_reports(mine: str, world: int) -> list[str]:
    """Every rank's `mine` (error path only: one all_gather_object)."""
    if world == 1:
        return [mine]
    reports = [""] * world
    dist.all_gather_object(reports, mine)
    return reports


def check_save_dir(save_dir: str | Path, rank: int, world: int) -> None:
    """At start-up, before any data is loaded or the engine built: train.save_dir must be
    (or be creatable as) a folder every rank can write a file into. CheckpointError naming
    the folder and the cause on every rank otherwise (a file, a folder under a file, a
    read-only file system, no permission, no space)."""
    save_dir = Path(save_dir)
    problem = ""
    blocker = next((p for p in [save_dir, *save_dir.parents] if p.exists() and not p.is_dir()), None)
    if blocker == save_dir:
        problem = f"train.save_dir={save_dir} is a file, not a folder"
    elif blocker is not None:
        problem = f"train.save_dir={save_dir} cannot be created: {blocker} is a file, not a folder"
    else:
        probe = save_dir / f".cats_ds_write_test.{socket.gethostname()}.{os.getpid()}"
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"cats_ds checks that train.save_dir is writable\n")
        except OSError as e:
            where = f" ({e.filename})" if e.filename and Path(e.filename) != probe else ""
            problem = f"train.save_dir={save_dir} is not writable by rank {rank}: {e.strerror}{where}"
        finally:
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass
    if any_rank(bool(problem), world):
        others = [r for r in gather_reports(problem, world) if r and r != problem]
        raise CheckpointError((problem or others[0]) + ". Choose another train.save_dir (or make this one a "
                              "writable folder); checkpoints, logs and evaluation outputs go there")


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


CHECKPOINT_NAMES = ("latest", "best")

RESUME_MAY_CHANGE = ("data.", "eval.", "analysis.", "experts.ep_size", "train.save_dir", "train.max_updates",
                     "train.max_minutes", "train.log_every", "train.valid_every", "train.resume", "train.overwrite",
                     "train.tensorboard", "train.host_malloc", "train.lr", "train.warmup_updates",
                     "train.warmup_init_lr", "train.max_nonfinite", "train.save_every", "train.keep_last", "train.patience")
"""Config keys (or section prefixes) a resumed run may change. data.* is checked through
the manifest fingerprint and the language list, experts.ep_size by its own message,
train.lr and the warmup are applied to the restored schedule (`apply_lr_schedule`);
the settings the run's weighting method never reads may change too (`unused_by_method`).
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
            done.append(f"{final} <- {tmp.name} (step {read_meta(final)['step']}; a save was "
                        f"interrupted after writing it)")
        elif not final.exists() and _complete(old):
            os.replace(old, final)
            done.append(f"{final} <- {old.name} (step {read_meta(final)['step']}; a save was "
                        f"interrupted before writing {tmp.name})")
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
    for leftover in save_dir.glob(f"{STEP_PREFIX}*.tmp"):  # a numbered save cut short: the previous ones stand
        shutil.rmtree(leftover)
    return done


RUN_OUTPUTS = ("train_log.jsonl", "analysis.jsonl", "tensorboard", "eval", "analysis")
"""What a run and the tools run on its checkpoints write into train.save_dir beside the
checkpoints: logs, TensorBoard events (the default path), evaluate's and analyze's
default output folders."""


def prepare_save_dir(cfg: Config, rank: int) -> None:
    """Before a run writes into train.save_dir: recover interrupted saves, and refuse to
    start from step 0 over existing checkpoints unless train.overwrite=true (which then
    deletes them and RUN_OUTPUTS, so nothing of the old run is mixed in: no old scores in
    eval/, no old curves in TensorBoard)."""
    save_dir = Path(cfg.train.save_dir)  # checked by check_save_dir before the lock was taken
    if rank == 0 and save_dir.is_dir():
        for line in recover_interrupted_saves(save_dir):
            print0(f"| recovered {line}")
    dist.barrier()
    r = cfg.train.resume
    fresh = r == "none" or (r == "auto" and not _complete(save_dir / "latest"))
    existing = [save_dir / n for n in CHECKPOINT_NAMES if _complete(save_dir / n)] + numbered_checkpoints(save_dir)
    if not fresh or not existing:
        return
    found = ", ".join(f"{p} (step {read_meta(p)['step']})" for p in existing)
    if not cfg.train.overwrite:
        raise CheckpointError(f"train.save_dir={save_dir} already holds checkpoints: {found}; train.resume={r} would "
                         f"start from step 0 and replace them. Set train.overwrite=true to replace them, "
                         f"train.resume=auto to continue, or choose another train.save_dir")
    if rank == 0:
        for p in existing:
            shutil.rmtree(p)
        derived = [save_dir / n for n in RUN_OUTPUTS if (save_dir / n).exists()]
        for p in derived:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        print0(f"| train.overwrite=true: deleted {found}" + "".join(f", {p.name}" for p in derived))
    dist.barrier()


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unused_by_method(config: dict) -> tuple[str, ...]:
    """Keys and sections (ending in '.') that the run's weighting.method never reads, so a
    resumed run may change them (a changed weighting.method itself is refused): a temperature
    run reads no method section, no grads.* and of meta.* only meta.every, when
    sampling.draws_at_meta_steps is on; a Gram method reads meta.*, grads.* and its own section."""
    method = config.get("weighting", {}).get("method")
    if method not in METHODS:
        return ()
    sections = tuple(name for name in METHODS if isinstance(config.get(name), dict))
    if not METHODS[method].gram:
        draws = config.get("sampling", {}).get("draws_at_meta_steps")
        meta = tuple(f"meta.{key}" for key in config.get("meta", {}) if draws is not True or key != "every")
        return tuple(f"{name}." for name in sections) + ("grads.",) + meta
    return tuple(f"{name}." for name in sections if name != method)


def changed_settings(saved: dict, current: dict, also: tuple = ()) -> list[str]:
    """Keys (outside RESUME_MAY_CHANGE and `also`) whose value differs between the config a
    checkpoint was trained with and this run's, as "key: old -> new". Keys only one side
    knows (a checkpoint from an older version) are not compared; old spellings of a value
    (config.LEGACY_VALUES, e.g. cats.loss_term: true) compare as their new one."""
    old, new = _flatten(upgrade_legacy(saved)), _flatten(current)
    free = RESUME_MAY_CHANGE + tuple(also) + unused_by_method(current)
    diffs = []
    for key in sorted(old.keys() & new.keys()):
        if key in free or any(key.startswith(k) for k in free if k.endswith(".")):
            continue
        if json.dumps(old[key]) != json.dumps(new[key]):
            diffs.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return diffs


def apply_lr_schedule(run: Run, factor: Callable[[int], float]) -> None:
    """After DeepSpeed restored the LambdaLR state (its base_lrs hold the OLD train.lr;
    the lambda is this run's, since a plain function is not saved), put this run's train.lr
    and warmup (`factor`: the multiplier on train.lr at a step) in force from the restored step on."""
    sched = run.engine.lr_scheduler
    groups = sched.optimizer.param_groups
    sched.lr_lambdas = [factor] * len(groups)
    sched.base_lrs = [run.cfg.train.lr] * len(groups)
    lr = run.cfg.train.lr * factor(sched.last_epoch)
    for group in groups:
        group["initial_lr"] = run.cfg.train.lr
        group["lr"] = lr
    sched._last_lr = [lr] * len(groups)


def unreadable_files(folder: Path) -> list[str]:
    """The .pt files of a checkpoint that cannot be read, each with the reason (error path
    only: DeepSpeed's load failed and its error does not name the file). Every file is opened
    with weights_only=True (load_states; optimizer files may hold `optimizer_state_classes`),
    so diagnosing a damaged folder never runs code a crafted file carries: such a file is
    listed as refused, next to the damaged ones."""
    bad = []
    allow = tuple(optimizer_state_classes())
    for f in sorted(folder.glob("*.pt")):
        try:
            load_states(f, allow=allow)
        except CheckpointError as e:
            bad.append(str(e).split("; use another checkpoint")[0])
        except Exception as e:  # anything else torch raises on a damaged file
            bad.append(f"{f}: cannot be read ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
    return bad


def resume(run: Run, lr_factor: Callable[[int], float]) -> None:
    """Continue from train.resume: DeepSpeed state, client state (step, sampler, weighting,
    best/patience bookkeeping) and per-rank RNG; this run's lr schedule (`lr_factor`, see
    apply_lr_schedule) from the restored step on. On another world size (ZeRO-1/2 through a
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
        raise CheckpointError(f"train.resume={r}: no checkpoint at {path} (expected {CHECKPOINT_META} inside)")
    try:
        meta = read_meta(path)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / CHECKPOINT_META}: not valid JSON ({e}); resume from another checkpoint "
                         f"(train.resume=<path>)") from None
    if meta["vocab_size"] != len(run.vocab) or meta["manifest_fingerprint"] != run.manifest.fingerprint:
        raise CheckpointError(f"{path}: checkpoint was trained on data with vocab {meta['vocab_size']} / fingerprint "
                         f"{meta['manifest_fingerprint'][:12]}, but {run.cfg.data.dir} has vocab {len(run.vocab)} / "
                         f"{run.manifest.fingerprint[:12]}")
    if meta["languages"] != run.languages:
        raise CheckpointError(f"{path}: checkpoint languages {meta['languages']} != configured {run.languages}")
    saved_ep = meta["config"]["experts"]["ep_size"]
    if run.cfg.experts.modules and saved_ep != run.cfg.experts.ep_size:
        raise CheckpointError(f"{path}: checkpoint has experts.ep_size={saved_ep}, this run "
                         f"experts.ep_size={run.cfg.experts.ep_size}; resume with the same ep_size")
    same_world = meta["world_size"] == run.world
    # on another world size train.max_tokens may change so that the sampler's global batch stays the same
    keeps_batch = micro_step_tokens(meta["config"], meta["world_size"]) == micro_step_tokens(run.cfg, run.world)
    diffs = changed_settings(meta["config"], run.cfg.to_dict(), () if same_world or not keeps_batch
                             else ("train.max_tokens",))
    if diffs:
        raise CheckpointError(f"{path}: this run changes settings the checkpoint was trained with: {'; '.join(diffs)}. "
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
            set_rng_state(torch.load(rng_file, weights_only=True))  # tensors, ints, tuples: no pickle code runs
        except Exception as e:  # truncated, overwritten or not an RNG file at all
            failure = (f"{rng_file}: damaged RNG state ({type(e).__name__}: {e}); delete the file to resume with "
                       f"reseeded dropout, or resume from another checkpoint")
    # each rank reads its own files: the others must not train on without them
    failed = torch.tensor([float(failure is not None)])
    if run.world > 1:
        failed = failed.to(run.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failure is not None:
        raise CheckpointError(failure)
    if failed.item() > 0:
        raise CheckpointError(f"{path}: another rank could not load its part of the checkpoint (its error names the "
                         f"file)")
    if universal and run.rank == 0:  # every rank has loaded it (the all_reduce above): used once
        shutil.rmtree(path.parent / f"{path.name}{UNIVERSAL_SUFFIX}")
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint at {path}")
    apply_lr_schedule(run, lr_factor)
    client = read_client_state(client)  # a checkpoint from before TrainState: its flat layout mapped
    run.state.load_state_dict(client["train"])
    try:
        run.sampler.load_state_dict(client["sampler"])
    except ValueError as e:
        if same_world:
            raise CheckpointError(f"{path}: {e}") from None
        saved_tokens = meta["config"]["train"]["max_tokens"]
        total = micro_step_tokens(meta["config"], meta["world_size"])
        hint = (f"resume with train.max_tokens={total // run.world}" if total % run.world == 0 else
                f"no train.max_tokens gives it on {run.world} ranks; resume on a number of ranks that divides {total}")
        raise CheckpointError(f"{path}: the world size changed ({meta['world_size']} -> {run.world} ranks) and with it the "
                         f"global batch the sampler plans (train.max_tokens x world size: {saved_tokens} x "
                         f"{meta['world_size']} = {total} tokens, now {run.cfg.train.max_tokens} x {run.world} = "
                         f"{micro_step_tokens(run.cfg, run.world)}): {hint}, so the run continues with the same "
                         f"batches") from None
    if run.dev_sampler is not None and client["dev_sampler"]:
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
        meta = read_meta(path)
    except (json.JSONDecodeError, OSError):
        return False  # resume() names the damaged file
    saved, stage = meta.get("world_size"), meta.get("zero_stage", 0)
    if saved == world or not stage:
        return False  # same world, or ZeRO-0: the full optimizer state is in the model-state file
    where = f"{path} was saved by {saved} ranks with ZeRO-{stage}; this run has {world}"
    if meta["config"]["experts"]["modules"]:
        raise CheckpointError(f"{where}. Checkpoints with family experts (experts.modules="
                         f"{meta['config']['experts']['modules']}) resume only on the world size they were saved "
                         f"with: DeepSpeed's universal checkpoints do not reshard MoE expert parameters. Supported on "
                         f"another world size: dense models with ZeRO-0, 1 or 2; resume with {saved} ranks")
    if stage == 3:
        raise CheckpointError(f"{where}. ZeRO-3 checkpoints resume only on the world size they were saved with "
                         f"(supported on another world size: ZeRO-0, 1 or 2); resume with {saved} ranks")
    current = (ds.get("zero_optimization") or {}).get("stage", 0)
    if current not in (1, 2):
        raise CheckpointError(f"{where}, and a DeepSpeed JSON with ZeRO stage {current}: a ZeRO-{stage} checkpoint "
                         f"resumes on another world size through a universal checkpoint, which loads into ZeRO "
                         f"stage 1 or 2 only; use such a JSON")
    return True


def to_universal(run: Run, path: Path, saved_world: int) -> Path:
    """Convert the ZeRO-1/2 checkpoint `path` (saved on saved_world ranks) into a DeepSpeed
    universal checkpoint <path>.universal/ (deepspeed.checkpoint.ds_to_universal: every
    parameter's fp32 weights and Adam moments, whole, under zero/<name>/), which any world
    size loads with `checkpoint.load_universal`. Rank 0 converts, the others wait;
    resume() deletes the folder once every rank has loaded it."""
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
        raise CheckpointError(flag[0] if run.rank == 0 else f"{path}: rank 0 could not convert the checkpoint")
    return out
