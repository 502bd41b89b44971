"""End to end: a hand-made checkpoint folder on the tiny prepared corpus -> evaluate_checkpoint.

tiny_data (conftest) has training pairs aa 400, bb 150, cc 50 and 30 test pairs each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cats_ds import search
from cats_ds.checkpoint import MODEL_STATES, CheckpointError, gather_state_dict, load_for_inference
from cats_ds.cli import evaluate_main
from cats_ds.config import ConfigError, config_from_dict
from cats_ds.data.manifest import EOS, Manifest, Vocab, load_split
from cats_ds.evaluate import EvalError, corpus_scores, evaluate_checkpoint, group_of
from cats_ds.model.transformer import build_model
from helpers import TINY_MODEL, checkpoint_dev_loss, ds_config, launch, write_json

GROUPS = ["eval.lo_max=100", "eval.hi_min=300"]  # cc (50) Lo, bb (150) Mid, aa (400) Hi


def make_checkpoint(folder: Path, data_dir: Path, **meta_overrides) -> tuple[Path, dict]:
    """What train.save_checkpoint leaves behind, for an untrained tiny model."""
    manifest = Manifest.load(data_dir)
    vocab = Vocab(data_dir, manifest.languages)
    cfg = config_from_dict({"data": {"dir": str(data_dir)}, "model": dict(TINY_MODEL)})
    torch.manual_seed(0)
    model = build_model(cfg.model, len(vocab))
    folder.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "optimizer": None}, folder / MODEL_STATES)
    meta = {"step": 7, "valid_loss": 5.0, "config": cfg.to_dict(), "languages": list(manifest.languages),
            "manifest_fingerprint": manifest.fingerprint, "vocab_size": len(vocab), "world_size": 1,
            "zero_stage": 0, **meta_overrides}
    (folder / "cats_ds.json").write_text(json.dumps(meta))
    return folder, model.state_dict()


@pytest.fixture
def ckpt(tmp_path, tiny_data) -> Path:
    return make_checkpoint(tmp_path / "run" / "best", tiny_data)[0]


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_load_for_inference_restores_the_weights(tmp_path, tiny_data):
    folder, state = make_checkpoint(tmp_path / "best", tiny_data)
    cfg, model, manifest, vocab, languages = load_for_inference(folder)
    assert languages == ["aa", "bb", "cc"] and len(vocab) == manifest.vocab_size
    assert not model.training and cfg.model.embed_dim == TINY_MODEL["embed_dim"]
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v), k


def test_evaluate_writes_every_file(ckpt, tiny_data):
    report = evaluate_checkpoint(ckpt, split="test", limit=5,
                                 overrides=["eval.beam=2", "eval.batch_tokens=24", *GROUPS])
    out = ckpt / "eval-test"  # the default place
    manifest = Manifest.load(tiny_data)
    vocab = Vocab(tiny_data, manifest.languages)
    test = load_split(tiny_data, manifest, "test")
    for lang in ("aa", "bb", "cc"):
        hyps, refs = lines(out / f"hyp.en-{lang}.txt"), lines(out / f"ref.en-{lang}.txt")
        assert len(hyps) == len(refs) == 5
        assert refs == [vocab.decode(test[lang].tgt[i]) for i in range(5)]  # decoded target shard
        r = report["languages"][lang]
        assert r["n"] == 5 and 0.0 <= r["bleu"] <= 100.0 and 0.0 <= r["chrf"] <= 100.0
        assert "tok:13a" in r["signature"]
    assert {lang: r["group"] for lang, r in report["languages"].items()} == {"aa": "Hi", "bb": "Mid", "cc": "Lo"}
    assert {lang: r["train_pairs"] for lang, r in report["languages"].items()} == {"aa": 400, "bb": 150, "cc": 50}
    assert report["settings"] | {"checkpoint": None} == {
        "checkpoint": None, "step": 7, "split": "test", "limit": 5, "beam": 2, "lenpen": 1.0,
        "max_len_a": 1.2, "max_len_b": 10, "lo_max": 100, "hi_min": 300,
        "chrf_signature": report["settings"]["chrf_signature"]}
    assert json.loads((out / "bleu.json").read_text()) == report
    table = (out / "bleu.md").read_text()
    assert "| en-bb | 150 | Mid |" in table and "| All | 3 |" in table


def test_a_perfect_system_scores_100_in_test_set_order(ckpt, tiny_data, monkeypatch, tmp_path):
    """Replace decoding by a lookup of the reference: any mix-up of the length-sorted
    batches (order, language, truncation) would cost BLEU points."""
    manifest = Manifest.load(tiny_data)
    vocab = Vocab(tiny_data, manifest.languages)
    test = load_split(tiny_data, manifest, "test")
    reference = {(vocab.lang_ids[lang], tuple(test[lang].src[i].tolist())): test[lang].tgt[i].tolist()
                 for lang in test for i in range(len(test[lang]))}
    batches = []

    def oracle(model, src, tags, langs, **kw):
        batches.append(src.ne(0).sum(1).tolist())
        rows = [tuple(s[s.ne(0)].tolist()) for s in src]
        return [[search.Hypothesis(reference[(int(t), r)], 0.0, 0.0, [])] for t, r in zip(tags, rows)]

    monkeypatch.setattr(search, "generate", oracle)
    out = tmp_path / "perfect"
    report = evaluate_checkpoint(ckpt, split="test", limit=20, out_dir=out,
                                 overrides=["eval.batch_tokens=40", "eval.tokenize_lang.cc=char"])
    assert len(batches) > 3 and all(b == sorted(b) for b in batches)
    for lang, r in report["languages"].items():
        assert r["bleu"] == pytest.approx(100.0) and r["chrf"] == pytest.approx(100.0), lang
        assert lines(out / f"hyp.en-{lang}.txt") == lines(out / f"ref.en-{lang}.txt")
    assert "tok:char" in report["languages"]["cc"]["signature"]
    assert report["averages"]["All"]["bleu"] == pytest.approx(100.0)
    # default thresholds (100K / 1M pairs): every tiny language is Lo
    assert report["averages"]["Lo"]["languages"] == ["aa", "bb", "cc"]
    assert report["averages"]["Mid"] is None and report["averages"]["Hi"] is None
    table = (out / "bleu.md").read_text()
    assert "| Mid | 0 | - | - |" in table and "| Hi | 0 | - | - |" in table


def test_scorer_and_groups():
    refs = ["the red cat sleeps in the old house", "a big dog runs to the river"]
    perfect = corpus_scores(refs, refs, "13a")
    assert perfect.bleu == pytest.approx(100.0) and perfect.chrf == pytest.approx(100.0)
    assert "tok:13a" in perfect.bleu_signature and "nc:6" in perfect.chrf_signature
    assert corpus_scores(["the red cat", "a dog"], refs, "13a").bleu < 50.0
    assert [group_of(n, 100, 1000) for n in (0, 99, 100, 999, 1000, 10 ** 6)] == \
           ["Lo", "Lo", "Mid", "Mid", "Hi", "Hi"]


def test_language_subset_and_unknown_language(ckpt, tmp_path):
    report = evaluate_checkpoint(ckpt, limit=2, out_dir=tmp_path / "o", languages=["cc"],
                                 overrides=["eval.beam=1"])
    assert list(report["languages"]) == ["cc"] and sorted(p.name for p in (tmp_path / "o").iterdir()) == \
           ["bleu.json", "bleu.md", "hyp.en-cc.txt", "ref.en-cc.txt"]
    with pytest.raises(EvalError, match="unknown language 'zz'.*aa, bb, cc"):
        evaluate_checkpoint(ckpt, limit=2, out_dir=tmp_path / "o", languages=["zz"])


def test_errors_name_the_problem(ckpt, tmp_path, tiny_data, capsys):
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {tmp_path}/nope"):
        evaluate_checkpoint(tmp_path / "nope")
    with pytest.raises(EvalError, match="only eval.* settings.*not 'model'"):
        evaluate_checkpoint(ckpt, overrides=["model.embed_dim=64"])
    with pytest.raises(ConfigError, match="unknown config key 'eval.beem'.*'beam'"):
        evaluate_checkpoint(ckpt, overrides=["eval.beem=2"])
    with pytest.raises(EvalError, match="eval.tokenize_lang.cc: unknown sacreBLEU tokenizer 'klingon'"):
        evaluate_checkpoint(ckpt, overrides=["eval.tokenize_lang.cc=klingon"])
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(tmp_path / "nope")])
    assert f"no checkpoint at {tmp_path}/nope" in capsys.readouterr().err

    wrong, _ = make_checkpoint(tmp_path / "wrong", tiny_data, manifest_fingerprint="0123456789abcdef")
    fingerprint = Manifest.load(tiny_data).fingerprint
    with pytest.raises(EvalError, match=f"fingerprint 0123456789ab.*fingerprint {fingerprint[:12]}"):
        evaluate_checkpoint(wrong)
    states = torch.load(ckpt / MODEL_STATES, weights_only=False)
    del states["module"]["encoder_layers.1.ffn.fc1.weight"]
    torch.save(states, ckpt / MODEL_STATES)
    with pytest.raises(EvalError, match="(?s)do not fit.*Missing key.*encoder_layers.1.ffn.fc1.weight"):
        evaluate_checkpoint(ckpt)


def test_expert_files_are_merged_into_the_state_dict(ckpt):
    """DeepSpeed MoE writes each expert's parameters to layer_*_expert_*_ files."""
    meta = json.loads((ckpt / "cats_ds.json").read_text())
    expert = {"decoder_layers.0.ffn.deepspeed_moe.experts.deepspeed_experts.1.fc1.weight": torch.ones(2, 2)}
    torch.save(expert, ckpt / "layer_0_expert_1_mp_rank_00_model_states.pt")
    state = gather_state_dict(ckpt, meta)
    assert torch.equal(state[next(iter(expert))], torch.ones(2, 2)) and "embed.weight" in state
    torch.save({"embed.weight": torch.zeros(1)}, ckpt / "layer_0_expert_0_mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="layer_0_expert_0.*embed.weight"):
        gather_state_dict(ckpt, meta)


def test_beam_search_output_is_what_gets_written(ckpt, tiny_data, tmp_path):
    """The hypothesis file holds the detokenized best beam of each sentence, in order."""
    evaluate_checkpoint(ckpt, limit=6, out_dir=tmp_path / "o", languages=["bb"],
                        overrides=["eval.beam=3", "eval.batch_tokens=1000"])
    _, model, manifest, vocab, _ = load_for_inference(ckpt)
    test = load_split(tiny_data, manifest, "test")["bb"]
    order = np.argsort(test.src.sizes[:6], kind="stable")
    src = torch.nn.utils.rnn.pad_sequence([torch.tensor(test.src[i].astype(np.int64)) for i in order],
                                          batch_first=True)
    nbest = search.beam_search(model, src, torch.full((6,), vocab.lang_ids["bb"]), torch.full((6,), 1),
                               beam=3, max_len_a=1.2, max_len_b=10)
    expected = [""] * 6
    for i, hyps in zip(order.tolist(), nbest):
        assert hyps[0].tokens[-1] == EOS
        expected[i] = vocab.decode(hyps[0].tokens)
    assert lines(tmp_path / "o" / "hyp.en-bb.txt") == expected


def test_a_trained_zero3_checkpoint_loads_exactly(tmp_path, tiny_recipe):
    """A real ZeRO-3 run (weights only in the optimizer partitions, the tied embedding
    saved once): the loaded model reproduces the validation loss train.py recorded."""
    ds = write_json(tmp_path / "z3.json", ds_config(3))
    launch(["launch/train.py", "--deepspeed_config", ds, "--config", tiny_recipe("z3", train={"max_updates": 3})], 1)
    best = tmp_path / "z3" / "best"
    valid_loss = checkpoint_dev_loss(best)
    assert valid_loss == pytest.approx(json.loads((best / "cats_ds.json").read_text())["valid_loss"], rel=1e-6)
    report = evaluate_checkpoint(best, limit=3, overrides=["eval.beam=2"])
    assert report["settings"]["step"] == 3 and all(r["n"] == 3 for r in report["languages"].values())
