"""The CTranslate2 export (`launch/export.py --format ctranslate2`; cats_ds/inference/export.py
dispatches the formats).

The CTranslate2 export folder holds
  model.bin, config.json,           the CTranslate2 model (ctranslate2.Translator(DIR) loads it)
  shared_vocabulary.json
  spm.model                         the checkpoint's joint SentencePiece model
  languages.json                    {"languages": [...], "tags": {"de": "<2de>", ...}}
  README.md                         how to translate with it

How our Transformer maps onto CTranslate2's TransformerSpec:
  - pre-norm or post-norm (model.prenorm); pre-norm keeps the final encoder/decoder norm;
  - norms: layernorm (eps 1e-5), rmsnorm (eps 1e-6); the *_noaffine variants are the
    same norms with gain 1 and bias 0, so every `model.norm` is representable;
  - embeddings scaled by sqrt(embed_dim) plus our sinusoidal table (written into the model
    as explicit position encodings, row 0 = the first token); tied or separate embeddings;
    the output projection is the decoder embedding matrix (no bias);
  - q/k/v projections fused the way CTranslate2 stores them (self-attention: one qkv
    matrix; cross-attention: q, then one kv matrix);
  - the source gets </s> appended (add_source_eos), no <s>; the decoder has no start
    token of its own (decoder_start_token None): the `<2xx>` tag given as target_prefix is
    the first decoder input, exactly as in training.
Family-expert models (CTranslate2 has no per-sentence routing) export one dense model per
family: for family f, each expert sublayer is replaced by its expert f (FFN, the q/k/v/out
projections of expert attention, the output embedding of out_embed experts; the latter
becomes the model's output projection, untied from the shared input embeddings), and the
shared parameters are copied. `<out>/<family>/` holds that family's model, which
translates exactly the family's languages; `<out>/families.json` maps language -> folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cats_ds.config import Config
from cats_ds.data.manifest import BOS, EOS, PAD, SPM_PREFIX, UNK, Vocab, lang_tag
from cats_ds.inference.export_common import ExportError, _expert
from cats_ds.model.families import load_family_map
from cats_ds.model.transformer import Attention, FeedForward, Transformer

NORM_EPS = {"layernorm": 1e-5, "layernorm_noaffine": 1e-5, "rmsnorm": 1e-6, "rmsnorm_noaffine": 1e-6}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def _ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise ExportError("--format ctranslate2 needs the ctranslate2 package: pip install -e '.[export]'") from None
    return ctranslate2


def check_exportable(cfg: Config, model: Transformer) -> None:
    """Refuse what CTranslate2 cannot represent, naming the setting."""
    if cfg.model.norm not in NORM_EPS:
        raise ExportError(f"model.norm={cfg.model.norm} has no CTranslate2 equivalent; "
                          f"supported: {', '.join(NORM_EPS)}")
    if cfg.model.activation not in ("relu", "gelu"):
        raise ExportError(f"model.activation={cfg.model.activation}: supported are relu, gelu")


def _set_norm(spec, norm: torch.nn.Module, dim: int, rms: bool) -> None:
    weight = getattr(norm, "weight", None)
    spec.gamma = _np(weight) if weight is not None else np.ones(dim, dtype=np.float32)
    if not rms:  # CTranslate2's RMSNorm has a gain only
        bias = getattr(norm, "bias", None)
        spec.beta = _np(bias) if bias is not None else np.zeros(dim, dtype=np.float32)


def _set_linear(spec, *linears: torch.nn.Linear) -> None:
    """One CTranslate2 linear from one or more of ours stacked along the output dimension."""
    spec.weight = np.concatenate([_np(lin.weight) for lin in linears], axis=0)
    spec.bias = np.concatenate([_np(lin.bias) for lin in linears], axis=0)


def _set_attention(spec, attn: Attention, cross: bool, family: Optional[int]) -> None:
    q, k, v, o = (_expert(getattr(attn, name), family) for name in ("q_proj", "k_proj", "v_proj", "out_proj"))
    if cross:
        _set_linear(spec.linear[0], q)
        _set_linear(spec.linear[1], k, v)
    else:
        _set_linear(spec.linear[0], q, k, v)
    _set_linear(spec.linear[-1], o)


def _set_ffn(spec, ffn: torch.nn.Module, family: Optional[int]) -> None:
    ffn = _expert(ffn, family)
    assert isinstance(ffn, FeedForward), type(ffn)
    _set_linear(spec.linear_0, ffn.fc1)
    _set_linear(spec.linear_1, ffn.fc2)


def transformer_spec(cfg: Config, model: Transformer, vocab_tokens: list[str], family: Optional[int] = None):
    """The ctranslate2 TransformerSpec of a dense model, or of family `family` of a
    family-expert model (its experts in place of the expert layers), weights filled in."""
    check_exportable(cfg, model)
    _ctranslate2()
    from ctranslate2.specs import common_spec, transformer_spec as ts

    m = cfg.model
    d, rms = m.embed_dim, m.norm.startswith("rmsnorm")
    activation = common_spec.Activation.RELU if m.activation == "relu" else common_spec.Activation.GELU
    spec = ts.TransformerSpec.from_config((m.encoder_layers, m.decoder_layers), m.heads, pre_norm=m.prenorm,
                                          activation=activation, rms_norm=rms)
    positions = _np(model.positions)  # (max_positions, D)

    enc = spec.encoder
    enc.embeddings[0].weight = _np(model.embed.weight)
    enc.scale_embeddings = True
    enc.position_encodings.encodings = positions
    for layer_spec, layer in zip(enc.layer, model.encoder_layers):
        _set_attention(layer_spec.self_attention, layer.self_attn, False, family)
        _set_norm(layer_spec.self_attention.layer_norm, layer.norm1, d, rms)
        _set_ffn(layer_spec.ffn, layer.ffn, family)
        _set_norm(layer_spec.ffn.layer_norm, layer.norm2, d, rms)
    if m.prenorm:
        _set_norm(enc.layer_norm, model.enc_norm, d, rms)

    dec = spec.decoder
    dec.embeddings.weight = _np(model.dec_embed.weight)
    dec.scale_embeddings = True
    dec.position_encodings.encodings = positions
    for layer_spec, layer in zip(dec.layer, model.decoder_layers):
        _set_attention(layer_spec.self_attention, layer.self_attn, False, family)
        _set_norm(layer_spec.self_attention.layer_norm, layer.norm1, d, rms)
        _set_attention(layer_spec.attention, layer.cross_attn, True, family)
        _set_norm(layer_spec.attention.layer_norm, layer.norm2, d, rms)
        _set_ffn(layer_spec.ffn, layer.ffn, family)
        _set_norm(layer_spec.ffn.layer_norm, layer.norm3, d, rms)
    if m.prenorm:
        _set_norm(dec.layer_norm, model.dec_norm, d, rms)
    # logits = x @ E^T, no bias; E = the decoder embedding, or the family's output-embedding expert
    out_embed = model.dec_embed if model.out_proj is None else _expert(model.out_proj, family)
    dec.projection.weight = _np(out_embed.weight)

    spec.register_source_vocabulary(vocab_tokens)
    spec.register_target_vocabulary(vocab_tokens)
    c = spec.config
    c.unk_token, c.bos_token, c.eos_token = (vocab_tokens[i] for i in (UNK, BOS, EOS))
    c.decoder_start_token = None  # the <2xx> tag, given as target_prefix, is the first decoder input
    c.add_source_bos, c.add_source_eos = False, True
    c.layer_norm_epsilon = NORM_EPS[m.norm]
    return spec


def vocab_tokens(vocab: Vocab) -> list[str]:
    """SentencePiece pieces in id order (ids 0-3: <pad>, <unk>, <s>, </s>)."""
    tokens = [vocab.sp.id_to_piece(i) for i in range(len(vocab))]
    assert tokens[PAD] != tokens[EOS], "unexpected special pieces"
    return tokens


USAGE = """# {name}: CTranslate2 export of {checkpoint}

