"""A markdown report: the paper's qualitative optimization claims vs. what our runs measured.

Runs are recognized by their checkpoint config (not by their labels):
  T=1 / T=inf   weighting.method=temperature, a norm with affine parameters, and
                sampling.temperature 1 / inf
  noaffine      model.norm=*_noaffine (weighting temperature); its baseline is the T=1/5/inf
                run with the same temperature and an affine norm
  CATS          weighting.method=cats; its baseline is the temperature run with the same T

Each claim states what was measured, from which runs and steps, and whether it holds;
a claim whose runs or records are missing says "not measured" (holds: None).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from cats_ds.analysis.records import RunData, loss_by_resource

COS_NEAR_ZERO = 0.1
"""|mean HiLo cosine| at or below this counts as "near 0" (nearly orthogonal)."""
MAJOR_GROUPS = ("E.SA", "E.FC", "D.SA", "D.EA", "D.FC")
TRAIN_WINDOW = 0.2
"""Train loss for the generalization gap: mean over the last 20% of updates before the
last validation."""


@dataclass
class Claim:
    name: str
    paper: str
    """The paper's qualitative claim, as tested here."""
    measured: str
    holds: Optional[bool]
    """None: could not be measured with the given runs."""


# --------------------------------------------------------------------------- run roles


def _temperature(run: RunData) -> Optional[float]:
    t = run.setting("sampling", "temperature")
    return None if t is None else float(t)


def _is_temperature_baseline(run: RunData) -> bool:
    return (run.config is not None and run.setting("weighting", "method") == "temperature"
            and not str(run.setting("model", "norm", "")).endswith("noaffine")
            and not run.setting("experts", "modules"))


def _find(runs: Sequence[RunData], test: Callable[[RunData], bool]) -> Optional[RunData]:
    return next((r for r in runs if test(r)), None)


def _baseline_for(runs: Sequence[RunData], run: RunData) -> Optional[RunData]:
    t = _temperature(run)
    return _find(runs, lambda r: r is not run and _is_temperature_baseline(r) and _temperature(r) == t)


def _t_name(t: Optional[float]) -> str:
    return "T=?" if t is None else ("T=inf" if math.isinf(t) else f"T={t:g}")


# --------------------------------------------------------------------------- measurements


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def _langs(run: RunData, group: str) -> list[str]:
    return [l for l, g in run.resource.items() if g == group]


def early_records(run: RunData) -> list[dict]:
    """Analyses up to the end of warm-up (train.warmup_updates); the first one if none."""
    w = run.warmup
    early = [r for r in run.analysis if w is not None and r["step"] <= w]
    return early or run.analysis[:1]


def _converged(record: dict, lang: str) -> bool:
    return bool(record.get("hessian", {}).get(lang, {}).get("converged", True))


def early_lambda(run: RunData, group: str = "Lo") -> tuple[Optional[float], int, int]:
    """(mean lambda_max of the group's languages over the early analyses, values used,
    values left out because power iteration did not converge)."""
    langs, used, loose = _langs(run, group), [], 0
    for r in early_records(run):
        for lang in langs:
            if r["lambda_max"].get(lang) is None:
                continue
            if _converged(r, lang):
                used.append(r["lambda_max"][lang])
            else:
                loose += 1
    return _mean(used), len(used), loose


def generalization_gap(run: RunData, langs: Sequence[str]) -> Optional[tuple[float, int]]:
    """(mean over `langs` of valid loss - train loss, step) at the last validation; the
    train loss of a language is its mean over the train records of the last
    TRAIN_WINDOW of updates before it. None if not measurable."""
    if not run.valid:
        return None
    last = run.valid[-1]
    step = last["step"]
    window = [r for r in run.train if step * (1 - TRAIN_WINDOW) < r["step"] <= step]
    gaps = []
    for lang in langs:
        valid = last.get("langs", {}).get(lang, {}).get("loss")
        train = _mean(r.get("loss_lang", {}).get(lang) for r in window)
        if valid is not None and train is not None:
            gaps.append(valid - train)
    return (float(np.mean(gaps)), step) if gaps else None


def final_valid(run: RunData, group: str) -> Optional[tuple[float, int]]:
    """(mean valid loss of the group's languages, step) at the last validation."""
    if not run.valid:
        return None
    curve = loss_by_resource(run).get(group, {}).get("valid")
    if not curve or not curve[0]:
        return None
    return curve[1][-1], curve[0][-1]


# --------------------------------------------------------------------------- claims


