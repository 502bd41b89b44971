"""The paper's optimization figures, drawn from analysis records and training logs.

    lambda_max.png        Figure 2 top: lambda_max per language over training steps, one
                          panel per run (side by side, shared y axis); Lo languages dashed,
                          open circles where power iteration did not converge
    hilo_cos.png          Figure 2 bottom: mean HiLo gradient cosine (all parameters) over
                          steps, one line per run
    group_similarity.png  Figures 4 and 5: parameter group x pair type heatmaps of cos
                          (direction) and gamma (magnitude) at one analysis step
    loss_curves.png       Figures 3 and 6: train (solid) and valid (dashed) loss per
                          resource group over steps, one line colour per run
    weighting.png         CATS / GradNorm / MGDA runs: alpha (or w) per language over
                          updates (Hi blue, Mid green, Lo red), sum alpha, lambda_c and
                          the curvature ratio f / f0; one row per run
    (cats_ds/reports/figure3.py draws Figure 3 over seeds, and with --alpha-out the weights per
    language as a mean over seeds, weights_over_seeds_figure)

matplotlib is an optional dependency (`pip install 'cats_ds[plot]'`); it is imported
only here, through its object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from cats_ds.analysis.records import (RunData, SeedStats, lambda_series, loss_by_resource, pair_type_series,
                                      seed_stats, weight_name, weighting_series)
from cats_ds.analysis.similarity import ALL, GROUPS, PAIR_TYPES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURES = {"lambda_max": "lambda_max.png", "hilo_cos": "hilo_cos.png",
           "group_similarity": "group_similarity.png", "loss_curves": "loss_curves.png",
           "weighting": "weighting.png"}
STYLE = {"Hi": "-", "Mid": "-.", "Lo": "--"}


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float, height: float) -> "Figure":
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("PNG figures need matplotlib: pip install 'cats_ds[plot]'") from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def figure_image(fig: "Figure") -> np.ndarray:
    """The rendered figure as an (H, W, 3) uint8 array (for TensorBoard's add_image)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def lambda_figure(runs: Sequence[RunData]) -> "Figure":
    """Figure 2 top: one panel per run, a line per language."""
    fig = _figure(3.6 * len(runs) + 1.2, 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(runs), sharey=True, squeeze=False)[0])
    for ax, run in zip(axes, runs):
        for lang, (steps, values, converged) in lambda_series(run).items():
            line, = ax.plot(steps, values, STYLE.get(run.resource.get(lang, ""), "-"), marker=".",
                            label=f"{lang} ({run.resource.get(lang, '?')})")
            loose = [(s, v) for s, v, ok in zip(steps, values, converged) if not ok]
            if loose:  # power iteration did not meet the tolerance: an open circle
                ax.plot(*zip(*loose), "o", mfc="none", color=line.get_color(), markersize=7)
        ax.set_title(run.label)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(r"top Hessian eigenvalue $\lambda_{max}$")
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig


def pair_cos_figure(runs: Sequence[RunData], pair_type: str = "HiLo", group: str = ALL) -> "Figure":
    """Figure 2 bottom: the mean cosine of `pair_type` pairs over steps, a line per run."""
    fig = _figure(6.0, 3.4)
    ax = fig.subplots()
    for run in runs:
        steps, values = pair_type_series(run, pair_type, "cos", group)
        if steps:
            ax.plot(steps, values, marker=".", label=run.label)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("update")
    ax.set_ylabel(f"{pair_type} gradient cosine ({group})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def group_similarity_figure(record: dict) -> "Figure":
    """Figures 4 and 5: rows = parameter groups (+ all), columns = pair types; left cos,
    right gamma; each cell the mean over the pairs of that type."""
    types = [t for t in PAIR_TYPES if t in record["pair_types"]]
    groups = [g for g in GROUPS if g in record["param_groups"]] + [ALL]
    fig = _figure(2.2 + 1.6 * max(len(types), 1) * 2, 1.2 + 0.42 * len(groups))
    axes = fig.subplots(1, 2)
    for ax, measure, (lo, hi), cmap in zip(axes, ("cos", "gamma"), ((-1.0, 1.0), (0.0, 1.0)), ("RdBu_r", "viridis")):
        grid = np.full((len(groups), len(types)), np.nan)
        for j, t in enumerate(types):
            for i, g in enumerate(groups):
                v = record["pair_types"][t][measure].get(g)
                grid[i, j] = np.nan if v is None else v
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        for i in range(len(groups)):
            for j in range(len(types)):
                v = grid[i, j]
                if math.isfinite(v):
                    dark = abs(v) > 0.6 if measure == "cos" else v < 0.6  # cell colour under the text
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize="small",
                            color="white" if dark else "black")
        ax.set_xticks(range(len(types)), types)
        ax.set_yticks(range(len(groups)), groups)
        ax.set_title(f"{'direction cos' if measure == 'cos' else 'magnitude gamma'} (step {record['step']})")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def loss_curves_figure(runs: Sequence[RunData]) -> "Figure":
    """Figures 3 and 6: one panel per resource group; train solid, valid dashed."""
    curves = {run.label: loss_by_resource(run) for run in runs}
    names = [g for g in ("Hi", "Mid", "Lo", "All") if any(g in c for c in curves.values())]
    fig = _figure(3.6 * len(names) + 0.6, 3.4)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    colors = [f"C{i}" for i in range(10)]
    for ax, name in zip(axes, names):
        for k, run in enumerate(runs):
            c = curves[run.label].get(name)
            if c is None:
                continue
            color = colors[k % len(colors)]
            if c["train"][0]:
                ax.plot(*c["train"], "-", color=color, label=f"{run.label} train")
            if c["valid"][0]:
                ax.plot(*c["valid"], "--", marker="o", markersize=3, color=color, label=f"{run.label} valid")
        ax.set_title(f"{name} languages")
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss per token")
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig


