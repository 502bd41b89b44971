"""Evaluate a checkpoint: beam search per language, BLEU + chrF++ against the raw
references, a copy baseline, Lo/Mid/Hi/All table.

    python launch/evaluate.py --checkpoint runs/gettext8/best --split test --limit 200 eval.beam=1
    deepspeed --num_gpus 4 launch/evaluate.py --checkpoint runs/gettext8/best --device cuda

No DeepSpeed engine. One process by default (--device cpu or cuda); under the deepspeed
launcher or torchrun (RANK / WORLD_SIZE set) every process decodes a share of the batches
of all languages (the same batches one process would decode, dealt by size), the token ids
are gathered on rank 0 over gloo and scored there: the same files and scores as one
process. Writes to `<save_dir>/eval/<checkpoint name>-<split>/`
(e.g. runs/gettext8/eval/best-test/; or --out), outside the checkpoint folders that
training rotates (a re-saved best/ or latest/ replaces its whole folder):
  bleu.json            per language: bleu, chrf (chrF++), copy_bleu, copy_chrf, the BLEU
                       signature and tokenizer, n, group, train_pairs; Lo/Mid/Hi/All
                       averages; the decoding settings and the chrF++ signature; timing
                       (processes, decoding seconds, sentences/s)
  bleu.md              the table printed at the end
  hyp.en-xx.txt        one detokenized hypothesis per line, in test-set order
  ref.en-xx.txt        the references they were scored against
  src.en-xx.txt        the English sources (the copy baseline's hypotheses)

References are the RAW dev/test text `prepare` keeps next to the shards (checked against
the manifest's sha256), not SentencePiece round trips of it: a character outside the
vocabulary or one SentencePiece normalizes (NFKC) costs the model points, as it should.
Hypotheses are detokenized (SentencePiece decode). chrF++ is sacreBLEU's
`CHRF(word_order=2)`; BLEU uses the per-language tokenizer of eval.tokenize(_lang).

The copy baseline scores the English source as the hypothesis: a model that does not
beat it on a language has not learned to translate that language (software catalogs
share many tokens across languages: placeholders, names, options).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from sacrebleu.metrics import BLEU, CHRF
from tqdm import tqdm

from cats_ds.checkpoints import CheckpointError, load_for_inference, read_meta
from cats_ds.config import Config, DataConfig, EvalConfig, config_from_dict, merge_overrides, parse_override
from cats_ds.data.groups import GROUPS, GroupError, group_for
from cats_ds.data.manifest import LangSplit, RawTextError, load_split, load_texts
from cats_ds.data.sampler import chunk_by_budget, pad_stack
from cats_ds.inference import search
from cats_ds.inference.ct2_backend import BACKENDS, prepare_decoder
from cats_ds.inference.ct2_export import _ctranslate2
from cats_ds.inference.export_common import ExportError
from cats_ds.model.transformer import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LIMIT_ORDER = "sha256 of the English source"
"""How --limit picks its sentences (recorded in bleu.json settings.limit_order)."""


class EvalError(Exception):
    """Evaluation cannot run as asked; the message names the setting, file or language."""


@dataclass
class LangResult:
    lang: str
    train_pairs: int
    group: str
    bleu: float
    chrf: float
    """chrF++ (sacreBLEU CHRF(word_order=2))."""
    copy_bleu: float
    """BLEU of the copy baseline (hypothesis = the English source)."""
    copy_chrf: float
    """chrF++ of the copy baseline."""
    signature: str
    """sacreBLEU BLEU signature (names the tokenizer)."""
    tokenize: str
    """The BLEU tokenizer."""
    n: int
    """Sentences scored."""

    METRICS = ("bleu", "chrf", "copy_bleu", "copy_chrf")


# --------------------------------------------------------------------------- settings


def apply_eval_overrides(cfg: Config, overrides: Optional[list[str]]) -> Config:
    """cfg with `eval.key=value` overrides applied; any other section is an error."""
    overrides = list(overrides or [])
    check_override_sections(overrides)
    return config_from_dict(merge_overrides(cfg.to_dict(), overrides))


def check_override_sections(overrides: list[str]) -> None:
    for text in overrides:
        path, _ = parse_override(text)
        if path[0] != "eval" or len(path) < 2:
            raise EvalError(f"override '{text}': only eval.* settings can change at evaluation time, "
                            f"not '{path[0]}' (the model and data are fixed by the checkpoint; a moved data "
                            f"folder is given as --data-dir)")


def tokenizer_for(lang: str, ecfg: EvalConfig) -> str:
    tok = ecfg.tokenize_lang.get(lang, ecfg.tokenize)
    if tok not in BLEU.TOKENIZERS:
        key = f"eval.tokenize_lang.{lang}" if lang in ecfg.tokenize_lang else "eval.tokenize"
        raise EvalError(f"{key}: unknown sacreBLEU tokenizer '{tok}'; choices: {', '.join(BLEU.TOKENIZERS)}")
    return tok


# --------------------------------------------------------------------------- scoring


class Scores(NamedTuple):
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str


def metrics(tokenize: str) -> tuple[BLEU, CHRF]:
    """The two metrics every table reports: BLEU with `tokenize`, and chrF++."""
    return BLEU(tokenize=tokenize), CHRF(word_order=2)


def corpus_scores(hyps: list[str], refs: list[str], tokenize: str) -> Scores:
    """Corpus BLEU (sacreBLEU tokenizer `tokenize`) and chrF++ of detokenized hypotheses
    against one reference each, with the sacreBLEU signatures that pin the settings."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    bleu, chrf = metrics(tokenize)
    b, c = bleu.corpus_score(hyps, [refs]).score, chrf.corpus_score(hyps, [refs]).score
    return Scores(b, c, str(bleu.get_signature()), str(chrf.get_signature()))