def claim_hilo_orthogonal(runs: Sequence[RunData]) -> Claim:
    paper = (f"After warm-up, gradients of high- and low-resource languages are nearly orthogonal: "
             f"the mean HiLo gradient cosine (all parameters) is near 0 (|cos| <= {COS_NEAR_ZERO}).")
    parts, verdicts = [], []
    for run in runs:
        w = run.warmup or 0
        recs = [r for r in run.analysis if r["step"] > w and "HiLo" in r["pair_types"]]
        cos_all = _mean(r["pair_types"]["HiLo"]["cos"].get("all") for r in recs)
        if cos_all is None:
            continue
        major = {g: _mean(r["pair_types"]["HiLo"]["cos"].get(g) for r in recs) for g in MAJOR_GROUPS}
        major = {g: v for g, v in major.items() if v is not None}
        detail = ""
        if major:
            g = max(major, key=lambda k: abs(major[k]))
            detail = f"; largest |cos| among major groups: {g} {major[g]:+.3f}"
        parts.append(f"{run.label}: {cos_all:+.3f} (mean of {len(recs)} analyses after update {w}{detail})")
        verdicts.append(abs(cos_all) <= COS_NEAR_ZERO)
    if not parts:
        return Claim("hilo_orthogonal", paper, "not measured: no run has HiLo pairs analyzed after its warm-up "
                     "(needs analysis.every > 0, Hi and Lo languages, and more updates than train.warmup_updates)",
                     None)
    return Claim("hilo_orthogonal", paper, "; ".join(parts), all(verdicts))


def claim_sharpness_temperature(runs: Sequence[RunData]) -> Claim:
    paper = ("Early in training, the top Hessian eigenvalue (lambda_max) of low-resource languages is larger "
             "when they are upsampled to uniform (T=inf) than with proportional sampling (T=1).")
    t1 = _find(runs, lambda r: _is_temperature_baseline(r) and _temperature(r) == 1.0)
    tinf = _find(runs, lambda r: _is_temperature_baseline(r) and _temperature(r) is not None
                 and math.isinf(_temperature(r)))
    if t1 is None or tinf is None:
        return Claim("sharpness_temperature", paper, "not measured: needs a T=1 and a T=inf temperature run", None)
    (a, na, la), (b, nb, lb) = early_lambda(t1), early_lambda(tinf)
    if a is None or b is None:
        missing = ", ".join(r.label for r, v in ((t1, a), (tinf, b)) if v is None)
        return Claim("sharpness_temperature", paper,
                     f"not measured: no converged early lambda_max of a Lo language in {missing} "
                     f"(no analysis, or raise analysis.hessian_iters)", None)

    def where(run: RunData, used: int, loose: int) -> str:
        steps = ", ".join(str(r["step"]) for r in early_records(run))
        return f"updates {steps}, {used} value(s)" + (f", {loose} unconverged left out" if loose else "")

    return Claim("sharpness_temperature", paper,
                 f"mean Lo lambda_max {tinf.label} (T=inf) {b:.4g} vs {t1.label} (T=1) {a:.4g} "
                 f"({tinf.label}: {where(tinf, nb, lb)}; {t1.label}: {where(t1, na, la)})", b > a)


def _run_and_baseline(runs: Sequence[RunData], name: str, paper: str, setting: str, baseline: str,
                      is_treated) -> tuple[Optional[RunData], Optional[RunData], Optional[Claim]]:
    """The first run that is_treated and its temperature baseline, or a 'not measured'
    Claim saying which of the two is missing."""
    run = _find(runs, is_treated)
    if run is None:
        return None, None, Claim(name, paper, f"not measured: no run with {setting}", None)
    base = _baseline_for(runs, run)
    if base is None:
        return run, None, Claim(name, paper, f"not measured: no {baseline} with "
                                f"{_t_name(_temperature(run))} to compare {run.label} with", None)
    return run, base, None


def claim_noaffine_gap(runs: Sequence[RunData]) -> Claim:
    paper = ("Removing LayerNorm's gain and bias (noaffine) narrows the generalization gap (valid - train "
             "loss) of low-resource languages.")
    na, base, missing = _run_and_baseline(
        runs, "noaffine_gap", paper, "model.norm=*_noaffine", "affine-norm temperature run",
        lambda r: r.config is not None and str(r.setting("model", "norm", "")).endswith("noaffine")
        and r.setting("weighting", "method") == "temperature")
    if missing is not None:
        return missing
    lo, every = _langs(na, "Lo"), sorted({l for r in na.valid for l in r.get("langs", {})})
    lo_na, lo_base = generalization_gap(na, lo), generalization_gap(base, lo)
    all_na, all_base = generalization_gap(na, every), generalization_gap(base, every)
    if lo_na is None or lo_base is None:
        return Claim("noaffine_gap", paper, f"not measured: no validation of Lo languages with train losses in "
                     f"the last {TRAIN_WINDOW:.0%} of updates in {na.label} or {base.label}", None)
    extra = (f"; all languages {all_na[0]:.3f} vs {all_base[0]:.3f}" if all_na and all_base else "")
    return Claim("noaffine_gap", paper,
                 f"Lo gap {na.label} {lo_na[0]:.3f} (update {lo_na[1]}) vs {base.label} {lo_base[0]:.3f} "
                 f"(update {lo_base[1]}){extra}", lo_na[0] < lo_base[0])


