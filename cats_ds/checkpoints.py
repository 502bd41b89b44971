"""The checkpoint folder formats, and loading them on one process without a DeepSpeed engine
(inference, averaging, export, analysis). Writing and resuming checkpoints is training's
(cats_ds/training/checkpoint.py); nothing here imports training.

A checkpoint folder (`<save_dir>/best/`, `<save_dir>/latest/`, `<save_dir>/step_<n>/`) holds
  cats_ds.json                          resolved config, languages, manifest fingerprint, vocab size, step
  mp_rank_00_model_states.pt            DeepSpeed model states; 'module' = the model's state dict
                                        (ZeRO-3: zero_pp_rank_*_mp_rank_00_model_states.pt, with
                                        placeholders instead of weights)
  layer_*_expert_*_mp_rank_00_model_states.pt
                                        family-expert models only: DeepSpeed MoE writes each expert's
                                        parameters to its own file (keys use GLOBAL expert ids)
  [bf16_]zero_pp_rank_*_optim_states.pt optimizer partitions (ZeRO-3: the only copy of the weights)
A model folder (written by cats_ds/inference/model_folder.py) holds config.json,
model.safetensors and spm.model; everything that loads a checkpoint loads it too.

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
from typing import Optional

import torch

from cats_ds.config import Config, ConfigError, config_from_dict
from cats_ds.data.manifest import SPM_PREFIX, Manifest, Vocab
from cats_ds.model.build import model_from_config
from cats_ds.model.transformer import Transformer

CHECKPOINT_META = "cats_ds.json"

MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_STATES = "layer_*_expert_*_mp_rank_00_model_states.pt"
ZERO3_STATES = "*zero_pp_rank_*_mp_rank_00_optim_states.pt"  # bf16 runs: bf16_zero_pp_rank_...
ZERO3_MODEL_STATES = "zero_pp_rank_*_mp_rank_00_model_states.pt"


class CheckpointError(Exception):
    """The checkpoint cannot be used as it is; the message names the file and the mismatch."""


# --------------------------------------------------------------------------- model folders

FORMAT = "cats_ds-model"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SPM = f"{SPM_PREFIX}.model"


class ModelFolderError(CheckpointError):
    """The folder cannot be written or read as a model folder; the message names the file."""


def is_model_folder(path: str | Path) -> bool:
    """Whether `path` holds a model folder's config.json (not, e.g., a CTranslate2 export's)."""
    config = Path(path) / CONFIG
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def read_config(path: str | Path) -> dict:
    """config.json of a model folder, checked for the keys loading needs."""
    file = Path(path) / CONFIG
    try:
        conf = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no model folder at {path} (expected {CONFIG} inside)") from None
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{file}: not valid JSON: {e}") from None
    if conf.get("format") != FORMAT:
        raise ModelFolderError(f"{file}: not a cats_ds model folder (format {conf.get('format')!r}, "
                               f"expected {FORMAT!r})")
    if conf.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFolderError(f"{file}: format_version {conf['format_version']} is newer than this cats_ds "
                               f"reads ({FORMAT_VERSION}); update cats_ds")
    missing = [k for k in ("model", "vocab_size", "languages", "training") if k not in conf]
    if missing:
        raise ModelFolderError(f"{file}: missing key(s) {', '.join(missing)}; export the model again")
    for name in (WEIGHTS, SPM):
        if not (Path(path) / name).is_file():
            raise ModelFolderError(f"{Path(path) / name} is missing: a model folder holds {CONFIG}, {WEIGHTS} and "
                                   f"{SPM}; copy the whole folder")
    return conf


def folder_meta(path: str | Path) -> dict:
    """A model folder described like a checkpoint's cats_ds.json (what read_meta returns),
    plus `model_folder: True`: the training config with config.json's model section."""
    conf = read_config(path)
    train = conf["training"]
    config = dict(train["config"], model=conf["model"])
    if conf.get("experts") is not None:
        config["experts"] = conf["experts"]
    config["eval"] = dict(config.get("eval", {}), **conf.get("eval", {}))
    return {"step": train.get("step"), "valid_loss": train.get("valid_loss"), "config": config,
            "languages": list(conf["languages"]), "manifest_fingerprint": train.get("manifest_fingerprint", ""),
            "vocab_size": conf["vocab_size"], "world_size": 1, "zero_stage": 0,
            "valid_scores": train.get("valid_scores"), "families": conf.get("families"),
            "model_folder": True}


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights in model.safetensors (tied tensors under one name; see fill_tied)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFolderError(f"{file}: damaged or not a safetensors file ({e}); copy the model folder again "
                               f"or export it again") from None