RESOURCE_COLORS = {"Hi": "Blues", "Mid": "Greens", "Lo": "Reds", None: "Greys"}


def _hold_flat_axis(ax, values: Sequence[float]) -> None:
    """A series that stays (numerically) constant, as CATS' sum alpha = N does, gets a y
    range of +-5% around its value: without it matplotlib zooms into the 1e-12 rounding
    noise and labels ticks 8.000000000005."""
    if not values:
        return
    lo, hi = min(values), max(values)
    mid = (lo + hi) / 2
    if hi - lo <= 1e-9 * max(1.0, abs(mid)):
        pad = 0.05 * max(1.0, abs(mid))
        ax.set_ylim(mid - pad, mid + pad)
    ax.ticklabel_format(axis="y", useOffset=False)


def language_styles(langs: Sequence[str], resource: dict[str, str]) -> dict[str, tuple]:
    """{lang: (colour, line style, legend label)}: Hi blues, Mid greens, Lo reds (dashed),
    ungrouped greys; shades tell the languages of a group apart."""
    from matplotlib import colormaps

    by_group: dict = {}
    for lang in langs:
        by_group.setdefault(resource.get(lang), []).append(lang)
    out = {}
    for group, members in by_group.items():
        cmap = colormaps[RESOURCE_COLORS.get(group, "Greys")]
        for i, lang in enumerate(members):
            shade = 0.45 + 0.5 * (i / max(len(members) - 1, 1))
            out[lang] = (cmap(shade), "--" if group == "Lo" else "-", f"{lang} ({group})" if group else lang)
    return out


BANDS = ("minmax", "sd", "none")
"""What the shaded band around a mean over seeds shows: min-max over seeds, +-1 sd, nothing."""


def seed_band(ax, stats: SeedStats, band: str, color, style: str = "-", label: Optional[str] = None, **kw) -> None:
    """The mean over seeds as a line, the band (BANDS) around it shaded in its colour."""
    ax.plot(stats.steps, stats.mean, style, color=color, label=label, **kw)
    if band == "none" or stats.seeds < 2:
        return
    mean = np.asarray(stats.mean)
    low, high = ((stats.low, stats.high) if band == "minmax"
                 else (mean - np.asarray(stats.sd), mean + np.asarray(stats.sd)))
    ax.fill_between(stats.steps, low, high, color=color, alpha=0.18, linewidth=0)


