"""The paper's Figure 3 from run folders: train and dev loss of the low- and high-resource
languages against updates, one line per arm (a sampling temperature, CATS, ...), each the
mean over the arm's seeds with a band; and where each arm's dev loss is lowest.

    python launch/figure3.py --arm T=1:runs/t1-s1,runs/t1-s2 --arm T=5:runs/t5-s1,runs/t5-s2 \\
        --arm T=inf:runs/tinf-s1,runs/tinf-s2 --arm CATS:runs/cats-s1,runs/cats-s2 \\
        --out results/figure3.png --json results/figure3.json --alpha-out results/cats_alpha.png

(also `python launch/figure3.py ...` and `cats-figure3 ...`). An arm is `LABEL:DIR[,DIR...]`,
split at the first ':' (so a label has no ':', and may have '=': `T=1`), one run folder
(train.save_dir) per seed; repeating a label adds seeds to it.

What is read: each run's `train_log.jsonl` (cats_ds/analysis/records.py reads it; a resumed
run's repeated updates count once, the last record wins):
  - train loss: `loss_lang` of the "train" records, {lang: token-mean label-smoothed loss of
    that language over the log window} (train.py log_train; a language drawn nowhere in the
    window is absent from that record);
  - dev loss: `langs[lang]["loss"]` of the "valid" records (the whole dev split, train.py
    log_valid);
  - with --alpha-out: `weighting["alpha/<lang>"]` (CATS; `weight/<lang>` of GradNorm and the
    other methods) of the "train" records.

Groups (Lo / Mid / Hi): `--lo a,b --hi c,d [--mid e]` by name (codes match as in
eval.groups: exactly, by base language or across ISO 639-1/639-3; unlisted languages are in
no group); else `--data DIR`, the prepared data folder, whose manifest's training pairs
give the groups with the run's eval.lo_max / eval.hi_min (or its eval.groups); else each
run's own config: the checkpoint's (latest/ or best/), or `<run>/config.yaml`, with the
manifest at its data.dir (cats_ds/data/groups.py).

Each curve, per run (seed): the group's macro-average, the mean over its languages.
  - train: only at the log points where every language of the group was logged (an update
    window that drew none of a language has no loss for it; a mean over the others would
    jump); the JSON's `train_points_skipped` counts the points left out. Then a centered
    moving average over `--smooth` K log points (K // 2 after, (K - 1) // 2 before; the
    window shrinks at the ends; K = 1: none).
  - dev: every validation; `--smooth-dev` K the same way (default 1: raw).
Over seeds: the mean at the updates every seed logged (a longer seed's extra updates are
left out and counted as `dropped`), the band min-max over seeds (`--band minmax`, default),
+-1 sd (`sd`) or none.

Dev minimum, per seed and group: the (first) update of the lowest dev value, that value,
the final dev value and final - min (how far the dev loss turned back up: 0 when the last
validation is the lowest). The table gives their means over seeds (the update also +- sd);
the figure marks the minimum of the mean curve (a star), which can differ from the mean of
the seeds' minimum updates.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cats_ds.analysis.records import (TRAIN_LOG, RunData, SeedStats, Series, _resource_from_manifest, load_run,
                                      seed_stats, weighting_series)
from cats_ds.analysis.similarity import AnalysisError
from cats_ds.data.groups import named_group

COLUMNS = ("Lo", "Mid", "Hi", "All")


class FigureError(AnalysisError):
    """A figure input is wrong or missing; the message names the arm, run folder or file."""


@dataclass
class Arm:
    label: str
    runs: list[RunData] = field(default_factory=list)


def parse_arm(text: str) -> tuple[str, list[Path]]:
    """'LABEL:DIR[,DIR...]' -> (label, dirs), split at the first ':'."""
    label, sep, dirs = text.partition(":")
    paths = [d.strip() for d in dirs.split(",") if d.strip()]
    if not sep or not label.strip() or not paths:
        raise FigureError(f"--arm '{text}' should be LABEL:DIR[,DIR...] (one run folder per seed), e.g. "
                          f"T=5:runs/t5-s1,runs/t5-s2")
    return label.strip(), [Path(p) for p in paths]


def load_arms(specs: Sequence[str]) -> list[Arm]:
    """Every arm's runs, in the order given (a repeated label adds seeds)."""
    arms: dict[str, Arm] = {}
    for spec in specs:
        label, paths = parse_arm(spec)
        arm = arms.setdefault(label, Arm(label))
        for path in paths:
            if not path.is_dir():
                raise FigureError(f"arm {label}: run folder not found: {path}")
            if not (path / TRAIN_LOG).is_file():
                raise FigureError(f"arm {label}: {path / TRAIN_LOG} not found: not a training run folder "
                                  f"(train.save_dir)")
            if any(r.path.resolve() == path.resolve() for a in arms.values() for r in a.runs):
                raise FigureError(f"arm {label}: run folder {path} is given twice")
            arm.runs.append(load_run(path, f"{label} {path.name}"))
    if not arms:
        raise FigureError("no arms: give --arm LABEL:DIR[,DIR...] (repeatable)")
    return list(arms.values())