# --------------------------------------------------------------------------- checkpoint folders


def read_meta(path: str | Path) -> dict:
    """The checkpoint's cats_ds.json; for a model folder (below) the same
    keys from its config.json, with `model_folder: True`. FileNotFoundError naming the
    folder when it is neither."""
    meta_path = Path(path) / CHECKPOINT_META
    if not meta_path.is_file():
        if is_model_folder(path):
            return folder_meta(path)
        raise FileNotFoundError(f"no checkpoint at {path} (expected {CHECKPOINT_META} of a DeepSpeed checkpoint, "
                                f"or config.json + model.safetensors of a model folder, inside)")
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
    if meta.get("model_folder"):
        return load_state(path)
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


def build_for_checkpoint(cfg: Config, vocab_size: int, languages: list[str], path: str | Path,
                         meta: Optional[dict] = None) -> Transformer:
    """The model a checkpoint's config describes, on one process: family experts are all
    local (ep_size 1), so local expert ids are the global ids of the expert files. A model
    folder's meta carries its family assignment (no family-map file needed)."""
    families = None
    stored = (meta or {}).get("families")
    if stored:
        names = list(stored["names"])
        try:
            families = (names, [names.index(stored["of_language"][lang]) for lang in languages])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: config.json 'families' does not place every language "
                                  f"({e}); export the model folder again") from None
    try:
        return model_from_config(cfg, vocab_size, languages, ep_size=1, families=families)
    except ConfigError as e:  # e.g. the family map the run used is gone or changed
        raise CheckpointError(f"{path}: cannot rebuild the model its config describes: {e}") from None


def data_dir_for(path: str | Path, cfg: Config, data_dir: Optional[str | Path] = None) -> Path:
    """The prepared data folder of a checkpoint: `data_dir` (--data-dir) if given, else the
    data.dir it was trained with. CheckpointError with the fix when it is not there."""
    meta_file = Path(path) / (CHECKPOINT_META if (Path(path) / CHECKPOINT_META).is_file() else "config.json")
    chosen = Path(data_dir) if data_dir is not None else Path(cfg.data.dir)
    if not (chosen / "manifest.json").is_file():
        where = (f"--data-dir {chosen}" if data_dir is not None else
                 f"data.dir={cfg.data.dir} (from {meta_file}"
                 + (")" if chosen.is_absolute() else f", relative to the current directory {Path.cwd()})"))
        what = "does not exist" if not chosen.exists() else "has no manifest.json"
        raise CheckpointError(
            f"{path}: the prepared data folder {where} {what}. It is needed to score (and, for a DeepSpeed "
            f"checkpoint, for its spm.model). If the data moved or you run from another directory, pass "
            f"--data-dir <the prepared folder the model was trained on, with manifest.json and spm.model>; "
            f"a model folder (launch/export.py --format pytorch) translates without it")
    return chosen


