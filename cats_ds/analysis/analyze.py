"""The analysis itself, on a checkpoint (one process) or inside training (every rank).

Both compute, on FIXED analysis batches (the first `analysis.sentences` dev sentences of
each language, train sentences where a language has no dev split):
  - per-language gradients -> per-group Gram matrices -> cos / gamma per pair and per
    pair type, and split_cos from the two halves of each language's batch (similarity.py);
  - lambda_max of each language's loss by power iteration (hessian.py);
and return one record (a dict, one line of analysis.jsonl):

    {"step", "languages", "resource": {lang: Hi|Mid|Lo}, "loss": {lang: mean token loss},
     "lambda_max": {lang: value}, "hessian": {lang: {"iters", "converged"}},
     "param_groups": {group: parameters}, "pairs": {"a:b": {"type", "cos": {group: v},
     "gamma": {group: v}, "split_cos": {group: v}}}, "pair_types": {"HiLo": {"n", "cos": {...},
     "gamma": {...}, "split_cos": {...}}},
     "settings": {...}, "seconds"}

In training (`analysis_step`, called from fit() every analysis.every updates) the
gradients come from the DeepSpeed engine's ZeRO partitions through the same
per_language_gradients the CATS hook uses, with dropout off; the partition is left
zeroed and the optimizer is not stepped, so training continues exactly as without the
analysis. The Hessians run on a plain fp32 copy of the weights, languages spread over
ranks. Rank 0 appends the record to <save_dir>/analysis.jsonl and writes TensorBoard
scalars (and a heatmap image) through DeepSpeed's monitor.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from cats_ds.analysis.figures import figure_image, group_similarity_figure, have_matplotlib, write_figures
from cats_ds.analysis.hessian import HessianResult, language_loss, top_eigenvalue
from cats_ds.analysis.records import ANALYSIS_LOG, TRAIN_LOG, load_run, parse_run_arg
from cats_ds.analysis.report import write_report
from cats_ds.analysis.similarity import (AnalysisError, group_grams, group_sizes, module_segments, parse_pairs,
                                         partition_segments, reduce_grams, resource_groups, summarize)
from cats_ds.checkpoints import build_for_checkpoint, load_for_inference, read_meta
from cats_ds.config import Config, ConfigError, config_from_dict, merge_overrides, parse_override
from cats_ds.data.manifest import LangSplit, load_split
from cats_ds.data.sampler import Batch, Plan, chunk_by_budget, collate
from cats_ds.runtime.output import print0, write_events
from cats_ds.training.grads import PartitionGrads, fold_halves, split_slot

if TYPE_CHECKING:
    from cats_ds.training.loop import Run


# --------------------------------------------------------------------------- inputs


def analysis_plan(dev: dict[str, LangSplit], train: dict[str, LangSplit], languages: Sequence[str],
                  sentences: int) -> tuple[Plan, dict[str, LangSplit], dict[str, str]]:
    """The fixed analysis batch: one Plan over every language (index i = languages[i])
    holding its first `sentences` dev sentences (train where there is no dev split),
    ascending by length (ranks' interleaved shares stay balanced, and length buckets are
    consecutive runs).
    Returns (plan, the split each language's ids refer to, "dev"/"train" per language)."""
    if sentences < 1:
        raise AnalysisError(f"analysis.sentences must be >= 1, got {sentences}")
    langs, sents, splits, sources = [], [], {}, {}
    for li, lang in enumerate(languages):
        if lang in dev:
            split, sources[lang] = dev[lang], "dev"
        elif lang in train:
            split, sources[lang] = train[lang], "train"
        else:
            raise AnalysisError(f"language '{lang}' has neither dev nor train data for the analysis batch")
        n = min(sentences, len(split))
        cost = np.maximum(split.src.sizes[:n], split.tgt.sizes[:n])
        langs.append(li)
        sents.append(np.argsort(cost, kind="stable"))
        splits[lang] = split
    return Plan(langs, sents), splits, sources


BUCKET_TOKENS = 1024
"""Padded tokens (sentences x longest side) per length bucket of an analysis batch."""


def language_batches(plan: Plan, k: int, splits: dict[str, LangSplit], languages: Sequence[str],
                     tag_ids: Sequence[int], device) -> list[Batch]:
    """Language plan.langs[k]'s analysis sentences as length buckets of <= BUCKET_TOKENS
    padded tokens (one batch padded to the longest sentence can cost several times the
    real tokens)."""
    li, sents = plan.langs[k], plan.sents[k]
    split = splits[languages[li]]
    cost = np.maximum(split.src.sizes, split.tgt.sizes)
    return [collate(Plan([li], [chunk]), splits, list(languages), list(tag_ids)).to(device)
            for chunk in chunk_by_budget(sents, cost, BUCKET_TOKENS)]


def check_override_keys(overrides: Optional[Sequence[str]]) -> None:
    """Only `analysis.*`, `eval.lo_max`, `eval.hi_min` and `eval.groups` may change when
    analyzing a checkpoint (the model, data and training settings are fixed by it)."""
    for text in overrides or []:
        path, _ = parse_override(text)
        key = ".".join(path)
        if not (path[0] == "analysis" and len(path) == 2) and key not in ("eval.lo_max", "eval.hi_min") \
                and path[:2] != ["eval", "groups"]:
            raise ConfigError(f"override '{text}': only analysis.*, eval.lo_max, eval.hi_min and eval.groups can be set "
                              f"when analyzing a checkpoint, not '{key}'")


def apply_overrides(cfg: Config, overrides: Optional[Sequence[str]]) -> Config:
    """cfg with the (checked) overrides applied."""
    check_override_keys(overrides)
    return config_from_dict(merge_overrides(cfg.to_dict(), list(overrides or [])))


# --------------------------------------------------------------------------- the record


def make_record(step: int, languages: Sequence[str], langs: Sequence[int], grams: torch.Tensor,
                losses: torch.Tensor, sizes: dict[str, int], resource: dict[str, str],
                pairs: Sequence[tuple[str, str]], hessians: dict[str, HessianResult], sources: dict[str, str],
                cfg: Config, split: Optional[torch.Tensor] = None) -> dict:
    """One analysis record (see the module docstring). langs: language indices of the
    Gram's rows; grams: global (len(GROUPS), K, K); losses: (K,) mean token loss; split:
    the split Grams (len(GROUPS), K, K) of the batch halves."""
    names = [languages[i] for i in langs]
    return {
        "step": int(step),
        "languages": names,
        "resource": {lang: resource[lang] for lang in names},
        "loss": {lang: float(losses[k]) for k, lang in enumerate(names)},
        "lambda_max": {lang: hessians[lang].value for lang in names},
        "hessian": {lang: {"iters": hessians[lang].iters, "converged": hessians[lang].converged} for lang in names},
        **summarize(names, grams, sizes, resource, pairs, split),
        "settings": {"sentences": cfg.analysis.sentences, "batch_split": {lang: sources[lang] for lang in names},
                     "hessian_iters": cfg.analysis.hessian_iters, "hessian_tol": cfg.analysis.hessian_tol,
                     "label_smoothing": cfg.train.label_smoothing, "lo_max": cfg.eval.lo_max,
                     "hi_min": cfg.eval.hi_min},
    }


def record_events(record: dict) -> list[tuple[str, float, int]]:
    """TensorBoard scalars (tag, value, step) of a record."""
    step = record["step"]
    events = [(f"analysis/lambda_max/en-{l}", v, step) for l, v in record["lambda_max"].items()]
    events += [(f"analysis/loss/en-{l}", v, step) for l, v in record["loss"].items()]
    for ptype, res in record["pair_types"].items():
        for measure in ("cos", "gamma", "split_cos"):
            events += [(f"analysis/{measure}/{ptype}/{g}", v, step) for g, v in res.get(measure, {}).items()]
    for pair, res in record["pairs"].items():
        events += [(f"analysis/pair/{pair}/{m}", res[m]["all"], step) for m in ("cos", "gamma", "split_cos")
                   if m in res]
    return [(tag, float(v), s) for tag, v, s in events if v is not None and np.isfinite(v)]


def summary_line(record: dict) -> str:
    lam = " ".join(f"{l} {v:.3g}" for l, v in record["lambda_max"].items())
    cos = " ".join(f"{t} {r['cos']['all']:.3f}" for t, r in record["pair_types"].items()
                   if r["cos"].get("all") is not None)
    split = " ".join(f"{t} {r['split_cos']['all']:.3f}" for t, r in record["pair_types"].items()
                     if r.get("split_cos", {}).get("all") is not None)
    line = f"| analysis step {record['step']} | lambda_max {lam} | cos {cos}"
    return line + (f" | split cos {split}" if split else "")


def append_record(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------- one process: a checkpoint


def analyze_checkpoint(checkpoint: str | Path, pairs: Optional[str] = None, overrides: Optional[Sequence[str]] = None,
                       device: str = "cpu", data_dir: Optional[str | Path] = None) -> dict:
    """The analysis record of a checkpoint folder (`<save_dir>/best` or `latest`) or a model
    folder, in one process on a plain module. `pairs` ("de:af,uk:kk") replaces
    analysis.pairs; `data_dir`: the prepared data (default: the data.dir it was trained with).
    Memory: 2K full gradients (K = number of languages; the halves of each batch) plus one
    double-backward graph."""
    check_override_keys(overrides)  # before the (slow) loading
    cfg, model, manifest, vocab, languages = load_for_inference(checkpoint, device, data_dir)
    cfg = apply_overrides(cfg, overrides)
    meta = read_meta(checkpoint)
    pair_list = (parse_pairs(pairs, languages, key="--pairs") if pairs is not None
                 else parse_pairs(cfg.analysis.pairs, languages))
    dev = load_split(cfg.data.dir, manifest, "dev", languages)
    train = load_split(cfg.data.dir, manifest, "train", languages)
    plan, splits, sources = analysis_plan(dev, train, languages, cfg.analysis.sentences)
    tag_ids = [vocab.lang_ids[lang] for lang in languages]
    params = [p for p in model.parameters() if p.requires_grad]
    rows_a, rows_b, rho, losses, hessians = [], [], [], [], {}
    t0 = time.time()
    for k, li in enumerate(plan.langs):
        batches = language_batches(plan, k, splits, languages, tag_ids, device)
        loss = language_loss(model, batches, li, len(languages), cfg.train.label_smoothing)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        whole = torch.cat([g.detach().reshape(-1) for g in grads])
        losses.append(float(loss.detach()))
        hessians[languages[li]] = top_eigenvalue(loss, params, cfg.analysis.hessian_iters, cfg.analysis.hessian_tol,
                                                 seed=li, grads=grads)
        del grads, loss
        # the half a's token mean, one more backward; half b's part is the rest: g = rho^a g^a + rho^b g^b
        sizes = splits[languages[li]].tgt.sizes
        half_a, half_b = split_slot(plan.sents[k], sizes)
        r_a = float(sizes[half_a].sum()) / float(sizes[plan.sents[k]].sum())
        loss_a = language_loss(model, language_batches(Plan([li], [half_a]), 0, splits, languages, tag_ids, device),
                               li, len(languages), cfg.train.label_smoothing)
        row_a = r_a * torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_a, params)])
        rows_a.append(row_a)
        rows_b.append(whole - row_a if len(half_b) else torch.zeros_like(whole))
        rho.append([r_a, 1.0 - r_a])
        del loss_a
    q = group_grams(torch.stack(rows_a + rows_b), module_segments(model)).cpu()
    grams, split, _, _ = fold_halves(q, torch.tensor(rho, dtype=torch.float64))
    resource = resource_groups(manifest, languages, cfg.eval.lo_max, cfg.eval.hi_min, cfg.eval.groups)
    record = make_record(int(meta.get("step", 0)), languages, plan.langs, grams, torch.tensor(losses),
                         group_sizes(model), resource, pair_list, hessians, sources, cfg, split)
    record["seconds"] = time.time() - t0
    record["checkpoint"] = str(checkpoint)
    return record


