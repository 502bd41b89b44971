"""Compare evaluated runs: several seeds per label, mean and sd, significance whose unit is
the method (its seeds), not one seed average.

    python launch/compare.py --baseline T1 --primary CATS:T5,CATS:Tinf --out runs/exp/weighting.md \
        T1=runs/exp/t1-s1/eval/best-test,runs/exp/t1-s2/eval/best-test \
        CATS=runs/exp/cats-s1/eval/best-test,runs/exp/cats-s2/eval/best-test,runs/exp/cats-s3/eval/best-test ...

Each run is an `evaluate` folder (bleu.json plus hyp/ref files). A label takes several
runs (seeds) as a comma-separated list or by repeating the label. All runs must have
been scored on the same sentences against the same references (the same split and
--limit sample) with the same Lo/Mid/Hi groups; the error names the run that differs.

Tables (chrF++ first, then BLEU): one row per language and per group (Lo/Mid/Hi/All,
groups as evaluate assigned them: eval.groups or the size thresholds); per label the
mean over its seeds and, with two or more seeds, the sample standard deviation; the copy
baseline (hypothesis = the English source) in the first column. A group's score is the
MACRO-average of its languages' scores (every language counts once, whatever its test
set size), for the rows and for the tests alike.

The test: a hierarchical (two-level) bootstrap over seeds and sentences
------------------------------------------------------------------------
A method's score on a language is the mean over its seeds of each seed's corpus score
(what the row shows). Each of B resamples (default 1000, fixed RNG seed):

  1. seeds: each label's seeds are drawn with replacement (as many as it has),
     independently per label (a seed of one method is no partner of a seed of another);
     the same draw serves every language of that resample (a seed is one whole run);
  2. sentences: each language's test sentences are drawn with replacement, stratified
     by language (every language keeps its size), the same draw for both labels and all
     their seeds (paired: both systems see the same sentences);
  3. per language, each drawn seed's corpus score on the drawn sentences (sacreBLEU's
     sentence-level sufficient statistics summed, then scored), averaged over the drawn
     seeds; a group: the mean over its languages of those (macro-average);
  4. d_b = score(label) - score(other).

Two-sided p = (1 + #{b : |d_b - mean(d)| >= |d_obs|}) / (B + 1), d_obs the difference
of the table's means (the bootstrap distribution shifted to the null of no difference);
the 2.5/97.5 percentiles of d are reported as a 95% interval. Between-seed variation
now widens the distribution: two methods whose seeds scatter more than they differ are
not marked, however many test sentences there are. With one seed per label step 1 does
nothing and the test is the paired sentence bootstrap (Koehn 2004) of one run each.
Resampling n seeds with replacement underestimates their variance by (n-1)/n and with
2 seeds there are only 3 distinct draws: hence the warning below 3 seeds.

Why this and not approximate randomization across replicas (MultEval, Clark et al.
2011): randomization swaps the two systems' outputs sentence by sentence; across seeds
its null is "these runs are exchangeable", and permuting whole runs between 3 + 3 seeds
has 20 arrangements (smallest p 0.05 two-sided, 0.1 for 2 + 2) while sentence swaps
ignore seed variance again. The bootstrap keeps both levels in one distribution, gives
an interval as well as a p, and the per-language stratification and macro-averaging of
groups fall out of it.

Multiple comparisons: Holm's step-down (Holm 1979) within each table (chrF++ and BLEU are
separate tables, separate families), over two families:

  - primary: the comparisons named in advance with --primary A:B[,C:D...], tested on
    every group row (Lo/Mid/Hi/All present) and reported first; Holm within them only,
    so naming few keeps their power;
  - secondary: every other label against --baseline on every row (languages and
    groups), minus those already primary; Holm within them.

`*` in a table: Holm-adjusted p < --alpha (default 0.05). The JSON (compare --out X.md
writes X.json) holds for every comparison the difference, the 95% interval, the raw and
the adjusted p and the family. A warning is printed for each headline arm (the labels of
--primary; without it the baseline and the labels tested against it) with fewer than 3
seeds, and for an arm that does not beat the copy baseline on a group.

`paired_bootstrap` is the test this module used before (the seed-averaged systems
resampled over pooled sentences): it is kept to reproduce older tables and to show, in
the tests, what seed variance it missed; `compare` no longer calls it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from cats_ds.data.groups import GROUPS
from cats_ds.inference.evaluate import EvalError, metrics, read_lines

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
            groups = {l: i["group"] for l, i in ev.report["languages"].items()}
            first_groups = {l: i["group"] for l, i in first.report["languages"].items()}
            if groups != first_groups:
                raise EvalError(f"{label} ({ev.path}) assigned the groups {groups}, not {first_groups} like "
                                f"{first.path}: evaluate every run with the same eval.groups (or eval.lo_max / "
                                f"eval.hi_min)")
            for lang in first.refs:
                if ev.refs[lang] != first.refs[lang]:
                    sample = [(e.report["settings"].get("limit"), e.report["settings"].get("limit_order"))
                              for e in (ev, first)]
                    how = "" if sample[0] == sample[1] else \
                        (f"; --limit samples differ: {sample[0][0]} by {sample[0][1] or 'first sentences'} vs "
                         f"{sample[1][0]} by {sample[1][1] or 'first sentences'}")
                    raise EvalError(f"{label} ({ev.path}): en-{lang} references differ from {first.path}'s "
                                    f"({len(ev.refs[lang])} vs {len(first.refs[lang])} sentences{how}): evaluate "
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


def seed_stats(metric, hyp_sets: list[list[str]], refs: list[str]) -> np.ndarray:
    """(seeds, n sentences, k) sufficient statistics of `metric`, one slice per hypothesis set."""
    extract = _private(metric, "_extract_corpus_statistics")
    return np.stack([np.asarray(extract(h, [refs]), dtype=np.float64) for h in hyp_sets])


def sentence_stats(metric, hyp_sets: list[list[str]], refs: list[str]) -> np.ndarray:
    """(n sentences, k) sufficient statistics of `metric`, averaged over hypothesis sets (seeds)."""
    return seed_stats(metric, hyp_sets, refs).mean(axis=0)


def score_of(metric, stats: np.ndarray) -> float:
    return float(_private(metric, "_compute_score_from_stats")(stats).score)


def paired_bootstrap(metric, system: np.ndarray, baseline: np.ndarray, resamples: int = RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """(score difference system - baseline, two-sided p) by paired bootstrap over the rows
    (sentences) of two (n, k) statistics arrays, each a seed average (`sentence_stats`).
    The test before the hierarchical one: seed variance is not part of it (see the module
    docstring)."""
    n = len(system)
    rng = np.random.default_rng(seed)
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.repeat(np.arange(resamples), n), rng.integers(0, n, size=resamples * n)), 1.0)
    sys_b, base_b = counts @ system, counts @ baseline  # (B, k): each resample's summed statistics
    d = np.array([score_of(metric, a) - score_of(metric, b) for a, b in zip(sys_b, base_b)])
    observed = score_of(metric, system.sum(0)) - score_of(metric, baseline.sum(0))
    p = (1 + int(np.sum(np.abs(d - d.mean()) >= abs(observed) - 1e-12))) / (resamples + 1)
    return observed, p


TEST_NAME = "hierarchical bootstrap"
TEST_DESCRIPTION = ("hierarchical bootstrap: each label's seeds resampled with replacement, then each language's "
                    "test sentences resampled with replacement (stratified by language, paired across labels); "
                    "a group is the macro-average of its languages; two-sided p of the null-shifted distribution")
CORRECTION = "Holm"
MIN_SEEDS = 3
"""Headline arms with fewer seeds are warned about."""


@dataclass
class Resampled:
    """One label's scores under the shared resamples (see `resample_label`)."""

    observed: dict[str, np.ndarray]
    """language -> (seeds,) each seed's corpus score on the whole test set."""
    boot: dict[str, np.ndarray]
    """language -> (B, seeds) each seed's score on each resample of the sentences."""
    seeds: np.ndarray
    """(B, seeds) the seeds drawn (with replacement) in each resample."""

    def method_scores(self, members: list[str]) -> tuple[float, np.ndarray]:
        """(observed, (B,) resampled) score of the method on a unit: per language the mean over
        (drawn) seeds, then the mean over the unit's languages (macro-average)."""
        rows = np.arange(len(self.seeds))[:, None]
        observed = float(np.mean([self.observed[l].mean() for l in members]))
        boot = np.mean([self.boot[l][rows, self.seeds].mean(axis=1) for l in members], axis=0)
        return observed, boot


