"""A model folder that stands alone: everything needed to translate with a trained model,
nothing of the training run.

    python launch/export.py --checkpoint runs/gettext8/best --format pytorch --out models/gettext8
    (training writes one at its end: <save_dir>/best/model/)

The folder holds
  model.safetensors   the model's weights (fp32), each tensor once: a tied embedding is
                      stored as `embed.weight` only (loading ties `dec_embed.weight` to it);
                      family-expert models keep every expert (keys use global expert ids)
  config.json         format, the model section, vocab size, languages, language tags
                      (`<2xx>`), families (expert models), special token ids, the decoding
                      defaults (eval section), and where it came from (step, checkpoint, the
                      training data folder and its fingerprint, the full training config)
  spm.model           the joint SentencePiece model (the `<2xx>` tags are pieces of it)
  README.md           what the model is: training data, updates, dev/test scores where known

`evaluate`, `average`, `export` and `analyze` take such a folder wherever they take a
checkpoint (cats_ds/checkpoints.py reads it: read_meta, gather_state_dict, load_for_inference).
Translating needs only the folder; scoring needs the prepared data folder (`--data-dir`,
checked against the fingerprint in config.json).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from cats_ds.checkpoints import CONFIG, FORMAT, FORMAT_VERSION, SPM, WEIGHTS, ModelFolderError
from cats_ds.config import Config
from cats_ds.data.manifest import BOS, EOS, PAD, UNK, lang_tag
from cats_ds.model.families import load_family_map

def untied_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor once: a parameter registered under several
    names (the shared embedding is `embed` and `dec_embed`) keeps its first name."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    keep = set(first.values())
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in model.state_dict().items() if k in keep or k not in params}


def family_assignment(cfg: Config, languages: list[str]) -> Optional[dict]:
    """{"map", "names", "of_language"} of a family-expert model (None for a dense one): the
    families the run's languages were routed to, so the folder needs no family-map file."""
    if not cfg.experts.modules:
        return None
    names, ids = load_family_map(cfg.experts.families or "default").assign(languages)
    return {"map": cfg.experts.families or "default", "names": names,
            "of_language": {lang: names[i] for lang, i in zip(languages, ids)}}


def _data_dir(cfg: Config) -> str:
    """data.dir as an absolute path where it exists from here (so a moved folder still says
    where its data was), else as the config has it."""
    p = Path(cfg.data.dir)
    return str(p.resolve()) if p.exists() else cfg.data.dir


def test_scores(checkpoint: Optional[str | Path]) -> Optional[dict]:
    """The test scores `evaluate` wrote for this checkpoint, if any (<save_dir>/eval/<name>-test/bleu.json)."""
    if not checkpoint:
        return None
    ckpt = Path(checkpoint).resolve()
    found = ckpt.parent / "eval" / f"{ckpt.name}-test" / "bleu.json"
    if not found.is_file():
        return None
    try:
        report = json.loads(found.read_text(encoding="utf-8"))
        return {"file": str(found), "averages": report["averages"], "settings": report["settings"],
                "languages": {lang: {"bleu": r["bleu"], "chrf": r["chrf"], "n": r["n"]}
                              for lang, r in report["languages"].items()}}
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


README = """# {name}: a cats_ds translation model

English -> {n} languages: {languages}.
{arch}

Files: `model.safetensors` (weights), `config.json` (architecture, languages, `<2xx>` target
tags{families_note}), `spm.model` (the joint SentencePiece model).

## Training
- data: {corpus} corpus, prepared in `{data_dir}` (manifest fingerprint {fingerprint}){pairs}
- updates: {step}{valid}
- exported from: `{checkpoint}`

## Scores
{scores}

## Use
```bash
python launch/evaluate.py --checkpoint {out} --data-dir <prepared data folder> --split test
python launch/export.py --checkpoint {out} --format transformers --out <folder>
```
```python
import torch
from cats_ds.checkpoints import load_model
from cats_ds.inference import search

cfg, model, vocab, languages, meta = load_model("{out}")
lang = "{example}"
src = torch.tensor([vocab.encode("Open the file.")])          # pieces + </s>
hyp = search.generate(model, src, torch.tensor([vocab.lang_ids[lang]]), torch.tensor([languages.index(lang)]),
                      beam=cfg.eval.beam, lenpen=cfg.eval.lenpen, max_len_a=cfg.eval.max_len_a,
                      max_len_b=cfg.eval.max_len_b)[0][0]
print(vocab.decode(hyp.tokens))
```
The target language is chosen by its tag (`<2xx>`), the decoder's first input token.
"""


