"""Command-line entry points (the only place that parses argv).

    cats-prepare  --config R.yaml [a.b=v ...]
    cats-train    --deepspeed_config ds.json --config R.yaml [a.b=v ...]   (under `deepspeed`)
    cats-train    --print-config [--config R.yaml] [a.b=v ...]          (every key, its default and doc)
    cats-evaluate --checkpoint DIR [--data-dir DIR] [--split test] [--limit N] [--out DIR] [--samples N] [--device cpu|cuda]
                  [--dtype fp32|bf16|fp16] [--backend pytorch|ctranslate2] [a.b=v ...]
                  (data-parallel under `deepspeed --num_gpus N` or `torchrun --nproc_per_node N`)
    cats-analyze  --checkpoint DIR [--data-dir DIR] [--pairs de:af,uk:kk] [--out DIR] [a.b=v ...]
    cats-average  (--inputs DIR ... | --last N --save-dir DIR) --out DIR [--force]
    cats-export   --checkpoint DIR --format pytorch|transformers|ctranslate2 --out DIR [--data-dir DIR]
                  [--quantization int8] [--force]
    (DIR of --checkpoint: a DeepSpeed checkpoint or a model folder, for evaluate, analyze, average, export)
    cats-curve    --run DIR [--split test] [--evaluate] [--limit N] [--minutes 10,30,60] [--out DIR]
    cats-figure3  --arm LABEL:DIR[,DIR...] ... --out FIG.png [--json F] [--alpha-out F.png]
                  [--data DIR | --lo a,b --hi c,d] [--groups Lo,Hi] [--smooth 5] [--smooth-dev 1] [--band minmax]
                  (also python launch/figure3.py)
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from cats_ds.config import ConfigError, load_config


def _fail(msg: str) -> "None":
    sys.stderr.write(f"error: {msg}\n")  # one write: ranks that fail together do not interleave mid-line
    sys.exit(2)


def _config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="experiment recipe (YAML)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_updates=200")
    return p


def prepare_main(argv: Optional[list[str]] = None) -> None:
    p = _config_parser("cats-prepare", "Raw corpus -> SentencePiece -> binarized shards + manifest.json")
    p.add_argument("--force", action="store_true", help="rebuild even if the inputs are unchanged")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        _fail(str(e))
    from cats_ds.data.prepare import PrepareError, prepare

    try:
        prepare(cfg, force=args.force)
    except PrepareError as e:
        _fail(str(e))


def train_main(argv: Optional[list[str]] = None) -> None:
    """launch/train.py. Under launch/supervise.py each rank records how it ended
    (cats_ds/runtime/supervise.py), since DeepSpeed's runner does not always pass it on."""
    from cats_ds.runtime import preempt, supervise

    preempt.install()  # before the record: the wrapper forwards stop signals to recorded ranks
    supervise.record_start()
    code = 1
    try:
        _train(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        raise
    finally:
        supervise.record_exit(code)


def _train(argv: Optional[list[str]]) -> None:
    p = _config_parser("cats-train", "Train under the DeepSpeed launcher. Every experiment setting, its default "
                                     "and its meaning: --print-config")
    p.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON (precision, ZeRO, accumulation); required "
                                                             "to train")
    p.add_argument("--print-config", "--print_config", dest="print_config", action="store_true",
                   help="print the resolved config (the recipe and overrides applied, or the defaults) as YAML, every "
                        "key with its doc and its default, and exit; no launcher needed")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        _fail(str(e))
    if args.print_config:
        from cats_ds.config import config_yaml

        source = " ".join(([f"--config {args.config}"] if args.config else []) + list(args.overrides)) or "defaults"
        sys.stdout.write(config_yaml(cfg, header=f"cats_ds experiment config ({source}): each key's doc above it, "
                                                 f"and its default where the value differs.\nUsable as a recipe: "
                                                 f"--config FILE; any key as an override: section.key=value."))
        return
    if not args.deepspeed_config:
        p.error("the following arguments are required to train: --deepspeed_config (or --print-config)")
    from cats_ds.checkpoints import CheckpointError
    from cats_ds.runtime.watchdog import watch_launcher
    from cats_ds.training.loop import TrainError, train
    from cats_ds.weighting.base import WeightingError

    watch_launcher()  # stop (save latest/) when the deepspeed launcher dies (kill -9 / SIGTERM to the runner)
    try:
        run = train(cfg, args.deepspeed_config)
    except (TrainError, CheckpointError, ConfigError, WeightingError) as e:
        _fail(str(e))
    if run.requeue:  # stopped on SIGTERM/SIGUSR1 with latest/ saved (cats_ds/runtime/preempt.py)
        from cats_ds.runtime.preempt import REQUEUE_EXIT

        sys.exit(REQUEUE_EXIT)


