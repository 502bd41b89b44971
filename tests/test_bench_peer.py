"""The peer bench's fairseq side without fairseq (CI has none): the export to fairseq's
binarized format is token-identical (read back with cats_ds.bench.peer's own reader), the
log parser reads fairseq's train_inner lines, and a python without fairseq is refused
with a clear message."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from cats_ds.bench.peer import (FAIRSEQ_SPECIALS, FairseqMissing, check_fairseq_python, export_fairseq,
                                fairseq_dict_lines, fairseq_tag, id_map, parse_fairseq_log, read_dict, read_mmap)
from cats_ds.data.manifest import EOS, Manifest, Vocab, lang_tag, load_split


def test_export_is_token_identical(tmp_path, tiny_data):
    manifest = Manifest.load(tiny_data)
    vocab = Vocab(tiny_data, manifest.languages)
    out = tmp_path / "fs"
    stamp = export_fairseq(tiny_data, out)
    assert stamp["languages"] == manifest.languages and stamp["vocab_size"] == len(vocab)

    # the dictionary: fairseq id i holds our piece i (the four specials by name, the tags renamed)
    symbols = read_dict(out / "dict.txt")
    assert len(symbols) == len(vocab) and symbols[:4] == list(FAIRSEQ_SPECIALS)
    table = id_map(len(vocab))
    assert sorted(table.tolist()) == list(range(len(vocab)))  # a bijection
    assert (table[4:] == np.arange(4, len(vocab))).all()
    tags = {lang_tag(lang): fairseq_tag(lang) for lang in manifest.languages}
    for ours in range(len(vocab)):
        piece = vocab.sp.id_to_piece(ours)
        assert symbols[table[ours]] == tags.get(piece, piece)
    assert symbols[table[EOS]] == "</s>" and symbols[table[vocab.lang_ids["aa"]]] == "__aa__"

    # every sentence of every language and split, in order, id for id
    for ours, theirs in (("train", "train"), ("dev", "valid")):
        splits = load_split(tiny_data, manifest, ours)
        assert stamp["sentences"][theirs] == {lang: len(s) for lang, s in splits.items()}
        for lang, data in splits.items():
            for side, shard in (("en", data.src), (lang, data.tgt)):
                exported = read_mmap(out / f"{theirs}.en-{lang}.{side}")
                assert len(exported) == len(shard) == manifest.pairs[ours][lang]
                for i, sent in enumerate(exported):
                    assert sent.tolist() == table[shard[i].astype(np.int64)].tolist()
                    assert sent[-1] == FAIRSEQ_SPECIALS.index("</s>")
    assert not list(out.glob("test.*"))  # the test split stays ours

    # a second export of the same prepared folder is a no-op
    before = (out / "train.en-aa.aa.bin").stat().st_mtime_ns
    assert export_fairseq(tiny_data, out) == stamp
    assert (out / "train.en-aa.aa.bin").stat().st_mtime_ns == before


def test_dict_refuses_pieces_fairseq_cannot_hold():
    pieces = ["<pad>", "<unk>", "<s>", "</s>", "<2aa>", "x"]
    assert fairseq_dict_lines(pieces, ["aa"]) == ["__aa__ 1", "x 1"]
    with pytest.raises(ValueError, match="cannot be a fairseq dictionary entry"):
        fairseq_dict_lines(pieces[:-1] + ["a b"], ["aa"])
    with pytest.raises(ValueError, match="expected '<unk>'"):
        fairseq_dict_lines(["<pad>", "<s>", "<unk>", "</s>", "x"], ["aa"])


def _inner(n: int, wps: float, wpb: float) -> str:
    stats = {"epoch": 1, "update": round(n / 1000, 3), "loss": "12.9", "wps": f"{wps:.1f}", "ups": "1.2",
             "wpb": f"{wpb:.1f}", "bsz": "95", "num_updates": str(n), "lr": "1e-05", "gnorm": "3.1", "clip": "100",
             "train_wall": "7", "wall": "8"}
    return f"2026-12-07 17:30:{n:02d} | INFO | train_inner | {json.dumps(stats)}"


SAMPLE_LOG = "\n".join([
    "2026-12-07 17:29:50 | INFO | fairseq_cli.train | model: TransformerModel",
    "2026-12-07 17:29:50 | INFO | fairseq_cli.train | num. shared model params: 4,652,160 (num. trained: 4,652,160)",
    _inner(10, 1000.0, 2000.0),  # warm-up
    _inner(20, 2000.0, 2500.0),
    _inner(30, 2500.0, 2600.0),
    _inner(40, 3000.0, 2700.0),
    '2026-12-07 17:30:59 | INFO | train | {"epoch": 1, "wps": "999.0", "num_updates": "40"}',
    "2026-12-07 17:31:00 | INFO | fairseq_cli.train | done training in 70.1 seconds",
])


def test_parse_fairseq_log_timed_window():
    res = parse_fairseq_log(SAMPLE_LOG, warmup=10, timed=30)
    tokens = 10 * (2500 + 2600 + 2700)
    seconds = 10 * (2500 / 2000 + 2600 / 2500 + 2700 / 3000)
    assert res["tokens"] == pytest.approx(tokens) and res["seconds"] == pytest.approx(seconds)
    assert res["tokens_per_s"] == pytest.approx(tokens / seconds)
    assert res["tokens_per_update"] == pytest.approx(2600)
    assert res["params"] == 4_652_160
    # only the lines inside the window count; the epoch summary ("train") never does
    assert parse_fairseq_log(SAMPLE_LOG, warmup=20, timed=20)["tokens"] == pytest.approx(10 * (2600 + 2700))


def test_parse_fairseq_log_needs_the_whole_window():
    with pytest.raises(ValueError, match="cover 30 of the 40 timed updates"):
        parse_fairseq_log(SAMPLE_LOG, warmup=10, timed=40)
    with pytest.raises(ValueError, match="straddles the warm-up end 15"):
        parse_fairseq_log(SAMPLE_LOG, warmup=15, timed=25)


def test_missing_python_is_named(tmp_path):
    with pytest.raises(FairseqMissing, match="no such python.*launch/fairseq_env.sh"):
        check_fairseq_python(str(tmp_path / "nowhere" / "python"))


@pytest.mark.launcher  # runs `python -c "import fairseq"`
def test_python_without_fairseq_is_refused(tiny_data, tiny_recipe, capsys):
    from cats_ds.bench.suite import main

    with pytest.raises(SystemExit, match=r"cannot import fairseq \(ModuleNotFoundError: No module named 'fairseq'\)"):
        main(["peer", "--fairseq-python", sys.executable, "--recipe", str(tiny_recipe()), "--processes", "1"])


@pytest.mark.launcher  # starts a stand-in for the fairseq python (a shell script)
def test_run_fairseq_launches_the_ranks(tmp_path, tiny_data):
    """launch_fairseq with a stand-in python that logs its arguments and prints the
    sample log: each rank gets the rendezvous and its rank, the run the window's updates
    and a log interval that lands on the warm-up end; rank 0's log is parsed."""
    from pathlib import Path

    from cats_ds.bench.peer import run_fairseq
    from cats_ds.config import config_from_dict

    (tmp_path / "sample.log").write_text(SAMPLE_LOG + "\n")
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = -c ]; then echo 0.12.3.1; exit 0; fi\n"
                    f"echo \"$@\" > \"{tmp_path}/args.$$\"\ncat \"{tmp_path}/sample.log\"\n")
    fake.chmod(0o755)
    assert check_fairseq_python(str(fake)) == "0.12.3.1"
    cfg = config_from_dict({"data": {"dir": str(tiny_data)}, "model": {"embed_dim": 32, "ffn_dim": 64,
                                                                       "encoder_layers": 2, "decoder_layers": 2,
                                                                       "heads": 4}})
    res = run_fairseq(str(fake), cfg, tmp_path / "fs", ["aa", "bb"], 2, 3000, 10, 30)
    assert res["tokens_per_s"] == pytest.approx(parse_fairseq_log(SAMPLE_LOG, 10, 30)["tokens_per_s"])
    calls = sorted(Path(p).read_text().split() for p in tmp_path.glob("args.*"))
    assert len(calls) == 2
    for rank, args in enumerate(sorted(calls, key=lambda a: a[a.index("--distributed-rank") + 1])):
        opt = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
        assert args[:2] == ["-m", "fairseq_cli.train"] and args[2] == str((tmp_path / "fs").absolute())
        assert opt["--distributed-rank"] == str(rank) and opt["--distributed-world-size"] == "2"
        assert opt["--distributed-init-method"].startswith("tcp://127.0.0.1:")
        assert opt["--ddp-backend"] == "legacy_ddp" and opt["--distributed-backend"] == "gloo"
        assert opt["--max-update"] == "40" and opt["--log-interval"] == "10" and opt["--max-tokens"] == "3000"
        assert opt["--lang-pairs"] == "en-aa,en-bb" and opt["--sampling-temperature"] == "5.0"
        assert opt["--encoder-embed-dim"] == "32" and opt["--decoder-layers"] == "2"
        assert "--cpu" in args and "--decoder-langtok" in args and "--share-all-embeddings" in args


@pytest.mark.launcher  # starts a stand-in for the fairseq python (a shell script)
@pytest.mark.parametrize("malloc", ["system", "reuse"])
def test_run_fairseq_allocator_setting(tmp_path, tiny_data, monkeypatch, malloc):
    """--fairseq-malloc reuse gives fairseq our trainer's allocator setting through
    GLIBC_TUNABLES; system leaves the environment as it is."""
    from cats_ds.bench.peer import run_fairseq
    from cats_ds.config import config_from_dict
    from cats_ds.runtime.host_malloc import GLIBC_TUNABLES_REUSE

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    (tmp_path / "sample.log").write_text(SAMPLE_LOG + "\n")
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"tunables=$GLIBC_TUNABLES\" > \"{tmp_path}/env\"\ncat \"{tmp_path}/sample.log\"\n")
    fake.chmod(0o755)
    cfg = config_from_dict({"data": {"dir": str(tiny_data)}})
    run_fairseq(str(fake), cfg, tmp_path / "fs", ["aa", "bb"], 1, 3000, 10, 30, malloc=malloc)
    expected = GLIBC_TUNABLES_REUSE if malloc == "reuse" else ""
    assert (tmp_path / "env").read_text().strip() == f"tunables={expected}"
