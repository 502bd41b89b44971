"""Export for Hugging Face transformers: a folder `AutoModelForSeq2SeqLM.from_pretrained`
and `AutoTokenizer.from_pretrained` load.

    pip install -e '.[hf]'
    python launch/export.py --checkpoint runs/gettext8/best --format transformers --out hf/gettext8

Our Transformer maps onto M2M100 (`M2M100ForConditionalGeneration`): pre-norm layers with
a final LayerNorm on each side, embeddings scaled by sqrt(d_model) plus a sinusoidal table
(sin on the first half of the channels, cos on the second, the same frequencies), one
shared vocabulary, q/k/v/out projections with biases, relu or gelu. What had to be chosen
so that the outputs are the same, not just similar:

- Positions. M2M100 computes its table itself (a non-persistent buffer, so no weights can
  be written for it) and looks row `padding_idx + 1 + i` up for the i-th non-pad token,
  while ours uses row i. With `pad_token_id = -1` in config.json the lookup is row i
  (the cumulative count of non-pad tokens minus 1); no token has id -1, so no position is
  treated as padding, exactly as ours (right padding is masked as keys by the attention
  mask; positions of pad tokens never matter). The model's padding_idx (-1) only marks
  the last embedding row for gradients: nothing at inference. generation_config.json and
  the tokenizer use the real pad id 0 (padding batches, filling finished sentences).
- The first decoder token. M2M100 starts from </s> and forces the language token next; we
  start from the `<2xx>` tag itself at position 0. So generation_config has no
  decoder_start_token_id (nor bos_token_id, which generate would fall back to), and the
  tag is passed as `decoder_start_token_id` (one id, or a list with one per sentence):
  generate without it is an error, not a translation into an arbitrary language.
- Search. `suppress_tokens` = <pad>, <unk>, <s> (what our search bans), `early_stopping`
  True (stop a sentence at `num_beams` finished hypotheses, as ours does), length_penalty
  from eval.lenpen (both divide by the length counting </s>, not the tag),
  `forced_eos_token_id` </s> (a hypothesis at the length limit ends in </s>, as ours).
  Our maximum length rule is per sentence, int(max_len_a * source tokens incl. </s> +
  max_len_b) including </s>: give generate `max_new_tokens` = that (the README's example
  does; the default, max_positions - 1, is the model's own limit). Greedy search is then
  ours token for token. One difference remains in beam search: at the limit transformers'
  forced </s> scores log-probability 0 where ours keeps </s>'s own log-probability, so
  hypotheses that reach the limit can be ranked differently (sentences that end before
  it get the same n-best list, tested).
- Norms: layernorm (eps 1e-5); layernorm_noaffine is the same with gain 1, bias 0.
  rmsnorm(_noaffine) and post-norm have no M2M100 equivalent and are refused by name
  (the CTranslate2 export maps them).
- Embeddings: tied (share_embeddings) -> `tie_word_embeddings` true and one matrix
  (`model.shared.weight`) in model.safetensors; separate decoder embeddings, or an
  out_embed expert, -> tie_word_embeddings false and the encoder, decoder and output
  matrices written each.
Family-expert models export one M2M100 model per family, as the CTranslate2 export does:
`<out>/<family>/` with that family's experts in place of the expert layers, and
`<out>/families.json` (language -> folder).

The tokenizer is SentencePiece's unigram model rebuilt for the `tokenizers` library
(tokenizer.json): the same pieces and scores, SentencePiece's own normalization table
(nmt_nfkc), whitespace as `▁` with a leading one, </s> appended to each source; the
`<2xx>` tags and <pad>/<unk>/<s>/</s> are special tokens. Encoding gives our ids and
decoding (skip_special_tokens=True) our detokenized text (tested on the test sets). One
known difference: a source text that contains one of those special strings literally
("<s>", "<2de>", ...) is encoded by transformers as that special token, while SentencePiece
splits the control symbols as text and puts its `▁` before a tag.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from cats_ds.config import Config
from cats_ds.data.manifest import BOS, EOS, PAD, SPM_PREFIX, UNK, Vocab, lang_tag
from cats_ds.inference.export_common import ExportError, _expert
from cats_ds.inference.model_folder import staged_folder
from cats_ds.model.families import load_family_map
from cats_ds.model.transformer import Transformer

NORMS = ("layernorm", "layernorm_noaffine")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ExportError("--format transformers needs the transformers package: pip install -e '.[hf]'") from None
    return transformers


def check_exportable(cfg: Config) -> None:
    """Refuse, by setting, what M2M100 cannot represent."""
    m = cfg.model
    if not m.prenorm:
        raise ExportError("model.prenorm=false (post-norm) has no transformers (M2M100) equivalent: M2M100 layers "
                          "are pre-norm; export it with --format ctranslate2, which maps post-norm")
    if m.norm not in NORMS:
        raise ExportError(f"model.norm={m.norm} has no transformers (M2M100) equivalent: M2M100 uses LayerNorm "
                          f"(supported: {', '.join(NORMS)}); export it with --format ctranslate2, which maps "
                          f"RMSNorm")
    if m.activation not in ("relu", "gelu"):
        raise ExportError(f"model.activation={m.activation}: supported are relu, gelu")


def _norm(prefix: str, norm: torch.nn.Module, dim: int) -> dict[str, torch.Tensor]:
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    return {f"{prefix}.weight": weight.detach().clone() if weight is not None else torch.ones(dim),
            f"{prefix}.bias": bias.detach().clone() if bias is not None else torch.zeros(dim)}


def _linear(prefix: str, lin: torch.nn.Linear) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": lin.weight.detach().clone(), f"{prefix}.bias": lin.bias.detach().clone()}


def _attention(prefix: str, attn: torch.nn.Module, family: Optional[int]) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out.update(_linear(f"{prefix}.{name}", _expert(getattr(attn, name), family)))
    return out


def _ffn(prefix: str, ffn: torch.nn.Module, family: Optional[int]) -> dict[str, torch.Tensor]:
    ffn = _expert(ffn, family)
    return {**_linear(f"{prefix}.fc1", ffn.fc1), **_linear(f"{prefix}.fc2", ffn.fc2)}


def m2m100_state(cfg: Config, model: Transformer, family: Optional[int] = None) -> tuple[dict, bool]:
    """(M2M100ForConditionalGeneration state dict, tie_word_embeddings) of a dense model or
    of family `family` of a family-expert model. Tied: the shared matrix once."""
    d = cfg.model.embed_dim
    out_embed = model.dec_embed if model.out_proj is None else _expert(model.out_proj, family)
    tied = model.dec_embed is model.embed and out_embed is model.dec_embed
    state = {"model.shared.weight": model.embed.weight.detach().clone()}
    if not tied:
        state["model.encoder.embed_tokens.weight"] = model.embed.weight.detach().clone()
        state["model.decoder.embed_tokens.weight"] = model.dec_embed.weight.detach().clone()
        state["lm_head.weight"] = out_embed.weight.detach().clone()
    for i, layer in enumerate(model.encoder_layers):
        p = f"model.encoder.layers.{i}"
        state.update(_attention(f"{p}.self_attn", layer.self_attn, family))
        state.update(_norm(f"{p}.self_attn_layer_norm", layer.norm1, d))
        state.update(_ffn(p, layer.ffn, family))
        state.update(_norm(f"{p}.final_layer_norm", layer.norm2, d))
    state.update(_norm("model.encoder.layer_norm", model.enc_norm, d))
    for i, layer in enumerate(model.decoder_layers):
        p = f"model.decoder.layers.{i}"
        state.update(_attention(f"{p}.self_attn", layer.self_attn, family))
        state.update(_norm(f"{p}.self_attn_layer_norm", layer.norm1, d))
        state.update(_attention(f"{p}.encoder_attn", layer.cross_attn, family))
        state.update(_norm(f"{p}.encoder_attn_layer_norm", layer.norm2, d))
        state.update(_ffn(p, layer.ffn, family))
        state.update(_norm(f"{p}.final_layer_norm", layer.norm3, d))
    state.update(_norm("model.decoder.layer_norm", model.dec_norm, d))
    return {k: v.float().contiguous() for k, v in state.items()}, tied


def m2m100_config(cfg: Config, vocab_size: int, tied: bool) -> dict:
    """config.json of the M2M100 model (see the module docstring for pad_token_id and the
    start token)."""
    m = cfg.model
    return {
        "architectures": ["M2M100ForConditionalGeneration"], "model_type": "m2m_100",
        "vocab_size": vocab_size, "max_position_embeddings": m.max_positions, "d_model": m.embed_dim,
        "encoder_layers": m.encoder_layers, "decoder_layers": m.decoder_layers,
        "encoder_attention_heads": m.heads, "decoder_attention_heads": m.heads,
        "encoder_ffn_dim": m.ffn_dim, "decoder_ffn_dim": m.ffn_dim, "activation_function": m.activation,
        "dropout": m.dropout, "attention_dropout": m.attention_dropout, "activation_dropout": m.activation_dropout,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "scale_embedding": True, "init_std": m.embed_dim ** -0.5,
        "pad_token_id": -1,  # positions: row i for token i, as ours (see the module docstring)
        "bos_token_id": None, "eos_token_id": EOS, "decoder_start_token_id": None,
        "tie_word_embeddings": tied, "is_encoder_decoder": True, "use_cache": True,
    }


def generation_config(cfg: Config) -> dict:
    e = cfg.eval
    return {"decoder_start_token_id": None, "bos_token_id": None, "eos_token_id": EOS, "pad_token_id": PAD,
            "suppress_tokens": [PAD, UNK, BOS], "num_beams": e.beam, "length_penalty": e.lenpen,
            "early_stopping": True, "do_sample": False, "forced_eos_token_id": EOS,
            "max_new_tokens": cfg.model.max_positions - 1}


def build_tokenizer(spm_model: str | Path, languages: list[str]):
    """A transformers fast tokenizer equal to the joint SentencePiece model (see the
    module docstring)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    transformers = _transformers()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(spm_model).read_bytes())
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM or trainer.byte_fallback:
        raise ExportError(f"{spm_model}: a unigram SentencePiece model without byte fallback is expected (prepare "
                          f"writes one); this one cannot be rebuilt for transformers")
    if not (spec.add_dummy_prefix and spec.remove_extra_whitespaces and spec.escape_whitespaces):
        raise ExportError(f"{spm_model}: unexpected normalizer settings (add_dummy_prefix, remove_extra_whitespaces, "
                          f"escape_whitespaces must be on, as prepare trains it)")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    tok = Tokenizer(models.Unigram(pieces, unk_id=UNK, byte_fallback=False))
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    # remove_extra_whitespaces: no leading/trailing spaces, runs of spaces as one
    steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    # SentencePiece's decoding: `▁` -> space, and every leading space dropped (not only the first)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1 << 20, right=0)])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A $B </s>",
                                                       special_tokens=[("</s>", EOS)])
    specials = [pieces[i][0] for i in (PAD, UNK, BOS, EOS)] + [lang_tag(lang) for lang in languages]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pieces[PAD][0], unk_token=pieces[UNK][0], bos_token=pieces[BOS][0],
        eos_token=pieces[EOS][0], additional_special_tokens=[lang_tag(lang) for lang in languages],
        model_max_length=None)


