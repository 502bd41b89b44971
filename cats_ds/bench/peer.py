"""The fairseq side of the peer benchmark (`bench peer`, suite.bench_peer): this project
against fairseq on the same model, data and budget.

    python -m cats_ds.bench peer --fairseq-python .venv-fairseq/bin/python --processes 1,2 \
        --max-tokens 3000 --rounds 2 --json peer.json

fairseq is not a dependency of cats_ds: the bench only needs the path to a python that can
import it (launch/fairseq_env.sh builds one). Per round and process count it launches our
training (`bench worker-peer` under the deepspeed launcher: `train_step` on the recipe, the
real sampler, DeepSpeed engine and per-language losses) and `fairseq_cli.train`, alternating
which goes first, each for `warmup + timed` updates, and compares target tokens per second
over the timed updates.

The peer setup:
  * data: the recipe's prepared shards exported to fairseq's binarized (mmap) format
    token for token (`export_fairseq`): the same sentences per language in the same order,
    every SentencePiece piece at the same id. fairseq's Dictionary fixes its four specials
    at <s>=0 <pad>=1 </s>=2 <unk>=3 where ours are pad 0, unk 1, bos 2, eos 3: those four
    ids are relabeled by name (`FAIRSEQ_SPECIALS`); the language tags `<2xx>` keep their ids
    under fairseq's tag names `__xx__`. fairseq's translation_multi_simple_epoch task with
    --decoder-langtok then feeds exactly our decoder input (the tag, then the target
    without its </s>) and target (the pieces + </s>); the source is the pieces + </s>
    (no encoder tag) on both sides.
  * model: the recipe's pre-norm Transformer (fairseq `transformer` with the same widths,
    depths, heads, --encoder/decoder-normalize-before, --share-all-embeddings, sinusoidal
    positions, ReLU, dropout). fairseq's task adds a tag for the source language (`__en__`)
    to the dictionary: one embedding row (embed_dim parameters) more than ours.
  * sampling: languages by temperature T (p ~ n^(1/T), --sampling-method temperature);
    fairseq fills each batch from the length-sorted sampled epoch (any languages per batch),
    ours from K = sampling.langs_per_batch language slots per draw, regrouped by length.
  * optimisation: Adam (betas, eps, lr, inverse-sqrt warm-up of the recipe), clip 1.0,
    label-smoothed cross entropy; --max-tokens = train.max_tokens per process, one
    micro-batch per update (update-freq 1), --required-batch-size-multiple 1 (fairseq's
    default of 8 rounds batches down).
  * processes: fairseq on CPU under gloo with its legacy_ddp backend (torch DDP through
    fairseq's pytorch_ddp wrapper passes device_ids=[0], which DDP refuses for a CPU
    module), data loading in the main process (--num-workers 0, as ours), one thread per
    process (OMP_NUM_THREADS=1 on both sides).
  * timing: fairseq's `wps` (train_inner log lines, --log-interval = gcd(warmup, timed)) is
    target tokens (the criterion's ntokens, summed over processes) per second of wall time
    since the previous log line; the timed rate is the timed tokens over the sum of the
    intervals' seconds. Ours: `train_step` between barriers over the same number of updates.
  * allocator: ours sets glibc malloc to reuse freed buffers (train.host_malloc=reuse,
    cats_ds/runtime/host_malloc.py). `--fairseq-malloc both` (the default) runs fairseq
    twice per round, as the environment has it and with the same setting given through
    GLIBC_TUNABLES, so the table shows what the setting is worth and what is left without it.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from cats_ds.data.manifest import Manifest, lang_tag, load_split
from cats_ds.runtime.host_malloc import GLIBC_TUNABLES_REUSE
from cats_ds.runtime.ports import free_port

FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
"""fairseq's Dictionary specials in id order 0..3."""
OUR_SPECIALS = {0: "<pad>", 1: "<unk>", 2: "<s>", 3: "</s>"}
"""Our special ids (cats_ds.data.manifest: PAD, UNK, BOS, EOS) by fairseq's names."""
MMAP_MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4, np.dtype(np.int64): 5}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
EXPORT_STAMP = "cats_export.json"
SOURCE_LANG = "en"


# --------------------------------------------------------------------------- data export


def fairseq_tag(lang: str) -> str:
    """fairseq's language token (--lang-tok-style multilingual)."""
    return f"__{lang}__"


def id_map(vocab_size: int) -> np.ndarray:
    """ours -> fairseq token id: the four specials relabeled by name, every other id kept."""
    table = np.arange(vocab_size, dtype=np.int64)
    for ours, name in OUR_SPECIALS.items():
        table[ours] = FAIRSEQ_SPECIALS.index(name)
    return table


