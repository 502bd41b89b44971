"""Checkpoint averaging (fairseq's average_checkpoints): the elementwise mean of the model
weights of several checkpoints of one run, written as a checkpoint `evaluate`, `export`
and `analyze` load.

    python launch/average.py --last 5 --save-dir runs/gettext8 --out runs/gettext8/avg5
    python launch/average.py --inputs runs/gettext8/step_900 runs/gettext8/step_1000 --out runs/gettext8/avg2

Each input's consolidated weights come from checkpoint.gather_state_dict: ZeRO-0/1/2
model states, ZeRO-3 partitions (zero_to_fp32), and family-expert parameters from
DeepSpeed MoE's per-expert files (keyed by global expert id, so expert e of one checkpoint
is averaged with expert e of the others). Sums are taken in float64, the mean is stored
in float32. Inputs may also be model folders (cats_ds/inference/model_folder.py). The output folder
holds
  mp_rank_00_model_states.pt   {"module": averaged state dict} (expert parameters included;
                               the tied embedding once, as `embed.weight`)
  cats_ds.json                 the newest input's metadata; step = its step, zero_stage 0,
                               world_size 1, averaged_from = the inputs and their steps
or, when the first input is a model folder, a model folder (model.safetensors, config.json
with averaged_from, spm.model, README.md). It is for inference: it has no optimizer state,
so training cannot resume from it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from cats_ds.checkpoints import (CHECKPOINT_META, MODEL_STATES, SPM, CheckpointError, build_for_checkpoint, fill_tied,
                                 gather_state_dict, numbered_checkpoints, read_meta)
from cats_ds.config import config_from_dict
from cats_ds.inference.model_folder import untied_state, write_model_folder

MUST_MATCH = ("languages", "vocab_size", "manifest_fingerprint")


class AverageError(Exception):
    """The checkpoints cannot be averaged as asked; the message names the checkpoint and key."""


def last_checkpoints(save_dir: str | Path, n: int) -> list[Path]:
    """The newest n step_<n>/ checkpoints of a run (train.save_every writes them)."""
    if n < 1:
        raise AverageError(f"--last must be >= 1, got {n}")
    found = numbered_checkpoints(save_dir)
    if len(found) < n:
        raise AverageError(f"--last {n}: {save_dir} has {len(found)} numbered checkpoints "
                           f"({', '.join(p.name for p in found) or 'none'}); train with train.save_every=N "
                           f"(and train.keep_last >= {n}) to write step_<n>/ checkpoints")
    return found[-n:]


def _check_compatible(paths: list[Path], metas: list[dict]) -> None:
    ref, ref_meta = paths[0], metas[0]
    for path, meta in zip(paths[1:], metas[1:]):
        for key in MUST_MATCH:
            if meta.get(key) != ref_meta.get(key):
                raise AverageError(f"{path}: {key} differs from {ref} ({meta.get(key)!r} vs {ref_meta.get(key)!r}); "
                                   f"only checkpoints of one run (same data and model) can be averaged")
        for section in ("model", "experts"):
            a, b = ref_meta["config"][section], meta["config"][section]
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            if section == "experts":
                diff = [k for k in diff if k != "ep_size"]  # expert files use global ids: any ep_size averages
            if diff:
                raise AverageError(f"{path}: {section}.{diff[0]}={b.get(diff[0])!r} but {ref} has "
                                   f"{a.get(diff[0])!r}; only checkpoints of the same model can be averaged")


def average_state_dicts(states: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """Elementwise mean (float64 sums, float32 result) of state dicts with the same keys
    and shapes; non-float entries must be equal. `names` label the inputs in errors."""
    keys = states[0].keys()
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != keys:
            extra = sorted(state.keys() ^ keys)
            raise AverageError(f"{name}: parameters differ from {names[0]}: {extra[:5]}")
    out = {}
    for k in keys:
        tensors = [s[k] for s in states]
        for t, name in zip(tensors[1:], names[1:]):
            if t.shape != tensors[0].shape:
                raise AverageError(f"{name}: {k} has shape {tuple(t.shape)}, {names[0]} {tuple(tensors[0].shape)}")
        if tensors[0].is_floating_point():
            total = torch.zeros(tensors[0].shape, dtype=torch.float64)
            for t in tensors:
                total += t.to(torch.float64)
            out[k] = (total / len(tensors)).to(torch.float32)
        else:
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise AverageError(f"{k}: a non-float tensor that differs between the checkpoints")
            out[k] = tensors[0].clone()
    return out


def average_checkpoints(inputs: list[str | Path], out: str | Path, force: bool = False) -> Path:
    """Average the model weights of `inputs` into the checkpoint folder `out` (see the
    module docstring); returns out."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise AverageError("give at least one checkpoint (--inputs DIR ... or --last N --save-dir DIR)")
    if len({p.resolve() for p in paths}) != len(paths):
        raise AverageError(f"a checkpoint is listed twice: {', '.join(map(str, paths))}")
    out = Path(out)
    if out.resolve() in {p.resolve() for p in paths}:
        raise AverageError(f"--out {out} is one of the inputs")
    if out.exists() and not force:
        raise AverageError(f"{out} exists; choose another --out or pass --force to replace it")
    metas = [read_meta(p) for p in paths]
    _check_compatible(paths, metas)
    cfg = config_from_dict(metas[0]["config"])
    model = build_for_checkpoint(cfg, metas[0]["vocab_size"], list(metas[0]["languages"]), paths[0], metas[0])
    # every input as a full state dict under every name the model uses (ZeRO-3 saves tied weights once)
    states = [fill_tied(model, gather_state_dict(p, m)) for p, m in zip(paths, metas)]
    avg = average_state_dicts(states, [str(p) for p in paths])
    missing = sorted(set(model.state_dict()) - set(avg))
    if missing:
        raise CheckpointError(f"{paths[0]}: the saved weights lack {missing[:5]}")

    newest = max(range(len(paths)), key=lambda i: (metas[i].get("step") or 0, i))
    meta = dict(metas[newest], step=metas[newest].get("step"), valid_loss=None, zero_stage=0, world_size=1,
                averaged_from=[{"checkpoint": str(p), "step": m.get("step")} for p, m in zip(paths, metas)])
    if metas[0].get("model_folder"):
        model.load_state_dict(avg, strict=True)
        meta.pop("model_folder")
        meta.pop("valid_scores", None)
        return write_model_folder(cfg, model, list(metas[0]["languages"]), paths[0] / SPM, out, meta,
                                  checkpoint=", ".join(map(str, paths)), force=True)
    avg = {k: v for k, v in avg.items() if k in untied_state(model)}  # the tied embedding once
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save({"module": avg}, tmp / MODEL_STATES)
    (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def average_main_impl(inputs: Optional[list[str]], last: Optional[int], save_dir: Optional[str], out: str,
                      force: bool) -> Path:
    """--inputs, or --last N --save-dir D: resolve the inputs, average, print what was done."""
    if inputs and (last or save_dir):
        raise AverageError("give either --inputs or --last N --save-dir DIR, not both")
    if not inputs:
        if not (last and save_dir):
            raise AverageError("give --inputs DIR ... or --last N --save-dir DIR")
        inputs = [str(p) for p in last_checkpoints(save_dir, last)]
    result = average_checkpoints(inputs, out, force=force)
    steps = [read_meta(p).get("step") for p in inputs]
    print(f"| averaged {len(inputs)} checkpoints (steps {', '.join(map(str, steps))}) -> {result}")
    return result