def claim_cats_low_resource(runs: Sequence[RunData]) -> Claim:
    paper = "CATS improves low-resource languages: lower Lo validation loss than the same sampling without CATS."
    cats, base, missing = _run_and_baseline(runs, "cats_low_resource", paper, "weighting.method=cats",
                                            "temperature run", lambda r: r.setting("weighting", "method") == "cats")
    if missing is not None:
        return missing
    a, b = final_valid(cats, "Lo"), final_valid(base, "Lo")
    if a is None or b is None:
        return Claim("cats_low_resource", paper, f"not measured: no Lo validation loss in {cats.label} or "
                     f"{base.label}", None)
    return Claim("cats_low_resource", paper, f"Lo valid loss {cats.label} {a[0]:.3f} (update {a[1]}) vs "
                 f"{base.label} {b[0]:.3f} (update {b[1]})", a[0] < b[0])


def evaluate_claims(runs: Sequence[RunData]) -> list[Claim]:
    return [claim_hilo_orthogonal(runs), claim_sharpness_temperature(runs), claim_noaffine_gap(runs),
            claim_cats_low_resource(runs)]


# --------------------------------------------------------------------------- markdown


def _verdict(holds: Optional[bool]) -> str:
    return "not measured" if holds is None else ("yes" if holds else "no")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_report(runs: Sequence[RunData], claims: Sequence[Claim], figures: dict[str, Path], out: Path) -> str:
    lines = ["# Optimization analysis: the paper's claims vs. our runs", "",
             "## Runs", "", "| run | folder | sampling | weighting | norm | updates | analyses |",
             "|---|---|---|---|---|---:|---:|"]
    for r in runs:
        lines.append(f"| {r.label} | {r.path} | {_t_name(_temperature(r))} | {r.setting('weighting', 'method', '?')} "
                     f"| {r.setting('model', 'norm', '?')} | {r.last_step} | {len(r.analysis)} |")
    groups = sorted({g for r in runs for g in r.resource.values()}, key=("Hi", "Mid", "Lo").index)
    if groups:
        lines += ["", "Resource groups: " + "; ".join(
            f"{g}: {', '.join(sorted({l for r in runs for l, x in r.resource.items() if x == g}))}" for g in groups)]
    lines += ["", "## Claims", "", "| claim | paper | measured | holds |", "|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c.name} | {_cell(c.paper)} | {_cell(c.measured)} | {_verdict(c.holds)} |")
    if figures:
        lines += ["", "## Figures", ""]
        for name, path in figures.items():
            rel = Path(path).relative_to(out) if Path(path).is_relative_to(out) else Path(path)
            lines += [f"![{name}]({rel})", ""]
    lines += ["", "## Definitions", "",
              "- cos and gamma: per-language gradients on each run's fixed analysis batches (the first "
              "analysis.sentences dev sentences per language), dropout off; gamma = 2|g1||g2| / (|g1|^2 + |g2|^2).",
              "- lambda_max: power iteration with Hessian-vector products on each language's mean token loss "
              "(settings per record in analysis.jsonl: hessian_iters, hessian_tol).",
              "- early: analyses at updates <= train.warmup_updates (the first analysis if there is none); "
              "lambda_max values whose power iteration did not converge are left out.",
              f"- generalization gap: valid loss at the last validation minus the mean train loss over the last "
              f"{TRAIN_WINDOW:.0%} of updates before it (train loss with dropout, valid without).",
              "- Claims are judged on these short runs; they are evidence about this setup, not a replication "
              "of the paper's numbers."]
    return "\n".join(lines) + "\n"


def write_report(runs: Sequence[RunData], out: str | Path, figures: Optional[dict[str, Path]] = None
                 ) -> tuple[Path, list[Claim]]:
    """Write <out>/report.md and <out>/report.json (the claims); returns (report.md, claims)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    claims = evaluate_claims(runs)
    md = out / "report.md"
    md.write_text(render_report(runs, claims, figures or {}, out), encoding="utf-8")
    (out / "report.json").write_text(json.dumps({"claims": [asdict(c) for c in claims],
                                                 "runs": {r.label: str(r.path) for r in runs}}, indent=1),
                                     encoding="utf-8")
    return md, claims
