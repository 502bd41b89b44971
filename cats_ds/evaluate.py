"""Evaluate a checkpoint: beam search per language, sacreBLEU + chrF, Lo/Mid/Hi/All table.

    python launch/evaluate.py --checkpoint runs/gettext8/best --split test --limit 200 eval.beam=1

One CPU process, no DeepSpeed engine. Writes to `<checkpoint>/eval-<split>/` (or --out):
  bleu.json            per language: bleu, chrf, signature, n, group, train_pairs;
                       Lo/Mid/Hi/All averages; the decoding settings
  bleu.md              the table printed at the end
  hyp.en-xx.txt        one detokenized hypothesis per line, in test-set order
  ref.en-xx.txt        the references they were scored against

References are the DECODED target shards (Vocab.decode of the binarized target side):
prepare keeps no raw text, so a reference is the SentencePiece round trip of the raw
sentence. That equals the raw text up to SentencePiece's normalization (NFKC, spaces)
and pieces outside the vocabulary (unk, decoded as ' ⁇ '), so scores are comparable
between our systems but not exactly to scores against the original raw references.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from sacrebleu.metrics import BLEU, CHRF
from tqdm import tqdm

from cats_ds import search
from cats_ds.checkpoint import CheckpointError, load_for_inference, read_meta
from cats_ds.config import Config, EvalConfig, config_from_dict, merge_overrides, parse_override
from cats_ds.data.manifest import LangSplit, load_split
from cats_ds.data.sampler import chunk_by_budget, pad_stack
from cats_ds.model.transformer import Transformer

GROUPS = ("Lo", "Mid", "Hi")


class EvalError(Exception):
    """Evaluation cannot run as asked; the message names the setting, file or language."""


@dataclass
class LangResult:
    lang: str
    train_pairs: int
    group: str
    bleu: float
    chrf: float
    signature: str
    """sacreBLEU BLEU signature (names the tokenizer)."""
    n: int
    """Sentences scored."""


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
                            f"not '{path[0]}' (the model and data are fixed by the checkpoint)")


def group_of(train_pairs: int, lo_max: int, hi_min: int) -> str:
    """Lo: fewer than lo_max training pairs; Hi: at least hi_min; Mid: in between."""
    if train_pairs < lo_max:
        return "Lo"
    return "Hi" if train_pairs >= hi_min else "Mid"


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


def corpus_scores(hyps: list[str], refs: list[str], tokenize: str) -> Scores:
    """Corpus BLEU (sacreBLEU tokenizer `tokenize`) and chrF of detokenized hypotheses
    against one reference each, with the sacreBLEU signatures that pin the settings."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    bleu, chrf = BLEU(tokenize=tokenize), CHRF()
    b, c = bleu.corpus_score(hyps, [refs]).score, chrf.corpus_score(hyps, [refs]).score
    return Scores(b, c, str(bleu.get_signature()), str(chrf.get_signature()))


def averages(results: list[LangResult]) -> dict[str, Optional[dict]]:
    """Mean per-language BLEU and chrF of each group and of all; None for an empty group."""
    out: dict[str, Optional[dict]] = {}
    for name in GROUPS + ("All",):
        members = [r for r in results if name == "All" or r.group == name]
        out[name] = None if not members else {
            "bleu": float(np.mean([r.bleu for r in members])),
            "chrf": float(np.mean([r.chrf for r in members])),
            "languages": [r.lang for r in members]}
    return out


