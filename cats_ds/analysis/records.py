"""Reading training runs back for figures and reports.

A run folder is a `train.save_dir`:
  analysis.jsonl        one analysis record per line (analyze.py), if analysis.every was set
  train_log.jsonl       {"kind": "train", "step", "loss", "loss_lang": {lang: loss}, ...}
                        and {"kind": "valid", "step", "mean_loss", "langs": {lang: {"loss", "nll"}}}
  latest/cats_ds.json   the resolved config and languages (also best/)
  config.yaml           the resolved config, written at the run's start (train.py's
                        write_run_config): read when there is no checkpoint yet, with
                        the languages then taken from the logs

A resumed run repeats the steps after its checkpoint; the last record of a step wins.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from cats_ds.analysis.similarity import AnalysisError, resource_groups
from cats_ds.checkpoints import CHECKPOINT_META
from cats_ds.data.manifest import Manifest

ANALYSIS_LOG = "analysis.jsonl"
TRAIN_LOG = "train_log.jsonl"
RUN_CONFIG = "config.yaml"
"""= cats_ds.train.RUN_CONFIG (not imported: train.py pulls in DeepSpeed)."""

Series = tuple[list[int], list[float]]
"""(steps, values)"""


def read_jsonl(path: Path) -> list[dict]:
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise AnalysisError(f"{path}:{n}: not valid JSON: {e}") from None
    return out


def by_step(records: list[dict]) -> list[dict]:
    """One record per step (the last one written), ascending."""
    last = {int(r["step"]): r for r in records}
    return [last[s] for s in sorted(last)]


@dataclass
class RunData:
    label: str
    path: Path
    config: Optional[dict]
    """The resolved config of the run's checkpoint (None: no checkpoint found)."""
    resource: dict[str, str]
    """Language -> Hi / Mid / Lo ({} if unknown)."""
    analysis: list[dict] = field(default_factory=list)
    train: list[dict] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)

    def setting(self, section: str, key: str, default=None):
        """A config value (default when the run has no checkpoint config)."""
        return default if self.config is None else self.config.get(section, {}).get(key, default)

    @property
    def warmup(self) -> Optional[int]:
        return self.setting("train", "warmup_updates")

    @property
    def last_step(self) -> int:
        steps = [r["step"] for r in self.train + self.valid + self.analysis]
        return max(steps) if steps else 0


def parse_run_arg(text: str) -> tuple[Optional[str], Path]:
    """'LABEL=DIR' or 'DIR' (the label is then the folder name)."""
    if "=" in text:
        label, path = text.split("=", 1)
        if not label or not path:
            raise AnalysisError(f"--run: '{text}' should be LABEL=DIR or DIR")
        return label, Path(path)
    return None, Path(text)


