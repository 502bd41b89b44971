"""Load a training checkpoint for inference on one process, without a DeepSpeed engine.

A checkpoint folder (`<save_dir>/best/` or `<save_dir>/latest/`, written by train.py) holds
  cats_ds.json                          resolved config, languages, manifest fingerprint, vocab size, step
  mp_rank_00_model_states.pt            DeepSpeed model states; 'module' = the model's state dict
                                        (ZeRO-3: zero_pp_rank_*_mp_rank_00_model_states.pt, with
                                        placeholders instead of weights)
  layer_*_expert_*_mp_rank_00_model_states.pt
                                        family-expert models only: DeepSpeed MoE writes each expert's
                                        parameters to its own file (keys use GLOBAL expert ids)
  zero_pp_rank_*_optim_states.pt        optimizer partitions (ZeRO-3: the only copy of the weights)

Trust: every file this module reads is opened with torch.load(weights_only=True), which
unpickles tensors and plain containers only, so a crafted file cannot run code here (it is
refused with CheckpointError naming it). ZeRO-3 weights are rebuilt by DeepSpeed's
zero_to_fp32, which unpickles without that restriction: each file it reads is first
checked here with weights_only=True (optimizer files: allowing, by name, the few plain
DeepSpeed classes they hold, `optimizer_state_classes`). A damaged (e.g. truncated) file is reported by name
with what to do, not as a raw PyTorch traceback.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from cats_ds.config import Config, ConfigError
from cats_ds.data.manifest import Manifest, Vocab
from cats_ds.model.build import model_from_config
from cats_ds.model.transformer import Transformer
from cats_ds.train import CHECKPOINT_META, load_config_from_checkpoint

MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_STATES = "layer_*_expert_*_mp_rank_00_model_states.pt"
ZERO3_STATES = "zero_pp_rank_*_mp_rank_00_optim_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_*_mp_rank_00_model_states.pt"


class CheckpointError(Exception):
    """The checkpoint cannot be used as it is; the message names the file and the mismatch."""


def read_meta(path: str | Path) -> dict:
    """The checkpoint's cats_ds.json, or FileNotFoundError naming the folder."""
    meta_path = Path(path) / CHECKPOINT_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {CHECKPOINT_META} inside)")
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON: {e}") from None


