"""CTranslate2 export: greedy decoding of the exported model gives the same tokens as the
project's greedy search, for every norm variant, pre- and post-norm, tied and separate
embeddings, and for family-expert models (one model per family); existing folders and
unknown formats are refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cats_ds.cli import export_main
from cats_ds.config import config_from_dict
from cats_ds.data.manifest import Manifest, Vocab, load_split
from cats_ds.data.sampler import collate, eval_plans
from cats_ds.inference import search
from cats_ds.inference.ct2_export import export_ctranslate2
from cats_ds.inference.export import export_checkpoint
from cats_ds.inference.export_common import ExportError
from cats_ds.model.build import model_from_config
from cats_ds.training.losses import per_language_sums
from helpers import TINY_MODEL
from test_evaluate import make_checkpoint

ctranslate2 = pytest.importorskip("ctranslate2")  # the `export` extra (also in `dev`, so CI runs this)


def trained_model(data_dir: Path, steps: int = 40, experts: dict | None = None, **model):
    """A tiny model trained `steps` Adam steps on the tiny corpus' train split, so that it
    emits varied tokens and </s> (an untrained one repeats one token to the length limit).
    `experts`: an experts section (family experts, ep_size 1, trained without DeepSpeed)."""
    cfg = config_from_dict({"data": {"dir": str(data_dir)}, "model": dict(TINY_MODEL, **model),
                            "experts": experts or {}})
    manifest = Manifest.load(data_dir)
    vocab = Vocab(data_dir, manifest.languages)
    langs = manifest.languages
    torch.manual_seed(0)
    net = model_from_config(cfg, len(vocab), langs)
    train = load_split(data_dir, manifest, "train", langs)
    plans = eval_plans(train, langs, 400, 0, 1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    tag_ids = [vocab.lang_ids[lang] for lang in langs]
    for step in range(steps):
        b = collate(plans[step % len(plans)], train, langs, tag_ids)
        loss, _, tok = per_language_sums(net(b.src, b.prev, b.langs), b.tgt, b.langs, len(langs), 0.0)
        opt.zero_grad()
        (loss.sum() / tok.sum()).backward()
        opt.step()
    return cfg, net.eval(), manifest, vocab, langs


def compare_greedy(cfg, model, manifest, vocab, langs, out: Path, n: int = 12) -> int:
    """Assert CTranslate2 (beam 1) and search.greedy_search give the same tokens on the
    first n test sentences of every language; returns how many ended in </s> before the
    length limit (so the test knows it exercised stopping, not only the limit)."""
    per_family = (out / "families.json").is_file()
    folder = json.loads((out / "families.json").read_text())["folder"] if per_family else {}
    test = load_split(cfg.data.dir, manifest, "test", langs)
    stopped = 0
    for li, lang in enumerate(langs):
        translator = ctranslate2.Translator(str(out / folder[lang] if per_family else out), device="cpu",
                                            intra_threads=1)
        srcs = [torch.as_tensor(test[lang].src[i].astype("int64")) for i in range(n)]
        src = torch.nn.utils.rnn.pad_sequence(srcs, batch_first=True, padding_value=model.pad_id)
        tags = torch.full((n,), vocab.lang_ids[lang])
        ours = search.greedy_search(model, src, tags, torch.full((n,), li), max_len_a=cfg.eval.max_len_a,
                                    max_len_b=cfg.eval.max_len_b)
        limits = search.max_lengths(model, src, cfg.eval.max_len_a, cfg.eval.max_len_b).tolist()
        for s, hyp, limit in zip(srcs, ours, limits):
            pieces = [vocab.sp.id_to_piece(int(t)) for t in s[:-1]]  # CTranslate2 appends </s> itself
            # ours: at most limit tokens including </s>; CTranslate2 does not return </s>
            r = translator.translate_batch([pieces], target_prefix=[[f"<2{lang}>"]], beam_size=1,
                                           max_decoding_length=limit - 1, min_decoding_length=0,
                                           disable_unk=True, suppress_sequences=[["<pad>"], ["<s>"]])
            expected = [vocab.sp.id_to_piece(t) for t in hyp.tokens[:-1]]
            assert r[0].hypotheses[0] == expected, (lang, pieces)
            stopped += len(hyp.tokens) < limit
    return stopped


@pytest.mark.parametrize("model", [
    {},
    {"prenorm": False},
    {"norm": "layernorm_noaffine", "activation": "gelu"},
    {"norm": "rmsnorm", "share_embeddings": False},
    {"norm": "rmsnorm_noaffine", "prenorm": False},
])
def test_ctranslate2_greedy_equals_ours(tmp_path, tiny_data, model):
    cfg, net, manifest, vocab, langs = trained_model(tiny_data, **model)
    out = export_ctranslate2(cfg, net, vocab, langs, tmp_path / "ct2")
    assert compare_greedy(cfg, net, manifest, vocab, langs, out) > 0


def test_export_checkpoint_writes_model_vocab_and_tags(tmp_path, tiny_data, capsys):
    ckpt, _ = make_checkpoint(tmp_path / "run" / "best", tiny_data)
    out = tmp_path / "export"
    export_main(["--checkpoint", str(ckpt), "--format", "ctranslate2", "--out", str(out)])
    assert {"model.bin", "config.json", "shared_vocabulary.json", "spm.model", "languages.json",
            "README.md"} <= {p.name for p in out.iterdir()}
    assert (out / "spm.model").read_bytes() == (tiny_data / "spm.model").read_bytes()
    tags = json.loads((out / "languages.json").read_text())
    assert tags == {"languages": ["aa", "bb", "cc"], "tags": {"aa": "<2aa>", "bb": "<2bb>", "cc": "<2cc>"}}
    config = json.loads((out / "config.json").read_text())
    assert config["decoder_start_token"] is None and config["add_source_eos"] and not config["add_source_bos"]
    assert "translate_batch" in (out / "README.md").read_text()
    # the untrained checkpoint decodes the same in both (to the length limit)
    from cats_ds.checkpoints import load_for_inference

    cfg, model, manifest, vocab, langs = load_for_inference(ckpt)
    compare_greedy(cfg, model, manifest, vocab, langs, out, n=3)
    # an existing folder is not overwritten without --force
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(ckpt), "--format", "ctranslate2", "--out", str(out)])
    assert "--force" in capsys.readouterr().err
    export_main(["--checkpoint", str(ckpt), "--format", "ctranslate2", "--out", str(out), "--force"])


def test_expert_model_exports_one_model_per_family(tmp_path, tiny_data):
    """Experts on every placement (ffn, attn, out_embed; both sides), trained so the
    families' experts differ: each family's export decodes its languages like our search
    routing them to that family."""
    families = tmp_path / "families.yaml"
    families.write_text(yaml.safe_dump({"x": ["aa", "bb"], "y": ["cc"]}))
    cfg, net, manifest, vocab, langs = trained_model(
        tiny_data, experts={"modules": ["all"], "side": "both", "families": str(families)})
    ffn = net.decoder_layers[0].ffn.moe.deepspeed_moe.experts.deepspeed_experts
    assert not torch.equal(ffn[0].fc1.weight, ffn[1].fc1.weight)  # training moved the experts apart
    out = export_ctranslate2(cfg, net, vocab, langs, tmp_path / "ct2")
    index = json.loads((out / "families.json").read_text())
    assert index == {"families": ["x", "y"], "folder": {"aa": "x", "bb": "x", "cc": "y"}}
    assert json.loads((out / "y" / "languages.json").read_text())["languages"] == ["cc"]
    assert (out / "x" / "model.bin").is_file() and (out / "y" / "spm.model").is_file()
    assert compare_greedy(cfg, net, manifest, vocab, langs, out) > 0
    # family y's model is not family x's: decoding cc with x's model gives other tokens somewhere
    spec_x, spec_y = (json.loads((out / f / "config.json").read_text()) for f in ("x", "y"))
    assert spec_x == spec_y and (out / "x" / "model.bin").read_bytes() != (out / "y" / "model.bin").read_bytes()


def test_unknown_format_is_refused(tmp_path, tiny_data):
    ckpt, _ = make_checkpoint(tmp_path / "best", tiny_data)
    with pytest.raises(ExportError, match="supported formats: pytorch, transformers, ctranslate2"):
        export_checkpoint(ckpt, tmp_path / "out", fmt="onnx")
    assert not (tmp_path / "out").exists()