def load_run(path: str | Path, label: Optional[str] = None) -> RunData:
    """Read a run folder (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise AnalysisError(f"run folder not found: {path}")
    analysis = by_step(read_jsonl(path / ANALYSIS_LOG)) if (path / ANALYSIS_LOG).is_file() else []
    log = read_jsonl(path / TRAIN_LOG) if (path / TRAIN_LOG).is_file() else []
    if not analysis and not log:
        raise AnalysisError(f"{path}: no {ANALYSIS_LOG} or {TRAIN_LOG}: not a training run folder (train.save_dir)")
    config, languages = None, None
    for tag in ("latest", "best"):
        meta_path = path / tag / CHECKPOINT_META
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            config, languages = meta.get("config"), meta.get("languages")
            break
    else:
        config = _run_config(path)
        if config is not None:
            languages = sorted({l for r in log if r.get("kind") == "train" for l in r.get("loss_lang", {})} |
                               {l for r in log if r.get("kind") == "valid" for l in r.get("langs", {})})
    resource: dict[str, str] = dict(analysis[-1]["resource"]) if analysis else {}
    if not resource and config is not None and languages:
        resource = _resource_from_manifest(config, languages)
    return RunData(label or path.name, path, config, resource, analysis,
                   by_step([r for r in log if r.get("kind") == "train"]),
                   by_step([r for r in log if r.get("kind") == "valid"]))


def _run_config(path: Path) -> Optional[dict]:
    """`<run>/config.yaml` as a {section: {key: value}} dict (None if there is none)."""
    import yaml

    file = path / RUN_CONFIG
    if not file.is_file():
        return None
    try:
        tree = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise AnalysisError(f"{file}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise AnalysisError(f"{file}: top level must be a mapping of config sections")
    return tree


def _resource_from_manifest(config: dict, languages: list[str]) -> dict[str, str]:
    try:
        manifest = Manifest.load(config["data"]["dir"])
    except (FileNotFoundError, ValueError, KeyError):
        return {}  # the data folder moved: losses are then shown for all languages only
    ev = config.get("eval", {})
    return resource_groups(manifest, languages, int(ev.get("lo_max", 100_000)), int(ev.get("hi_min", 1_000_000)),
                           ev.get("groups") or None)


# --------------------------------------------------------------------------- series


def lambda_series(run: RunData) -> dict[str, tuple[list[int], list[float], list[bool]]]:
    """lambda_max over analysis steps, per language: (steps, values, converged)."""
    out: dict[str, tuple[list[int], list[float], list[bool]]] = {}
    for r in run.analysis:
        for lang, v in r["lambda_max"].items():
            steps, values, converged = out.setdefault(lang, ([], [], []))
            steps.append(r["step"])
            values.append(v)
            converged.append(bool(r.get("hessian", {}).get(lang, {}).get("converged", True)))
    return out


def pair_type_series(run: RunData, pair_type: str = "HiLo", measure: str = "cos", group: str = "all") -> Series:
    """Mean cos (or gamma) of a pair type in a parameter group over analysis steps."""
    steps, values = [], []
    for r in run.analysis:
        v = r["pair_types"].get(pair_type, {}).get(measure, {}).get(group)
        if v is not None:
            steps.append(r["step"])
            values.append(v)
    return steps, values


def _group_mean(values: dict[str, float], langs: list[str]) -> Optional[float]:
    xs = [values[l] for l in langs if l in values and values[l] is not None and math.isfinite(values[l])]
    return float(np.mean(xs)) if xs else None


def loss_by_resource(run: RunData) -> dict[str, dict[str, Series]]:
    """{group: {"train": series, "valid": series}} for each resource group present and
    "All": the mean per-language loss of the group's languages (train: those sampled in
    the logging interval)."""
    groups: dict[str, list[str]] = {}
    for lang, g in run.resource.items():
        groups.setdefault(g, []).append(lang)
    ordered = [g for g in ("Hi", "Mid", "Lo") if g in groups]
    all_langs = sorted({l for r in run.train for l in r.get("loss_lang", {})} |
                       {l for r in run.valid for l in r.get("langs", {})})
    out: dict[str, dict[str, Series]] = {}
    for name, langs in [(g, groups[g]) for g in ordered] + [("All", all_langs)]:
        curves: dict[str, Series] = {"train": ([], []), "valid": ([], [])}
        for r in run.train:
            v = _group_mean(r.get("loss_lang", {}), langs)
            if v is not None:
                curves["train"][0].append(r["step"])
                curves["train"][1].append(v)
        for r in run.valid:
            v = _group_mean({l: x["loss"] for l, x in r.get("langs", {}).items()}, langs)
            if v is not None:
                curves["valid"][0].append(r["step"])
                curves["valid"][1].append(v)
        out[name] = curves
    return out


def weighting_series(run: RunData) -> dict[str, dict[str, Series]]:
    """The weighting state logged with each train record (train_log.jsonl "weighting"):
    {"weights": {lang: series of alpha (CATS) or w (the other methods)}, "sum": series of
    their sum, "lambda_c": series, "curvature_ratio": series of f / f0 (CATS), "mean_cos":
    series of the meta batch's mean pairwise gradient cosine (Gram-based methods)}.
    Empty dicts for a temperature run."""
    out: dict[str, dict[str, Series]] = {"weights": {}, "sum": {}, "lambda_c": {}, "curvature_ratio": {},
                                         "mean_cos": {}}
    for r in run.train:
        w = r.get("weighting") or {}
        weights = {k.split("/", 1)[1]: v for k, v in w.items() if k.startswith(("alpha/", "weight/"))}
        for lang, v in weights.items():
            steps, values = out["weights"].setdefault(lang, ([], []))
            steps.append(r["step"])
            values.append(v)
        if weights:
            steps, values = out["sum"].setdefault("sum", ([], []))
            steps.append(r["step"])
            values.append(float(sum(weights.values())))
        for key, name in (("cats/lambda_c", "lambda_c"), ("cats/curvature_ratio", "curvature_ratio"),
                          ("meta/mean_cos", "mean_cos")):
            if key in w and w[key] is not None and math.isfinite(w[key]):
                steps, values = out[name].setdefault(name, ([], []))
                steps.append(r["step"])
                values.append(w[key])
    return out


def weight_name(run: RunData) -> str:
    """What the run's per-language weights are called: "alpha" (CATS) or "weight"."""
    return "alpha" if any(k.startswith("alpha/") for r in run.train for k in (r.get("weighting") or {})) else "weight"



# --------------------------------------------------------------------------- over seeds


@dataclass
class SeedStats:
    """One curve over seeds at the updates every seed logged: mean, min, max and sd (ddof 0)."""
    steps: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    sd: list[float]
    seeds: int
    dropped: int
    """Updates some seeds logged and others did not (left out: a shorter or resumed seed)."""


def seed_stats(series: list[Series]) -> Optional[SeedStats]:
    """The seeds' curves (one series each) at their common updates; None if they share none."""
    if not series:
        return None
    common = set(series[0][0]).intersection(*(s[0] for s in series[1:]))
    if not common:
        return None
    steps = sorted(common)
    grid = np.array([[dict(zip(*s))[t] for t in steps] for s in series], dtype=float)
    everyone = set().union(*(s[0] for s in series))
    return SeedStats(steps, grid.mean(0).tolist(), grid.min(0).tolist(), grid.max(0).tolist(),
                     grid.std(0).tolist(), len(series), len(everyone) - len(steps))