def averages(results: list[LangResult]) -> dict[str, Optional[dict]]:
    """Mean per-language scores (`LangResult.METRICS`) of each group and of all; None for
    an empty group."""
    out: dict[str, Optional[dict]] = {}
    for name in GROUPS + ("All",):
        members = [r for r in results if name == "All" or r.group == name]
        out[name] = None if not members else {
            **{m: float(np.mean([getattr(r, m) for r in members])) for m in LangResult.METRICS},
            "languages": [r.lang for r in members]}
    return out


def format_table(results: list[LangResult], avg: dict[str, Optional[dict]], title: str) -> str:
    """Markdown: one row per language, then the group averages ('-' for empty groups);
    the copy baseline's BLEU and chrF++ next to the model's."""
    lines = [f"### {title}", "",
             "| language | train pairs | group | sentences | BLEU | chrF++ | copy BLEU | copy chrF++ |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| en-{r.lang} | {r.train_pairs} | {r.group} | {r.n} | {r.bleu:.2f} | {r.chrf:.2f} | "
              f"{r.copy_bleu:.2f} | {r.copy_chrf:.2f} |" for r in results]
    lines += ["", "| group | languages | BLEU | chrF++ | copy BLEU | copy chrF++ |", "|---|---:|---:|---:|---:|---:|"]
    for name, a in avg.items():
        if a is None:
            lines.append(f"| {name} | 0 | - | - | - | - |")
        else:
            lines.append(f"| {name} | {len(a['languages'])} | {a['bleu']:.2f} | {a['chrf']:.2f} | "
                         f"{a['copy_bleu']:.2f} | {a['copy_chrf']:.2f} |")
    return "\n".join(lines) + "\n"


def default_out_dir(checkpoint: str | Path, split: str) -> Path:
    """`<save_dir>/eval/<checkpoint name>-<split>`: beside the checkpoint, not inside it
    (training replaces best/ and latest/ whole when it saves them again). The model folder
    training writes into best/ (best/model) evaluates to `<save_dir>/eval/best.model-<split>`."""
    ckpt = Path(checkpoint).resolve()
    if (ckpt.parent / "cats_ds.json").is_file():  # a folder inside a checkpoint: beside that checkpoint
        return ckpt.parent.parent / "eval" / f"{ckpt.parent.name}.{ckpt.name}-{split}"
    return ckpt.parent / "eval" / f"{ckpt.name}-{split}"


def prepare_command(data) -> str:
    """The `prepare` command line that rebuilds a checkpoint's data folder: every data.*
    setting that differs from its default, as an override."""
    default = DataConfig()
    args = []
    for key, value in vars(data).items():
        if value != getattr(default, key):
            text = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else \
                ("null" if value is None else str(value).lower() if isinstance(value, bool) else str(value))
            args.append(f"data.{key}={text}")
    return "python launch/prepare.py " + " ".join(args)