# --------------------------------------------------------------------------- in training: every rank


def plain_copy(run: "Run") -> torch.nn.Module:
    """A plain fp32 module (eval mode, on run.device) with the engine's current weights.

    ZeRO 0-2 keep full (possibly bf16/fp16) weights in every rank's module; ZeRO-3's are
    gathered for the copy (a collective: every rank must call this)."""
    with torch.random.fork_rng(devices=[]):  # initializing the copy must not move training's RNG
        model = build_for_checkpoint(run.cfg, len(run.vocab), run.languages, run.cfg.train.save_dir)
    source = run.engine.module
    tensors = dict(source.named_parameters(remove_duplicate=False))
    tensors.update(dict(source.named_buffers()))
    gather = contextlib.nullcontext()
    if run.engine.zero_optimization_stage() == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(source.parameters()), modifier_rank=None)
    with gather:
        missing = [k for k in model.state_dict() if k not in tensors]
        if missing:
            raise RuntimeError(f"the training module has no tensors {missing[:5]} that the analysis copy needs")
        state = {k: tensors[k].detach().float().clone() for k in model.state_dict()}
    model.load_state_dict(state, strict=True)
    return model.float().to(run.device).eval()


def spread_hessians(run: "Run", plan: Plan, splits: dict[str, LangSplit]) -> dict[str, HessianResult]:
    """lambda_max of every language of the plan; rank r takes languages r, r + world, ...
    and one all_reduce shares the results."""
    model = plain_copy(run)
    params = [p for p in model.parameters() if p.requires_grad]
    acfg, n = run.cfg.analysis, len(run.languages)
    out = torch.zeros(3, len(plan.langs), dtype=torch.float64)  # value, iters, converged
    for k, li in enumerate(plan.langs):
        if k % run.world != run.rank:
            continue
        batches = language_batches(plan, k, splits, run.languages, run.tag_ids, run.device)
        loss = language_loss(model, batches, li, n, run.cfg.train.label_smoothing)
        res = top_eigenvalue(loss, params, acfg.hessian_iters, acfg.hessian_tol, seed=li)
        out[:, k] = torch.tensor([res.value, res.iters, float(res.converged)], dtype=torch.float64)
        del loss
    if dist.is_initialized() and run.world > 1:
        shared = out.to(run.device)
        dist.all_reduce(shared)
        out = shared.cpu()
    return {run.languages[li]: HessianResult(float(out[0, k]), int(out[1, k]), bool(out[2, k] > 0.5))
            for k, li in enumerate(plan.langs)}