# --------------------------------------------------------------------------- groups


def logged_languages(run: RunData) -> list[str]:
    return sorted({l for r in run.train for l in r.get("loss_lang", {})} |
                  {l for r in run.valid for l in r.get("langs", {})})


def named_resource(languages: Sequence[str], lo: Sequence[str], mid: Sequence[str], hi: Sequence[str]
                   ) -> dict[str, str]:
    """Groups by name (--lo/--mid/--hi); languages listed nowhere are in none."""
    named = {g: list(v) for g, v in (("Lo", lo), ("Mid", mid), ("Hi", hi)) if v}
    out = {}
    for lang in languages:
        g = named_group(lang, named)
        if g is not None:
            out[lang] = g
    return out


def run_resource(run: RunData, data_dir: Optional[str | Path] = None, lo: Sequence[str] = (),
                 mid: Sequence[str] = (), hi: Sequence[str] = ()) -> dict[str, str]:
    """{lang: Lo|Mid|Hi} for a run (module docstring, "Groups")."""
    languages = logged_languages(run)
    if lo or mid or hi:
        resource = named_resource(languages, lo, mid, hi)
        for flag, names in (("--lo", lo), ("--mid", mid), ("--hi", hi)):
            missing = [n for n in names if not named_resource(languages, [n], [], [])]
            if missing:
                raise FigureError(f"{run.path}: {flag} {', '.join(missing)}: not among the languages in its "
                                  f"{TRAIN_LOG} ({', '.join(languages)})")
        return resource
    if data_dir is not None:
        from cats_ds.config import EvalConfig
        from cats_ds.data.manifest import Manifest

        ev = dict((run.config or {}).get("eval") or {})
        try:
            manifest = Manifest.load(data_dir)
        except (FileNotFoundError, ValueError) as e:
            raise FigureError(f"--data: {e}") from None
        config = {"data": {"dir": str(data_dir)},
                  "eval": {"lo_max": ev.get("lo_max", EvalConfig.lo_max), "hi_min": ev.get("hi_min", EvalConfig.hi_min),
                           "groups": ev.get("groups") or None}}
        unknown = [l for l in languages if l not in manifest.languages]
        if unknown:
            raise FigureError(f"{run.path}: languages {', '.join(unknown)} of its {TRAIN_LOG} are not in --data "
                              f"{data_dir} (its languages: {', '.join(manifest.languages)})")
        return _resource_from_manifest(config, languages)
    if run.resource:
        return {l: g for l, g in run.resource.items() if l in languages}
    raise FigureError(f"{run.path}: cannot tell its Lo from its Hi languages: no checkpoint config (latest/ or best/) "
                      f"or config.yaml whose data.dir holds the manifest; pass --data DIR (the prepared data) or "
                      f"--lo/--hi language lists")


def group_languages(resource: dict[str, str], group: str) -> list[str]:
    return sorted(resource) if group == "All" else sorted(l for l, g in resource.items() if g == group)


