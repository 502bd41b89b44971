"""The contract between `prepare` and everything after it.

A prepared data folder holds:
  manifest.json                     languages, pair counts per split, vocab, sources + sha256
  spm.model / spm.vocab             ONE joint SentencePiece model; `<2xx>` tags are user symbols
  {split}.en-{lang}.en.{bin,idx}    source side: pieces + </s>
  {split}.en-{lang}.{lang}.{bin,idx} target side: pieces + </s> (the `<2xx>` tag is added
                                     at batch time as the first decoder input token)
  {split}.en-{lang}.{side}.txt       dev/test only: the text of the same pairs, one per line in
                                     shard order, as the reader returned it (before SentencePiece);
                                     what `evaluate` scores against and copies for its baseline
Token ids: pad 0, unk 1, bos 2, eos 3, then the language tags.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from cats_ds.data.indexed import IndexedDataset

MANIFEST = "manifest.json"
SPM_PREFIX = "spm"
SPLITS = ("train", "dev", "test")
PAD, UNK, BOS, EOS = 0, 1, 2, 3
MANIFEST_VERSION = 1
TEXT_SPLITS = ("dev", "test")
"""Splits whose text `prepare` keeps next to the shards."""


def lang_tag(lang: str) -> str:
    return f"<2{lang}>"


def shard_prefix(data_dir: str | Path, split: str, lang: str, side: str) -> Path:
    """side is "en" (source) or the language code (target)."""
    return Path(data_dir) / f"{split}.en-{lang}.{side}"


def text_paths(data_dir: str | Path, split: str, lang: str) -> tuple[Path, Path]:
    """(English, target) text files of a dev/test split."""
    en, xx = (shard_prefix(data_dir, split, lang, side) for side in ("en", lang))
    return en.with_name(en.name + ".txt"), xx.with_name(xx.name + ".txt")


@dataclass
class Manifest:
    languages: list[str]
    """Target languages, in a fixed order: language index i everywhere means languages[i]."""
    pairs: dict[str, dict[str, int]]
    """split -> language -> number of pairs in the binarized shards."""
    vocab_size: int
    dtype: str
    corpus: str
    sources: list[dict] = field(default_factory=list)
    """[{"path": ..., "sha256": ...}] of every raw file read."""
    fingerprint: str = ""
    """Hash of the sources' checksums and the prepare settings: equal means no-op re-run."""
    settings: dict = field(default_factory=dict)
    version: int = MANIFEST_VERSION
    texts: dict[str, str] = field(default_factory=dict)
    """File name -> sha256 of the kept dev/test text (`text_paths`); empty in folders
    prepared before it was kept."""

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def train_pairs(self, lang: str) -> int:
        return int(self.pairs.get("train", {}).get(lang, 0))

    def lang_index(self, lang: str) -> int:
        try:
            return self.languages.index(lang)
        except ValueError:
            raise KeyError(f"unknown language '{lang}'; corpus languages: {', '.join(self.languages)}") from None

    def save(self, data_dir: str | Path) -> None:
        path = Path(data_dir) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, data_dir: str | Path) -> "Manifest":
        path = Path(data_dir) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `python launch/prepare.py --config <recipe>` "
                                    f"(data.dir={data_dir}) first")
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: manifest version {raw.get('version')} != {MANIFEST_VERSION}; re-run prepare")
        return cls(**raw)


class Vocab:
    """The joint SentencePiece model plus the id conventions above."""

    def __init__(self, data_dir: str | Path, languages: list[str]):
        import sentencepiece as spm

        path = Path(data_dir) / f"{SPM_PREFIX}.model"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run prepare first")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.pad, self.unk, self.bos, self.eos = PAD, UNK, BOS, EOS
        assert self.sp.pad_id() == PAD and self.sp.eos_id() == EOS, f"{path}: unexpected special ids"
        self.lang_ids = {}
        for lang in languages:
            i = self.sp.piece_to_id(lang_tag(lang))
            if i == self.sp.unk_id():
                raise ValueError(f"{path}: no tag {lang_tag(lang)} for language '{lang}'")
            self.lang_ids[lang] = i

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int) + [EOS]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) not in (PAD, BOS, EOS)]
        return self.sp.decode(ids)


@dataclass
class LangSplit:
    src: IndexedDataset
    tgt: IndexedDataset

    def __len__(self) -> int:
        return len(self.src)


def load_split(data_dir: str | Path, manifest: Manifest, split: str,
               languages: Optional[list[str]] = None) -> dict[str, LangSplit]:
    """Per-language source/target shards of one split (languages default to the manifest's)."""
    out = {}
    for lang in languages or manifest.languages:
        manifest.lang_index(lang)  # raises naming the language if it is not in the corpus
        if manifest.pairs.get(split, {}).get(lang, 0) == 0:
            continue
        # token ids checked against the vocabulary: a damaged shard is named here, not by an
        # IndexError at the first forward
        src = IndexedDataset(shard_prefix(data_dir, split, lang, "en"), manifest.np_dtype, manifest.vocab_size)
        tgt = IndexedDataset(shard_prefix(data_dir, split, lang, lang), manifest.np_dtype, manifest.vocab_size)
        if len(src) != len(tgt):
            raise ValueError(f"{shard_prefix(data_dir, split, lang, lang)}: {len(tgt)} target sentences "
                             f"but {len(src)} source sentences")
        if len(src) != manifest.pairs[split][lang]:
            raise ValueError(f"{shard_prefix(data_dir, split, lang, 'en')}: {len(src)} sentences, but "
                             f"{Path(data_dir) / MANIFEST} says {manifest.pairs[split][lang]}")
        out[lang] = LangSplit(src, tgt)
    return out


class RawTextError(Exception):
    """A prepared folder lacks the dev/test text or it does not match the manifest."""


def load_texts(data_dir: str | Path, manifest: Manifest, split: str, lang: str, n_pairs: int,
               reprepare: str = "") -> tuple[list[str], list[str]]:
    """(English, target) lines of a dev/test split's kept text, checked against the
    manifest's sha256 and the shard's pair count. `reprepare` is the command that
    rebuilds the folder, for the error message."""
    how = reprepare or f"python launch/prepare.py --config <recipe> data.dir={data_dir}"
    sides = []
    for path in text_paths(data_dir, split, lang):
        digest = manifest.texts.get(path.name)
        if digest is None:
            raise RawTextError(f"{data_dir} has no raw {split} text for en-{lang} ({path.name} is not in its "
                               f"manifest): it was prepared by an older cats_ds that scored against SentencePiece "
                               f"round trips. Re-prepare it (the changed prepare version rebuilds it):\n    {how}\n"
                               f"then retrain: checkpoints of the old folder do not match the new one")
        if not path.is_file():
            raise RawTextError(f"{path} is missing (listed in {Path(data_dir) / MANIFEST}); re-prepare with "
                               f"--force:\n    {how} --force")
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != digest:
            raise RawTextError(f"{path}: sha256 differs from {Path(data_dir) / MANIFEST}: the file was changed "
                               f"after prepare; re-prepare with --force:\n    {how} --force")
        lines = raw.decode("utf-8").split("\n")  # \n only: U+2028 and friends occur inside sentences
        if lines[-1] == "":
            lines.pop()
        if len(lines) != n_pairs:
            raise RawTextError(f"{path}: {len(lines)} lines but the shards hold {n_pairs} pairs")
        sides.append(lines)
    return sides[0], sides[1]
