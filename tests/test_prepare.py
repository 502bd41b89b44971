"""`prepare` end to end on a small generated plain corpus, plus the real gettext catalogs."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from cats_ds.config import Config, DataConfig, load_config
from cats_ds.data.indexed import token_dtype
from cats_ds.data.manifest import EOS, Manifest, Vocab, lang_tag, load_split
from cats_ds.data.prepare import PrepareError, prepare, sample_indices, sample_sizes

REPO = Path(__file__).resolve().parents[1]
WORDS = ("time year people way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work government "
         "number night point home water room mother area money story fact month right study book eye job "
         "word business issue side kind head house service friend father power hour game line end member "
         "law car city community name president team minute idea body information back parent face level "
         "office door health person art war history party result change morning reason research girl").split()
LANGS = {"de": lambda w: w[::-1] + "en", "fr": lambda w: "le" + w[1:] + "é", "cy": lambda w: "y" + w + "dd"}


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "." for _ in range(n)]


def make_corpus(root: Path, sizes=None) -> Path:
    """train/dev/test for de, fr (and cy without dev/test: hash-carved)."""
    sizes = sizes or {"de": 400, "fr": 300, "cy": 120}
    root.mkdir(parents=True, exist_ok=True)
    for k, (lang, n) in enumerate(sizes.items()):
        for split, count in (("train", n), ("dev", 20), ("test", 25)):
            if lang == "cy" and split != "train":
                continue
            en = sentences(count, seed=zlib.crc32(f"{lang}-{split}".encode()) + k)
            xx = [" ".join(LANGS[lang](w) for w in s.split()) for s in en]
            for side, lines in (("en", en), (lang, xx)):
                (root / f"{split}.en-{lang}.{side}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def config(raw: Path, out: Path, **data) -> Config:
    settings = dict(corpus="plain", raw=str(raw), dir=str(out), vocab_size=160, vocab_sentences=4000,
                    character_coverage=1.0, dev_fraction=0.05, test_fraction=0.05)
    settings.update(data)
    return Config(data=DataConfig(**settings))


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    raw = make_corpus(tmp_path_factory.mktemp("raw"))
    out = tmp_path_factory.mktemp("bin") / "data"
    manifest = prepare(config(raw, out))
    return raw, out, manifest


def normalized(text: str) -> str:
    norm = spm.SentencePieceNormalizer(rule_name="nmt_nfkc", add_dummy_prefix=False, escape_whitespaces=False)
    return norm.normalize(text)


def test_prepare_writes_a_loadable_folder(prepared):
    raw, out, manifest = prepared
    loaded = Manifest.load(out)
    assert loaded == manifest
    assert loaded.languages == ["cy", "de", "fr"]
    assert loaded.vocab_size == 160 and loaded.dtype == token_dtype(160).name
    assert loaded.pairs["dev"]["de"] == 20 and loaded.pairs["test"]["fr"] == 25
    assert loaded.pairs["dev"]["cy"] > 0 and loaded.pairs["train"]["cy"] + loaded.pairs["dev"]["cy"] + \
        loaded.pairs["test"]["cy"] <= 120
    assert sorted(Path(s["path"]).name for s in loaded.sources) == sorted(p.name for p in raw.iterdir())
    assert not [p for p in out.iterdir() if "tmp" in p.name]
    vocab = Vocab(out, loaded.languages)
    assert [vocab.lang_ids[lang] for lang in loaded.languages] == [4, 5, 6]
    assert vocab.sp.id_to_piece(4) == lang_tag("cy")
    assert (vocab.sp.pad_id(), vocab.sp.unk_id(), vocab.sp.bos_id(), vocab.sp.eos_id()) == (0, 1, 2, 3)


def test_prepare_round_trips_the_text(prepared):
    raw, out, manifest = prepared
    vocab = Vocab(out, manifest.languages)
    for split in ("train", "dev"):
        data = load_split(out, manifest, split)
        assert set(data) == {"cy", "de", "fr"}
        for lang in ("de", "fr"):
            src = (raw / f"{split}.en-{lang}.en").read_text(encoding="utf-8").splitlines()
            tgt = (raw / f"{split}.en-{lang}.{lang}").read_text(encoding="utf-8").splitlines()
            pairs = data[lang]
            assert len(pairs) == manifest.pairs[split][lang] == len(src)  # nothing too long here
            same = sum(vocab.decode(pairs.src[i]) == normalized(src[i]) and
                       vocab.decode(pairs.tgt[i]) == normalized(tgt[i]) for i in range(len(pairs)))
            assert same >= 0.95 * len(pairs)
            assert all(pairs.tgt[i][-1] == EOS and len(pairs.tgt[i]) <= 200 for i in range(len(pairs)))


def test_rerun_is_a_noop_and_changes_rebuild(tmp_path, capsys):
    raw = make_corpus(tmp_path / "raw", {"de": 300, "fr": 200})
    out = tmp_path / "bin"
    first = prepare(config(raw, out))
    before = mtimes(out)
    capsys.readouterr()
    start = time.time()
    again = prepare(config(raw, out))
    assert time.time() - start < 5 and "up to date" in capsys.readouterr().out
    assert again == first and mtimes(out) == before

    # same content, rewritten file: still up to date
    p = raw / "train.en-de.de"
    p.write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    prepare(config(raw, out))
    assert mtimes(out) == before

    # changed content: rebuild with the new pair count
    p.write_text("\n" + p.read_text(encoding="utf-8").split("\n", 1)[1], encoding="utf-8")
    rebuilt = prepare(config(raw, out))
    assert rebuilt.fingerprint != first.fingerprint and mtimes(out) != before
    assert rebuilt.pairs["train"]["de"] == first.pairs["train"]["de"] - 1  # the blank line's pair dropped

    # changed setting: rebuild; force: rebuild
    smaller = prepare(config(raw, out, max_tokens_per_side=12))
    assert smaller.fingerprint != rebuilt.fingerprint
    assert smaller.pairs["train"]["de"] < rebuilt.pairs["train"]["de"]
    stamp = mtimes(out)
    time.sleep(0.01)
    assert prepare(config(raw, out, max_tokens_per_side=12), force=True) == smaller
    assert all(mtimes(out)[name] > stamp[name] for name in stamp if name.endswith(".bin"))


def test_rebuild_removes_stale_shards_and_deleted_outputs_rebuild(tmp_path):
    raw = make_corpus(tmp_path / "raw", {"de": 250, "fr": 200})
    out = tmp_path / "bin"
    prepare(config(raw, out))
    assert (out / "train.en-fr.fr.bin").is_file()
    manifest = prepare(config(raw, out, languages=["de"]))
    assert manifest.languages == ["de"] and not list(out.glob("*.en-fr.*"))
    (out / "dev.en-de.de.idx").unlink()
    prepare(config(raw, out, languages=["de"]))
    assert (out / "dev.en-de.de.idx").is_file()


def test_prepare_errors_are_prepare_errors(tmp_path):
    raw = make_corpus(tmp_path / "raw", {"de": 200, "fr": 150})
    with pytest.raises(PrepareError, match=r"language 'xx' not in the plain corpus"):
        prepare(config(raw, tmp_path / "a", languages=["de", "xx"]))
    with pytest.raises(PrepareError, match=r"fewer than data.min_pairs=190 training pairs after filtering: fr"):
        prepare(config(raw, tmp_path / "b", min_pairs=190))
    with pytest.raises(PrepareError, match=r"after dropping pairs over data.max_tokens_per_side=3: de \(0\)"):
        prepare(config(raw, tmp_path / "c", max_tokens_per_side=3))
    with pytest.raises(PrepareError, match=r"SentencePiece training failed \(data.vocab_size=50000"):
        prepare(config(raw, tmp_path / "d", vocab_size=50000))
    assert not (tmp_path / "d" / "manifest.json").exists()
    with pytest.raises(PrepareError, match="data.vocab_temperature must be > 0"):
        prepare(config(raw, tmp_path / "e", vocab_temperature=0.0))
    with pytest.raises(PrepareError, match="data.dev_fraction=0.6 and data.test_fraction=0.5"):
        prepare(config(raw, tmp_path / "e", dev_fraction=0.6, test_fraction=0.5))


def test_prepare_is_deterministic(tmp_path):
    raw = make_corpus(tmp_path / "raw", {"de": 200, "cy": 80})
    a, b = prepare(config(raw, tmp_path / "a")), prepare(config(raw, tmp_path / "b"))
    assert a.pairs == b.pairs and a.fingerprint == b.fingerprint
    for name in ("spm.vocab", "train.en-cy.cy.bin", "dev.en-cy.en.bin"):  # .model holds the tmp paths
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_sample_sizes_follow_the_temperature():
    train = {"hi": 100_000, "lo": 1_000}
    assert sample_sizes(train, 1.0, 10_100) == {"hi": 10_000, "lo": 100}
    assert sample_sizes(train, float("inf"), 1000) == {"hi": 500, "lo": 500}
    t5 = sample_sizes(train, 5.0, 1000)
    assert t5["lo"] / t5["hi"] == pytest.approx((1 / 100) ** 0.2, rel=0.01)
    idx = sample_indices(3, 8, np.random.default_rng(0))
    assert sorted(np.bincount(idx, minlength=3)) == [2, 3, 3]


def test_launch_script_runs_from_the_repo_root(tmp_path):
    raw = make_corpus(tmp_path / "raw", {"de": 200})
    out = tmp_path / "bin"
    cmd = [sys.executable, "launch/prepare.py", "data.corpus=plain", f"data.raw={raw}", f"data.dir={out}",
           "data.vocab_size=120", "data.vocab_sentences=1000", "data.character_coverage=1.0"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and Manifest.load(out).languages == ["de"]
    bad = subprocess.run(cmd[:2] + ["data.corpus=plain", f"data.raw={tmp_path / 'none'}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such directory" in bad.stderr


LOCALE = Path("/usr/share/locale")


@pytest.mark.skipif(not list(LOCALE.glob("cy/LC_MESSAGES/*.mo")) or not list(LOCALE.glob("af/LC_MESSAGES/*.mo")),
                    reason="no gettext catalogs for cy and af on this machine")
def test_prepare_real_gettext_catalogs(tmp_path):
    cfg = load_config(None, [f"data.dir={tmp_path}", "data.languages=[af,cy]", "data.vocab_size=400",
                             "data.vocab_sentences=4000"])
    manifest = prepare(cfg)
    assert manifest.corpus == "gettext" and manifest.languages == ["af", "cy"]
    assert all(manifest.pairs["train"][lang] > 500 and manifest.pairs["dev"][lang] > 20 for lang in ("af", "cy"))
    assert all(Path(s["path"]).suffix == ".mo" for s in manifest.sources)
    vocab = Vocab(tmp_path, manifest.languages)
    dev = load_split(tmp_path, manifest, "dev")["cy"]
    decoded = [vocab.decode(dev.tgt[i]) for i in range(len(dev))]
    assert sum("⁇" not in s for s in decoded) > 0.8 * len(decoded)
    train_en = {vocab.decode(x) for x in load_split(tmp_path, manifest, "train")["af"].src}
    assert not train_en & {vocab.decode(x) for x in load_split(tmp_path, manifest, "test")["cy"].src}


def test_raw_dev_test_text_is_kept_with_checksums(prepared):
    """dev/test text of exactly the pairs in the shards, in shard order, listed with its
    sha256 in the manifest; no text for train."""
    import hashlib

    from cats_ds.data.manifest import load_texts, text_paths

    raw, out, manifest = prepared
    for split in ("dev", "test"):
        for lang in ("de", "fr"):
            src, tgt = load_texts(out, manifest, split, lang, manifest.pairs[split][lang])
            assert src == (raw / f"{split}.en-{lang}.en").read_text(encoding="utf-8").splitlines()
            assert tgt == (raw / f"{split}.en-{lang}.{lang}").read_text(encoding="utf-8").splitlines()
        en, xx = text_paths(out, split, "cy")  # hash-carved from train: the carved pairs
        assert len(xx.read_text(encoding="utf-8").splitlines()) == manifest.pairs[split]["cy"]
        assert manifest.texts[xx.name] == hashlib.sha256(xx.read_bytes()).hexdigest()
    assert not list(out.glob("train.*.txt"))
    assert sorted(manifest.texts) == sorted(p.name for p in out.glob("*.txt"))


def test_a_missing_or_changed_text_file(tmp_path):
    from cats_ds.data.manifest import RawTextError, load_texts, text_paths

    raw = make_corpus(tmp_path / "raw", {"de": 200})
    out = tmp_path / "bin"
    manifest = prepare(config(raw, out))
    _, xx = text_paths(out, "test", "de")
    xx.write_text(xx.read_text(encoding="utf-8").replace("e", "E"), encoding="utf-8")
    with pytest.raises(RawTextError, match="test.en-de.de.txt: sha256 differs.*--force"):
        load_texts(out, manifest, "test", "de", 25)
    xx.unlink()
    assert prepare(config(raw, out)).texts == manifest.texts  # a missing output file rebuilds
    assert load_texts(out, manifest, "test", "de", 25)[1][0] == \
        (raw / "test.en-de.de").read_text(encoding="utf-8").splitlines()[0]
    with pytest.raises(RawTextError, match="24 pairs"):
        load_texts(out, manifest, "test", "de", 24)