def optimizer_state_classes() -> list:
    """The plain data classes DeepSpeed pickles into its optimizer-state files (an enum,
    the loss scalers, a named tuple): allowed, by name, when checking those files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_states(path: str | Path, allow: tuple = ()) -> dict:
    """torch.load(path, weights_only=True) on the CPU; CheckpointError naming the file when
    it is damaged (truncated, not a torch file) or holds objects other than tensors, plain
    containers and the classes in `allow` (a pickle that could run code when loaded:
    refused, nothing runs)."""
    path = Path(path)
    use_another = "use another checkpoint (best/, latest/ or an older step_N/) or copy this one again"
    try:
        with torch.serialization.safe_globals(list(allow)):
            states = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" not in text:
            raise CheckpointError(f"{path}: damaged, cannot be unpickled ({text[:200]}); {use_another}") from None
        found = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
        raise CheckpointError(
            f"{path}: refused, not loaded: it holds objects other than tensors and plain containers "
            f"({found.split('. Please')[0] or 'a disallowed pickle global'}), which could run code when "
            f"unpickled. cats_ds loads checkpoints with torch.load(weights_only=True); the files it writes "
            f"never need more. Do not use this file unless you know where it came from; {use_another}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated zip, empty file, not a torch file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". This is")[0]
        raise CheckpointError(f"{path}: damaged or truncated ({path.stat().st_size} bytes), cannot be read: "
                              f"{first[:200]}; {use_another}") from None
    if not isinstance(states, dict):
        raise CheckpointError(f"{path}: expected a dict of states, found {type(states).__name__}")
    return states


def gather_state_dict(path: str | Path, meta: dict) -> dict[str, torch.Tensor]:
    """The model's complete state dict from a DeepSpeed checkpoint folder.

    - ZeRO-3 (`zero_stage` 3 in cats_ds.json): the model states hold empty placeholders;
      the fp32 weights are rebuilt from the optimizer partitions (DeepSpeed's zero_to_fp32).
    - otherwise: 'module' of mp_rank_00_model_states.pt.
    - family experts: DeepSpeed's MoE checkpointing removes expert parameters from
      'module' and writes them to layer_{moe layer}_expert_{global id}_... files, keyed
      by their full parameter names with the GLOBAL expert id. On one process every
      expert is local (local id == global id), so merging the files restores the dict.
    """
    path = Path(path)
    main = path / MODEL_STATES
    if meta.get("zero_stage") == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if not list(path.glob(ZERO3_STATES)):
            raise FileNotFoundError(f"no {ZERO3_STATES} in {path}: a ZeRO-3 checkpoint keeps its weights there")
        for f in sorted(path.glob(ZERO3_MODEL_STATES)):  # zero_to_fp32 unpickles them unrestricted:
            load_states(f)                                 # check each file first
        for f in sorted(path.glob(ZERO3_STATES)):
            load_states(f, allow=tuple(optimizer_state_classes()))
        state = dict(get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name))
    else:
        if not main.is_file():
            raise FileNotFoundError(f"{main} not found: {path} has {CHECKPOINT_META} but no DeepSpeed model states")
        states = load_states(main)
        if not isinstance(states.get("module"), dict):
            raise CheckpointError(f"{main}: no 'module' state dict inside (keys: {list(states)[:10]})")
        state = dict(states["module"])
    for expert_file in sorted(path.glob(EXPERT_STATES)):
        part = load_states(expert_file)
        clash = sorted(part.keys() & state.keys())
        if clash:
            raise CheckpointError(f"{expert_file}: parameters already loaded from another file: {clash[:5]}")
        state.update(part)
    return state


def fill_tied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the missing names of tied parameters (the shared embedding is both `embed` and
    `dec_embed`): zero_to_fp32 writes each parameter under one name only."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for aliases in names.values():
        present = [n for n in aliases if n in state]
        if present:
            for n in aliases:
                state.setdefault(n, state[present[0]])
    return state


def build_for_checkpoint(cfg: Config, vocab_size: int, languages: list[str], path: str | Path) -> Transformer:
    """The model a checkpoint's config describes, on one process: family experts are all
    local (ep_size 1), so local expert ids are the global ids of the expert files."""
    try:
        return model_from_config(cfg, vocab_size, languages, ep_size=1)
    except ConfigError as e:  # e.g. the family map the run used is gone or changed
        raise CheckpointError(f"{path}: cannot rebuild the model its config describes: {e}") from None


def load_for_inference(path: str | Path, device: str | torch.device = "cpu"
                       ) -> tuple[Config, Transformer, Manifest, Vocab, list[str]]:
    """(config, fp32 model in eval mode, manifest, vocab, training languages) of a checkpoint.

    The data folder is the checkpoint's `data.dir`; it must be the data the model was
    trained on (same manifest fingerprint and vocabulary size). Language index i in the
    model (expert routing) means languages[i], as in training.
    """
    meta = read_meta(path)
    cfg = load_config_from_checkpoint(path)
    try:
        manifest = Manifest.load(cfg.data.dir)
        vocab = Vocab(cfg.data.dir, manifest.languages)
    except ValueError as e:  # wrong manifest version, a language tag missing from spm.model
        raise CheckpointError(f"{path}: data.dir={cfg.data.dir} cannot be used: {e}") from None
    languages = list(meta["languages"])
    unknown = [lang for lang in languages if lang not in manifest.languages]
    if unknown:
        raise CheckpointError(f"{path}: checkpoint languages {', '.join(unknown)} are not in {cfg.data.dir} "
                              f"(which has {', '.join(manifest.languages)})")
    if meta["vocab_size"] != len(vocab) or meta["manifest_fingerprint"] != manifest.fingerprint:
        raise CheckpointError(f"{path}: checkpoint was trained on data with vocab {meta['vocab_size']} / fingerprint "
                              f"{meta['manifest_fingerprint'][:12]}, but data.dir={cfg.data.dir} has vocab "
                              f"{len(vocab)} / fingerprint {manifest.fingerprint[:12]}")

    model = build_for_checkpoint(cfg, len(vocab), languages, path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in gather_state_dict(path, meta).items()}
    try:
        model.load_state_dict(fill_tied(model, state), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the saved weights do not fit the model its config describes: {e}") from None
    return cfg, model.float().to(device).eval(), manifest, vocab, languages
