"""`prepare`: raw corpus -> ONE joint SentencePiece model -> binarized shards + manifest.json.

Three passes over the corpus, holding one language in memory at a time:
  1. scan    every language read and filtered once: counts, warnings, errors, all before
             any SentencePiece work;
  2. sample  SentencePiece training sentences from the train splits, temperature-sampled
             over languages, written to a temporary file; train the model;
  3. encode  every split; pairs with a side over data.max_tokens_per_side dropped; shards,
             and for dev/test also the text of the kept pairs (`manifest.text_paths`), the
             references `evaluate` scores against, with their sha256 in the manifest.
Dev/test of catalog corpora are first reduced to pairs that test translation
(cats_ds/data/translatable.py, `data.translatable_*`); the summary table counts each
rule's drops per language.
manifest.json is written last and atomically: a folder with a manifest is complete. A
rebuild deletes the old manifest first. Inputs are fingerprinted (sha256 of every raw
file + the settings that change the output), so a re-run with the same inputs returns
before reading anything but the checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zlib
from collections import Counter
from itertools import chain
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from cats_ds.config import Config, ConfigError, DataConfig
from cats_ds.data.indexed import shard_problem, token_dtype, write_shard
from cats_ds.data.manifest import (BOS, EOS, MANIFEST, PAD, SPLITS, SPM_PREFIX, TEXT_SPLITS, UNK, Manifest,
                                   lang_tag, shard_prefix, text_paths)
from cats_ds.data.readers import CorpusError, Layout, Scan, locate, read_language, scan_corpus
from cats_ds.data.translatable import RULES, applies

PREPARE_VERSION = 3
"""Bump when reader filters or encoding change the output for the same inputs.
2: raw dev/test text kept; the translatable dev/test filter.
3: training pairs whose English side is in the language's dev/test dropped."""
SAMPLE_SEED = 1234
"""Seed of the SentencePiece training sample (independent of train.seed)."""
ENCODE_BATCH = 4096
"""Sentences per SentencePiece encode call."""
FINGERPRINT_KEYS = ("corpus", "languages", "pattern", "vocab_size", "vocab_temperature",
                    "vocab_sentences", "character_coverage", "max_chars", "max_tokens_per_side",
                    "dev_fraction", "test_fraction", "dev_max", "min_pairs", "translatable_eval",
                    "translatable_min_letters", "translatable_min_words", "translatable_train")
"""DataConfig fields that decide the output (data.dir and data.raw do not)."""


class PrepareError(Exception):
    """The corpus or the settings cannot be prepared; the message says which and why."""


def prepare(cfg: Config, force: bool = False) -> Manifest:
    """Prepare cfg.data.dir from cfg.data.raw, or return its manifest if it is up to date."""
    data = cfg.data
    out = Path(data.dir)
    start = time.time()
    check_settings(data)
    try:
        layout = locate(data)
        sources = checksums(layout)
        settings = prepare_settings(data)
        fp = fingerprint(layout.root, sources, settings)
        current = None if force else up_to_date(out, fp)
        if current is not None:
            print(f"{out}: up to date ({len(sources)} source files unchanged, fingerprint {fp[:12]}); "
                  f"nothing to do (--force rebuilds)")
            return current
        manifest = _build(layout, data, out, sources, settings, fp)
    except CorpusError as e:
        raise PrepareError(str(e)) from None
    print(f"prepared {len(manifest.languages)} languages in {time.time() - start:.0f}s -> {out}")
    return manifest


