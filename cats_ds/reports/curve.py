"""A run's learning curve: test chrF++ / BLEU per language group and dev loss against
updates and minutes of training, from the numbered checkpoints it kept.

    python launch/learning_curve.py --run runs/lc --evaluate --limit 200 --minutes 10,30,60

A run trained with `train.save_every=N` keeps `step_<n>/` every N updates (and `latest/`,
its final state). For each of them (`latest/` only when it is past the last numbered one)
the curve takes:

  - the update count and the **minutes** of training wall time at the save (everything the
    run did: updates, validation, earlier saves; summed over resumed sittings), from
    `elapsed_s` in `cats_ds.json`, or, for checkpoints written before that key existed,
    from `elapsed` in the DeepSpeed client state (read with `weights_only=True`);
  - the dev loss of that save (`valid_loss` in `cats_ds.json`, else the train log's
    validation record at that update);
  - the scores of `evaluate` on `--split` (its default folder `<run>/eval/<ckpt>-<split>/`;
    `--evaluate` runs the missing ones, beam 5, `--limit` sentences per language, evaluate's hash-ordered sample).
    Every point must have been scored on the same sentences (same split and limit), so the
    points are comparable; the error names the one that differs.

Written to `--out` (default `<run>/eval/curve-<split>/`): `curve.md` (one row per point,
then the rows nearest below each of `--minutes`), `curve.json`, and `curve.png`
(chrF++ and BLEU per group with the copy baseline dashed, and dev loss; minutes on the
lower axis, updates on the upper; needs matplotlib).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from cats_ds.analysis.figures import _figure, have_matplotlib
from cats_ds.checkpoints import CHECKPOINT_META, STEP_PREFIX, numbered_checkpoints, read_meta
from cats_ds.inference.evaluate import EvalError, default_out_dir, evaluate_checkpoint

GROUP_ORDER = ("Lo", "Mid", "Hi", "All")


@dataclass
class CurvePoint:
    checkpoint: str
    step: int
    minutes: float
    valid_loss: Optional[float]
    limit: Optional[int]
    scores: dict  # group -> {"chrf", "bleu", "copy_chrf", "copy_bleu"}; groups with no language absent


def checkpoint_minutes(path: Path, meta: dict) -> float:
    """Minutes of training wall time when `path` was saved."""
    if meta.get("elapsed_s") is not None:
        return float(meta["elapsed_s"]) / 60.0
    import torch

    states = path / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise EvalError(f"{path}: {CHECKPOINT_META} has no elapsed_s and there is no {states.name} to read it from")
    client = torch.load(states, map_location="cpu", weights_only=True)
    if client.get("elapsed") is None:
        raise EvalError(f"{path}: no training time recorded (neither elapsed_s in {CHECKPOINT_META} "
                        f"nor elapsed in {states.name})")
    return float(client["elapsed"]) / 60.0


def curve_checkpoints(run: str | Path) -> list[Path]:
    """`step_<n>/` in update order, then `latest/` if it is past the last of them."""
    run = Path(run)
    steps = numbered_checkpoints(run)
    out = list(steps)
    latest = run / "latest"
    if (latest / CHECKPOINT_META).is_file():
        last = int(steps[-1].name[len(STEP_PREFIX):]) if steps else -1
        if read_meta(latest)["step"] > last:
            out.append(latest)
    if not out:
        raise EvalError(f"{run}: no checkpoints (step_<n>/ or latest/ with {CHECKPOINT_META}); "
                        f"train with train.save_every=N to keep a curve")
    return out


def _valid_losses(run: Path) -> dict[int, float]:
    log = run / "train_log.jsonl"
    out: dict[int, float] = {}
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash; the rest is still good
            if rec.get("kind") == "valid" and rec.get("mean_loss") is not None:
                out[int(rec["step"])] = float(rec["mean_loss"])
    return out


def curve_points(run: str | Path, split: str = "test", evaluate_missing: bool = False,
                 limit: Optional[int] = None) -> list[CurvePoint]:
    """One point per kept checkpoint (see the module docstring); `evaluate_missing` runs
    `evaluate` where a checkpoint has no scores on `split` yet."""
    run = Path(run)
    losses = _valid_losses(run)
    points = []
    ckpts = curve_checkpoints(run)
    from tqdm import tqdm

    it = tqdm(ckpts, desc="curve", unit="ckpt") if evaluate_missing else ckpts
    for ckpt in it:
        meta = read_meta(ckpt)
        scores_file = default_out_dir(ckpt, split) / "bleu.json"
        if not scores_file.is_file() or (ckpt / CHECKPOINT_META).stat().st_mtime > scores_file.stat().st_mtime:
            if not evaluate_missing:
                why = "no scores" if not scores_file.is_file() else "scores older than the checkpoint"
                raise EvalError(f"{ckpt}: {why} on {split} ({scores_file}); run `python launch/evaluate.py "
                                f"--checkpoint {ckpt} --split {split}"
                                f"{f' --limit {limit}' if limit else ''}` or pass --evaluate")
            evaluate_checkpoint(ckpt, split=split, limit=limit)
        result = json.loads(scores_file.read_text(encoding="utf-8"))
        settings = result.get("settings", {})
        groups = {g: {k: v[k] for k in ("chrf", "bleu", "copy_chrf", "copy_bleu")}
                  for g, v in result["averages"].items() if v is not None}
        valid = meta.get("valid_loss")
        if valid is None:
            valid = losses.get(int(meta["step"]))
        points.append(CurvePoint(checkpoint=ckpt.name, step=int(meta["step"]),
                                 minutes=checkpoint_minutes(ckpt, meta), valid_loss=valid,
                                 limit=settings.get("limit"), scores=groups))
    first = points[0]
    for p in points[1:]:
        if p.limit != first.limit:
            raise EvalError(f"{run}: {p.checkpoint} was scored with --limit {p.limit}, {first.checkpoint} with "
                            f"{first.limit}; re-evaluate so every point uses the same sentences")
    return points


def at_minutes(points: Sequence[CurvePoint], minutes: Sequence[float], slack: float = 0.02
               ) -> dict[float, Optional[CurvePoint]]:
    """For each budget m: the last point saved within m minutes (plus `slack` of m, for the
    final save of a `max_minutes=m` run, which lands a few seconds past it); None if none."""
    out = {}
    for m in minutes:
        within = [p for p in points if p.minutes <= m * (1 + slack)]
        out[m] = within[-1] if within else None
    return out


def _fmt(x: Optional[float], nd: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def format_curve(points: Sequence[CurvePoint], marks: dict[float, Optional[CurvePoint]], split: str) -> str:
    groups = [g for g in GROUP_ORDER if any(g in p.scores for p in points)]
    head = (["checkpoint", "updates", "minutes", "dev loss"] + [f"chrF++ {g}" for g in groups]
            + [f"BLEU {g}" for g in groups])
    lines = [f"Learning curve on {split} (first {points[0].limit or 'all'} sentences per language; "
             f"beam and metrics as evaluate)", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * 4 + "---:|" * (2 * len(groups))]

    def row(label: str, p: CurvePoint) -> str:
        cells = [label, str(p.step), _fmt(p.minutes, 1), _fmt(p.valid_loss, 3)]
        cells += [_fmt(p.scores.get(g, {}).get("chrf")) for g in groups]
        cells += [_fmt(p.scores.get(g, {}).get("bleu")) for g in groups]
        return "| " + " | ".join(cells) + " |"

    lines += [row(p.checkpoint, p) for p in points]
    copy = points[-1].scores
    lines.append("| copy baseline | | | | " + " | ".join(_fmt(copy.get(g, {}).get("copy_chrf")) for g in groups)
                 + " | " + " | ".join(_fmt(copy.get(g, {}).get("copy_bleu")) for g in groups) + " |")
    if marks:
        lines += ["", "At a budget (the last checkpoint saved within it):", "",
                  "| budget | " + " | ".join(head) + " |", "|---|" + "---|" * 4 + "---:|" * (2 * len(groups))]
        for m, p in marks.items():
            lines.append(f"| {m:g} min | " + (row(p.checkpoint, p)[2:] if p else "no checkpoint that early |"))
    return "\n".join(lines) + "\n"


def curve_figure(points: Sequence[CurvePoint]):
    """chrF++ | BLEU | dev loss against minutes (updates on the upper axis)."""
    import numpy as np

    fig = _figure(13.5, 4.0)
    axes = fig.subplots(1, 3)
    minutes = np.array([p.minutes for p in points])
    steps = np.array([p.step for p in points], dtype=float)
    colours = {"Lo": "tab:red", "Mid": "tab:green", "Hi": "tab:blue", "All": "black"}
    for ax, metric, name in ((axes[0], "chrf", "chrF++"), (axes[1], "bleu", "BLEU")):
        for g in GROUP_ORDER:
            ys = [p.scores.get(g, {}).get(metric) for p in points]
            if all(y is None for y in ys):
                continue
            ax.plot(minutes, [np.nan if y is None else y for y in ys], "o-", color=colours[g], label=g, ms=3)
            copy = points[-1].scores.get(g, {}).get(f"copy_{metric}")
            if copy is not None:
                ax.axhline(copy, color=colours[g], ls="--", lw=0.8)
        ax.set_ylabel(f"test {name} (dashed: copy baseline)")
        ax.legend(fontsize=8)
    vl = [(p.minutes, p.valid_loss) for p in points if p.valid_loss is not None]
    if vl:
        axes[2].plot([m for m, _ in vl], [v for _, v in vl], "o-", color="black", ms=3)
    axes[2].set_ylabel("dev loss (label-smoothed CE)")
    for ax in axes:
        ax.set_xlabel("minutes of training")
        ax.grid(alpha=0.3)
        if len(points) > 1 and np.all(np.diff(minutes) > 0):
            top = ax.secondary_xaxis("top", functions=(lambda m: np.interp(m, minutes, steps),
                                                      lambda s: np.interp(s, steps, minutes)))
            top.set_xlabel("updates")
    return fig


def write_curve(points: Sequence[CurvePoint], out: str | Path, split: str,
                minutes: Sequence[float] = (10, 30, 60)) -> str:
    """curve.md, curve.json and (with matplotlib) curve.png under `out`; returns the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marks = at_minutes(points, minutes)
    table = format_curve(points, marks, split)
    (out / "curve.md").write_text(table, encoding="utf-8")
    (out / "curve.json").write_text(json.dumps(
        {"split": split, "points": [asdict(p) for p in points],
         "at_minutes": {f"{m:g}": (p.checkpoint if p else None) for m, p in marks.items()}}, indent=1),
        encoding="utf-8")
    if have_matplotlib():
        curve_figure(points).savefig(out / "curve.png", dpi=110)
    return table
