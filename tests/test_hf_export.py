"""Hugging Face transformers export (cats_ds/inference/hf_export.py): AutoModelForSeq2SeqLM and
AutoTokenizer load the folder; the tokenizer gives our ids and text; transformers' greedy
`generate` gives our greedy tokens exactly, and beam 5 on 50 sentences scores within 0.1
BLEU of ours; variants M2M100 cannot represent are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cats_ds.cli import export_main
from cats_ds.data.manifest import EOS, load_split, load_texts
from cats_ds.inference import search
from cats_ds.inference.evaluate import corpus_scores
from cats_ds.inference.export import export_checkpoint
from cats_ds.inference.export_common import ExportError
from cats_ds.inference.hf_export import export_transformers
from test_evaluate import make_checkpoint
from test_export import trained_model

transformers = pytest.importorskip("transformers")  # the `hf` extra (also in `dev`)


def load_hf(folder: Path):
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(folder)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert model.generation_config.pad_token_id == 0 and model.generation_config.decoder_start_token_id is None
    return model, tok


def hf_tokens(out: torch.Tensor) -> list[int]:
    """A generated row without its first token (the tag) and what follows its first </s>
    (padding: <pad> after greedy, </s> after beam search)."""
    row = out.tolist()[1:]
    return row[:row.index(EOS) + 1] if EOS in row else row


def compare_greedy(cfg, model, manifest, vocab, langs, out: Path, n: int = 10) -> int:
    """Sentence by sentence (each with its own length limit) and in padded batches:
    transformers' greedy generate == search.greedy_search, token for token. The tokenizer
    encodes the raw source text to the shard's ids. Returns how many stopped at </s>
    before the limit."""
    per_family = (out / "families.json").is_file()
    folder = json.loads((out / "families.json").read_text())["folder"] if per_family else {}
    test = load_split(cfg.data.dir, manifest, "test", langs)
    stopped = 0
    for li, lang in enumerate(langs):
        hf, tok = load_hf(out / folder[lang] if per_family else out)
        texts = load_texts(cfg.data.dir, manifest, "test", lang, len(test[lang]))[0][:n]
        batch = tok(texts, return_tensors="pt", padding=True)
        src = batch["input_ids"]
        for i, text in enumerate(texts):  # the tokenizer gives the prepared ids
            assert src[i][batch["attention_mask"][i].bool()].tolist() == test[lang].src[i].tolist(), text
        tag = vocab.lang_ids[lang]
        ours = search.greedy_search(model, src, torch.full((n,), tag), torch.full((n,), li),
                                    max_len_a=cfg.eval.max_len_a, max_len_b=cfg.eval.max_len_b)
        limits = search.max_lengths(model, src, cfg.eval.max_len_a, cfg.eval.max_len_b).tolist()
        for i, (hyp, limit) in enumerate(zip(ours, limits)):
            one = src[i:i + 1, :int(batch["attention_mask"][i].sum())]
            got = hf_tokens(hf.generate(one, decoder_start_token_id=tag, num_beams=1, max_new_tokens=limit)[0])
            assert got == hyp.tokens, (lang, i)  # also at the limit: </s> forced there in both
            assert tok.decode(got, skip_special_tokens=True) == vocab.decode(hyp.tokens)  # and so is the text
            stopped += len(hyp.tokens) < limit
        # a padded batch, one tag per sentence (a list of decoder start tokens)
        rows = hf.generate(**batch, decoder_start_token_id=[tag] * n, num_beams=1, max_new_tokens=max(limits))
        for i, (hyp, limit) in enumerate(zip(ours, limits)):
            if len(hyp.tokens) < limit:
                assert hf_tokens(rows[i])[:len(hyp.tokens)] == hyp.tokens, (lang, i, "batch")
    return stopped


@pytest.mark.parametrize("model", [
    {},
    {"norm": "layernorm_noaffine", "activation": "gelu"},
    {"share_embeddings": False},
])
def test_transformers_greedy_equals_ours(tmp_path, tiny_data, model):
    cfg, net, manifest, vocab, langs = trained_model(tiny_data, **model)
    out = export_transformers(cfg, net, vocab, langs, tmp_path / "hf")
    tied = cfg.model.share_embeddings
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == tied
    from safetensors.torch import load_file

    names = set(load_file(str(out / "model.safetensors")))
    assert ("lm_head.weight" in names) != tied and "model.shared.weight" in names
    assert compare_greedy(cfg, net, manifest, vocab, langs, out) > 0


def test_transformers_beam5_within_0_1_bleu_of_ours(tmp_path, tiny_data):
    """50 test sentences (20 aa, 15 bb, 15 cc), beam 5, each with our length limit, on a
    model trained long enough that many hypotheses end before the limit and many reach it.
    Sentences whose hypotheses all end before it get our best hypothesis; those that reach
    it may be ranked differently (forced </s> scores 0 there), so the
    corpus scores are compared: BLEU within 0.1."""
    cfg, net, manifest, vocab, langs = trained_model(tiny_data, steps=300)
    out = export_transformers(cfg, net, vocab, langs, tmp_path / "hf")
    hf, tok = load_hf(out)
    assert hf.generation_config.num_beams == 5 and hf.generation_config.early_stopping is True
    test = load_split(tiny_data, manifest, "test", langs)
    ours_text, hf_text, refs, before_limit, same, greedy_at_limit = [], [], [], 0, 0, 0
    for li, (lang, n) in enumerate(zip(langs, (20, 15, 15))):
        refs += load_texts(tiny_data, manifest, "test", lang, len(test[lang]))[1][:n]
        tag = vocab.lang_ids[lang]
        for i in range(n):
            src = torch.as_tensor(test[lang].src[i].astype("int64"))[None]
            limit = int(search.max_lengths(net, src, cfg.eval.max_len_a, cfg.eval.max_len_b))
            ours = search.beam_search(net, src, torch.tensor([tag]), torch.tensor([li]), beam=5,
                                      lenpen=cfg.eval.lenpen, max_len_a=cfg.eval.max_len_a,
                                      max_len_b=cfg.eval.max_len_b)[0]
            rows = hf.generate(src, decoder_start_token_id=tag, max_new_tokens=limit, num_return_sequences=5)
            got = [hf_tokens(r) for r in rows]
            if all(len(h.tokens) < limit for h in ours):
                assert got[0] == ours[0].tokens, (lang, i)
                before_limit += 1
            same += got[0] == ours[0].tokens
            # greedy: equal also where it runs into the limit (</s> forced there by both)
            greedy = search.greedy_search(net, src, torch.tensor([tag]), torch.tensor([li]))[0].tokens
            assert hf_tokens(hf.generate(src, decoder_start_token_id=tag, num_beams=1,
                                         max_new_tokens=limit)[0]) == greedy, (lang, i)
            greedy_at_limit += len(greedy) == limit
            ours_text.append(vocab.decode(ours[0].tokens))
            hf_text.append(tok.decode(got[0], skip_special_tokens=True))
    assert len(refs) == 50 and 5 <= before_limit <= 45, before_limit  # both cases are exercised
    assert greedy_at_limit >= 5, greedy_at_limit
    ours_bleu = corpus_scores(ours_text, refs, "13a").bleu
    hf_bleu = corpus_scores(hf_text, refs, "13a").bleu
    print(f"beam 5, 50 sentences: BLEU ours {ours_bleu:.4f}, transformers {hf_bleu:.4f}; same best hypothesis "
          f"{same}/50; all hypotheses before the limit in {before_limit}; greedy equal in 50/50, "
          f"{greedy_at_limit} of them at the limit")
    assert abs(ours_bleu - hf_bleu) <= 0.1, (ours_bleu, hf_bleu, same)


@pytest.mark.parametrize("model, name", [
    ({"norm": "rmsnorm"}, "model.norm=rmsnorm"),
    ({"norm": "rmsnorm_noaffine"}, "model.norm=rmsnorm_noaffine"),
    ({"prenorm": False}, r"model.prenorm=false \(post-norm\)"),
])
def test_unmappable_variants_are_refused_by_name(tmp_path, tiny_data, model, name):
    cfg, net, manifest, vocab, langs = trained_model(tiny_data, steps=0, **model)
    with pytest.raises(ExportError, match=f"{name}.*--format ctranslate2"):
        export_transformers(cfg, net, vocab, langs, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


def test_expert_model_exports_one_transformers_model_per_family(tmp_path, tiny_data):
    families = tmp_path / "families.yaml"
    families.write_text(yaml.safe_dump({"x": ["aa", "bb"], "y": ["cc"]}))
    cfg, net, manifest, vocab, langs = trained_model(
        tiny_data, experts={"modules": ["all"], "side": "both", "families": str(families)})
    out = export_transformers(cfg, net, vocab, langs, tmp_path / "hf")
    assert json.loads((out / "families.json").read_text()) == {"families": ["x", "y"],
                                                                "folder": {"aa": "x", "bb": "x", "cc": "y"}}
    # out_embed experts: the output projection is the family's, untied from the input embeddings
    assert json.loads((out / "x" / "config.json").read_text())["tie_word_embeddings"] is False
    assert compare_greedy(cfg, net, manifest, vocab, langs, out, n=6) > 0


def test_export_cli_from_a_model_folder(tmp_path, tiny_data):
    ckpt, _ = make_checkpoint(tmp_path / "run" / "best", tiny_data)
    folder = export_checkpoint(ckpt, tmp_path / "model", "pytorch")
    export_main(["--checkpoint", str(folder), "--format", "transformers", "--out", str(tmp_path / "hf")])
    hf, tok = load_hf(tmp_path / "hf")
    assert tok.convert_tokens_to_ids("<2bb>") == json.loads((tmp_path / "hf" / "languages.json").read_text())[
        "tag_ids"]["bb"]
    assert "decoder_start_token_id=tag" in (tmp_path / "hf" / "README.md").read_text()
    with pytest.raises(ValueError, match="decoder_start_token_id"):  # no tag: an error, not a guess
        hf.generate(tok(["a b"], return_tensors="pt")["input_ids"], max_new_tokens=3)