def _readme(conf: dict, out: Path, checkpoint: str, pair_counts: Optional[dict], scores: Optional[dict]) -> str:
    train = conf["training"]
    m = conf["model"]
    arch = (f"Transformer {m['encoder_layers']}+{m['decoder_layers']} layers, d={m['embed_dim']}, "
            f"ffn={m['ffn_dim']}, {m['heads']} heads, {m['norm']}, {'pre' if m['prenorm'] else 'post'}-norm, "
            f"vocabulary {conf['vocab_size']}"
            + (f"; family experts {conf['experts']['modules']} ({conf['experts']['side']})"
               if conf.get("families") else "") + ".")
    pairs = ""
    if pair_counts:
        pairs = "; training pairs: " + ", ".join(f"{lang} {n}" for lang, n in pair_counts.items())
    valid = ""
    if train.get("valid_loss") is not None:
        valid = f"; mean dev loss {train['valid_loss']:.4f}"
    vs = train.get("valid_scores")
    if vs:
        valid += f"; dev BLEU {vs['bleu']:.2f}, chrF++ {vs['chrf']:.2f} (beam {vs['beam']}, {vs['sentences']} sentences)"
    if scores:
        rows = ["| language | sentences | BLEU | chrF++ |", "|---|---:|---:|---:|"]
        rows += [f"| en-{lang} | {r['n']} | {r['bleu']:.2f} | {r['chrf']:.2f} |" for lang, r in scores["languages"].items()]
        a = scores["averages"]["All"]
        rows += [f"| All | | {a['bleu']:.2f} | {a['chrf']:.2f} |", "",
                 f"Test split, beam {scores['settings'].get('beam')}, from `{scores['file']}`."]
        score_text = "\n".join(rows)
    else:
        score_text = ("No test scores yet: `python launch/evaluate.py --checkpoint <this folder> --data-dir "
                      "<prepared data folder>` writes them.")
    return README.format(
        name=out.name, n=len(conf["languages"]), languages=", ".join(conf["languages"]), arch=arch,
        families_note=", families" if conf.get("families") else "",
        corpus=train["config"]["data"].get("corpus"), data_dir=train.get("data_dir"),
        fingerprint=str(train.get("manifest_fingerprint", ""))[:12], pairs=pairs, step=train.get("step"),
        valid=valid, checkpoint=checkpoint or "(in-memory model)", scores=score_text, out=out,
        example=conf["languages"][0])


def write_model_folder(cfg: Config, model: torch.nn.Module, languages: list[str], spm_path: str | Path,
                       out: str | Path, meta: Optional[dict] = None, checkpoint: str = "", force: bool = False,
                       pair_counts: Optional[dict] = None) -> Path:
    """Write the model folder (see the module docstring) to `out`, atomically (out.tmp,
    then renamed). `meta`: the checkpoint's cats_ds.json (step, losses, scores,
    fingerprint); `pair_counts`: training pairs per language, for the README."""
    from safetensors.torch import save_file

    out = Path(out)
    meta = meta or {}
    if out.exists() and not force:
        raise ModelFolderError(f"{out} exists; choose another --out or pass --force to replace it")
    spm_path = Path(spm_path)
    if not spm_path.is_file():
        raise ModelFolderError(f"{spm_path} not found: the model folder needs the SentencePiece model the "
                               f"checkpoint was trained with (pass --data-dir <prepared data folder>)")
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
             for k, v in untied_state(model).items()}
    config = cfg.to_dict()
    conf = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": config["model"],
        "vocab_size": int(getattr(model, "vocab_size")),
        "languages": list(languages),
        "language_tags": {lang: lang_tag(lang) for lang in languages},
        "special_ids": {"pad": PAD, "unk": UNK, "bos": BOS, "eos": EOS},
        "families": family_assignment(cfg, list(languages)),
        "experts": config["experts"] if cfg.experts.modules else None,
        "tied_embeddings": bool(cfg.model.share_embeddings),
        "eval": config["eval"],
        "training": {"step": meta.get("step"), "valid_loss": meta.get("valid_loss"),
                     "valid_scores": meta.get("valid_scores"), "checkpoint": checkpoint,
                     "manifest_fingerprint": meta.get("manifest_fingerprint", ""), "data_dir": _data_dir(cfg),
                     "averaged_from": meta.get("averaged_from"),
                     "config": dict(config, data=dict(config["data"], dir=_data_dir(cfg)))},
    }
    scores = test_scores(checkpoint)
    if scores:
        conf["training"]["test_scores"] = scores
    with staged_folder(out) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "cats_ds": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(conf, indent=1, ensure_ascii=False), encoding="utf-8")
        shutil.copyfile(spm_path, tmp / SPM)
        (tmp / "README.md").write_text(_readme(conf, out, checkpoint, pair_counts, scores), encoding="utf-8")
    return out


@contextlib.contextmanager
def staged_folder(out: Path):
    """Yield an empty `<out>.tmp` to write a whole folder into; when the block ends normally
    it replaces `out`, on any error it is removed (no half-written folder is left)."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