def evaluate_main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="cats-evaluate", description="Beam search; BLEU, chrF++ and the copy "
                                                                   "baseline per language")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, e.g. runs/gettext8/best, or a "
                                                       "model folder, e.g. runs/gettext8/best/model")
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None,
                   help="the prepared data folder the model was trained on (default: its data.dir); "
                        "needed to score, e.g. when the data or the checkpoint moved")
    p.add_argument("--split", default="test", choices=["dev", "test"])
    p.add_argument("--limit", type=int, default=None, help="N sentences per language: a fixed sample, the N with "
                   "the smallest sha256 of the English source (recorded in bleu.json settings.limit_order)")
    p.add_argument("--out", default=None, help="where bleu.json, the table and hyp/ref/src files go "
                                                "(default: <save_dir>/eval/<checkpoint name>-<split>)")
    p.add_argument("--languages", default=None, help="comma-separated subset of languages")
    p.add_argument("--samples", type=int, default=0, help="also print N sample translations "
                                                          "(source / reference / hypothesis)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="decode on the CPU or on this process' GPU (cuda:<local rank>)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="precision of the weights while decoding (fp16: CUDA only)")
    p.add_argument("--backend", default="pytorch", choices=["pytorch", "ctranslate2"],
                   help="pytorch: the project's beam search; ctranslate2: a CTranslate2 export of the checkpoint "
                        "(made on the fly, cached in <save_dir>/eval/ctranslate2/), same beam, length penalty "
                        "and length limits (needs pip install -e '.[export]')")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="eval.key=value overrides, e.g. eval.beam=1")
    args = p.parse_args(argv)
    from cats_ds.inference.evaluate import EvalError, evaluate_checkpoint

    try:
        evaluate_checkpoint(args.checkpoint, split=args.split, limit=args.limit, out_dir=args.out,
                            languages=args.languages.split(",") if args.languages else None,
                            overrides=args.overrides, device=args.device, samples=args.samples,
                            dtype=args.dtype, data_dir=args.data_dir, backend=args.backend)
    except (EvalError, ConfigError, FileNotFoundError) as e:
        _fail(str(e))


def average_main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="cats-average", description="Average the model weights of several "
                                "checkpoints of one run (fairseq's average_checkpoints) into a checkpoint "
                                "evaluate loads")
    p.add_argument("--inputs", nargs="+", default=None, metavar="DIR", help="checkpoint folders to average")
    p.add_argument("--last", type=int, default=None, help="average the newest N step_<n>/ checkpoints of --save-dir")
    p.add_argument("--save-dir", "--save_dir", dest="save_dir", default=None,
                   help="a run's train.save_dir (with --last)")
    p.add_argument("--out", required=True, help="output checkpoint folder, e.g. runs/gettext8/avg5")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    from cats_ds.checkpoints import CheckpointError
    from cats_ds.inference.average import AverageError, average_main_impl

    try:
        average_main_impl(args.inputs, args.last, args.save_dir, args.out, args.force)
    except (AverageError, CheckpointError, ConfigError, FileNotFoundError) as e:
        _fail(str(e))


