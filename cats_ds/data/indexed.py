"""Memory-mapped token shards: ``{prefix}.bin`` (all tokens, concatenated) and
``{prefix}.idx`` (a .npy of int64 offsets, length n+1).

Both are written to temporary names and renamed into place, so a crash never leaves a
half-written shard that looks complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def write_shard(prefix: str | Path, sequences: Iterable[Sequence[int]], dtype: np.dtype) -> int:
    """Write sequences of token ids; returns how many were written."""
    prefix = Path(prefix)
    bin_tmp = prefix.with_name(prefix.name + ".bin.tmp")
    idx_tmp = prefix.with_name(prefix.name + ".idx.tmp")
    offsets = [0]
    with open(bin_tmp, "wb") as f:
        for seq in sequences:
            arr = np.asarray(seq, dtype=dtype)
            f.write(arr.tobytes())
            offsets.append(offsets[-1] + len(arr))
    with open(idx_tmp, "wb") as f:
        np.save(f, np.asarray(offsets, dtype=np.int64))
    os.replace(bin_tmp, prefix.with_name(prefix.name + ".bin"))
    os.replace(idx_tmp, prefix.with_name(prefix.name + ".idx"))
    return len(offsets) - 1


def read_offsets(idx_path: Path, mmap: bool = False) -> np.ndarray:
    """The offsets of an .idx file; ValueError naming the file if it is not a readable,
    non-empty int64 array starting at 0 (a truncated or overwritten index)."""
    try:
        offsets = np.load(idx_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"{idx_path}: not a readable shard index ({e})") from None
    if offsets.ndim != 1 or len(offsets) == 0 or offsets.dtype != np.int64 or offsets[0] != 0:
        raise ValueError(f"{idx_path}: not a shard index (expected int64 offsets from 0, got "
                         f"{offsets.dtype} of shape {offsets.shape})")
    return offsets


def shard_problem(prefix: str | Path, dtype: np.dtype, count: int) -> str | None:
    """What is wrong with a written shard (a file missing, an unreadable index, a .bin whose
    size does not match its index, a sentence count other than `count`), or None. Reads
    only the index's header and last offset."""
    prefix = Path(prefix)
    idx_path = prefix.with_name(prefix.name + ".idx")
    bin_path = prefix.with_name(prefix.name + ".bin")
    for p in (idx_path, bin_path):
        if not p.is_file():
            return f"missing shard file {p}"
    try:
        offsets = read_offsets(idx_path, mmap=True)
    except ValueError as e:
        return str(e)
    n_tokens = int(offsets[-1])
    if bin_path.stat().st_size != n_tokens * np.dtype(dtype).itemsize:
        return (f"{bin_path}: size {bin_path.stat().st_size} bytes does not match {n_tokens} tokens of "
                f"{np.dtype(dtype).name} from {idx_path} (truncated or overwritten)")
    if len(offsets) - 1 != count:
        return f"{idx_path}: {len(offsets) - 1} sentences, the manifest says {count}"
    return None


CHECK_CHUNK = 1 << 24
"""Tokens per slice of the vocabulary range check (32 MiB of uint16): bounded memory."""


def out_of_vocab(tokens: np.ndarray, offsets: np.ndarray, vocab_size: int) -> tuple[int, int, int] | None:
    """(sentence index, token position in it, id) of the first token id outside
    [0, vocab_size) in a shard, or None. One pass over the tokens, in slices."""
    for start in range(0, len(tokens), CHECK_CHUNK):
        part = tokens[start:start + CHECK_CHUNK]
        if int(part.max()) < vocab_size and int(part.min()) >= 0:
            continue
        pos = start + int(np.argmax((part >= vocab_size) | (part < 0)))
        sent = int(np.searchsorted(offsets, pos, side="right")) - 1
        return sent, pos - int(offsets[sent]), int(tokens[pos])
    return None


class IndexedDataset:
    """Read-only view of one shard; items are numpy arrays of token ids. With `vocab_size`,
    every token id is checked to lie in [0, vocab_size) when the shard is opened (bytes
    changed after prepare would otherwise surface as an IndexError in the embedding)."""

    def __init__(self, prefix: str | Path, dtype: np.dtype, vocab_size: int | None = None):
        prefix = Path(prefix)
        idx_path = prefix.with_name(prefix.name + ".idx")
        bin_path = prefix.with_name(prefix.name + ".bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise FileNotFoundError(f"missing shard file {p}; run prepare first")
        self.offsets = read_offsets(idx_path)
        n_tokens = int(self.offsets[-1])
        if bin_path.stat().st_size != n_tokens * np.dtype(dtype).itemsize:
            raise ValueError(f"{bin_path}: size {bin_path.stat().st_size} bytes does not match "
                             f"{n_tokens} tokens of {np.dtype(dtype).name} from {idx_path}")
        # np.memmap of an empty file fails; an empty shard has no tokens to map
        self.tokens = (np.memmap(bin_path, dtype=dtype, mode="r") if n_tokens
                       else np.zeros(0, dtype=dtype))
        self.sizes = np.diff(self.offsets).astype(np.int64)
        bad = out_of_vocab(self.tokens, self.offsets, vocab_size) if vocab_size and n_tokens else None
        if bad is not None:
            sent, pos, token = bad
            raise ValueError(f"{bin_path}: token id {token} (sentence {sent + 1}, token {pos + 1}) is outside the "
                             f"vocabulary of {vocab_size} ids: the shard was changed after prepare (flipped or "
                             f"overwritten bytes)")

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]