def check_settings(cfg: Config, languages: Sequence[str]) -> list[tuple[str, str]]:
    """Validate the analysis settings of a training run (cheap: call it at setup to fail
    before training rather than at the first analysis). Returns the parsed pairs.
    The analysis.* minimums and analysis.every with experts.ep_size are config checks
    (AnalysisConfig.check, Config.validate: ConfigError, at load_config); they run again
    here for a Config built without it. analysis.pairs needs the languages: AnalysisError."""
    cfg.validate()
    return parse_pairs(cfg.analysis.pairs, languages)


def analysis_step(run: "Run", per_language_gradients: Callable) -> dict:
    """Analyze the current weights of a training run (call on every rank, between
    updates); returns the record, which rank 0 also appends to <save_dir>/analysis.jsonl
    and writes to TensorBoard. per_language_gradients: the training loop's
    (cats_ds.training.loop.per_language_gradients; passed in, so this package never imports
    train.py). AnalysisError names a bad analysis.* setting."""

    cfg = run.cfg
    t0 = time.time()
    pairs = check_settings(cfg, run.languages)
    plan, splits, sources = analysis_plan(run.dev_splits, run.train_splits, run.languages, cfg.analysis.sentences)

    # per-language gradients on this rank's partition, dropout off (no RNG drawn)
    grads = run.grads if run.grads is not None else PartitionGrads(run.engine)
    saved, run.grads = run.grads, grads
    run.engine.eval()
    try:
        half = per_language_gradients(run, [plan], splits, log=False)  # the halves of each language's batch
    finally:
        run.grads = saved
        run.engine.train()
    scale = grads.loss_scale()
    partial = group_grams(half.rows, partition_segments(grads)) / (scale * scale)  # (Q, 2K, 2K)
    langs, rho = half.langs, half.rho
    packed_device = run.device if dist.is_initialized() and run.world > 1 else partial.device
    q, losses = reduce_grams(partial.to(packed_device), half.loss_sums, half.tokens)
    del half
    grams, split, _, _ = fold_halves(q, rho)

    hessians = spread_hessians(run, plan, splits)
    resource = resource_groups(run.manifest, run.languages, cfg.eval.lo_max, cfg.eval.hi_min, cfg.eval.groups)
    record = make_record(run.step, run.languages, langs, grams, losses, group_sizes(run.engine.module), resource,
                         pairs, hessians, sources, cfg, split)
    record["seconds"] = time.time() - t0
    if run.rank == 0:
        append_record(Path(cfg.train.save_dir) / ANALYSIS_LOG, record)
        write_events(run, record_events(record))
        _tensorboard_heatmap(run, record)
    print0(summary_line(record) + f" | {record['seconds']:.1f}s")
    run.t_log += time.time() - t0  # tokens/s counts training time only
    return record