def export_main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="cats-export", description="Export a checkpoint for inference: a model "
                                "folder (pytorch: model.safetensors + config.json + spm.model), a Hugging Face "
                                "transformers folder, or a CTranslate2 model (the last two: one model per family "
                                "for family-expert checkpoints)")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, e.g. runs/gettext8/best, or a model folder")
    p.add_argument("--format", default="ctranslate2", choices=["pytorch", "transformers", "ctranslate2"])
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None,
                   help="the prepared data folder a DeepSpeed checkpoint was trained on, for its spm.model, "
                        "when it is not at the checkpoint's data.dir (a model folder needs none)")
    p.add_argument("--out", required=True, help="export folder (must not exist unless --force)")
    p.add_argument("--quantization", default=None,
                   help="CTranslate2 weight type, e.g. int8, int8_float16, float16 (default: float32)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    from cats_ds.checkpoints import CheckpointError
    from cats_ds.inference.export import export_checkpoint
    from cats_ds.inference.export_common import ExportError

    try:
        out = export_checkpoint(args.checkpoint, args.out, args.format, force=args.force,
                                quantization=args.quantization, data_dir=args.data_dir)
    except (ExportError, CheckpointError, ConfigError, FileNotFoundError) as e:
        _fail(str(e))
    print(f"| exported {args.checkpoint} -> {out} ({args.format}); usage: {out / 'README.md'}")


def slurm_hostfile_main(argv: Optional[list[str]] = None) -> None:
    """Print the master host after writing a DeepSpeed hostfile from a SLURM node list."""
    p = argparse.ArgumentParser(prog="cats-slurm-hostfile")
    p.add_argument("nodelist", help="SLURM_JOB_NODELIST, e.g. gpu[01-04]")
    p.add_argument("slots", type=int, help="ranks per node (GPUs per node)")
    p.add_argument("out", help="hostfile to write")
    args = p.parse_args(argv)
    from cats_ds.runtime.slurm import write_hostfile

    try:
        print(write_hostfile(args.nodelist, args.slots, args.out)[0])
    except ValueError as e:
        _fail(str(e))


def analyze_main(argv: Optional[list[str]] = None) -> None:
    """Gradient similarity by parameter group, lambda_max per language, figures, report."""
    p = argparse.ArgumentParser(
        prog="cats-analyze",
        description="The paper's optimization analysis on a checkpoint, and/or figures (and a claims report) "
                    "from training runs that logged analyses (analysis.every > 0).")
    p.add_argument("--checkpoint", default=None, help="checkpoint (or model) folder to analyze, e.g. "
                                                      "runs/gettext8/best")
    p.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None,
                   help="the prepared data folder the model was trained on (default: its data.dir), for the "
                        "dev/train batches, e.g. when the data or the checkpoint moved")
    p.add_argument("--pairs", default=None, help="language pairs to report one by one, e.g. de:af,uk:kk "
                                                 "(default: analysis.pairs, empty = all pairs)")
    p.add_argument("--run", action="append", default=[], dest="runs", metavar="[LABEL=]DIR",
                   help="a training run folder (train.save_dir) to draw; repeat it to draw runs side by side; "
                        "the checkpoint's own run folder is added when it has logs")
    p.add_argument("--out", default=None, help="output folder (default: <save_dir>/analysis/<checkpoint name>)")
    p.add_argument("--report", action="store_true", help="also write report.md / report.json: the paper's "
                                                         "claims vs. the runs' measurements")
    p.add_argument("--device", default="cpu", help="torch device for the checkpoint analysis")
    p.add_argument("overrides", nargs="*", help="analysis.* / eval.lo_max / eval.hi_min / eval.groups overrides, "
                                                "e.g. analysis.sentences=32")
    args = p.parse_args(argv)
    if args.checkpoint is None and not args.runs:
        _fail("give --checkpoint DIR and/or --run DIR (repeatable)")
    if args.out is None and args.checkpoint is None:
        _fail("--out is required without --checkpoint")
    from cats_ds.analysis.analyze import analyze
    from cats_ds.analysis.similarity import AnalysisError
    from cats_ds.checkpoints import CheckpointError

    try:
        analyze(checkpoint=args.checkpoint, pairs=args.pairs, runs=args.runs, out=args.out, report=args.report,
                device=args.device, overrides=args.overrides, data_dir=args.data_dir)
    except (AnalysisError, CheckpointError, ConfigError, FileNotFoundError) as e:
        _fail(str(e))