def _build(layout: Layout, data: DataConfig, out: Path, sources: list[dict], settings: dict,
           fp: str) -> Manifest:
    scan = scan_corpus(layout, data, progress=lambda langs: tqdm(langs, desc="read", unit="lang",
                                                                 leave=False, disable=None))
    for warning in scan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    check_min_pairs({lang: c["train"] for lang, c in scan.counts.items()}, data.min_pairs, "after filtering")
    out.mkdir(parents=True, exist_ok=True)
    remove_previous(out)
    sp = train_sentencepiece(layout, scan, data, out)
    dtype = token_dtype(sp.get_piece_size())
    pairs: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    dropped: dict[str, Counter] = {}
    for lang in scan.languages:
        lang_data = read_language(layout, lang, data)
        dropped[lang] = Counter()
        for split in SPLITS:
            pairs[split][lang] = encode_split(sp, lang_data.splits.get(split, []), out, split, lang, dtype,
                                              data.max_tokens_per_side, dropped[lang],
                                              keep_text=split in TEXT_SPLITS)
    check_min_pairs(pairs["train"], data.min_pairs, f"after dropping pairs over "
                    f"data.max_tokens_per_side={data.max_tokens_per_side}")
    texts = {path.name: sha256_file(path) for split in TEXT_SPLITS for lang in scan.languages
             if pairs[split][lang] for path in text_paths(out, split, lang)}
    manifest = Manifest(languages=scan.languages, pairs=pairs, vocab_size=sp.get_piece_size(),
                        dtype=np.dtype(dtype).name, corpus=data.corpus, sources=sources,
                        fingerprint=fp, settings=settings, texts=texts)
    manifest.save(out)
    print_summary(manifest, scan, dropped)
    return manifest


# --------------------------------------------------------------------------- fingerprint


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksums(layout: Layout) -> list[dict]:
    """[{"path", "sha256"}] of every raw file of the selected languages."""
    return [{"path": str(p), "sha256": sha256_file(p)} for p in layout.sources()]


def prepare_settings(data: DataConfig) -> dict:
    settings = {key: getattr(data, key) for key in FINGERPRINT_KEYS}
    if data.max_train_pairs:  # only when set, so data prepared before the key keeps its fingerprint
        settings["max_train_pairs"] = dict(sorted(data.max_train_pairs.items()))
    settings.update(prepare_version=PREPARE_VERSION, sample_seed=SAMPLE_SEED,
                    sentencepiece=spm.__version__)
    return settings