Exported by `python launch/export.py --checkpoint {checkpoint} --format ctranslate2 --out {out}`
(cats_ds, step {step}). English -> {n} languages: {languages}.

Files: the CTranslate2 model (model.bin, config.json, shared_vocabulary.json), the joint
SentencePiece model `spm.model`, and `languages.json` (language -> `<2xx>` target tag).

The source is SentencePiece pieces (CTranslate2 appends </s>); the target language is
chosen by giving its tag as the target prefix, which the model reads as its first
decoder token (results do not repeat it).

```python
import ctranslate2, sentencepiece as spm

sp = spm.SentencePieceProcessor(model_file="{out}/spm.model")
translator = ctranslate2.Translator("{out}", device="cpu")   # or device="cuda"
sources = ["Hello world.", "Open the file."]
tag = "{example_tag}"
results = translator.translate_batch([sp.encode(s, out_type=str) for s in sources],
                                     target_prefix=[[tag]] * len(sources), beam_size=5,
                                     length_penalty=1.0, min_decoding_length=0, disable_unk=True,
                                     suppress_sequences=[["<pad>"], ["<s>"]])
print([sp.decode(r.hypotheses[0]) for r in results])
```

With `beam_size=1` and these options CTranslate2 gives the same tokens as the project's
greedy search (`cats_ds.inference.search.greedy_search`, tested), which never generates <pad>, <unk>
or <s> and may stop at once. Its length limit is int({max_len_a} * source length + {max_len_b})
tokens including </s> (source length counting </s>): pass that minus 1 as
`max_decoding_length` (CTranslate2 does not count </s>) to match it exactly.
"""


def _write_ctranslate2(spec, data_dir: str, languages: list[str], out: Path, quantization: Optional[str],
                       readme: str) -> None:
    ct2 = _ctranslate2()

    class _Converter(ct2.converters.Converter):
        def _load(self):
            return spec

    try:
        _Converter().convert(str(out), quantization=quantization, force=True)
    except ValueError as e:  # e.g. an unknown quantization
        raise ExportError(f"CTranslate2 conversion failed: {e}") from None
    shutil.copyfile(Path(data_dir) / f"{SPM_PREFIX}.model", out / f"{SPM_PREFIX}.model")
    tags = {lang: lang_tag(lang) for lang in languages}
    (out / "languages.json").write_text(json.dumps({"languages": list(languages), "tags": tags}, indent=1,
                                                   ensure_ascii=False), encoding="utf-8")
    (out / "README.md").write_text(readme, encoding="utf-8")


def export_ctranslate2(cfg: Config, model: Transformer, vocab: Vocab, languages: list[str], out: str | Path,
                       force: bool = False, quantization: Optional[str] = None,
                       checkpoint: str = "", step: Optional[int] = None, spm_dir: Optional[str | Path] = None,
                       family_names: Optional[list[str]] = None) -> Path:
    """Write the CTranslate2 model, spm.model, languages.json and README.md to `out`; for
    a family-expert model, one such folder per family under `out` plus families.json.
    `spm_dir`: the folder holding spm.model (default cfg.data.dir); `family_names`: the
    expert families in id order (a model folder's; default: read experts.families)."""
    _ctranslate2()
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} exists; choose another --out or pass --force to replace it")
    check_exportable(cfg, model)
    tokens = vocab_tokens(vocab)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    def readme(folder: Path, langs: list[str], note: str = "") -> str:
        return USAGE.format(name=out.name, checkpoint=checkpoint or "(in-memory model)", out=folder, step=step,
                            n=len(langs), languages=", ".join(langs), example_tag=lang_tag(langs[0]),
                            max_len_a=cfg.eval.max_len_a, max_len_b=cfg.eval.max_len_b) + note

    try:
        _write_all(cfg, model, tokens, languages, tmp, quantization, readme, out, str(spm_dir or cfg.data.dir),
                   family_names)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written export left behind
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _write_all(cfg: Config, model: Transformer, tokens: list[str], languages: list[str], tmp: Path,
               quantization: Optional[str], readme, out: Path, spm_dir: str,
               family_names: Optional[list[str]] = None) -> None:
    """The dense model into tmp, or one folder per family plus families.json."""
    if not model.routed:
        _write_ctranslate2(transformer_spec(cfg, model, tokens), spm_dir, languages, tmp, quantization,
                           readme(out, languages))
    else:
        if family_names is not None:  # a model folder's stored assignment: no map file needed
            families, lang_family = list(family_names), model.lang_family.tolist()
        else:
            families, lang_family = load_family_map(cfg.experts.families or "default").assign(languages)
        if list(model.lang_family.tolist()) != list(lang_family):
            raise ExportError(f"experts.families={cfg.experts.families}: the family map now routes the "
                              f"languages differently from the model ({lang_family} vs "
                              f"{model.lang_family.tolist()})")
        folders = {}
        for f, family in enumerate(families):
            langs = [lang for lang, g in zip(languages, lang_family) if g == f]
            (tmp / family).mkdir()
            note = (f"\nFamily `{family}` of a family-expert model (experts.modules={cfg.experts.modules}): "
                    f"this folder translates {', '.join(langs)} only; ../families.json lists the others.\n")
            _write_ctranslate2(transformer_spec(cfg, model, tokens, family=f), spm_dir, langs, tmp / family,
                               quantization, readme(out / family, langs, note))
            folders.update({lang: family for lang in langs})
        (tmp / "families.json").write_text(json.dumps({"families": families, "folder": folders}, indent=1),
                                           encoding="utf-8")