def compare_main(argv: Optional[list[str]] = None) -> None:
    """Print (and optionally write) chrF++ and BLEU tables of several labels (seeds each),
    with hierarchical-bootstrap marks against a baseline label and primary comparisons (cats_ds/reports/compare.py)."""
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(prog="cats-compare", description="chrF++ and BLEU of several runs side by side: "
                                "mean ± sd over seeds, significance against a baseline label")
    p.add_argument("runs", nargs="+", metavar="LABEL=DIR[,DIR...]",
                   help="an evaluate folder (or its bleu.json) per seed; repeat a label or list its seeds "
                        "comma-separated; labels starting with '-' go after '--'")
    p.add_argument("--baseline", default=None, help="label the others are tested against (hierarchical bootstrap "
                                                    "over seeds and sentences, Holm-adjusted)")
    p.add_argument("--primary", default=None, metavar="A:B[,C:D...]",
                   help="comparisons named in advance, e.g. CATS:T5,CATS:Tinf: tested on the group rows, "
                        "reported first, their own Holm family")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the marks")
    p.add_argument("--out", default=None, help="also write the markdown here, and the numbers to <out>.json")
    args = p.parse_args(argv)
    from cats_ds.inference.evaluate import EvalError
    from cats_ds.reports.compare import compare_paths, format_comparison

    try:
        result = compare_paths(args.runs, args.baseline, args.resamples, args.alpha, args.primary)
    except EvalError as e:
        _fail(str(e))
    table = format_comparison(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.write_text(table, encoding="utf-8")
        out.with_suffix(".json").write_text(json.dumps(result, indent=1), encoding="utf-8")


def curve_main(argv: Optional[list[str]] = None) -> None:
    """A run's learning curve from its step_<n>/ checkpoints (cats_ds/reports/curve.py)."""
    p = argparse.ArgumentParser(prog="cats-curve", description="test chrF++/BLEU per group and dev loss "
                                "against updates and minutes, from a run's numbered checkpoints")
    p.add_argument("--run", required=True, help="the run's save_dir (trained with train.save_every=N)")
    p.add_argument("--split", default="test", choices=["dev", "test"])
    p.add_argument("--evaluate", action="store_true", help="evaluate the checkpoints that have no scores yet")
    p.add_argument("--limit", type=int, default=None, help="with --evaluate: N sentences per language "
                   "(evaluate's fixed hash-ordered sample)")
    p.add_argument("--minutes", default="10,30,60", help="budgets to report the last checkpoint within")
    p.add_argument("--out", default=None, help="default <run>/eval/curve-<split>")
    args = p.parse_args(argv)
    from pathlib import Path

    from cats_ds.inference.evaluate import EvalError
    from cats_ds.reports.curve import curve_points, write_curve

    try:
        minutes = [float(m) for m in args.minutes.split(",") if m.strip()]
    except ValueError:
        _fail(f"--minutes must be comma-separated numbers, got {args.minutes!r}")
    try:
        points = curve_points(args.run, args.split, args.evaluate, args.limit)
    except (EvalError, FileNotFoundError) as e:
        _fail(str(e))
    out = Path(args.out) if args.out else Path(args.run) / "eval" / f"curve-{args.split}"
    print(write_curve(points, out, args.split, minutes))
    print(f"written: {out}/curve.md, curve.json" + (", curve.png" if (out / "curve.png").is_file() else ""))


def figure3_main(argv: Optional[list[str]] = None) -> None:
    """The paper's Figure 3 (train / dev loss of Lo and Hi against updates, mean over seeds
    per arm), the dev minimum table, and CATS' alpha over seeds (cats_ds/reports/figure3.py)."""
    p = argparse.ArgumentParser(prog="cats-figure3", description="Figure 3: train and dev loss per language group "
                                "against updates, one line per arm (mean over its seeds, band over seeds), from "
                                "the runs' train_log.jsonl; prints where each arm's dev loss is lowest")
    p.add_argument("--arm", action="append", default=[], dest="arms", metavar="LABEL:DIR[,DIR...]", required=True,
                   help="an arm and its run folders (train.save_dir), one per seed, split at the first ':' "
                        "(T=5:runs/t5-s1,runs/t5-s2); repeat for each arm (a repeated label adds seeds)")
    p.add_argument("--out", required=True, help="the figure (PNG)")
    p.add_argument("--json", default=None, help="also write the summary and the plotted curves here")
    p.add_argument("--alpha-out", "--alpha_out", dest="alpha_out", default=None,
                   help="also draw alpha/<lang> (weight/<lang>) of the arms that logged it, mean over seeds per "
                        "language, into this PNG (Lo dashed)")
    p.add_argument("--data", default=None, help="the prepared data folder: its manifest's train pairs give "
                   "Lo/Mid/Hi with the runs' eval.lo_max / eval.hi_min (default: each run's own config and data.dir)")
    p.add_argument("--lo", default="", help="comma-separated Lo languages (groups by name instead of --data)")
    p.add_argument("--mid", default="", help="comma-separated Mid languages")
    p.add_argument("--hi", default="", help="comma-separated Hi languages")
    p.add_argument("--groups", default="Lo,Hi", help="the columns: groups among Lo, Mid, Hi, All")
    p.add_argument("--smooth", type=int, default=5, help="train loss: centered moving average over this many "
                   "log points (1: none)")
    p.add_argument("--smooth-dev", "--smooth_dev", dest="smooth_dev", type=int, default=1,
                   help="dev loss: the same over validations (1: none, the default)")
    p.add_argument("--band", default="minmax", choices=["minmax", "sd", "none"],
                   help="the shaded band over seeds around each mean line")
    args = p.parse_args(argv)
    from cats_ds.analysis.similarity import AnalysisError
    from cats_ds.reports.figure3 import make_figure3
    from cats_ds.data.groups import GroupError

    def names(text: str) -> list[str]:
        return [x.strip() for x in text.split(",") if x.strip()]

    if args.data and (args.lo or args.mid or args.hi):
        _fail("give either --data or --lo/--mid/--hi, not both")
    try:
        table = make_figure3(args.arms, args.out, args.json, args.alpha_out, args.data, names(args.lo),
                             names(args.mid), names(args.hi), names(args.groups), args.smooth, args.smooth_dev,
                             args.band)
    except (AnalysisError, GroupError, ImportError) as e:
        _fail(str(e))
    print(table)
    print(f"written: {args.out}" + "".join(f", {f}" for f in (args.json, args.alpha_out) if f))


def train_script() -> None:
    """launch/train.py and cats-train: a launched rank ends with its own status, not an
    abort in the interpreter's teardown (cats_ds/runtime/rank_exit.py)."""
    from cats_ds.runtime.rank_exit import run_rank

    run_rank(train_main)


def evaluate_script() -> None:
    """launch/evaluate.py and cats-evaluate, under run_rank as train_script."""
    from cats_ds.runtime.rank_exit import run_rank

    run_rank(evaluate_main)


def analyze_script() -> None:
    """launch/analyze.py and cats-analyze, under run_rank as train_script."""
    from cats_ds.runtime.rank_exit import run_rank

    run_rank(analyze_main)