def fingerprint(root: Path, sources: list[dict], settings: dict) -> str:
    """Hash of the sources (paths relative to the corpus root, so moving the corpus is
    not a change) and the settings."""
    files = [[str(Path(s["path"]).relative_to(root)), s["sha256"]] for s in sources]
    blob = json.dumps({"files": files, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _output_files(out: Path, manifest: Manifest) -> list[Path]:
    files = [out / f"{SPM_PREFIX}.model", out / f"{SPM_PREFIX}.vocab"]
    for split, counts in manifest.pairs.items():
        for lang, n in counts.items():
            if n:
                for side in ("en", lang):
                    prefix = shard_prefix(out, split, lang, side)
                    files += [prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")]
    return files + [out / name for name in manifest.texts]


def _load_previous(out: Path) -> Optional[Manifest]:
    try:
        return Manifest.load(out)
    except (FileNotFoundError, ValueError, TypeError):  # absent, old version or malformed
        return None


def up_to_date(out: Path, fp: str) -> Optional[Manifest]:
    """The manifest in `out` if it has fingerprint `fp`, all its files exist and every
    shard matches its index and the manifest's count (a truncated shard is rebuilt)."""
    manifest = _load_previous(out)
    if manifest is None or manifest.fingerprint != fp:
        return None
    if not all(p.is_file() for p in _output_files(out, manifest)):
        return None
    for split, counts in manifest.pairs.items():
        for lang, n in counts.items():
            for side in ("en", lang) if n else ():
                problem = shard_problem(shard_prefix(out, split, lang, side), manifest.np_dtype, n)
                if problem:
                    print(f"{out}: {problem}; rebuilding", file=sys.stderr)
                    return None
    return manifest


def remove_previous(out: Path) -> None:
    """Delete the manifest (first: the folder stops being complete) and its shards."""
    manifest = _load_previous(out)
    (out / MANIFEST).unlink(missing_ok=True)
    if manifest is not None:
        for path in _output_files(out, manifest):
            path.unlink(missing_ok=True)


def check_settings(data: DataConfig) -> None:
    """Settings `prepare` cannot work with, named by their key: DataConfig.check's (config.py;
    load_config runs them too), as a PrepareError for a DataConfig built without load_config."""
    try:
        data.check()
    except ConfigError as e:
        raise PrepareError(str(e)) from None


def check_min_pairs(train: dict[str, int], min_pairs: int, stage: str) -> None:
    low = {lang: n for lang, n in train.items() if n < max(min_pairs, 1)}
    if low:
        listed = ", ".join(f"{lang} ({n})" for lang, n in low.items())
        raise PrepareError(f"fewer than data.min_pairs={min_pairs} training pairs {stage}: {listed}; "
                           f"remove them from data.languages or lower data.min_pairs")


# --------------------------------------------------------------------------- SentencePiece


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def sample_sizes(train: dict[str, int], temperature: float, total: int) -> dict[str, int]:
    """Pairs per language for the SentencePiece sample: p_l ~ n_l^(1/T), at least one."""
    weights = {lang: float(n) ** (1.0 / temperature) for lang, n in train.items()}
    z = sum(weights.values())
    return {lang: max(1, round(total * w / z)) for lang, w in weights.items()}


def sample_indices(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k indices into n items: every item k // n times, plus k % n distinct ones at random."""
    reps, rest = divmod(k, n)
    return np.concatenate([np.tile(np.arange(n), reps), rng.choice(n, rest, replace=False)])


def write_sample(layout: Layout, scan: Scan, data: DataConfig, path: Path) -> int:
    """Write the training sentences of every language (both sides) to `path`; returns how
    many. About data.vocab_sentences in all, fewer when the corpus has fewer pairs."""
    train = {lang: c["train"] for lang, c in scan.counts.items()}
    sizes = sample_sizes(train, data.vocab_temperature, min(data.vocab_sentences // 2, sum(train.values())))
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for lang in tqdm(scan.languages, desc="sample", unit="lang", leave=False, disable=None):
            pairs = read_language(layout, lang, data).splits["train"]
            rng = np.random.default_rng([SAMPLE_SEED, zlib.crc32(lang.encode("utf-8"))])
            for i in sample_indices(len(pairs), sizes[lang], rng):
                f.write(f"{pairs[i][0]}\n{pairs[i][1]}\n")
            written += 2 * sizes[lang]
    return written


def train_sentencepiece(layout: Layout, scan: Scan, data: DataConfig, out: Path) -> spm.SentencePieceProcessor:
    """Train the joint unigram model on a temperature sample of the train splits and
    install it as <out>/spm.model (and .vocab). Ids: pad 0, unk 1, bos 2, eos 3, then the
    `<2xx>` tags of scan.languages in order, then the learned pieces."""
    sample = out / f"{SPM_PREFIX}.sample.tmp"
    tmp_prefix = out / f"{SPM_PREFIX}.tmp"
    start = time.time()
    try:
        n = write_sample(layout, scan, data, sample)
        print(f"training SentencePiece (unigram, {data.vocab_size} pieces) on {n} sentences ...")
        spm.SentencePieceTrainer.train(
            input=str(sample), model_prefix=str(tmp_prefix), model_type="unigram",
            vocab_size=data.vocab_size, character_coverage=data.character_coverage,
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            user_defined_symbols=[lang_tag(lang) for lang in scan.languages],
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=_threads(),
            minloglevel=2)  # errors only; failures raise RuntimeError
    except RuntimeError as e:
        raise PrepareError(f"SentencePiece training failed (data.vocab_size={data.vocab_size}, "
                           f"{len(scan.languages)} languages): {e}") from None
    finally:
        sample.unlink(missing_ok=True)
    for ext in ("model", "vocab"):
        os.replace(f"{tmp_prefix}.{ext}", out / f"{SPM_PREFIX}.{ext}")
    print(f"SentencePiece trained in {time.time() - start:.0f}s")
    return spm.SentencePieceProcessor(model_file=str(out / f"{SPM_PREFIX}.model"))


# --------------------------------------------------------------------------- encoding


class PackedSequences:
    """Token sequences kept as one flat array per batch: memory ~ the tokens themselves."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.parts: list[np.ndarray] = []
        self.lengths: list[int] = []

    def add(self, seqs: list[list[int]]) -> None:
        self.parts.append(np.fromiter(chain.from_iterable(seqs), dtype=self.dtype))
        self.lengths.extend(len(s) for s in seqs)

    def __iter__(self) -> Iterator[np.ndarray]:
        tokens = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        for a, b in zip(offsets[:-1], offsets[1:]):
            yield tokens[a:b]


def encode_split(sp: spm.SentencePieceProcessor, pairs: list[tuple[str, str]], out: Path, split: str,
                 lang: str, dtype: np.dtype, max_tokens: int, dropped: Counter, keep_text: bool = False) -> int:
    """Encode one language's split (pieces + </s> per side) and write its two shards;
    a pair with a side longer than max_tokens (</s> included) or empty is dropped.
    keep_text: also write the kept pairs' text, line by line in shard order
    (`text_paths`). Returns the number of pairs written (no files for none)."""
    src, tgt = PackedSequences(dtype), PackedSequences(dtype)
    kept_text: list[tuple[str, str]] = []
    bar = tqdm(total=len(pairs), desc=f"encode {split} {lang}", unit="pair", leave=False, disable=None)
    for i in range(0, len(pairs), ENCODE_BATCH):
        batch = pairs[i:i + ENCODE_BATCH]
        en_ids = sp.encode([en for en, _ in batch], out_type=int, num_threads=_threads())
        xx_ids = sp.encode([xx for _, xx in batch], out_type=int, num_threads=_threads())
        keep_en, keep_xx = [], []
        for e, x, pair in zip(en_ids, xx_ids, batch):
            if not e or not x:
                dropped["empty after encoding"] += 1
            elif len(e) + 1 > max_tokens or len(x) + 1 > max_tokens:
                dropped["over max_tokens_per_side"] += 1
            else:
                keep_en.append(e + [EOS])
                keep_xx.append(x + [EOS])
                if keep_text:
                    kept_text.append(pair)
        src.add(keep_en)
        tgt.add(keep_xx)
        bar.update(len(batch))
    bar.close()
    n = len(src.lengths)
    if n:
        write_shard(shard_prefix(out, split, lang, "en"), src, dtype)
        write_shard(shard_prefix(out, split, lang, lang), tgt, dtype)
        if keep_text:
            for side, path in enumerate(text_paths(out, split, lang)):
                path.write_text("".join(p[side] + "\n" for p in kept_text), encoding="utf-8")
    return n


def print_summary(manifest: Manifest, scan: Scan, dropped: dict[str, Counter]) -> None:
    """Pairs per language and split; `filtered` by the reader (duplicates, and train pairs
    whose English side is in dev/test, included), `dropped` at encoding (too many tokens
    or empty), and one column per rule of the translatable dev/test filter
    (cats_ds/data/translatable.py) when it is on."""
    width = max(8, *(len(lang) for lang in manifest.languages))
    rules = list(RULES) if applies(manifest.corpus, manifest.settings["translatable_eval"]) else []
    rule_cols = [f"<{manifest.settings['translatable_min_' + r]} {r}" for r in rules]
    head = (f"{'language':<{width}} {'train':>9} {'dev':>7} {'test':>7} {'filtered':>9} {'dropped':>8}"
            + "".join(f" {c:>10}" for c in rule_cols))
    print(head)
    print("-" * len(head))
    totals = Counter()

    def row_text(name: str, row: Counter) -> str:
        return (f"{name:<{width}} {row['train']:>9} {row['dev']:>7} {row['test']:>7} {row['filtered']:>9} "
                f"{row['dropped']:>8}" + "".join(f" {row[r]:>10}" for r in rules))

    for lang in manifest.languages:
        row = Counter({s: manifest.pairs[s][lang] for s in SPLITS})
        row["filtered"] = sum(scan.dropped[lang].values())
        row["dropped"] = sum(dropped[lang].values())
        row.update({r: scan.untranslatable.get(lang, Counter())[r] for r in rules})
        totals.update(row)
        print(row_text(lang, row))
    print("-" * len(head))
    print(row_text("total", totals))
    if rules:
        splits = "dev/test and train" if manifest.settings.get("translatable_train") else "dev/test"
        print(f"not a translation test ({splits}): " + ", ".join(
            f"{sum(c[r] for c in scan.untranslatable.values())} with {col} left" for r, col in zip(rules, rule_cols))
            + " once placeholders, markup, URLs/paths, options and numbers are removed")
    reasons = sum(scan.dropped.values(), Counter()) + sum(dropped.values(), Counter())
    if reasons:
        print("filtered/dropped by reason: " + ", ".join(f"{r} {n}" for r, n in reasons.most_common()))