def format_table(results: list[LangResult], avg: dict[str, Optional[dict]], title: str) -> str:
    """Markdown: one row per language, then the group averages ('-' for empty groups)."""
    lines = [f"### {title}", "", "| language | train pairs | group | BLEU | chrF | sentences |",
             "|---|---:|---|---:|---:|---:|"]
    lines += [f"| en-{r.lang} | {r.train_pairs} | {r.group} | {r.bleu:.2f} | {r.chrf:.2f} | {r.n} |"
              for r in results]
    lines += ["", "| group | languages | BLEU | chrF |", "|---|---:|---:|---:|"]
    for name, a in avg.items():
        if a is None:
            lines.append(f"| {name} | 0 | - | - |")
        else:
            lines.append(f"| {name} | {len(a['languages'])} | {a['bleu']:.2f} | {a['chrf']:.2f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- decoding


def decode_language(model: Transformer, data: LangSplit, n: int, tag_id: int, lang_index: int,
                    ecfg: EvalConfig, desc: str = "") -> list[list[int]]:
    """Best hypothesis (token ids, </s> included) of the first n sentences of `data`, in
    their original order. Batches hold up to eval.batch_tokens padded source tokens of
    similar length (sorted by length, so little padding)."""
    sizes = data.src.sizes[:n]
    order = np.argsort(sizes, kind="stable")
    device = next(model.parameters()).device
    out: list[Optional[list[int]]] = [None] * n
    with tqdm(total=n, desc=desc, unit="sent", leave=False, disable=None) as bar:
        for chunk in chunk_by_budget(order, sizes, ecfg.batch_tokens):
            src = pad_stack([np.asarray(data.src[i], dtype=np.int64) for i in chunk]).to(device)  # (b, S)
            b = src.size(0)
            tags = torch.full((b,), tag_id, dtype=torch.long, device=device)
            langs = torch.full((b,), lang_index, dtype=torch.long, device=device)
            nbest = search.generate(model, src, tags, langs, beam=ecfg.beam, lenpen=ecfg.lenpen,
                                    max_len_a=ecfg.max_len_a, max_len_b=ecfg.max_len_b)
            for i, hyps in zip(chunk.tolist(), nbest):
                out[i] = hyps[0].tokens
            bar.update(b)
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- main


def evaluate_checkpoint(checkpoint: str | Path, split: str = "test", limit: Optional[int] = None,
                        out_dir: Optional[str | Path] = None, languages: Optional[list[str]] = None,
                        overrides: Optional[list[str]] = None, device: str = "cpu") -> dict:
    """Decode `split` of every (or each listed) training language of a checkpoint,
    score it, print and write the results (see the module docstring); returns what
    bleu.json holds. `limit`: the first N sentences of each language."""
    check_override_sections(list(overrides or []))  # before any loading: fail fast
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    ckpt = Path(checkpoint)
    try:
        cfg, model, manifest, vocab, ckpt_langs = load_for_inference(ckpt, device)
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    meta = read_meta(ckpt)
    cfg = apply_eval_overrides(cfg, overrides)
    ecfg = cfg.eval

    langs = list(languages) if languages else list(ckpt_langs)
    unknown = [lang for lang in langs if lang not in ckpt_langs]
    if unknown:
        raise EvalError(f"unknown language '{unknown[0]}'; the checkpoint was trained on: {', '.join(ckpt_langs)}")
    tokenizers = {lang: tokenizer_for(lang, ecfg) for lang in langs}
    splits = load_split(cfg.data.dir, manifest, split, langs)
    missing = [lang for lang in langs if lang not in splits]
    if missing:
        print(f"| no {split} data for {', '.join(missing)} in {cfg.data.dir}: skipped")
    langs = [lang for lang in langs if lang in splits]
    if not langs:
        raise EvalError(f"no {split} data in {cfg.data.dir} for any requested language")

    out = Path(out_dir) if out_dir is not None else ckpt / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"| evaluating {ckpt} (step {meta.get('step')}) on {split}: {len(langs)} languages, beam {ecfg.beam}, "
          f"lenpen {ecfg.lenpen}, max length {ecfg.max_len_a} * src + {ecfg.max_len_b}"
          + (f", first {limit} sentences each" if limit else ""))

    results: list[LangResult] = []
    chrf_signature = ""
    for lang in langs:
        data = splits[lang]
        n = len(data) if limit is None else min(limit, len(data))
        t0 = time.time()
        hyp_ids = decode_language(model, data, n, vocab.lang_ids[lang], ckpt_langs.index(lang), ecfg,
                                  desc=f"en-{lang}")
        hyps = [vocab.decode(ids) for ids in hyp_ids]
        refs = [vocab.decode(data.tgt[i]) for i in range(n)]
        scores = corpus_scores(hyps, refs, tokenizers[lang])
        pairs = manifest.train_pairs(lang)
        results.append(LangResult(lang, pairs, group_of(pairs, ecfg.lo_max, ecfg.hi_min), scores.bleu,
                                  scores.chrf, scores.bleu_signature, n))
        chrf_signature = scores.chrf_signature
        (out / f"hyp.en-{lang}.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        (out / f"ref.en-{lang}.txt").write_text("".join(r + "\n" for r in refs), encoding="utf-8")
        print(f"| en-{lang}: {n} sentences in {time.time() - t0:.1f}s, BLEU {scores.bleu:.2f}, "
              f"chrF {scores.chrf:.2f}")

    avg = averages(results)
    for tok in sorted(set(tokenizers[r.lang] for r in results)):
        sig = next(r.signature for r in results if tokenizers[r.lang] == tok)
        print(f"| BLEU signature ({tok}): {sig}")
    print(f"| chrF signature: {chrf_signature}")
    table = format_table(results, avg, f"{ckpt} ({split}, step {meta.get('step')}, beam {ecfg.beam})")
    print(table)

    report = {
        "languages": {r.lang: {"bleu": r.bleu, "chrf": r.chrf, "signature": r.signature, "n": r.n,
                               "group": r.group, "train_pairs": r.train_pairs} for r in results},
        "averages": avg,
        "settings": {"checkpoint": str(ckpt), "step": meta.get("step"), "split": split, "limit": limit,
                     "beam": ecfg.beam, "lenpen": ecfg.lenpen, "max_len_a": ecfg.max_len_a,
                     "max_len_b": ecfg.max_len_b, "lo_max": ecfg.lo_max, "hi_min": ecfg.hi_min,
                     "chrf_signature": chrf_signature},
    }
    (out / "bleu.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / "bleu.md").write_text(table, encoding="utf-8")
    print(f"| wrote {out / 'bleu.json'}, {out / 'bleu.md'} and hyp/ref files")
    return report


# --------------------------------------------------------------------------- comparing runs


def compare_reports(reports: dict[str, dict]) -> str:
    """Markdown table of several bleu.json reports side by side: one row per language
    (BLEU), then the Lo/Mid/Hi/All averages; columns are the runs, in the order given."""
    labels = list(reports)
    first = reports[labels[0]]
    langs = list(first["languages"])
    for label, rep in reports.items():
        if list(rep["languages"]) != langs or rep["settings"]["split"] != first["settings"]["split"]:
            raise EvalError(f"run '{label}' was evaluated on {list(rep['languages'])} "
                            f"({rep['settings']['split']}), not on {langs} ({first['settings']['split']})")
    head = "| language | pairs | group | " + " | ".join(labels) + " |"
    lines = [head, "|---|---:|---|" + "---:|" * len(labels)]
    for lang in langs:
        info = first["languages"][lang]
        cells = [f"{reports[l]['languages'][lang]['bleu']:.2f}" for l in labels]
        lines.append(f"| en-{lang} | {info['train_pairs']} | {info['group']} | " + " | ".join(cells) + " |")
    for group in GROUPS + ("All",):
        if first["averages"].get(group) is None:
            continue
        cells = [f"**{reports[l]['averages'][group]['bleu']:.2f}**" for l in labels]
        lines.append(f"| **{group}** | | | " + " | ".join(cells) + " |")
    s = first["settings"]
    note = (f"BLEU on {s['split']} (first {s['limit']} sentences per language), beam {s['beam']}, "
            f"length penalty {s['lenpen']}; steps: " + ", ".join(f"{l} {reports[l]['settings']['step']}" for l in labels))
    return "\n".join(lines) + "\n\n" + note + "\n"