def weights_over_seeds_figure(arms: Sequence[tuple[str, Sequence[RunData]]], resource: dict[str, str],
                              band: str = "minmax") -> "Figure":
    """One panel per arm: each language's alpha (CATS; w for the other methods), the mean
    over the arm's seeds with a band (BANDS); Hi blues, Mid greens, Lo reds dashed."""
    fig = _figure(4.2 * len(arms) + 1.6, 3.6)
    axes = fig.subplots(1, len(arms), squeeze=False, sharey=True)[0]
    for ax, (label, runs) in zip(axes, arms):
        per_seed = [weighting_series(r)["weights"] for r in runs]
        langs = [l for l in per_seed[0] if all(l in w for w in per_seed)]
        for lang, (color, style, name) in language_styles(langs, resource).items():
            stats = seed_stats([w[lang] for w in per_seed])
            if stats is not None:
                seed_band(ax, stats, band, color, style, name)
        ax.axhline(1.0, color="k", lw=0.6, ls=":")  # weight 1: the temperature baseline
        seeds = f"mean of {len(runs)} seeds" if len(runs) > 1 else "1 seed"
        ax.set_title(f"{label}: {weight_name(runs[0])} ({seeds})")
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    bands = {"minmax": " (band: min-max over seeds)", "sd": " (band: ± 1 sd over seeds)"}
    axes[0].set_ylabel(f"{weight_name(arms[0][1][0])} per language" + bands.get(band, ""))
    axes[-1].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig


def weighting_figure(runs: Sequence[RunData]) -> "Figure":
    """One row per run: weights per language (Hi blues, Mid greens, Lo reds; shades tell
    languages apart), their sum, and the panels any run logged: lambda_c, f / f0 (CATS),
    the meta batch's mean gradient cosine (Gram-based methods)."""
    all_series = [weighting_series(run) for run in runs]
    panels = ["weights", "sum"] + [p for p in ("lambda_c", "curvature_ratio", "mean_cos")
                                   if any(s[p] for s in all_series)]
    titles = {"lambda_c": "lambda_c", "curvature_ratio": "curvature f / f0",
              "mean_cos": "mean gradient cosine (meta batch)"}
    fig = _figure(3.4 * len(panels) + 1.4, 3.0 * len(runs))
    axes = fig.subplots(len(runs), len(panels), squeeze=False)
    for row, run, series in zip(axes, runs, all_series):
        name = weight_name(run)
        for lang, (color, style, label) in language_styles(series["weights"], run.resource).items():
            row[0].plot(*series["weights"][lang], style, color=color, label=label)
        row[0].axhline(1.0, color="k", lw=0.6, ls=":")  # weight 1: the temperature baseline
        for ax, panel in zip(row[1:], panels[1:]):
            for steps, values in series[panel].values():
                ax.plot(steps, values, "-", color="k")
        _hold_flat_axis(row[1], [v for _, vs in series["sum"].values() for v in vs])
        for ax, panel in zip(row, panels):
            own = {"weights": f"{run.label}: {name} per language", "sum": f"sum of {name}s"}
            ax.set_title(own.get(panel, titles.get(panel)))
            if panel not in ("weights", "sum") and not series[panel]:  # a panel another run logged
                ax.text(0.5, 0.5, f"not logged\nby {run.label}", ha="center", va="center",
                        transform=ax.transAxes, color="0.4")
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            ax.set_xlabel("update")
            ax.grid(alpha=0.3)
        if series["weights"]:
            row[0].legend(fontsize="x-small", ncol=2, loc="upper left", bbox_to_anchor=(0.0, -0.22))
    return fig


def write_figures(runs: Sequence[RunData], record: Optional[dict], out: str | Path, writer=None,
                  step: int = 0) -> dict[str, Path]:
    """Draw every figure there is data for into `out`; returns {figure name: PNG path}.
    record: the analysis record for the heatmap (default: the first run's last one);
    writer: a TensorBoard SummaryWriter that also gets each figure as an image at `step`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with_analysis = [r for r in runs if r.analysis]
    if record is None and with_analysis:
        record = with_analysis[0].analysis[-1]
    figures: dict[str, "Figure"] = {}
    if with_analysis:
        figures["lambda_max"] = lambda_figure(with_analysis)
        with_hilo = [r for r in with_analysis if pair_type_series(r, "HiLo")[0]]
        if with_hilo:
            figures["hilo_cos"] = pair_cos_figure(with_hilo)
    if record is not None:
        figures["group_similarity"] = group_similarity_figure(record)
    if any(r.train or r.valid for r in runs):
        figures["loss_curves"] = loss_curves_figure([r for r in runs if r.train or r.valid])
    weighted = [r for r in runs if weighting_series(r)["weights"]]
    if weighted:
        figures["weighting"] = weighting_figure(weighted)
    paths = {}
    for name, fig in figures.items():
        paths[name] = out / FIGURES[name]
        fig.savefig(paths[name])
        if writer is not None:
            writer.add_image(f"figures/{name}", figure_image(fig), step, dataformats="HWC")
    return paths