def draw_sentences(sizes: dict[str, int], resamples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """language -> (B, n) how often each test sentence is drawn in each resample (each
    language resampled on its own: stratified)."""
    return {lang: rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
            for lang, n in sizes.items()}


def resample_label(metric, stats: dict[str, np.ndarray], counts: dict[str, np.ndarray],
                   rng: np.random.Generator) -> Resampled:
    """A label's per-seed scores on the full test sets and on every resample; `stats`:
    language -> (seeds, n, k) statistics (`seed_stats`); `metric` scores them."""
    n_seeds = next(iter(stats.values())).shape[0]
    resamples = next(iter(counts.values())).shape[0]
    observed, boot = {}, {}
    for lang, s in stats.items():
        observed[lang] = np.array([score_of(metric, s[j].sum(0)) for j in range(n_seeds)])
        summed = np.einsum("bn,snk->bsk", counts[lang], s)  # (B, seeds, k)
        boot[lang] = np.array([[score_of(metric, summed[b, j]) for j in range(n_seeds)] for b in range(resamples)])
    return Resampled(observed, boot, rng.integers(0, n_seeds, size=(resamples, n_seeds)))


def bootstrap_test(system: Resampled, other: Resampled, members: list[str]) -> dict:
    """Difference of two labels' method scores on a unit (languages `members`), its 95%
    interval and two-sided p (see the module docstring)."""
    obs_a, boot_a = system.method_scores(members)
    obs_b, boot_b = other.method_scores(members)
    d, observed = boot_a - boot_b, obs_a - obs_b
    p = (1 + int(np.sum(np.abs(d - d.mean()) >= abs(observed) - 1e-9))) / (len(d) + 1)
    lo, hi = np.percentile(d, [2.5, 97.5])
    return {"delta": observed, "ci95": [float(lo), float(hi)], "p": p}


def hierarchical_bootstrap(metric, system: dict[str, np.ndarray], other: dict[str, np.ndarray],
                           resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """The test of the module docstring for two labels on one unit: `system` and `other` map
    each of the unit's languages to (seeds, n, k) statistics (`seed_stats`; seed counts may
    differ between the labels, sentence counts may not). Returns delta (system - other,
    macro over the languages), ci95 and p."""
    for lang in system:
        if system[lang].shape[1] != other[lang].shape[1]:
            raise EvalError(f"en-{lang}: {system[lang].shape[1]} vs {other[lang].shape[1]} sentences")
    rng = np.random.default_rng(seed)
    counts = draw_sentences({lang: s.shape[1] for lang, s in system.items()}, resamples, rng)
    a, b = resample_label(metric, system, counts, rng), resample_label(metric, other, counts, rng)
    return bootstrap_test(a, b, list(system))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest p times
    (m - i + 1), made non-decreasing along that order, capped at 1."""
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def parse_primary(text: Optional[str | list[str]], labels: list[str]) -> list[tuple[str, str]]:
    """"CATS:T5,CATS:Tinf" (or a list of such) -> [("CATS", "T5"), ("CATS", "Tinf")], checked
    against the labels."""
    items = [text] if isinstance(text, str) else list(text or [])
    pairs: list[tuple[str, str]] = []
    for item in (x.strip() for chunk in items for x in chunk.split(",")):
        if not item:
            continue
        a, sep, b = item.partition(":")
        if not sep or not a or not b or a == b:
            raise EvalError(f"--primary {item!r}: expected LABEL:OTHER with two different labels, e.g. CATS:T5")
        for label in (a, b):
            if label not in labels:
                raise EvalError(f"--primary {item}: no label {label!r}; labels: {', '.join(labels)}")
        if (a, b) not in pairs:
            pairs.append((a, b))
    return pairs


def compare(evals: dict[str, list[Evaluation]], baseline: Optional[str] = None, resamples: int = RESAMPLES,
            alpha: float = 0.05, primary: Optional[list[tuple[str, str]]] = None) -> dict:
    """Means, sds and hierarchical-bootstrap tests (with a baseline and/or primary
    comparisons, Holm-adjusted per table); what the tables show, as a dict (also written
    as JSON by the CLI)."""
    if baseline is not None and baseline not in evals:
        raise EvalError(f"--baseline {baseline}: no such label; labels: {', '.join(evals)}")
    primary = list(primary or [])
    for a, b in primary:
        if a not in evals or b not in evals:
            raise EvalError(f"--primary {a}:{b}: no such label; labels: {', '.join(evals)}")
    check_same_test(evals)
    first = next(iter(evals.values()))[0]
    langs = list(first.report["languages"])
    groups = {g: [l for l in langs if first.report["languages"][l]["group"] == g] for g in GROUPS}
    group_units = {**{g: m for g, m in groups.items() if m}, "All": langs}
    units = {**{l: [l] for l in langs}, **group_units}
    settings = first.report["settings"]
    tested = primary + ([(label, baseline) for label in evals if label != baseline] if baseline else [])
    headline = sorted({l for pair in primary for l in pair}, key=list(evals).index) if primary else \
        ([baseline] + [l for l in evals if l != baseline] if baseline else [])
    warnings = [f"{label} has {len(evals[label])} seed(s): fewer than {MIN_SEEDS} for a headline arm, so the test "
                f"sees little of its seed variance" for label in headline if len(evals[label]) < MIN_SEEDS]
    out: dict = {"labels": {label: [str(e.path) for e in runs] for label, runs in evals.items()},
                 "baseline": baseline, "primary": [f"{a}:{b}" for a, b in primary],
                 "split": settings["split"], "sample": {"limit": settings.get("limit"),
                                                        "order": settings.get("limit_order")},
                 "resamples": resamples, "alpha": alpha, "languages": langs,
                 "sentences": {l: len(first.refs[l]) for l in langs},
                 "groups": {g: m for g, m in units.items() if g not in langs},
                 "test": {"name": TEST_NAME, "description": TEST_DESCRIPTION, "correction": CORRECTION,
                          "families": "per metric table: primary (--primary pairs on the group rows) and "
                                      "secondary (labels vs --baseline on every row, minus primary ones)",
                          "seed": BOOTSTRAP_SEED} if tested else None,
                 "warnings": warnings, "metrics": {}, "comparisons": {}}
    for key in METRIC_NAMES:
        table: dict = {}
        for unit, members in units.items():
            row: dict = {"copy": float(np.mean([first.report["languages"][l][f"copy_{key}"] for l in members]))}
            for label, runs in evals.items():
                per_seed = [float(np.mean([e.report["languages"][l][key] for l in members])) for e in runs]
                row[label] = {"mean": float(np.mean(per_seed)), "sd": float(np.std(per_seed, ddof=1))
                              if len(per_seed) > 1 else None, "seeds": per_seed}
            table[unit] = row
        out["metrics"][key] = table
        if not tested:
            continue
        rng = np.random.default_rng(BOOTSTRAP_SEED)
        counts = draw_sentences({l: len(first.refs[l]) for l in langs}, resamples, rng)
        scoring = metrics("13a")[0 if key == "bleu" else 1]  # scoring only: the tokenizer is in the stats
        resampled: dict[str, Resampled] = {}
        for label in evals:
            if not any(label in pair for pair in tested):
                continue
            stats = {}
            for lang in langs:
                metric = metrics(first.report["languages"][lang].get("tokenize", "13a"))[0 if key == "bleu" else 1]
                stats[lang] = seed_stats(metric, [e.hyps[lang] for e in evals[label]], first.refs[lang])
            resampled[label] = resample_label(scoring, stats, counts, rng)
        families = {"primary": [(a, b, u) for a, b in primary for u in group_units],
                    "secondary": [(label, baseline, u) for label in evals if baseline and label != baseline
                                  for u in units if not ((label, baseline) in primary and u in group_units)]}
        rows = []
        for family, comps in families.items():
            results = [bootstrap_test(resampled[a], resampled[b], units[u]) for a, b, u in comps]
            for (a, b, u), r, p_adj in zip(comps, results, holm([r["p"] for r in results])):
                rows.append({"system": a, "other": b, "unit": u, "family": family, **r, "p_adjusted": p_adj,
                             "significant": p_adj < alpha})
                if b == baseline:
                    table[u][a].update(delta=r["delta"], ci95=r["ci95"], p=r["p"], p_adjusted=p_adj,
                                       family=family, significant=p_adj < alpha)
        out["comparisons"][key] = rows
    return out


def _cell(entry: dict) -> str:
    text = f"{entry['mean']:.2f}" + (f" ± {entry['sd']:.2f}" if entry["sd"] is not None else "")
    return text + (" *" if entry.get("significant") else "")


def method_line(result: dict) -> str:
    """The exact test, in words, for the legend."""
    return (f"{result['test']['description']}; {result['resamples']} resamples; {result['test']['correction']}-"
            f"adjusted p per table within the primary and the secondary family")


def format_comparison(result: dict) -> str:
    """Markdown: the primary comparisons (if any), one table per metric (see the module
    docstring), warnings, then a legend naming the test."""
    labels = list(result["labels"])
    lines: list[str] = []
    seeds = ", ".join(f"{label} {len(paths)}" for label, paths in result["labels"].items())
    for key, name in METRIC_NAMES.items():
        prim = [c for c in result["comparisons"].get(key, []) if c["family"] == "primary"]
        if prim:
            lines += [f"### Primary comparisons, {name} ({result['split']}; {TEST_NAME}, {CORRECTION} over "
                      f"{len(prim)})", "", f"| comparison | unit | Δ {name} | 95% interval | p | p ({CORRECTION}) |",
                      "|---|---|---:|---|---:|---:|"]
            lines += [f"| {c['system']} vs {c['other']} | {c['unit']} | {c['delta']:+.2f} | [{c['ci95'][0]:+.2f}, "
                      f"{c['ci95'][1]:+.2f}] | {c['p']:.4f} | {c['p_adjusted']:.4f}"
                      f"{' *' if c['significant'] else ''} |" for c in prim]
            lines.append("")
    for key, name in METRIC_NAMES.items():
        table = result["metrics"][key]
        lines += [f"### {name} ({result['split']}; seeds: {seeds})", "",
                  "| | copy | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
        for unit, row in table.items():
            head = f"en-{unit}" if unit in result["languages"] else f"**{unit}**"
            lines.append(f"| {head} | {row['copy']:.2f} | " + " | ".join(_cell(row[l]) for l in labels) + " |")
        lines.append("")
    for text in result["warnings"]:
        lines.append(f"warning: {text}")
    for label in labels:
        for unit in [*result["groups"]]:
            row = result["metrics"]["chrf"][unit]
            if row[label]["mean"] <= row["copy"]:
                lines.append(f"warning: {label} does not beat the copy baseline on {unit} (chrF++ "
                             f"{row[label]['mean']:.2f} vs {row['copy']:.2f}): it has not learned to translate "
                             f"there, so differences say little about the method")
    groups = "; ".join(f"{g} = macro-average of {', '.join(m)}" for g, m in result["groups"].items())
    groups += ". Test sentences: " + ", ".join(f"{l} {n}" for l, n in result["sentences"].items())
    if result["sample"]["limit"]:
        groups += f" (--limit {result['sample']['limit']}, sample by {result['sample']['order'] or 'first sentences'})"
    if result["test"] is not None:
        mark = (f"`*`: differs from {result['baseline']} at {CORRECTION}-adjusted p < {result['alpha']} (the "
                f"group rows of a --primary pair with it: adjusted in the primary family)"
                if result["baseline"] is not None else "no --baseline, so no marks in these tables")
        lines.append(f"Mean ± sd over seeds; {mark}. Test: {method_line(result)}. Groups: {groups}. "
                     f"copy: the English source as the hypothesis.")
    else:
        lines.append(f"Mean ± sd over seeds; no --baseline or --primary, so no significance tests. Groups: "
                     f"{groups}. copy: the English source as the hypothesis.")
    return "\n".join(lines) + "\n"


def compare_paths(items: list[str], baseline: Optional[str] = None, resamples: int = RESAMPLES,
                  alpha: float = 0.05, primary: Optional[str | list[str]] = None) -> dict:
    """`compare` on LABEL=path[,path] arguments; `primary`: "A:B,C:D" (--primary)."""
    if resamples < 1 or not (0 < alpha < 1) or math.isnan(alpha):
        raise EvalError(f"--resamples must be >= 1 and --alpha in (0, 1); got {resamples}, {alpha}")
    runs = parse_runs(items)
    pairs = parse_primary(primary, list(runs))
    evals = {label: [load_evaluation(p) for p in paths] for label, paths in runs.items()}
    return compare(evals, baseline, resamples, alpha, pairs)