def _checked_manifest(path: str | Path, meta: dict, data: Path, languages: list[str]) -> Manifest:
    try:
        manifest = Manifest.load(data)
    except ValueError as e:  # wrong manifest version
        raise CheckpointError(f"{path}: data folder {data} cannot be used: {e}") from None
    unknown = [lang for lang in languages if lang not in manifest.languages]
    if unknown:
        raise CheckpointError(f"{path}: checkpoint languages {', '.join(unknown)} are not in {data} "
                              f"(which has {', '.join(manifest.languages)}); pass --data-dir with the data "
                              f"the model was trained on")
    if meta["vocab_size"] != manifest.vocab_size or (meta.get("manifest_fingerprint")
                                                     and meta["manifest_fingerprint"] != manifest.fingerprint):
        raise CheckpointError(f"{path}: checkpoint was trained on data with vocab {meta['vocab_size']} / fingerprint "
                              f"{meta['manifest_fingerprint'][:12]}, but {data} has vocab "
                              f"{manifest.vocab_size} / fingerprint {manifest.fingerprint[:12]}; pass --data-dir "
                              f"with the data the model was trained on")
    return manifest


def _load_weights(path: str | Path, meta: dict, cfg: Config, vocab_size: int, languages: list[str],
                  device: str | torch.device) -> Transformer:
    model = build_for_checkpoint(cfg, vocab_size, languages, path, meta)
    state = {k: v.float() if v.is_floating_point() else v for k, v in gather_state_dict(path, meta).items()}
    try:
        model.load_state_dict(fill_tied(model, state), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the saved weights do not fit the model its config describes: {e}") from None
    return model.float().to(device).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu", data_dir: Optional[str | Path] = None
               ) -> tuple[Config, Transformer, Vocab, list[str], dict]:
    """(config, fp32 model in eval mode, vocab, training languages, meta) of a checkpoint
    or a model folder, for translating: a model folder needs nothing outside itself (its
    spm.model; `data_dir` is then only checked when given); a DeepSpeed checkpoint needs
    its data folder for spm.model (`data_dir`, default its data.dir)."""
    meta = read_meta(path)
    cfg = config_from_dict(meta["config"])
    languages = list(meta["languages"])
    if meta.get("model_folder"):
        if data_dir is not None:
            _checked_manifest(path, meta, data_dir_for(path, cfg, data_dir), languages)
            cfg.data.dir = str(data_dir)
        vocab_dir = Path(path)
    else:
        vocab_dir = data_dir_for(path, cfg, data_dir)
        _checked_manifest(path, meta, vocab_dir, languages)
        cfg.data.dir = str(vocab_dir)
    try:
        vocab = Vocab(vocab_dir, languages)
    except ValueError as e:  # a language tag missing from spm.model
        raise CheckpointError(f"{path}: {vocab_dir / 'spm.model'} cannot be used: {e}") from None
    if meta["vocab_size"] != len(vocab):
        raise CheckpointError(f"{path}: trained with vocab {meta['vocab_size']}, but {vocab_dir / 'spm.model'} "
                              f"has {len(vocab)} pieces")
    return cfg, _load_weights(path, meta, cfg, len(vocab), languages, device), vocab, languages, meta


def load_for_inference(path: str | Path, device: str | torch.device = "cpu", data_dir: Optional[str | Path] = None
                       ) -> tuple[Config, Transformer, Manifest, Vocab, list[str]]:
    """(config, fp32 model in eval mode, manifest, vocab, training languages) of a checkpoint
    or a model folder, with its prepared data (to score or analyze).

    The data folder is `data_dir` (--data-dir) or the checkpoint's `data.dir`; it must be
    the data the model was trained on (same manifest fingerprint and vocabulary size); the
    returned config's data.dir is the folder used. Language index i in the model (expert
    routing) means languages[i], as in training.
    """
    meta = read_meta(path)
    cfg = config_from_dict(meta["config"])
    data = data_dir_for(path, cfg, data_dir)
    cfg, model, vocab, languages, meta = load_model(path, device, data)
    manifest = _checked_manifest(path, meta, data, languages)
    return cfg, model, manifest, vocab, languages


STEP_PREFIX = "step_"


def numbered_checkpoints(save_dir: str | Path) -> list[Path]:
    """The step_<n>/ checkpoints in save_dir (those with cats_ds.json), oldest first."""
    found = [p for p in Path(save_dir).glob(f"{STEP_PREFIX}*")
             if p.name[len(STEP_PREFIX):].isdigit() and (p / CHECKPOINT_META).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))
