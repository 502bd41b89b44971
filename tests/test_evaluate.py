"""End to end: a hand-made checkpoint folder on the tiny prepared corpus -> evaluate_checkpoint.

tiny_data (conftest) has training pairs aa 400, bb 150, cc 50 and 30 test pairs each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cats_ds.checkpoints import MODEL_STATES, CheckpointError, gather_state_dict, load_for_inference
from cats_ds.cli import evaluate_main
from cats_ds.config import ConfigError, config_from_dict
from cats_ds.data.groups import group_of
from cats_ds.data.manifest import EOS, Manifest, Vocab, load_split
from cats_ds.inference import search
from cats_ds.inference.evaluate import LIMIT_ORDER, EvalError, corpus_scores, evaluate_checkpoint, limit_sample
from cats_ds.model.transformer import build_model
from helpers import TINY_MODEL, checkpoint_dev_loss, ds_config, launch, make_plain_corpus, write_json

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
    out = ckpt.parent / "eval" / "best-test"  # the default place: beside best/, not inside it
    raw = tiny_data.parent / "raw"
    for lang in ("aa", "bb", "cc"):
        hyps, refs = lines(out / f"hyp.en-{lang}.txt"), lines(out / f"ref.en-{lang}.txt")
        assert len(hyps) == len(refs) == 5
        pick = limit_sample(lines(raw / f"test.en-{lang}.en"), 5)  # the hash-ordered sample, in test-set order
        assert refs == [lines(raw / f"test.en-{lang}.{lang}")[i] for i in pick]  # the raw text
        assert lines(out / f"src.en-{lang}.txt") == [lines(raw / f"test.en-{lang}.en")[i] for i in pick]
        r = report["languages"][lang]
        assert r["n"] == 5 and 0.0 <= r["bleu"] <= 100.0 and 0.0 <= r["chrf"] <= 100.0
        assert "tok:13a" in r["signature"] and r["tokenize"] == "13a"
    assert {lang: r["group"] for lang, r in report["languages"].items()} == {"aa": "Hi", "bb": "Mid", "cc": "Lo"}
    assert {lang: r["train_pairs"] for lang, r in report["languages"].items()} == {"aa": 400, "bb": 150, "cc": 50}
    assert report["settings"] | {"checkpoint": None} == {
        "checkpoint": None, "step": 7, "split": "test", "limit": 5, "limit_order": LIMIT_ORDER, "groups": None,
        "processes": 1, "dtype": "fp32", "backend": "pytorch", "beam": 2, "lenpen": 1.0,
        "max_len_a": 1.2, "max_len_b": 10, "lo_max": 100, "hi_min": 300, "references": "raw text",
        "chrf_signature": report["settings"]["chrf_signature"]}
    assert "nw:2" in report["settings"]["chrf_signature"]  # chrF++
    assert json.loads((out / "bleu.json").read_text()) == report
    table = (out / "bleu.md").read_text()
    assert "| en-bb | 150 | Mid | 5 |" in table and "| All | 3 |" in table


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
    assert "| Mid | 0 | - | - | - | - |" in table and "| Hi | 0 | - | - | - | - |" in table


def test_scorer_and_groups():
    refs = ["the red cat sleeps in the old house", "a big dog runs to the river"]
    perfect = corpus_scores(refs, refs, "13a")
    assert perfect.bleu == pytest.approx(100.0) and perfect.chrf == pytest.approx(100.0)
    assert "tok:13a" in perfect.bleu_signature and "nc:6" in perfect.chrf_signature
    assert "nw:2" in perfect.chrf_signature
    assert corpus_scores(["the red cat", "a dog"], refs, "13a").bleu < 50.0
    assert [group_of(n, 100, 1000) for n in (0, 99, 100, 999, 1000, 10 ** 6)] == \
           ["Lo", "Lo", "Mid", "Mid", "Hi", "Hi"]


def test_language_subset_and_unknown_language(ckpt, tmp_path):
    report = evaluate_checkpoint(ckpt, limit=2, out_dir=tmp_path / "o", languages=["cc"],
                                 overrides=["eval.beam=1"])
    assert list(report["languages"]) == ["cc"] and sorted(p.name for p in (tmp_path / "o").iterdir()) == \
           ["bleu.json", "bleu.md", "hyp.en-cc.txt", "ref.en-cc.txt", "src.en-cc.txt"]
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
    pick = np.array(limit_sample(lines(tiny_data.parent / "raw" / "test.en-bb.en"), 6))  # the --limit sample
    order = np.argsort(test.src.sizes[pick], kind="stable")
    src = torch.nn.utils.rnn.pad_sequence([torch.tensor(test.src[pick[i]].astype(np.int64)) for i in order],
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


def oracle_from(table: dict):
    """search.generate replaced by a lookup (tag id, source ids) -> output ids."""

    def generate(model, src, tags, langs, **kw):
        rows = [tuple(s[s.ne(0)].tolist()) for s in src]
        return [[search.Hypothesis(list(table[(int(t), r)]), 0.0, 0.0, [])] for t, r in zip(tags, rows)]

    return generate


def test_raw_references_are_scored_not_sentencepiece_round_trips(tmp_path, monkeypatch):
    """A test reference with a character the vocabulary lacks: its SentencePiece round trip
    has ' ⁇ ' instead. A system that outputs exactly the round trip must not score 100."""
    from cats_ds.config import config_from_dict
    from cats_ds.data.prepare import prepare

    raw = make_plain_corpus(tmp_path / "raw", {"aa": 200}, test=6)
    path = raw / "test.en-aa.aa"
    refs = lines(path)
    refs[2] = refs[2] + " ☃"  # in no training sentence: not in the vocabulary
    path.write_text("".join(r + "\n" for r in refs), encoding="utf-8")
    data = tmp_path / "bin"
    prepare(config_from_dict({"data": {"dir": str(data), "corpus": "plain", "raw": str(raw), "vocab_size": 60,
                                       "character_coverage": 1.0}}))
    ckpt, _ = make_checkpoint(tmp_path / "run" / "best", data)
    manifest = Manifest.load(data)
    vocab = Vocab(data, manifest.languages)
    test = load_split(data, manifest, "test")["aa"]
    round_trip = [vocab.decode(test.tgt[i]) for i in range(6)]
    assert round_trip[2] != refs[2] and "⁇" in round_trip[2]
    assert [r for i, r in enumerate(round_trip) if i != 2] == [r for i, r in enumerate(refs) if i != 2]
    monkeypatch.setattr(search, "generate", oracle_from(
        {(vocab.lang_ids["aa"], tuple(test.src[i].tolist())): test.tgt[i].tolist() for i in range(6)}))
    report = evaluate_checkpoint(ckpt, out_dir=tmp_path / "o")
    assert lines(tmp_path / "o" / "ref.en-aa.txt") == refs  # the raw text, with the snowman
    assert lines(tmp_path / "o" / "hyp.en-aa.txt") == round_trip
    expected = corpus_scores(round_trip, refs, "13a")
    assert report["languages"]["aa"]["bleu"] == pytest.approx(expected.bleu) and expected.bleu < 99.0
    assert report["languages"]["aa"]["chrf"] == pytest.approx(expected.chrf) and expected.chrf < 99.5


def test_copy_baseline_scores_the_source(ckpt, tiny_data, monkeypatch, tmp_path):
    """A 'model' that copies its input scores exactly the copy baseline; the baseline is
    the English source against the raw reference, in the table and the averages."""
    manifest = Manifest.load(tiny_data)
    vocab = Vocab(tiny_data, manifest.languages)
    test = load_split(tiny_data, manifest, "test")
    copy = {(vocab.lang_ids[lang], tuple(test[lang].src[i].tolist())): test[lang].src[i].tolist()
            for lang in test for i in range(len(test[lang]))}
    monkeypatch.setattr(search, "generate", oracle_from(copy))
    report = evaluate_checkpoint(ckpt, limit=12, out_dir=tmp_path / "o", overrides=GROUPS)
    raw = tiny_data.parent / "raw"
    for lang, r in report["languages"].items():
        pick = limit_sample(lines(raw / f"test.en-{lang}.en"), 12)
        src, ref = ([lines(raw / f"test.en-{lang}.{side}")[i] for i in pick] for side in ("en", lang))
        expected = corpus_scores(src, ref, "13a")
        assert r["copy_bleu"] == pytest.approx(expected.bleu) and r["copy_chrf"] == pytest.approx(expected.chrf)
        assert r["bleu"] == pytest.approx(r["copy_bleu"]) and r["chrf"] == pytest.approx(r["copy_chrf"])
        assert 0.0 < r["copy_chrf"] < 60.0  # made-up words share some letters with English, not many
    for group in ("Lo", "Mid", "Hi", "All"):
        avg = report["averages"][group]
        members = [report["languages"][lang] for lang in avg["languages"]]
        assert avg["copy_chrf"] == pytest.approx(np.mean([m["copy_chrf"] for m in members]))
    table = (tmp_path / "o" / "bleu.md").read_text()
    assert "copy BLEU | copy chrF++ |" in table
    cc = report["languages"]["cc"]
    assert f"| en-cc | 50 | Lo | 12 | {cc['bleu']:.2f} | {cc['chrf']:.2f} | {cc['copy_bleu']:.2f} | " \
           f"{cc['copy_chrf']:.2f} |" in table


def test_old_data_folder_without_raw_text_says_how_to_reprepare(tmp_path, tiny_data):
    import shutil

    data = tmp_path / "old"
    shutil.copytree(tiny_data, data)
    data_cfg = {"dir": str(data), "corpus": "plain", "raw": str(tiny_data.parent / "raw"), "vocab_size": 100,
                "vocab_temperature": 1.0}  # as conftest prepared it
    cfg = config_from_dict({"data": data_cfg, "model": dict(TINY_MODEL)})
    ckpt, _ = make_checkpoint(tmp_path / "run" / "best", data, config=cfg.to_dict())
    raw = json.loads((data / "manifest.json").read_text())
    raw.pop("texts")  # what an older prepare wrote
    (data / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EvalError, match="(?s)no raw test text for en-aa.*older cats_ds.*Re-prepare") as e:
        evaluate_checkpoint(ckpt, limit=2)
    assert f"python launch/prepare.py data.dir={data} data.corpus=plain data.raw={tiny_data.parent / 'raw'} " \
           f"data.vocab_size=100 data.vocab_temperature=1.0" in str(e.value)
    assert not (tmp_path / "run" / "eval").exists()  # failed before decoding or writing


def test_default_output_survives_a_checkpoint_resave(ckpt, tiny_data, tmp_path):
    """train.save_checkpoint swaps a new best/ in whole; the evaluation must not live in it."""
    import shutil

    evaluate_checkpoint(ckpt, limit=2, overrides=["eval.beam=1"])
    out = tmp_path / "run" / "eval" / "best-test"
    assert (out / "bleu.json").is_file() and not list(ckpt.rglob("bleu.json"))
    shutil.rmtree(ckpt)  # what the swap does to the old folder, then the new one moves in
    make_checkpoint(ckpt, tiny_data)
    assert (out / "bleu.json").is_file()


def test_samples_print_source_reference_hypothesis(ckpt, tmp_path, capsys):
    evaluate_checkpoint(ckpt, limit=8, out_dir=tmp_path / "o", overrides=["eval.beam=1"], samples=5)
    printed = capsys.readouterr().out
    assert "| 5 sample translations (test):" in printed
    blocks = printed.split("| 5 sample translations (test):")[1].split("| wrote")[0].strip().split("\n")
    heads = [b for b in blocks if b.startswith("en-")]
    assert [h.split()[0] for h in heads] == ["en-aa", "en-aa", "en-bb", "en-bb", "en-cc"]
    for head in heads:
        lang, j = head.split()[0][3:], int(head.split("#")[1])
        i = blocks.index(head)
        for kind, label in (("src", "source:"), ("ref", "reference:"), ("hyp", "hypothesis:")):
            got = blocks[i + 1 + ("src", "ref", "hyp").index(kind)].split(None, 1)
            want = lines(tmp_path / "o" / f"{kind}.en-{lang}.txt")[j]
            assert got[0] == label and got[1:] == ([want] if want else [])


def trained_checkpoint(folder: Path, data_dir: Path) -> Path:
    """make_checkpoint's folder holding a model trained a few steps (test_export.trained_model),
    so hypotheses end at different lengths instead of all running to the limit."""
    from test_export import trained_model

    make_checkpoint(folder, data_dir)
    _, model, *_ = trained_model(data_dir)
    torch.save({"module": model.state_dict(), "optimizer": None}, folder / MODEL_STATES)
    return folder


def test_two_rank_decoding_equals_one_process(tmp_path, tiny_data):
    """2 real gloo ranks under the deepspeed launcher decode shares of the batches; rank 0
    merges and scores: the same hypotheses and scores as 1 process."""
    ckpt = trained_checkpoint(tmp_path / "run" / "best", tiny_data)
    common = ["launch/evaluate.py", "--checkpoint", ckpt, "--limit", "20", "eval.beam=2", "eval.batch_tokens=40"]
    launch(common + ["--out", tmp_path / "one"], 1)
    out = launch(common + ["--out", tmp_path / "two"], 2)
    assert "on 2 process(es)" in out.stdout
    one, two = (json.loads((tmp_path / d / "bleu.json").read_text()) for d in ("one", "two"))
    assert (one["settings"]["processes"], two["settings"]["processes"]) == (1, 2)
    assert two["timing"]["processes"] == 2 and two["timing"]["sentences_per_s"] > 0
    for report in (one, two):
        report["settings"]["processes"] = report["timing"] = None
    assert one == two
    for lang in ("aa", "bb", "cc"):
        hyps = lines(tmp_path / "one" / f"hyp.en-{lang}.txt")
        assert len(hyps) == 20 and hyps == lines(tmp_path / "two" / f"hyp.en-{lang}.txt")
    assert len({len(h.split()) for h in lines(tmp_path / "one" / "hyp.en-aa.txt")}) > 1  # not all at the limit


def test_share_batches_covers_every_batch_once():
    from cats_ds.inference.evaluate import share_batches

    costs = [5, 1, 9, 3, 3, 7]
    shares = share_batches([("aa", np.arange(1))] * 6, costs, 2)
    assert sorted(shares[0] + shares[1]) == list(range(6))
    assert abs(sum(costs[j] for j in shares[0]) - sum(costs[j] for j in shares[1])) <= 2
    assert share_batches([("aa", np.arange(1))] * 2, [1, 1], 3)[2] == []


def test_device_cuda_without_cuda_is_an_error(ckpt, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(ckpt), "--device", "cuda"])
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


def test_limit_is_a_fixed_hash_ordered_sample_not_the_first_sentences():
    """--limit keeps the N sentences whose English source has the smallest SHA-256, in test-set
    order: the same on every call (and machine: the indices below are pinned), not the
    alphabetically first ones of a sorted test file, and spread over all of it."""
    sources = sorted(f"{'%placeholder ' if i % 4 == 0 else ''}sentence number {i:04d}" for i in range(1000))
    pick = limit_sample(sources, 100)
    assert pick == limit_sample(list(sources), 100) == sorted(pick) and len(set(pick)) == 100
    assert pick[:8] == [15, 23, 31, 35, 38, 43, 44, 59]  # pinned: sha256 is the same everywhere
    assert pick != list(range(100)) and max(pick) > 900
    # the first 100 of the sorted file are all placeholders; the sample has about the file's 25%
    assert all(sources[i].startswith("%") for i in range(100))
    assert 0.15 < np.mean([sources[i].startswith("%") for i in pick]) < 0.35
    # chosen by content: the same sentences are kept when the file is reordered
    shuffled = sources[::-1]
    assert sorted(shuffled[i] for i in limit_sample(shuffled, 100)) == sorted(sources[i] for i in pick)
    assert limit_sample(sources, None) == limit_sample(sources, 5000) == list(range(1000))


def test_named_groups_in_evaluate_and_iso_codes(ckpt, tmp_path, monkeypatch):
    """eval.groups by name overrides the size thresholds; an unlisted language is an error
    naming it; malformed groups are config errors."""
    report = evaluate_checkpoint(ckpt, limit=2, out_dir=tmp_path / "o", overrides=[
        "eval.beam=1", "eval.groups={Lo: [aa], Hi: [bb, cc]}", *GROUPS])
    assert {l: r["group"] for l, r in report["languages"].items()} == {"aa": "Lo", "bb": "Hi", "cc": "Hi"}
    assert report["settings"]["groups"] == {"Lo": ["aa"], "Hi": ["bb", "cc"]}
    assert report["averages"]["Hi"]["languages"] == ["bb", "cc"] and report["averages"]["Mid"] is None
    with pytest.raises(EvalError, match=r"eval.groups: language 'cc' is in no group \(Lo: aa; Hi: bb\)"):
        evaluate_checkpoint(ckpt, limit=2, out_dir=tmp_path / "p", overrides=["eval.groups={Lo: [aa], Hi: [bb]}"])
    with pytest.raises(ConfigError, match=r"eval.groups: unknown group 'Low'"):
        config_from_dict({"eval": {"groups": {"Low": ["aa"]}}})
    with pytest.raises(ConfigError, match=r"eval.groups: language 'tur' is in both Lo and Hi \(as 'tr'\)"):
        config_from_dict({"eval": {"groups": {"Lo": ["tr"], "Hi": ["tur"]}}})


def test_ted8_group_map_on_a_two_letter_corpus():
    """The TED8-related named sets in 639-3 group a 2-letter (gettext-style) corpus."""
    from cats_ds.data.groups import group_for

    ted8 = config_from_dict({"eval": {"groups": {"Lo": ["aze", "bel", "glg", "slk"],
                                                 "Hi": ["tur", "rus", "por", "ces"]}}}).eval.groups
    got = {lang: group_for(lang, 10**9, 100, 300, ted8) for lang in ("az", "be", "gl", "sk", "tr", "ru", "pt_BR", "cs")}
    assert got == {"az": "Lo", "be": "Lo", "gl": "Lo", "sk": "Lo", "tr": "Hi", "ru": "Hi", "pt_BR": "Hi", "cs": "Hi"}
    assert group_for("tr", 10**9, 100, 300, None) == "Hi" and group_for("tr", 50, 100, 300, {}) == "Lo"
    from cats_ds.analysis.similarity import resource_groups  # analysis' HiLo / LoLo pair types follow them

    class Sizes:
        def train_pairs(self, lang):
            return 10**9

    assert resource_groups(Sizes(), ["az", "tr"], 100, 300, ted8) == {"az": "Lo", "tr": "Hi"}
    assert resource_groups(Sizes(), ["az", "tr"], 100, 300) == {"az": "Hi", "tr": "Hi"}