def _tensorboard_heatmap(run: "Run", record: dict) -> None:
    """The group x pair-type heatmap as a TensorBoard image (rank 0; needs matplotlib)."""
    monitor = getattr(run, "monitor", None) or getattr(run.engine, "monitor", None)  # train.py holds its own
    writer = getattr(getattr(monitor, "tb_monitor", None), "summary_writer", None)
    if writer is None or not have_matplotlib():
        return
    writer.add_image("analysis/group_similarity", figure_image(group_similarity_figure(record)), record["step"],
                     dataformats="HWC")
    writer.flush()


# --------------------------------------------------------------------------- the cats-analyze command


def default_out_dir(checkpoint: str | Path) -> Path:
    """`<save_dir>/analysis/<checkpoint name>`: outside the folders a re-save replaces (the
    model folder best/model/ inside a checkpoint: `<save_dir>/analysis/best.model`)."""
    ckpt = Path(checkpoint).resolve()
    if (ckpt.parent / "cats_ds.json").is_file():
        return ckpt.parent.parent / "analysis" / f"{ckpt.parent.name}.{ckpt.name}"
    return ckpt.parent / "analysis" / ckpt.name


def analyze(checkpoint: Optional[str | Path] = None, pairs: Optional[str] = None, runs: Sequence[str] = (),
            out: Optional[str | Path] = None, report: bool = False, device: str = "cpu",
            overrides: Optional[Sequence[str]] = None, data_dir: Optional[str | Path] = None) -> dict:
    """What `cats-analyze` does. Into `out` (default <save_dir>/analysis/<checkpoint name>/,
    beside the checkpoint, not inside it: training replaces best/ and latest/ whole):
      analysis.json        the checkpoint's analysis record (with --checkpoint)
      tensorboard/         its scalars, and every figure as an image
      *.png                the figures there is data for (figures.py; needs matplotlib)
      report.md/.json      with `report`: the paper's claims vs. the runs (report.py)
    runs: "[LABEL=]DIR" training run folders drawn side by side; the checkpoint's own run
    folder joins them when it has logs. Returns {"record", "figures", "report"}."""
    from torch.utils.tensorboard import SummaryWriter

    if checkpoint is None and not runs:
        raise AnalysisError("nothing to analyze: give a checkpoint and/or training run folders")
    if checkpoint is None and (pairs is not None or overrides):
        raise AnalysisError("--pairs and analysis.* overrides apply to a --checkpoint analysis only")
    run_args = [parse_run_arg(r) for r in runs]
    if checkpoint is not None:
        own = Path(checkpoint).resolve().parent
        if ((own / TRAIN_LOG).is_file() or (own / ANALYSIS_LOG).is_file()) and \
                own not in [p.resolve() for _, p in run_args]:
            run_args.insert(0, (None, own))
    loaded = [load_run(path, label) for label, path in run_args]  # fail fast, before the slow part
    labels = [r.label for r in loaded]
    if len(set(labels)) != len(labels):
        raise AnalysisError(f"--run: labels {labels} repeat; name them LABEL=DIR")
    if report and not loaded:
        raise AnalysisError("--report compares training runs: give --run DIR (or a checkpoint inside a run folder)")

    out_dir = Path(out) if out is not None else default_out_dir(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = None
    if checkpoint is not None:
        record = analyze_checkpoint(checkpoint, pairs, overrides, device, data_dir)
        (out_dir / "analysis.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        print(summary_line(record) + f" | {record['seconds']:.1f}s")
    step = record["step"] if record else max((r.last_step for r in loaded), default=0)
    writer = SummaryWriter(str(out_dir / "tensorboard"))
    try:
        for tag, value, s in record_events(record) if record else []:
            writer.add_scalar(tag, value, s)
        figures: dict[str, Path] = {}
        if have_matplotlib():
            figures = write_figures(loaded, record, out_dir, writer, step)
        else:
            print("| matplotlib is not installed (pip install 'cats_ds[plot]'): no PNG figures")
    finally:
        writer.close()
    for name, path in figures.items():
        print(f"| wrote {path} ({name})")
    report_path = None
    if report:
        report_path, claims = write_report(loaded, out_dir, figures)
        for c in claims:
            print(f"| claim {c.name}: {'not measured' if c.holds is None else ('holds' if c.holds else 'does not hold')}"
                  f" | {c.measured}")
        print(f"| wrote {report_path}")
    return {"record": record, "figures": figures, "report": report_path}