USAGE = """# {name}: Hugging Face transformers export of {checkpoint}

An M2M100-architecture model (cats_ds, step {step}): English -> {n} languages: {languages}.
Exported by `python launch/export.py --checkpoint {checkpoint} --format transformers --out {out}`.

The target language is chosen by its tag, given as the decoder's first token
(`decoder_start_token_id`: one id, or a list with one per sentence); the tag is the first
token of each output (skip_special_tokens drops it). Without a tag generate refuses.

```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{out}")
model = AutoModelForSeq2SeqLM.from_pretrained("{out}").eval()
sources = ["Hello world.", "Open the file."]
batch = tok(sources, return_tensors="pt", padding=True)
tag = tok.convert_tokens_to_ids("{example_tag}")
out = model.generate(**batch, decoder_start_token_id=tag, num_beams={beam}, length_penalty={lenpen},
                     max_new_tokens=int({max_len_a} * batch["input_ids"].shape[1] + {max_len_b}))
print(tok.batch_decode(out, skip_special_tokens=True))
```

generation_config.json bans <pad>, <unk> and <s>, stops a sentence at `num_beams` finished
hypotheses and ends one that reaches the length limit with </s>, as cats_ds' own search
does. With cats_ds' maximum length per sentence (int({max_len_a} * source tokens including
</s> + {max_len_b}) new tokens, </s> included; the example above applies it to the longest
source of the batch) greedy search gives cats_ds' tokens exactly (tested); beam search
differs only in how it ranks hypotheses that reach that limit.
Languages and tags: languages.json. Language families: see ../families.json if present.
"""