def sample_lines(out_dir: str | Path, languages: list[str], k: int = 5) -> str:
    """k sample translations (source / reference / hypothesis) from an evaluation folder:
    languages in turn, sentences evenly spread over each language's file."""
    out_dir = Path(out_dir)
    files = {lang: [read_lines(out_dir / f"{kind}.en-{lang}.txt") for kind in ("src", "ref", "hyp")]
             for lang in languages}
    picks: dict[str, int] = {}
    for i in range(k):
        lang = languages[i % len(languages)]
        picks[lang] = picks.get(lang, 0) + 1
    text = []
    for lang, count in picks.items():
        src, ref, hyp = files[lang]
        for j in sorted({(2 * m + 1) * len(src) // (2 * count) for m in range(count)}):
            text += [f"en-{lang} #{j}", f"  source:     {src[j]}", f"  reference:  {ref[j]}",
                     f"  hypothesis: {hyp[j]}"]
    return "\n".join(text) + "\n"


def read_lines(path: Path) -> list[str]:
    """Lines of a file written by `evaluate_checkpoint` (split on \\n only)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


# --------------------------------------------------------------------------- decoding


def limit_sample(sources: list[str], limit: Optional[int]) -> list[int]:
    """The sentences (indices, in test-set order) that `--limit N` scores: all without a limit;
    else the N whose English source has the smallest SHA-256 (UTF-8; ties by index). A fixed
    pseudo-random sample: the same on every run, process count and machine, spread over the
    whole test set (whose files are often sorted by the English text, so its first N are
    not a sample), and the same English sentences in every language that shares them."""
    if limit is None or limit >= len(sources):
        return list(range(len(sources)))
    keys = sorted((hashlib.sha256(src.encode("utf-8")).digest(), i) for i, src in enumerate(sources))
    return sorted(i for _, i in keys[:limit])


def decode_batches(data: LangSplit, n: int | np.ndarray | list[int], batch_tokens: int) -> list[np.ndarray]:
    """The batches (sentence indices) the first n sentences of `data` (or the sentences
    listed in `n`) are decoded in: up to batch_tokens padded source tokens of similar
    length (sorted by length, so little padding). The same batches on any number of
    processes, so results do not depend on it."""
    picked = np.arange(n) if isinstance(n, (int, np.integer)) else np.asarray(n, dtype=np.int64)
    order = picked[np.argsort(data.src.sizes[picked], kind="stable")]
    return chunk_by_budget(order, data.src.sizes, batch_tokens)


def decode_chunk(model: Transformer, data: LangSplit, chunk: np.ndarray, tag_id: int, lang_index: int,
                 ecfg: EvalConfig) -> list[list[int]]:
    """Best hypothesis (token ids, </s> included) of each sentence of one batch, in `chunk` order."""
    device = next(model.parameters()).device
    src = pad_stack([np.asarray(data.src[i], dtype=np.int64) for i in chunk]).to(device)  # (b, S)
    b = src.size(0)
    tags = torch.full((b,), tag_id, dtype=torch.long, device=device)
    langs = torch.full((b,), lang_index, dtype=torch.long, device=device)
    nbest = search.generate(model, src, tags, langs, beam=ecfg.beam, lenpen=ecfg.lenpen,
                            max_len_a=ecfg.max_len_a, max_len_b=ecfg.max_len_b)
    return [hyps[0].tokens for hyps in nbest]


# --------------------------------------------------------------------------- several processes


def process_group() -> tuple[int, int, bool]:
    """(rank, world size, created) of data-parallel decoding. Under the deepspeed launcher or
    torchrun (RANK / WORLD_SIZE in the environment) a gloo group is joined (created=True
    when this call initialized it); otherwise (0, 1, False)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise EvalError(f"WORLD_SIZE={world} but {key} is not set: start several processes with the "
                            f"deepspeed launcher or torchrun, or unset WORLD_SIZE for one process")
    dist.init_process_group("gloo")  # decoded token ids are merged as Python objects on the CPU
    return dist.get_rank(), dist.get_world_size(), True


def share_batches(jobs: list[tuple[str, np.ndarray]], costs: list[int], world: int) -> list[list[int]]:
    """Deal batches (job indices) to `world` processes, largest first to the least loaded
    one (cost: padded source tokens); deterministic, so every rank computes the same plan."""
    load, shares = [0] * world, [[] for _ in range(world)]
    for j in sorted(range(len(jobs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(j)
        load[r] += costs[j]
    return [sorted(share) for share in shares]


def resolve_device(device: str, local_rank: int) -> str:
    """`cpu`, or the CUDA device of this process (cuda:<local rank>); an error when CUDA is
    asked for but absent."""
    if device == "cpu":
        return "cpu"
    if device != "cuda" and not device.startswith("cuda:"):
        raise EvalError(f"--device {device}: choices: cpu, cuda")
    if not torch.cuda.is_available():
        raise EvalError(f"--device {device}: no CUDA device is available to this process "
                        f"(torch.cuda.is_available() is False; torch {torch.__version__}); use --device cpu")
    if device == "cuda":
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


# --------------------------------------------------------------------------- main


def evaluate_checkpoint(checkpoint: str | Path, split: str = "test", limit: Optional[int] = None,
                        out_dir: Optional[str | Path] = None, languages: Optional[list[str]] = None,
                        overrides: Optional[list[str]] = None, device: str = "cpu", samples: int = 0,
                        dtype: str = "fp32", data_dir: Optional[str | Path] = None,
                        backend: str = "pytorch") -> dict:
    """Decode `split` of every (or each listed) training language of a checkpoint,
    score it against the raw references, print and write the results (see the module
    docstring); returns what bleu.json holds (on rank 0; {} on the other ranks of a
    data-parallel run). `limit`: N sentences of each language, a fixed hash-ordered sample
    (`limit_sample`). `samples`: also
    print that many sample translations. `device`: cpu or cuda (this process' GPU).
    `checkpoint`: a DeepSpeed checkpoint or a model folder; `data_dir`: the prepared data
    to score against (default: the data.dir the model was trained with; a `data.dir=DIR`
    override means the same). `dtype`: fp32, bf16 or fp16, the precision of the weights
    and activations while decoding (beam scores are accumulated in fp32 whatever it is).
    `backend`: pytorch (cats_ds.inference.search) or ctranslate2 (a cached export of the checkpoint,
    decoded with the same beam, length penalty and length limits: cats_ds/inference/ct2_backend.py)."""
    overrides = list(overrides or [])
    for text in [t for t in overrides if parse_override(t)[0] == ["data", "dir"]]:  # = --data-dir
        value = text.split("=", 1)[1]
        if data_dir is not None and Path(data_dir) != Path(value):
            raise EvalError(f"--data-dir {data_dir} and the override '{text}' disagree; give one of them")
        data_dir = value
        overrides.remove(text)
    check_override_sections(overrides)  # before any loading: fail fast
    if dtype not in DTYPES:
        raise EvalError(f"--dtype {dtype}: choices: {', '.join(DTYPES)}")
    if dtype != "fp32" and backend == "ctranslate2":
        raise EvalError(f"--dtype {dtype} is for the pytorch backend; --backend ctranslate2 exports and decodes "
                        f"float32 weights: leave --dtype out")
    if backend not in BACKENDS:
        raise EvalError(f"--backend {backend}: choices: {', '.join(BACKENDS)}")
    if backend == "ctranslate2":
        try:
            _ctranslate2()
        except ExportError as e:
            raise EvalError(f"--backend ctranslate2: {e}") from None
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    ckpt = Path(checkpoint)
    rank, world, created = process_group()
    device = resolve_device(device, int(os.environ.get("LOCAL_RANK", rank)))
    try:
        return _evaluate(ckpt, split, limit, out_dir, languages, overrides, device, samples, rank, world, dtype,
                         data_dir, backend)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _evaluate(ckpt: Path, split: str, limit: Optional[int], out_dir, languages, overrides, device: str,
              samples: int, rank: int, world: int, dtype: str = "fp32", data_dir=None,
              backend: str = "pytorch") -> dict:
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        cfg, model, manifest, vocab, ckpt_langs = load_for_inference(ckpt, device, data_dir)
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    if dtype == "fp16" and device == "cpu":
        raise EvalError("--dtype fp16 needs --device cuda (CPU kernels for fp16 decoding are slow or missing); "
                        "use --dtype bf16 or fp32 on the CPU")
    model = model.to(DTYPES[dtype])
    meta = read_meta(ckpt)
    cfg = apply_eval_overrides(cfg, overrides)
    ecfg = cfg.eval

    langs = list(languages) if languages else list(ckpt_langs)
    unknown = [lang for lang in langs if lang not in ckpt_langs]
    if unknown:
        raise EvalError(f"unknown language '{unknown[0]}'; the checkpoint was trained on: {', '.join(ckpt_langs)}")
    tokenizers = {lang: tokenizer_for(lang, ecfg) for lang in langs}
    try:
        splits = load_split(cfg.data.dir, manifest, split, langs)
    except (FileNotFoundError, ValueError) as e:  # a shard missing, truncated or holding ids outside the vocab
        raise EvalError(f"{e}: the prepared data in data.dir={cfg.data.dir} is damaged; rebuild it with "
                        f"`{prepare_command(cfg.data)} --force`") from None
    missing = [lang for lang in langs if lang not in splits]
    if missing:
        say(f"| no {split} data for {', '.join(missing)} in {cfg.data.dir}: skipped")
    langs = [lang for lang in langs if lang in splits]
    if not langs:
        raise EvalError(f"no {split} data in {cfg.data.dir} for any requested language")
    try:  # all of them before decoding anything
        texts = {lang: load_texts(cfg.data.dir, manifest, split, lang, len(splits[lang]),
                                  reprepare=prepare_command(cfg.data)) for lang in langs}
    except RawTextError as e:
        raise EvalError(str(e)) from None

    try:
        groups = {lang: group_for(lang, manifest.train_pairs(lang), ecfg.lo_max, ecfg.hi_min, ecfg.groups)
                  for lang in langs}
    except GroupError as e:
        raise EvalError(str(e)) from None

    out = Path(out_dir) if out_dir is not None else default_out_dir(ckpt, split)
    ct2 = None
    if backend == "ctranslate2":
        try:
            ct2 = prepare_decoder(ckpt, cfg, model, vocab, ckpt_langs, device, rank, world, say=say)
        except ExportError as e:
            raise EvalError(f"--backend ctranslate2: {e}") from None
    say(f"| evaluating {ckpt} (step {meta.get('step')}) on {split} with {backend}: {len(langs)} languages, "
        f"beam {ecfg.beam}, "
        f"lenpen {ecfg.lenpen}, max length {ecfg.max_len_a} * src + {ecfg.max_len_b}"
        + (f", {limit} sentences each (sample by {LIMIT_ORDER})" if limit else "") + f"; {world} process(es) on {device}, {dtype}")

    picks = {lang: limit_sample(texts[lang][0][:len(splits[lang])], limit) for lang in langs}
    counts = {lang: len(picks[lang]) for lang in langs}
    jobs = [(lang, chunk) for lang in langs for chunk in decode_batches(splits[lang], picks[lang], ecfg.batch_tokens)]
    costs = [len(chunk) * int(splits[lang].src.sizes[chunk].max()) for lang, chunk in jobs]
    mine = share_batches(jobs, costs, world)[rank]
    t0 = time.time()
    decoded: dict[tuple[str, int], list[int]] = {}  # (language, sentence index) -> token ids
    with tqdm(total=sum(len(jobs[j][1]) for j in mine), desc="decoding", unit="sent", leave=False,
              disable=None if rank == 0 else True) as bar:
        for j in mine:
            lang, chunk = jobs[j]
            if ct2 is None:
                hyps = decode_chunk(model, splits[lang], chunk, vocab.lang_ids[lang], ckpt_langs.index(lang), ecfg)
            else:
                hyps = ct2.decode(lang, [np.asarray(splits[lang].src[i], dtype=np.int64) for i in chunk], ecfg.beam,
                                  ecfg.lenpen, ecfg.max_len_a, ecfg.max_len_b)
            decoded.update(((lang, i), tokens) for i, tokens in zip(chunk.tolist(), hyps))
            bar.update(len(chunk))
    if world > 1:  # merge on rank 0; the others are done
        import torch.distributed as dist

        parts = [None] * world if rank == 0 else None
        dist.gather_object(decoded, parts, dst=0)
        if rank != 0:
            return {}
        for part in parts:
            decoded.update(part)
    seconds = time.time() - t0
    total = sum(counts.values())
    say(f"| decoded {total} sentences in {seconds:.1f}s on {world} process(es) ({total / max(seconds, 1e-9):.1f} "
        f"sentences/s)")
    out.mkdir(parents=True, exist_ok=True)

    results: list[LangResult] = []
    chrf_signature = ""
    for lang in langs:
        n, pick = counts[lang], picks[lang]
        hyps = [vocab.decode(decoded[(lang, i)]) for i in pick]
        srcs, refs = [texts[lang][0][i] for i in pick], [texts[lang][1][i] for i in pick]
        scores = corpus_scores(hyps, refs, tokenizers[lang])
        copy = corpus_scores(srcs, refs, tokenizers[lang])
        pairs = manifest.train_pairs(lang)
        results.append(LangResult(lang, pairs, groups[lang], scores.bleu,
                                  scores.chrf, copy.bleu, copy.chrf, scores.bleu_signature, tokenizers[lang], n))
        chrf_signature = scores.chrf_signature
        for kind, lines in (("hyp", hyps), ("ref", refs), ("src", srcs)):
            (out / f"{kind}.en-{lang}.txt").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
        print(f"| en-{lang}: {n} sentences, BLEU {scores.bleu:.2f}, "
              f"chrF++ {scores.chrf:.2f} (copy: {copy.bleu:.2f}, {copy.chrf:.2f})")

    avg = averages(results)
    for tok in sorted(set(r.tokenize for r in results)):
        sig = next(r.signature for r in results if r.tokenize == tok)
        print(f"| BLEU signature ({tok}): {sig}")
    print(f"| chrF++ signature: {chrf_signature}")
    table = format_table(results, avg, f"{ckpt} ({split}, step {meta.get('step')}, beam {ecfg.beam}"
                                       + (", CTranslate2)" if backend == "ctranslate2" else ")"))
    print(table)
    if samples:
        print(f"| {samples} sample translations ({split}):")
        print(sample_lines(out, langs, samples))

    report = {
        "languages": {r.lang: {"bleu": r.bleu, "chrf": r.chrf, "copy_bleu": r.copy_bleu, "copy_chrf": r.copy_chrf,
                               "signature": r.signature, "tokenize": r.tokenize, "n": r.n, "group": r.group,
                               "train_pairs": r.train_pairs} for r in results},
        "averages": avg,
        "timing": {"processes": world, "decode_seconds": seconds, "sentences_per_s": total / max(seconds, 1e-9)},
        "settings": {"checkpoint": str(ckpt), "step": meta.get("step"), "split": split, "limit": limit,
                     "limit_order": LIMIT_ORDER if limit else None, "groups": ecfg.groups or None,
                     "processes": world, "dtype": dtype, "backend": backend,
                     "beam": ecfg.beam, "lenpen": ecfg.lenpen, "max_len_a": ecfg.max_len_a,
                     "max_len_b": ecfg.max_len_b, "lo_max": ecfg.lo_max, "hi_min": ecfg.hi_min,
                     "chrf_signature": chrf_signature, "references": "raw text"},
    }
    (out / "bleu.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "bleu.md").write_text(table, encoding="utf-8")
    print(f"| wrote {out / 'bleu.json'}, {out / 'bleu.md'} and hyp/ref/src files")
    if split == "test":
        add_test_scores(ckpt, meta.get("step"), avg["All"], limit)
    return report


def add_test_scores(ckpt: Path, step: Optional[int], avg: dict, limit: Optional[int]) -> None:
    """Mean test BLEU / chrF++ as hparams/test_bleu and hparams/test_chrf in the run's
    TensorBoard folder (`<save_dir>/tensorboard`, where training wrote its hparams), when
    the checkpoint sits in a run folder that has one."""
    tb = Path(ckpt).resolve().parent / "tensorboard"
    if not tb.is_dir():
        return
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tb)) as writer:
        writer.add_scalar("hparams/test_bleu", avg["bleu"], step or 0)
        writer.add_scalar("hparams/test_chrf", avg["chrf"], step or 0)
    print(f"| test scores of {ckpt} (step {step}) added to the TensorBoard hparams in {tb}"
          + (f" (first {limit} sentences per language)" if limit else ""))
