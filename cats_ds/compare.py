"""Compare evaluated runs: several seeds per label, mean and sd, paired significance.

    python launch/compare.py --baseline T5 T5=runs/exp/t5-s1/eval/best-test,runs/exp/t5-s2/eval/best-test \
        CATS=runs/exp/cats-s1/eval/best-test CATS=runs/exp/cats-s2/eval/best-test --out runs/exp/weighting.md

Each run is an `evaluate` folder (bleu.json plus hyp/ref files). A label takes several
runs (seeds) as a comma-separated list or by repeating the label. All runs must have
been scored on the same sentences against the same references (the same split and
--limit); the error names the run that differs.

Tables (chrF++ first, then BLEU): one row per language and per group (Lo/Mid/Hi/All,
groups as evaluate assigned them); per label the mean over its seeds and, with two or
more seeds, the sample standard deviation; the copy baseline (hypothesis = the English
source) in the first column. Group rows average the per-language scores, as evaluate's
table does.

Significance: paired bootstrap resampling (Koehn 2004), our own implementation on
sacreBLEU's sentence-level sufficient statistics (`Metric._extract_corpus_statistics`
and `_compute_score_from_stats`, the same ones `sacrebleu.significance` resamples; its
PairedTest takes one hypothesis list per system, which does not fit several seeds).
For every label and test unit (a language, or a group's languages' test sets
concatenated), with the same resamples of test sentences for both systems:

  - seeds: per test sentence, a label's statistics are averaged over its seeds. BLEU
    and chrF++ are functions of summed statistics and invariant to scaling them, so the
    score of the average is the score of the seeds' hypotheses concatenated; the
    resampling unit stays the test sentence, paired across the two labels;
  - B resamples (default 1000, fixed RNG seed) of the unit's sentences with
    replacement; d_b = score(label) - score(baseline) on each;
  - two-sided p = (1 + #{b : |d_b - mean(d)| >= |d_obs|}) / (B + 1), d_obs the
    difference on the full set (the bootstrap distribution shifted to the null);
  - marked `*` when p < 0.05 (`--alpha`). A group's test is on its concatenated test
    sets (its pooled corpus score), while its row shows the mean of the per-language
    scores; both are in the JSON.

What a mark means: the seed-averaged systems differ by more than test-set sampling
explains. Seed-to-seed variation is reported (sd) but is not part of the test; with two
seeds, a difference smaller than the sd deserves caution even when marked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from cats_ds.evaluate import EvalError, metrics, read_lines
from cats_ds.groups import GROUPS

METRIC_NAMES = {"chrf": "chrF++", "bleu": "BLEU"}
"""bleu.json keys -> table names, in table order."""
RESAMPLES = 1000
BOOTSTRAP_SEED = 12345


@dataclass
class Evaluation:
    """One evaluate folder."""

    path: Path
    report: dict
    hyps: dict[str, list[str]]
    refs: dict[str, list[str]]


def load_evaluation(path: str | Path) -> Evaluation:
    """bleu.json (or its folder) and the hyp/ref files beside it."""
    p = Path(path)
    f = p / "bleu.json" if p.is_dir() else p
    if not f.is_file():
        raise EvalError(f"no evaluation at {f} (expected bleu.json from launch/evaluate.py)")
    report = json.loads(f.read_text(encoding="utf-8"))
    hyps, refs = {}, {}
    for lang, info in report["languages"].items():
        for kind, store in (("hyp", hyps), ("ref", refs)):
            name = f.parent / f"{kind}.en-{lang}.txt"
            if not name.is_file():
                raise EvalError(f"{name} missing: significance needs the hypothesis and reference files")
            store[lang] = read_lines(name)
        if not len(hyps[lang]) == len(refs[lang]) == info["n"]:
            raise EvalError(f"{f.parent}: en-{lang} has {len(hyps[lang])} hypotheses and {len(refs[lang])} "
                            f"references but bleu.json says n={info['n']}")
    return Evaluation(f.parent, report, hyps, refs)


def parse_runs(items: list[str]) -> dict[str, list[str]]:
    """["T5=a,b", "CATS=c", "CATS=d"] -> {"T5": [a, b], "CATS": [c, d]} (order kept)."""
    runs: dict[str, list[str]] = {}
    for item in items:
        label, sep, paths = item.partition("=")
        if not sep or not label or not paths:
            raise EvalError(f"'{item}': expected LABEL=path[,path...] (an evaluate folder or its bleu.json)")
        runs.setdefault(label, []).extend(p for p in paths.split(",") if p)
    return runs


def check_same_test(evals: dict[str, list[Evaluation]]) -> None:
    """Every run scored the same languages, split and references as the first."""
    first = next(iter(evals.values()))[0]
    for label, runs in evals.items():
        for ev in runs:
            same = (list(ev.report["languages"]) == list(first.report["languages"])
                    and ev.report["settings"]["split"] == first.report["settings"]["split"])
            if not same:
                raise EvalError(f"{label} ({ev.path}) was evaluated on {list(ev.report['languages'])} "
                                f"({ev.report['settings']['split']}), not on {list(first.report['languages'])} "
                                f"({first.report['settings']['split']}) like {first.path}")
            for lang in first.refs:
                if ev.refs[lang] != first.refs[lang]:
                    raise EvalError(f"{label} ({ev.path}): en-{lang} references differ from {first.path}'s "
                                    f"({len(ev.refs[lang])} vs {len(first.refs[lang])} sentences): evaluate "
                                    f"every run with the same --split and --limit on the same prepared data")


SACREBLEU_TESTED = "2.3 to 2.6"
"""sacreBLEU versions whose sentence-statistics methods (private: _extract_corpus_statistics,
_compute_score_from_stats) this module was tested with; setup.py pins sacrebleu<2.7."""


def _private(metric, name: str):
    """sacreBLEU's private method `name` of `metric`, or an error naming the installed
    version and the tested ones (a newer sacreBLEU may rename them)."""
    method = getattr(metric, name, None)
    if method is None:
        import sacrebleu

        raise EvalError(f"sacreBLEU {sacrebleu.__version__} has no {type(metric).__name__}.{name}, which the paired "
                        f"bootstrap reads sentence statistics with (tested with sacreBLEU {SACREBLEU_TESTED}): "
                        f"pip install 'sacrebleu>=2.3,<2.7'")
    return method


def sentence_stats(metric, hyp_sets: list[list[str]], refs: list[str]) -> np.ndarray:
    """(n sentences, k) sufficient statistics of `metric`, averaged over hypothesis sets (seeds)."""
    extract = _private(metric, "_extract_corpus_statistics")
    return np.mean([np.asarray(extract(h, [refs]), dtype=np.float64) for h in hyp_sets], axis=0)


def score_of(metric, stats: np.ndarray) -> float:
    return float(_private(metric, "_compute_score_from_stats")(stats).score)


def paired_bootstrap(metric, system: np.ndarray, baseline: np.ndarray, resamples: int = RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """(score difference system - baseline, two-sided p) by paired bootstrap over the rows
    (sentences) of two (n, k) statistics arrays; see the module docstring."""
    n = len(system)
    rng = np.random.default_rng(seed)
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.repeat(np.arange(resamples), n), rng.integers(0, n, size=resamples * n)), 1.0)
    sys_b, base_b = counts @ system, counts @ baseline  # (B, k): each resample's summed statistics
    d = np.array([score_of(metric, a) - score_of(metric, b) for a, b in zip(sys_b, base_b)])
    observed = score_of(metric, system.sum(0)) - score_of(metric, baseline.sum(0))
    p = (1 + int(np.sum(np.abs(d - d.mean()) >= abs(observed) - 1e-12))) / (resamples + 1)
    return observed, p


def compare(evals: dict[str, list[Evaluation]], baseline: Optional[str] = None, resamples: int = RESAMPLES,
            alpha: float = 0.05) -> dict:
    """Means, sds and (with a baseline) paired-bootstrap tests of several labels; what
    the tables show, as a dict (also written as JSON by the CLI)."""
    if baseline is not None and baseline not in evals:
        raise EvalError(f"--baseline {baseline}: no such label; labels: {', '.join(evals)}")
    check_same_test(evals)
    first = next(iter(evals.values()))[0]
    langs = list(first.report["languages"])
    groups = {g: [l for l in langs if first.report["languages"][l]["group"] == g] for g in GROUPS}
    units = {**{l: [l] for l in langs}, **{g: m for g, m in groups.items() if m}, "All": langs}
    out: dict = {"labels": {label: [str(e.path) for e in runs] for label, runs in evals.items()},
                 "baseline": baseline, "split": first.report["settings"]["split"], "resamples": resamples,
                 "alpha": alpha, "languages": langs, "groups": {g: m for g, m in units.items() if g not in langs},
                 "metrics": {}}
    for key in METRIC_NAMES:
        table: dict = {}
        stats: dict[str, dict[str, np.ndarray]] = {label: {} for label in evals}
        for lang in langs:
            info = first.report["languages"][lang]
            metric = metrics(info.get("tokenize", "13a"))[0 if key == "bleu" else 1]
            for label, runs in evals.items():
                stats[label][lang] = sentence_stats(metric, [e.hyps[lang] for e in runs], first.refs[lang])
        for unit, members in units.items():
            row: dict = {"copy": float(np.mean([first.report["languages"][l][f"copy_{key}"] for l in members]))}
            for label, runs in evals.items():
                per_seed = [float(np.mean([e.report["languages"][l][key] for l in members])) for e in runs]
                row[label] = {"mean": float(np.mean(per_seed)), "sd": float(np.std(per_seed, ddof=1))
                              if len(per_seed) > 1 else None, "seeds": per_seed}
                if baseline is not None and label != baseline:
                    metric = metrics("13a")[0 if key == "bleu" else 1]  # scoring only: the tokenizer is in the stats
                    sys_stats = np.concatenate([stats[label][l] for l in members])
                    base_stats = np.concatenate([stats[baseline][l] for l in members])
                    delta, p = paired_bootstrap(metric, sys_stats, base_stats, resamples)
                    row[label].update(pooled_delta=delta, p=p, significant=p < alpha)
            table[unit] = row
        out["metrics"][key] = table
    return out


def _cell(entry: dict) -> str:
    text = f"{entry['mean']:.2f}" + (f" ± {entry['sd']:.2f}" if entry["sd"] is not None else "")
    return text + (" *" if entry.get("significant") else "")


def format_comparison(result: dict) -> str:
    """Markdown: one table per metric (see the module docstring), then a legend."""
    labels = list(result["labels"])
    lines: list[str] = []
    seeds = ", ".join(f"{label} {len(paths)}" for label, paths in result["labels"].items())
    for key, name in METRIC_NAMES.items():
        table = result["metrics"][key]
        lines += [f"### {name} ({result['split']}; seeds: {seeds})", "",
                  "| | copy | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
        for unit, row in table.items():
            head = f"en-{unit}" if unit in result["languages"] else f"**{unit}**"
            lines.append(f"| {head} | {row['copy']:.2f} | " + " | ".join(_cell(row[l]) for l in labels) + " |")
        lines.append("")
    for label in labels:
        for unit in [*result["groups"]]:
            row = result["metrics"]["chrf"][unit]
            if row[label]["mean"] <= row["copy"]:
                lines.append(f"warning: {label} does not beat the copy baseline on {unit} (chrF++ "
                             f"{row[label]['mean']:.2f} vs {row['copy']:.2f}): it has not learned to translate "
                             f"there, so differences say little about the method")
    if result["baseline"] is not None:
        lines.append(f"Mean ± sd over seeds; `*`: differs from {result['baseline']} at p < {result['alpha']} "
                     f"(paired bootstrap, {result['resamples']} resamples of test sentences, seeds averaged per "
                     f"sentence; a group's test is on its concatenated test sets). copy: the English source "
                     f"as the hypothesis.")
    else:
        lines.append("Mean ± sd over seeds; no --baseline, so no significance tests. copy: the English source "
                     "as the hypothesis.")
    return "\n".join(lines) + "\n"


def compare_paths(items: list[str], baseline: Optional[str] = None, resamples: int = RESAMPLES,
                  alpha: float = 0.05) -> dict:
    """`compare` on LABEL=path[,path] arguments."""
    if resamples < 1 or not (0 < alpha < 1) or math.isnan(alpha):
        raise EvalError(f"--resamples must be >= 1 and --alpha in (0, 1); got {resamples}, {alpha}")
    evals = {label: [load_evaluation(p) for p in paths] for label, paths in parse_runs(items).items()}
    return compare(evals, baseline, resamples, alpha)