def _write_one(cfg: Config, model: Transformer, vocab: Vocab, languages: list[str], spm: Path, folder: Path,
               family: Optional[int], readme: str) -> None:
    from safetensors.torch import save_file

    state, tied = m2m100_state(cfg, model, family)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(m2m100_config(cfg, len(vocab), tied), indent=1), encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=1), encoding="utf-8")
    build_tokenizer(spm, languages).save_pretrained(str(folder))
    shutil.copyfile(spm, folder / f"{SPM_PREFIX}.model")
    tags = {lang: lang_tag(lang) for lang in languages}
    (folder / "languages.json").write_text(json.dumps({"languages": list(languages), "tags": tags,
                                                       "tag_ids": {lang: vocab.lang_ids[lang] for lang in languages}},
                                                      indent=1, ensure_ascii=False), encoding="utf-8")
    (folder / "README.md").write_text(readme, encoding="utf-8")


def export_transformers(cfg: Config, model: Transformer, vocab: Vocab, languages: list[str], out: str | Path,
                        force: bool = False, checkpoint: str = "", step: Optional[int] = None,
                        spm_dir: Optional[str | Path] = None, family_names: Optional[list[str]] = None) -> Path:
    """Write the transformers folder (or one per family, plus families.json) to `out`.
    `family_names`: the expert families in id order (default: from experts.families)."""
    _transformers()
    check_exportable(cfg)
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} exists; choose another --out or pass --force to replace it")
    spm = Path(spm_dir or cfg.data.dir) / f"{SPM_PREFIX}.model"

    def readme(folder: Path, langs: list[str]) -> str:
        e = cfg.eval
        return USAGE.format(name=out.name, checkpoint=checkpoint or "(in-memory model)", out=folder, step=step,
                            n=len(langs), languages=", ".join(langs), example_tag=lang_tag(langs[0]),
                            beam=e.beam, lenpen=e.lenpen, max_len_a=e.max_len_a, max_len_b=e.max_len_b)

    with staged_folder(out) as tmp:
        if not model.routed:
            _write_one(cfg, model, vocab, languages, spm, tmp, None, readme(out, languages))
        else:
            if family_names is None:
                family_names = load_family_map(cfg.experts.families or "default").assign(languages)[0]
            names = list(family_names)
            folders = {}
            for f, family in enumerate(names):
                langs = [lang for lang, g in zip(languages, model.lang_family.tolist()) if g == f]
                _write_one(cfg, model, vocab, langs, spm, tmp / family, f, readme(out / family, langs))
                folders.update({lang: family for lang in langs})
            (tmp / "families.json").write_text(json.dumps({"families": names, "folder": folders}, indent=1),
                                               encoding="utf-8")
    return out