def fairseq_dict_lines(pieces: list[str], languages: list[str]) -> list[str]:
    """dict.txt lines for our vocabulary (`pieces[i]` = the piece of id i): ids 4.. in order
    (fairseq prepends its four specials), our tags `<2xx>` under fairseq's names."""

    rename = {lang_tag(lang): fairseq_tag(lang) for lang in languages}
    for ours, name in OUR_SPECIALS.items():
        if pieces[ours] != name:
            raise ValueError(f"vocabulary id {ours} is {pieces[ours]!r}, expected {name!r}")
    lines = []
    for piece in pieces[len(OUR_SPECIALS):]:
        piece = rename.get(piece, piece)
        if not piece or any(c.isspace() for c in piece) or piece in FAIRSEQ_SPECIALS:
            raise ValueError(f"piece {piece!r} cannot be a fairseq dictionary entry")
        lines.append(f"{piece} 1")
    return lines


def fairseq_dtype(vocab_size: int) -> np.dtype:
    """fairseq's best_fitting_int_dtype for the dictionary size (+1: the source-language tag)."""
    return np.dtype(np.uint16) if vocab_size + 1 < 65500 else np.dtype(np.int32)


def write_mmap(prefix: Path, sequences, dtype: np.dtype) -> int:
    """fairseq's MMapIndexedDataset: {prefix}.bin (tokens) and {prefix}.idx (magic, version
    1, dtype code, count, int32 sizes, int64 byte offsets)."""
    sizes = []
    with open(f"{prefix}.bin", "wb") as f:
        for seq in sequences:
            arr = np.asarray(seq).astype(dtype)
            f.write(arr.tobytes(order="C"))
            sizes.append(len(arr))
    sizes_arr = np.asarray(sizes, dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(sizes_arr, dtype=np.int64)[:-1]]) * dtype.itemsize
    with open(f"{prefix}.idx", "wb") as f:
        f.write(MMAP_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(sizes_arr.tobytes(order="C"))
        f.write(pointers.astype(np.int64).tobytes(order="C"))
    return len(sizes)


def read_mmap(prefix: Path) -> list[np.ndarray]:
    """The sentences of a fairseq MMapIndexedDataset (a reader independent of fairseq)."""
    raw = Path(f"{prefix}.idx").read_bytes()
    if raw[:9] != MMAP_MAGIC or struct.unpack("<Q", raw[9:17])[0] != 1:
        raise ValueError(f"{prefix}.idx: not a fairseq mmap index")
    dtype = CODE_DTYPES[raw[17]]
    (n,) = struct.unpack("<Q", raw[18:26])
    sizes = np.frombuffer(raw, dtype=np.int32, count=n, offset=26)
    pointers = np.frombuffer(raw, dtype=np.int64, count=n, offset=26 + 4 * n)
    tokens = np.fromfile(f"{prefix}.bin", dtype=dtype)
    return [tokens[p // dtype.itemsize:p // dtype.itemsize + s] for p, s in zip(pointers, sizes)]


def read_dict(path: Path) -> list[str]:
    """A fairseq dictionary's symbols by id: its four specials, then dict.txt's entries."""
    return list(FAIRSEQ_SPECIALS) + [line.rsplit(" ", 1)[0] for line in path.read_text("utf-8").splitlines()]


def export_fairseq(data_dir: str | Path, out: str | Path, languages: Optional[list[str]] = None,
                   splits: tuple[tuple[str, str], ...] = (("train", "train"), ("dev", "valid"))) -> dict:
    """Write the prepared folder's shards as fairseq binarized data in `out`:
    dict.txt and {split}.en-xx.{en,xx}.{bin,idx} for every language (`splits` maps our
    split names to fairseq's). A no-op when `out` already holds this export of the same
    prepared folder (the manifest fingerprint and languages match). Returns the stamp:
    {"fingerprint", "languages", "vocab_size", "sentences": {split: {lang: n}}}."""

    data_dir, out = Path(data_dir), Path(out)
    manifest = Manifest.load(data_dir)
    languages = list(languages or manifest.languages)
    stamp_path = out / EXPORT_STAMP
    if stamp_path.is_file():
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("fingerprint") == manifest.fingerprint and stamp.get("languages") == languages:
            return stamp
    out.mkdir(parents=True, exist_ok=True)
    pieces = [line.split("\t")[0] for line in (data_dir / "spm.vocab").read_text("utf-8").splitlines()]
    if len(pieces) != manifest.vocab_size:
        raise ValueError(f"{data_dir / 'spm.vocab'}: {len(pieces)} pieces, the manifest says {manifest.vocab_size}")
    (out / "dict.txt").write_text("".join(line + "\n" for line in fairseq_dict_lines(pieces, languages)), "utf-8")
    table, dtype = id_map(manifest.vocab_size), fairseq_dtype(manifest.vocab_size)
    sentences: dict[str, dict[str, int]] = {}
    for ours, theirs in splits:
        for lang, data in load_split(data_dir, manifest, ours, languages).items():
            for side, shard in ((SOURCE_LANG, data.src), (lang, data.tgt)):
                n = write_mmap(out / f"{theirs}.{SOURCE_LANG}-{lang}.{side}",
                               (table[shard[i].astype(np.int64)] for i in range(len(shard))), dtype)
            sentences.setdefault(theirs, {})[lang] = n
    stamp = {"fingerprint": manifest.fingerprint, "languages": languages, "vocab_size": manifest.vocab_size,
             "sentences": sentences}
    stamp_path.write_text(json.dumps(stamp, indent=1))
    return stamp


# --------------------------------------------------------------------------- fairseq side


class FairseqMissing(SystemExit):
    pass


def check_fairseq_python(python: str) -> str:
    """fairseq's version under `python`; FairseqMissing (a SystemExit with the reason and
    the fix) when that python does not exist or cannot import fairseq."""
    how = "build one with `bash launch/fairseq_env.sh .venv-fairseq` and pass --fairseq-python .venv-fairseq/bin/python"
    if not python or not (Path(python).is_file() or _which(python)):
        raise FairseqMissing(f"--fairseq-python {python!r}: no such python; {how}")
    proc = subprocess.run([python, "-c", "import fairseq, torch; print(fairseq.__version__)"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FairseqMissing(f"--fairseq-python {python}: cannot import fairseq ({last}); {how}")
    return proc.stdout.strip().splitlines()[-1]


def _which(name: str) -> Optional[str]:
    import shutil

    return shutil.which(name)


def fairseq_train_args(cfg, data: Path, languages: list[str], max_tokens: int, updates: int,
                       log_interval: int, save_dir: Path) -> list[str]:
    """fairseq-train's arguments for the recipe's model and optimisation (module docstring)."""
    m, t = cfg.model, cfg.train
    data = Path(data).absolute()
    model = ["--arch", "transformer", "--share-all-embeddings",
             "--encoder-embed-dim", m.embed_dim, "--decoder-embed-dim", m.embed_dim,
             "--encoder-ffn-embed-dim", m.ffn_dim, "--decoder-ffn-embed-dim", m.ffn_dim,
             "--encoder-layers", m.encoder_layers, "--decoder-layers", m.decoder_layers,
             "--encoder-attention-heads", m.heads, "--decoder-attention-heads", m.heads,
             "--dropout", m.dropout, "--attention-dropout", m.attention_dropout,
             "--activation-dropout", m.activation_dropout, "--activation-fn", m.activation,
             "--max-source-positions", m.max_positions, "--max-target-positions", m.max_positions]
    if m.prenorm:
        model += ["--encoder-normalize-before", "--decoder-normalize-before"]
    if m.norm != "layernorm" or not m.share_embeddings:
        raise SystemExit(f"peer bench: fairseq's transformer has no model.norm={m.norm} / "
                         f"share_embeddings={m.share_embeddings} equivalent here")
    task = ["--task", "translation_multi_simple_epoch", "--lang-pairs",
            ",".join(f"{SOURCE_LANG}-{lang}" for lang in languages), "--fixed-dictionary", data / "dict.txt",
            "--decoder-langtok", "--sampling-method", "temperature", "--sampling-temperature",
            cfg.sampling.temperature, "--dataset-impl", "mmap"]
    optim = ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", t.label_smoothing,
             "--optimizer", "adam", "--adam-betas", f"({t.betas[0]},{t.betas[1]})", "--adam-eps", t.adam_eps,
             "--weight-decay", t.weight_decay, "--lr", t.lr, "--lr-scheduler", "inverse_sqrt",
             "--warmup-updates", t.warmup_updates, "--warmup-init-lr", t.warmup_init_lr, "--clip-norm", 1.0,
             "--max-tokens", max_tokens, "--required-batch-size-multiple", 1, "--update-freq", 1,
             "--max-update", updates, "--seed", t.seed]
    run = ["--cpu", "--num-workers", 0, "--disable-validation", "--no-save", "--save-dir", save_dir,
           "--log-format", "json", "--log-interval", log_interval, "--no-progress-bar"]
    return [str(a) for a in [data] + model + task + optim + run]


def launch_fairseq(python: str, args: list[str], nproc: int, workdir: Path, extra_env: Optional[dict] = None) -> str:
    """fairseq_cli.train on nproc CPU processes (gloo, tcp rendezvous, one process each:
    fairseq's own launch paths assume CUDA devices), with `extra_env` added to the
    environment; returns rank 0's log."""
    if os.sep in python:  # the processes run in workdir
        python = str(Path(python).absolute())
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), CUDA_VISIBLE_DEVICES="",
               **(extra_env or {}))
    env.pop("PYTHONPATH", None)  # the fairseq venv sees neither cats_ds nor its site-packages
    dist: list[list[str]] = [[] for _ in range(nproc)]
    if nproc > 1:
        port = free_port()
        dist = [["--distributed-world-size", str(nproc), "--distributed-rank", str(r), "--distributed-no-spawn",
                 "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-backend", "gloo",
                 "--ddp-backend", "legacy_ddp", "--device-id", "0"] for r in range(nproc)]
    logs = [workdir / f"fairseq_rank{r}.log" for r in range(nproc)]
    procs = []
    for r in range(nproc):
        with open(logs[r], "w") as f:
            procs.append(subprocess.Popen([python, "-m", "fairseq_cli.train"] + args + dist[r], env=env,
                                          stdout=f, stderr=subprocess.STDOUT, cwd=workdir))
    codes = [p.wait() for p in procs]
    text = logs[0].read_text(errors="replace")
    if any(codes):
        bad = next(r for r, c in enumerate(codes) if c)
        raise SystemExit(f"fairseq-train on {nproc} process(es) failed (exit codes {codes}); rank {bad}'s log:\n"
                         f"{logs[bad].read_text(errors='replace')[-4000:]}")
    return text


TRAIN_INNER = re.compile(r"\|\s*train_inner\s*\|\s*(\{.*\})\s*$")
PARAMS = re.compile(r"num\. (?:shared )?model params: ([\d,]+)")


def parse_fairseq_log(text: str, warmup: int, timed: int) -> dict:
    """Timed target tokens/s from fairseq's train_inner JSON log lines: each line's wpb
    (target tokens per update, averaged over the interval) and wps (target tokens per second
    since the previous line); the lines after update `warmup` up to `warmup + timed` must
    cover the timed updates exactly. Also the model's parameter count."""
    lines = []
    for line in text.splitlines():
        match = TRAIN_INNER.search(line)
        if match:
            stats = json.loads(match.group(1))
            lines.append({k: float(stats[k]) for k in ("num_updates", "wps", "wpb")})
    prev, tokens, seconds, covered = None, 0.0, 0.0, 0
    for stats in lines:
        n = int(stats["num_updates"])
        if prev is not None and warmup < n <= warmup + timed:
            if prev < warmup:
                raise ValueError(f"fairseq log: the interval {prev + 1}..{n} straddles the warm-up end {warmup}")
            interval_tokens = stats["wpb"] * (n - prev)
            tokens += interval_tokens
            seconds += interval_tokens / stats["wps"]
            covered += n - prev
        prev = n
    if covered != timed:
        raise ValueError(f"fairseq log: train_inner lines cover {covered} of the {timed} timed updates "
                         f"after {warmup} warm-up updates (updates logged: {[int(s['num_updates']) for s in lines]})")
    params = PARAMS.search(text)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "tokens_per_update": tokens / timed,
            "params": int(params.group(1).replace(",", "")) if params else None}


FAIRSEQ_MALLOC = {"system": None, "reuse": {"GLIBC_TUNABLES": GLIBC_TUNABLES_REUSE}}
"""fairseq's allocator in the peer bench: as the environment has it, or given the setting
our trainer applies to itself (train.host_malloc=reuse), as an environment variable."""


def run_fairseq(python: str, cfg, data: Path, languages: list[str], nproc: int, max_tokens: int, warmup: int,
                timed: int, malloc: str = "system") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = fairseq_train_args(cfg, data, languages, max_tokens, warmup + timed, math.gcd(warmup, timed),
                                  Path(tmp) / "ckpt")
        t0 = time.perf_counter()
        text = launch_fairseq(python, args, nproc, Path(tmp), FAIRSEQ_MALLOC[malloc])
        result = parse_fairseq_log(text, warmup, timed)
        result["launch_s"] = time.perf_counter() - t0
        return result