# --------------------------------------------------------------------------- curves


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Centered moving average over `window` points: point i averages i - (window - 1) // 2
    through i + window // 2, fewer at the ends (the series keeps its length)."""
    if window < 1:
        raise FigureError(f"a moving-average window must be >= 1 log points, got {window}")
    x = np.asarray(values, dtype=float)
    if window == 1 or len(x) == 0:
        return x.tolist()
    csum = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(len(x))
    lo = np.maximum(i - (window - 1) // 2, 0)
    hi = np.minimum(i + window // 2 + 1, len(x))
    return ((csum[hi] - csum[lo]) / (hi - lo)).tolist()


def group_train(run: RunData, langs: Sequence[str]) -> tuple[Series, int]:
    """The group's macro-averaged train loss at the log points that have every one of its
    languages, and how many train log points were skipped for lacking one."""
    steps, values, skipped = [], [], 0
    for r in run.train:
        losses = r.get("loss_lang") or {}
        xs = [losses.get(l) for l in langs]
        if any(x is None or not math.isfinite(x) for x in xs):
            skipped += 1
            continue
        steps.append(int(r["step"]))
        values.append(float(np.mean(xs)))
    return (steps, values), skipped


def group_dev(run: RunData, langs: Sequence[str]) -> Series:
    """The group's macro-averaged dev loss at each validation (every language needed)."""
    steps, values = [], []
    for r in run.valid:
        per = r.get("langs") or {}
        missing = [l for l in langs if l not in per]
        if missing:
            raise FigureError(f"{run.path / TRAIN_LOG}: the validation at update {r['step']} has no dev loss for "
                              f"{', '.join(missing)}")
        steps.append(int(r["step"]))
        values.append(float(np.mean([per[l]["loss"] for l in langs])))
    return steps, values


@dataclass
class DevMinimum:
    """Per seed and group (module docstring, "Dev minimum")."""
    min_step: int
    min_loss: float
    final_step: int
    final_loss: float

    @property
    def overfit(self) -> float:
        return self.final_loss - self.min_loss


def dev_minimum(series: Series) -> DevMinimum:
    steps, values = series
    i = int(np.argmin(values))
    return DevMinimum(steps[i], values[i], steps[-1], values[-1])


@dataclass
class GroupResult:
    languages: list[str]
    train: SeedStats
    dev: SeedStats
    minima: list[DevMinimum]
    train_points_skipped: list[int]

    def summary(self) -> dict:
        m = self.minima
        out = {"languages": self.languages, "train_points_skipped": self.train_points_skipped,
               "seeds": [asdict(x) | {"overfit": x.overfit} for x in m]}
        if m:
            out.update(min_step_mean=float(np.mean([x.min_step for x in m])),
                       min_step_sd=float(np.std([x.min_step for x in m])),
                       min_loss_mean=float(np.mean([x.min_loss for x in m])),
                       final_loss_mean=float(np.mean([x.final_loss for x in m])),
                       overfit_mean=float(np.mean([x.overfit for x in m])))
        i = int(np.argmin(self.dev.mean))
        out.update(curve_min_step=self.dev.steps[i], curve_min_loss=self.dev.mean[i])
        return out


def arm_group(arm: Arm, resources: Sequence[dict[str, str]], group: str, smooth_train: int,
              smooth_dev: int) -> Optional[GroupResult]:
    """The arm's curves for one group (None when its runs have no language in it)."""
    langs = [group_languages(res, group) for res in resources]
    if not any(langs):
        return None
    for run, ls in zip(arm.runs, langs):
        if ls != langs[0]:
            raise FigureError(f"arm {arm.label}: {run.path} has {group} languages {', '.join(ls) or 'none'}, "
                              f"{arm.runs[0].path} {', '.join(langs[0]) or 'none'}; an arm's seeds must share them")
    train, dev, minima, skipped = [], [], [], []
    for run in arm.runs:
        (steps, values), n = group_train(run, langs[0])
        skipped.append(n)
        if not steps:
            raise FigureError(f"arm {arm.label}: {run.path / TRAIN_LOG}: none of its {n} \"train\" records has a "
                              f"loss (loss_lang) for every {group} language ({', '.join(langs[0])})"
                              + ("" if n else "; it has no train records"))
        train.append((steps, smooth(values, smooth_train)))
        steps, values = group_dev(run, langs[0])
        if not steps:
            raise FigureError(f"arm {arm.label}: {run.path / TRAIN_LOG} has no validation (\"kind\": \"valid\") "
                              f"records, so no dev loss; validate during training (train.valid_every)")
        values = smooth(values, smooth_dev)
        dev.append((steps, values))
        minima.append(dev_minimum((steps, values)))
    train_stats, dev_stats = seed_stats(train), seed_stats(dev)
    for what, stats in (("train log points", train_stats), ("validations", dev_stats)):
        if stats is None:
            raise FigureError(f"arm {arm.label}: its seeds' {what} ({group}) share no update "
                              f"({', '.join(str(r.path) for r in arm.runs)})")
    return GroupResult(langs[0], train_stats, dev_stats, minima, skipped)


def figure3_results(arms: Sequence[Arm], resources: dict[str, list[dict[str, str]]], columns: Sequence[str],
                    smooth_train: int = 5, smooth_dev: int = 1) -> dict[str, dict[str, GroupResult]]:
    """{arm label: {group: GroupResult}} (groups no run of the arm has are left out)."""
    for c in columns:
        if c not in COLUMNS:
            raise FigureError(f"--groups: unknown group {c!r}; choose among {', '.join(COLUMNS)}")
    out: dict[str, dict[str, GroupResult]] = {}
    for arm in arms:
        if not any(r.train for r in arm.runs) and not any(r.valid for r in arm.runs):
            raise FigureError(f"arm {arm.label}: no train or valid records in "
                              f"{', '.join(str(r.path / TRAIN_LOG) for r in arm.runs)}")
        got = {}
        for group in columns:
            result = arm_group(arm, resources[arm.label], group, smooth_train, smooth_dev)
            if result is not None:
                got[group] = result
        if not got:
            found = sorted({g for res in resources[arm.label] for g in res.values()})
            raise FigureError(f"arm {arm.label}: no languages in {', '.join(columns)} (its groups: "
                              f"{', '.join(found) or 'none'})")
        out[arm.label] = got
    for group in columns:
        if not any(group in g for g in out.values()):
            raise FigureError(f"no arm has {group} languages; choose --groups among those the runs have")
    return out


# --------------------------------------------------------------------------- outputs


def format_table(results: dict[str, dict[str, GroupResult]], smooth_dev: int = 1) -> str:
    """Markdown: per arm and group the dev minimum (means over seeds)."""
    lines = ["Dev loss per arm and group (macro-average over the group's languages; means over seeds"
             + (f"; dev smoothed over {smooth_dev} validations" if smooth_dev > 1 else "") + "):", "",
             "| arm | group | seeds | update of min (± sd) | min dev loss | final update | final dev loss "
             "| final - min |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, groups in results.items():
        for group, res in groups.items():
            s = res.summary()
            finals = sorted({m.final_step for m in res.minima})
            lines.append(f"| {label} | {group} | {len(res.minima)} | {s['min_step_mean']:.0f} "
                         f"± {s['min_step_sd']:.0f} | {s['min_loss_mean']:.4f} | {'/'.join(map(str, finals))} | {s['final_loss_mean']:.4f} "
                         f"| {s['overfit_mean']:+.4f} |")
    return "\n".join(lines) + "\n"


def figure3_figure(results: dict[str, dict[str, GroupResult]], columns: Sequence[str], band: str = "minmax",
                   smooth_train: int = 5, smooth_dev: int = 1):
    """Rows: train loss, dev loss; columns: the groups; one colour per arm, the band over
    seeds shaded; a star at the minimum of each arm's mean dev curve."""
    from cats_ds.analysis.figures import _figure, seed_band

    fig = _figure(4.2 * len(columns) + 1.6, 6.8)
    axes = fig.subplots(2, len(columns), squeeze=False, sharex=True)
    for k, (label, groups) in enumerate(results.items()):
        color = f"C{k % 10}"
        for j, group in enumerate(columns):
            res = groups.get(group)
            if res is None:
                continue
            seed_band(axes[0][j], res.train, band, color, "-", label)
            seed_band(axes[1][j], res.dev, band, color, "-", label, marker="o", markersize=2.5)
            i = int(np.argmin(res.dev.mean))
            axes[1][j].plot([res.dev.steps[i]], [res.dev.mean[i]], "*", color=color, markersize=13,
                            markeredgecolor="k", markeredgewidth=0.6, zorder=5)
    for j, group in enumerate(columns):
        langs = next((g[group].languages for g in results.values() if group in g), [])
        axes[0][j].set_title(f"{group} ({', '.join(langs)})", fontsize="medium")
        axes[1][j].set_xlabel("update")
        for ax in (axes[0][j], axes[1][j]):
            ax.grid(alpha=0.3)
    bands = {"minmax": "band: min-max over seeds", "sd": "band: ± 1 sd over seeds", "none": ""}[band]
    axes[0][0].set_ylabel("train loss per token" + (f"\n(moving avg of {smooth_train} log points)"
                                                    if smooth_train > 1 else ""))
    axes[1][0].set_ylabel("dev loss per token" + (f"\n(moving avg of {smooth_dev} validations)"
                                                  if smooth_dev > 1 else "") + "\n(star: lowest)")
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       title=bands or None, title_fontsize="x-small")
    return fig


def figure3_json(results: dict[str, dict[str, GroupResult]], arms: Sequence[Arm], settings: dict) -> dict:
    return {"settings": settings,
            "arms": {a.label: {"runs": [str(r.path) for r in a.runs],
                               "groups": {g: res.summary() | {"train": asdict(res.train), "dev": asdict(res.dev)}
                                          for g, res in results[a.label].items()}} for a in arms}}


def arms_with_weights(arms: Sequence[Arm]) -> list[Arm]:
    """The arms whose runs logged alpha/<lang> (or weight/<lang>); an arm where only some
    seeds did is an error naming the run."""
    out = []
    for arm in arms:
        has = [bool(weighting_series(r)["weights"]) for r in arm.runs]
        if any(has) and not all(has):
            bare = next(r for r, h in zip(arm.runs, has) if not h)
            raise FigureError(f"arm {arm.label}: {bare.path / TRAIN_LOG} has no alpha/<lang> or weight/<lang> "
                              f"scalars, its other seeds do")
        if all(has):
            out.append(arm)
    return out


def make_figure3(arm_specs: Sequence[str], out: str | Path, json_out: Optional[str | Path] = None,
                 alpha_out: Optional[str | Path] = None, data_dir: Optional[str | Path] = None,
                 lo: Sequence[str] = (), mid: Sequence[str] = (), hi: Sequence[str] = (),
                 columns: Sequence[str] = ("Lo", "Hi"), smooth_train: int = 5, smooth_dev: int = 1,
                 band: str = "minmax") -> str:
    """What `cats-figure3` / `launch/figure3.py` does; returns the table (printed by the CLI)."""
    from cats_ds.analysis.figures import BANDS, weights_over_seeds_figure

    if band not in BANDS:
        raise FigureError(f"--band must be one of {', '.join(BANDS)}, got {band!r}")
    smooth([], smooth_train), smooth([], smooth_dev)  # check the windows before reading anything
    arms = load_arms(arm_specs)
    resources = {a.label: [run_resource(r, data_dir, lo, mid, hi) for r in a.runs] for a in arms}
    results = figure3_results(arms, resources, columns, smooth_train, smooth_dev)
    weighted = arms_with_weights(arms) if alpha_out is not None else []
    if alpha_out is not None and not weighted:
        raise FigureError("--alpha-out: no arm logged alpha/<lang> (or weight/<lang>) scalars: those are the "
                          "weighting methods' runs (CATS, GradNorm, ...)")
    table = format_table(results, smooth_dev)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure3_figure(results, columns, band, smooth_train, smooth_dev).savefig(out, dpi=110)
    if alpha_out is not None:
        resource = resources[weighted[0].label][0]
        alpha_out = Path(alpha_out)
        alpha_out.parent.mkdir(parents=True, exist_ok=True)
        weights_over_seeds_figure([(a.label, a.runs) for a in weighted], resource, band).savefig(alpha_out, dpi=110)
    if json_out is not None:
        settings = {"columns": list(columns), "smooth_train": smooth_train, "smooth_dev": smooth_dev, "band": band,
                    "groups_from": "names" if (lo or mid or hi) else ("data" if data_dir else "run config")}
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(figure3_json(results, arms, settings), indent=1), encoding="utf-8")
    return table
