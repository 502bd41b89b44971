"""Benchmarks: a table on stdout and a JSON file. Every target is a ratio measured inside
one run (the machine is shared and noisy), never an absolute time.

    python -m cats_ds.bench train   --json out.json   # tokens/s on 1 and 2 ranks vs a bare PyTorch step
    python -m cats_ds.bench pool    --json out.json   # padding per sampling.length_pool (sampler only)
    python -m cats_ds.bench decode  --json out.json   # beam-5 sentences/s; CTranslate2 on the same model
    python -m cats_ds.bench cats    --json out.json   # CATS meta-step cost, Gram error, memory
    python -m cats_ds.bench cats --methods pcgrad,gradvac,cagrad,nashmtl,imtl   # + a row per method
    python -m cats_ds.bench cats --methods ... --solve-only   # only the coefficient solve, no data
    python -m cats_ds.bench experts --json out.json   # dense vs family experts
    python -m cats_ds.bench peer --fairseq-python .venv-fairseq/bin/python   # vs fairseq (bench/peer.py)

Multi-rank parts run under the real `deepspeed` launcher (CPU: DS_ACCELERATOR=cpu, gloo);
the worker side is `python -m cats_ds.bench worker-<name>` inside each rank.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from cats_ds.config import GRAM_METHODS, distinct_languages, load_config, micro_step_tokens
from cats_ds.runtime.ports import free_port

RECIPE = "launch/recipes/gettext8.yaml"
DS_CONFIG = "ds_configs/cpu_zero2.json"


# --------------------------------------------------------------------------- launcher side


def _launch_worker(name: str, nproc: int, args: list[str]) -> dict:
    """Run `cats_ds.bench worker-<name>` on nproc ranks; rank 0 writes the result JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        if not _has_cuda():  # a GPU node keeps DeepSpeed's own accelerator detection
            env.setdefault("DS_ACCELERATOR", "cpu")
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
               "--master_port", str(free_port()), "--module", "cats_ds.bench", f"worker-{name}",
               "--out", str(out), "--save_dir", str(Path(tmp) / "run")] + args
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(f"benchmark worker {name} on {nproc} rank(s) failed (exit {proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _ensure_prepared(recipe: str, overrides: list[str]) -> None:
    from cats_ds.data.prepare import prepare

    prepare(load_config(recipe, overrides))  # a no-op when the manifest is up to date


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: Optional[str], result: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {path}")


PHASES = ["data", "forward", "loss", "backward", "reduction", "optimizer", "logging"]


def bench_train(args) -> dict:
    _ensure_prepared(args.recipe, args.overrides)
    common = ["--config", args.recipe, "--deepspeed_config", args.ds_config, "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--rounds", str(args.rounds)] + args.overrides
    results = [_launch_worker("train", n, common) for n in args.ranks]
    rows = [[r["ranks"], r["tokens_per_s"], r["bare_tokens_per_s"], r["ratio_to_bare"], r["tokens_per_cpu_s"],
             r["cpu_ratio_to_bare"], r["forwards_per_update"], r["pad_src"], r["pad_tgt"], r["tokens_per_update"],
             r["peak_rss_mb"], r["model_tflops_per_s"], "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"]
            for r in results]
    print_table(f"training throughput ({args.recipe}, {args.rounds} rounds x {args.steps} updates each, "
                f"full step and bare PyTorch step interleaved; target tokens)",
                ["ranks", "tokens/s", "bare tokens/s", "full/bare", "tokens/CPU-s", "full/bare CPU", "forwards/update",
                 "pad src", "pad tgt", "tokens/update", "peak RSS/rank MB", "model TFLOP/s", "MFU"], rows)
    print(f"precision {results[0]['precision']} on {results[0]['device']}; MFU = model FLOPs (cats_ds/bench/flops.py) / "
          f"(peak x ranks), n/a where the peak is unknown (set PEAK_TFLOPS)")
    print_table("full step by phase (s per update, rank 0; reduction = DeepSpeed's backward epilogue, "
                "backward excludes it)", ["ranks"] + PHASES + ["other", "total"],
                [[r["ranks"]] + [r["phases_s"][p] for p in PHASES] + [r["phases_s"]["other"], r["step_s"]]
                 for r in results])
    result = {f"ranks_{r['ranks']}": r for r in results}
    result["targets"] = {"ratio_to_bare": 0.9}
    if len(results) == 2:
        result["speedup"] = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
        print(f"speedup {args.ranks[1]} ranks / {args.ranks[0]}: {result['speedup']:.2f}x")
    return result


def bench_pool(args) -> dict:
    """Padding of the plain updates' micro-batches per sampling.length_pool (the sampler
    alone, no model): source and target padded fractions of each rank's share, and
    micro-batches per draw, over the first --batches micro-batches at 1 and 2 ranks."""
    import numpy as np

    from cats_ds.data.manifest import Manifest, load_split
    from cats_ds.data.sampler import LanguageSampler

    _ensure_prepared(args.recipe, args.overrides)
    cfg = load_config(args.recipe, args.overrides)
    manifest = Manifest.load(cfg.data.dir)
    languages = cfg.data.languages or manifest.languages
    splits = load_split(cfg.data.dir, manifest, "train", languages)
    rows, out = [], {}
    for world in args.ranks:
        for pool in args.sizes:
            sampler = LanguageSampler(splits, languages, cfg.sampling.temperature, cfg.sampling.langs_per_batch,
                                      cfg.train.max_tokens, world, cfg.train.seed, distinct=distinct_languages(cfg),
                                      length_pool=pool)
            real, padded = np.zeros(2), np.zeros(2)  # source, target
            per_draw = []  # micro-batches per draw of each pool
            for _ in range(args.batches):
                plan, drawn = sampler.next_batch()
                if drawn and pool:
                    per_draw.append(len(sampler._pool) / len(drawn))
                for rank in range(world):
                    mine = plan.for_rank(rank, world)
                    for side, name in enumerate(("src", "tgt")):
                        sizes = np.concatenate([getattr(splits[languages[li]], name).sizes[s]
                                                for li, s in zip(mine.langs, mine.sents)])
                        if len(sizes):
                            real[side] += sizes.sum()
                            padded[side] += len(sizes) * sizes.max()
            pad = 1 - real / padded
            out[f"ranks_{world}_pool_{pool}"] = {"ranks": world, "length_pool": pool, "pad_src": float(pad[0]),
                                                 "pad_tgt": float(pad[1]),
                                                 "micro_batches_per_draw": float(np.mean(per_draw)) if pool else 1.0}
            rows.append([world, pool, f"{pad[0]:.2%}", f"{pad[1]:.2%}", out[f"ranks_{world}_pool_{pool}"][
                "micro_batches_per_draw"]])
    print_table(f"padding of length-pooled micro-batches ({args.recipe}, first {args.batches} micro-batches; "
                f"pool 0 = each draw as one padded batch)", ["ranks", "length_pool", "pad src", "pad tgt", "micro-batches/draw"],
                rows)
    return out


def bench_peer(args) -> dict:
    import numpy as np

    from cats_ds.bench.peer import SOURCE_LANG, check_fairseq_python, export_fairseq, run_fairseq
    from cats_ds.data.manifest import Manifest

    version = check_fairseq_python(args.fairseq_python)
    overrides = list(args.overrides) + [f"train.max_tokens={args.max_tokens}"]
    _ensure_prepared(args.recipe, overrides)
    cfg = load_config(args.recipe, overrides)
    manifest = Manifest.load(cfg.data.dir)
    languages = list(cfg.data.languages or manifest.languages)
    data = Path(args.export_dir or Path(cfg.data.dir).with_name(Path(cfg.data.dir).name + "-fairseq"))
    stamp = export_fairseq(cfg.data.dir, data, languages)
    print(f"fairseq {version} ({args.fairseq_python}); data {cfg.data.dir} exported to {data} "
          f"({sum(stamp['sentences']['train'].values())} training pairs, {len(languages)} languages)")
    common = ["--config", args.recipe, "--deepspeed_config", args.ds_config, "--steps", str(args.timed),
              "--warmup", str(args.warmup)] + overrides
    mallocs = ["system", "reuse"] if args.fairseq_malloc == "both" else [args.fairseq_malloc]
    sides = ["ours"] + [f"fairseq/{m}" for m in mallocs]
    per: dict[int, dict] = {n: {side: [] for side in sides} for n in args.processes}
    start = time.perf_counter()
    for r in range(args.rounds):
        for n in args.processes:
            shift = (r + n) % len(sides)  # which side goes first rotates from round to round
            for side in sides[shift:] + sides[:shift]:
                if side == "ours":
                    t0 = time.perf_counter()
                    res = _launch_worker("peer", n, common)
                    res["launch_s"] = time.perf_counter() - t0
                else:
                    res = run_fairseq(args.fairseq_python, cfg, data, languages, n, args.max_tokens, args.warmup,
                                      args.timed, malloc=side.split("/")[1])
                per[n][side].append(res)
                print(f"round {r + 1}/{args.rounds}, {n} process(es), {side}: {res['tokens_per_s']:.0f} target tokens/s "
                      f"({res['tokens_per_update']:.0f} per update)", flush=True)
    out = {"fairseq_version": version, "recipe": args.recipe, "max_tokens": args.max_tokens, "warmup": args.warmup,
           "timed": args.timed, "rounds": args.rounds, "target": 1.2, "fairseq_malloc": mallocs}

    def rate(runs: list[dict]) -> float:  # tokens over seconds, the rounds pooled
        return sum(x["tokens"] for x in runs) / sum(x["seconds"] for x in runs)

    def key(n: int, malloc: str) -> str:  # the JSON entry of a row
        return f"processes_{n}" + ("" if malloc == "system" else f"_fairseq_{malloc}")

    rows = []
    for n in args.processes:
        ours = per[n]["ours"]
        for malloc in mallocs:
            theirs = per[n][f"fairseq/{malloc}"]
            ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours, theirs)]
            o = out[key(n, malloc)] = {
                "processes": n, "fairseq_malloc": malloc, "ours_tokens_per_s": rate(ours),
                "fairseq_tokens_per_s": rate(theirs), "ratio": rate(ours) / rate(theirs), "round_ratios": ratios,
                "ours_params": ours[0]["params"], "fairseq_params": theirs[0]["params"],
                "ours_tokens_per_update": float(np.mean([x["tokens_per_update"] for x in ours])),
                "fairseq_tokens_per_update": float(np.mean([x["tokens_per_update"] for x in theirs])),
                "ours_rounds": ours, "fairseq_rounds": theirs}
            rows.append([n, malloc, o["ours_tokens_per_s"], o["fairseq_tokens_per_s"], o["ratio"],
                         " ".join(f"{x:.3f}" for x in ratios), o["ours_tokens_per_update"],
                         o["fairseq_tokens_per_update"]])
    print_table(f"peer: cats_ds vs fairseq {version}, target tokens/s over {args.timed} updates after {args.warmup} "
                f"warm-up ({args.recipe}, max_tokens {args.max_tokens} per process, {args.rounds} round(s), "
                f"alternating launches; ours with train.host_malloc={cfg.train.host_malloc})",
                ["processes", "fairseq malloc", "cats_ds tok/s", "fairseq tok/s", "ratio", "round ratios",
                 "cats_ds tok/update", "fairseq tok/update"], rows)
    first = out[key(args.processes[0], mallocs[0])]
    print(f"parameters: cats_ds {first['ours_params']:,}, fairseq {first['fairseq_params']:,} "
          f"(fairseq's dictionary holds one more language tag, {SOURCE_LANG}: +{cfg.model.embed_dim})")
    out["elapsed_s"] = time.perf_counter() - start
    print(f"target: ratio >= 1.2 at every process count ({out['elapsed_s'] / 60:.1f} min of launches)")
    return out


def bench_decode(args) -> dict:
    import torch

    from cats_ds.data.manifest import Manifest, Vocab, load_split
    from cats_ds.inference.search import beam_search
    from cats_ds.model.build import model_from_config

    _ensure_prepared(args.recipe, args.overrides)
    if args.checkpoint:
        from cats_ds.checkpoints import load_for_inference

        cfg, model, manifest, vocab, languages = load_for_inference(args.checkpoint)
        trained = True
    else:
        cfg = load_config(args.recipe, args.overrides)
        manifest = Manifest.load(cfg.data.dir)
        vocab = Vocab(cfg.data.dir, manifest.languages)
        languages = cfg.data.languages or manifest.languages
        torch.manual_seed(0)
        model = model_from_config(cfg, len(vocab), languages)
        trained = False
    model.eval()
    torch.set_num_threads(args.threads)
    splits = load_split(cfg.data.dir, manifest, "test", languages)
    per_lang = max(1, args.sentences // len(splits))
    batches = decode_batches(splits, languages, per_lang, args.batch)

    def ours_decode(li: int, lang: str) -> tuple[float, dict]:
        """Seconds for the language's batches, and {(lang, id): best hypothesis' tokens}."""
        inputs = [(ids, torch.nn.utils.rnn.pad_sequence(
            [torch.as_tensor(splits[lang].src[i].astype("int64")) for i in ids], batch_first=True))
            for ids in batches[lang]]
        t0, hyps = time.perf_counter(), {}
        for ids, src in inputs:
            tags = torch.full((len(ids),), vocab.lang_ids[lang], dtype=torch.long)
            langs = torch.full((len(ids),), li, dtype=torch.long)
            with torch.no_grad():
                out = beam_search(model, src, tags, langs, beam=args.beam, lenpen=cfg.eval.lenpen,
                                  max_len_a=cfg.eval.max_len_a, max_len_b=cfg.eval.max_len_b)
            hyps.update({(lang, i): nbest[0].tokens for i, nbest in zip(ids, out)})
        return time.perf_counter() - t0, hyps

    rows, total_s, total_n, total_tok, ours = [], 0.0, 0, 0, {}
    with _ctranslate2_decoder(args, cfg, model, vocab, languages, splits, batches) as ct2_decode:
        ct2 = {"s": 0.0, "n": 0, "identical": 0}
        for li, lang in enumerate(languages):
            if lang not in splits:
                continue
            # alternate which decoder goes first, so drift in the machine's load hits both
            if ct2_decode is not None and li % 2 == 1:
                ct2_s, ct2_out = ct2_decode(lang)
            dt, hyps = ours_decode(li, lang)
            if ct2_decode is not None and li % 2 == 0:
                ct2_s, ct2_out = ct2_decode(lang)
            n, hyp_tokens = len(hyps), sum(len(h) for h in hyps.values())
            ours.update(hyps)
            rows.append([lang, n, n / dt, hyp_tokens / dt])
            total_s, total_n, total_tok = total_s + dt, total_n + n, total_tok + hyp_tokens
            if ct2_decode is not None:
                ct2["s"], ct2["n"] = ct2["s"] + ct2_s, ct2["n"] + len(ct2_out)
                ct2["identical"] += sum(tokens == hyps[key] for key, tokens in ct2_out.items())
    note = "" if trained else " (untrained model: hypotheses tend to run to the length limit)"
    print_table(f"beam-{args.beam} decoding, batch {args.batch}, 1 process, {args.threads} thread(s){note}",
                ["lang", "sentences", "sentences/s", "hyp tokens/s"], rows)
    result = {"beam": args.beam, "batch": args.batch, "threads": args.threads, "sentences": total_n,
              "sentences_per_s": total_n / total_s, "hyp_tokens_per_s": total_tok / total_s,
              "trained_checkpoint": args.checkpoint,
              "per_language": {r[0]: {"sentences": r[1], "sentences_per_s": r[2]} for r in rows},
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(f"all: {result['sentences_per_s']:.2f} sentences/s, peak RSS {result['peak_rss_mb']:.0f} MB")
    result["processes"] = _bench_processes(args, cfg, model, manifest, vocab, languages, per_lang) \
        if args.processes else {}
    result["ctranslate2"] = None
    if ct2_decode is not None:
        result["ctranslate2"] = c = {"sentences": ct2["n"], "sentences_per_s": ct2["n"] / ct2["s"],
                                     "identical": ct2["identical"], "identical_share": ct2["identical"] / ct2["n"]}
        c["ratio_to_ours"] = c["sentences_per_s"] / result["sentences_per_s"]
        result["ours_over_ctranslate2"] = result["sentences_per_s"] / c["sentences_per_s"]
        print_table(f"beam-{args.beam} decoding, batch {args.batch}: project search vs CTranslate2 float32 decoded as "
                    f"evaluate --backend ctranslate2 (same model, sentences, batches, per-sentence length rule "
                    f"{cfg.eval.max_len_a} x source + {cfg.eval.max_len_b}, length penalty {cfg.eval.lenpen}; "
                    f"{args.threads} thread(s); alternating per language)",
                    ["decoder", "sentences", "sentences/s", "ours / decoder", "identical best hypotheses"],
                    [["cats_ds.inference.search", total_n, result["sentences_per_s"], 1.0, "-"],
                     ["ctranslate2", c["sentences"], c["sentences_per_s"], result["ours_over_ctranslate2"],
                      f"{c['identical']}/{c['sentences']} ({c['identical_share']:.1%})"]])
        print(f"ours / CTranslate2: {result['ours_over_ctranslate2']:.2f}x (target >= 0.8)")
    return result


def decode_batches(splits, languages, per_lang: int, batch: int) -> dict[str, list[list[int]]]:
    """The first per_lang test sentences of each language, sorted by source length (ties in
    test order) and cut into batches of `batch`: what both decoders translate."""
    import numpy as np

    out = {}
    for lang in languages:
        if lang in splits:
            n = min(per_lang, len(splits[lang]))
            order = np.argsort(splits[lang].src.sizes[:n], kind="stable").tolist()
            out[lang] = [order[i:i + batch] for i in range(0, n, batch)]
    return out


def _bench_processes(args, cfg, model, manifest, vocab, languages, per_lang) -> dict:
    """`launch/evaluate.py` under the deepspeed launcher on 1, 2, ... processes (args.processes):
    decoding sentences/s as evaluate reports it (the decode loop and rank-0 merge; loading
    and scoring excluded), same sentences, beam and eval.batch_tokens."""
    import torch

    from cats_ds.checkpoints import MODEL_STATES
    from cats_ds.checkpoints import CHECKPOINT_META

    rows, out = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "untrained"
        if not args.checkpoint:  # the benchmark's model as a checkpoint folder evaluate can load
            ckpt.mkdir()
            torch.save({"module": model.state_dict()}, ckpt / MODEL_STATES)
            meta = {"step": 0, "valid_loss": None, "config": cfg.to_dict(), "languages": list(languages),
                    "manifest_fingerprint": manifest.fingerprint, "vocab_size": len(vocab), "world_size": 1,
                    "zero_stage": 0}
            (ckpt / CHECKPOINT_META).write_text(json.dumps(meta))
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        if not _has_cuda():  # a GPU node keeps DeepSpeed's own accelerator detection
            env.setdefault("DS_ACCELERATOR", "cpu")
        for nproc in args.processes:
            res = Path(tmp) / f"eval{nproc}"
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
                   str(free_port()), "launch/evaluate.py", "--checkpoint", str(ckpt), "--limit", str(per_lang),
                   "--out", str(res), f"eval.beam={args.beam}"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).parents[2])
            if proc.returncode != 0:
                raise SystemExit(f"evaluate on {nproc} process(es) failed (exit {proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            timing = json.loads((res / "bleu.json").read_text())["timing"]
            out[str(nproc)] = timing
            rows.append([nproc, timing["sentences_per_s"], timing["sentences_per_s"] / out[str(args.processes[0])][
                "sentences_per_s"]])
    print_table(f"data-parallel evaluate (beam {args.beam}, eval.batch_tokens {cfg.eval.batch_tokens}, "
                f"{per_lang} sentences per language)", ["processes", "sentences/s", "speedup"], rows)
    return out


@contextlib.contextmanager
def _ctranslate2_decoder(args, cfg, model, vocab, languages, splits, batches):
    """A function lang -> (seconds, {(lang, id): best hypothesis' tokens}) that translates
    the language's `batches` with an in-memory float32 CTranslate2 export of the same model,
    decoded as `evaluate --backend ctranslate2` does (cats_ds/inference/ct2_backend.py: same beam,
    length penalty, per-sentence length limits, banned tokens, </s> re-scoring of cut
    hypotheses; family-expert models: each language through its family's model); None
    when ctranslate2 is not installed or the model cannot be exported."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        print("(ctranslate2 not installed: no CTranslate2 row; pip install -e '.[export]')")
        yield None
        return
    from cats_ds.inference.ct2_backend import CT2Decoder
    from cats_ds.inference.ct2_export import export_ctranslate2
    from cats_ds.inference.export_common import ExportError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            export_ctranslate2(cfg, model, vocab, languages, Path(tmp) / "ct2", force=True)
        except ExportError as e:
            print(f"(no CTranslate2 row: {e})")
            yield None
            return
        decoder = CT2Decoder(Path(tmp) / "ct2", vocab, cfg.model.max_positions, threads=args.threads)

        def decode(lang: str):
            decoder.translator(lang)  # loaded outside the timing
            work = [(ids, [splits[lang].src[i].astype("int64") for i in ids]) for ids in batches[lang]]
            t0 = time.perf_counter()
            results = [(ids, decoder.decode(lang, srcs, args.beam, cfg.eval.lenpen, cfg.eval.max_len_a,
                                            cfg.eval.max_len_b)) for ids, srcs in work]
            seconds = time.perf_counter() - t0
            return seconds, {(lang, i): tokens for ids, hyps in results for i, tokens in zip(ids, hyps)}

        yield decode


def solve_costs(methods: list[str], k: int = 8, ns=(8, 100), reps: int = 50, dim: int = 1000) -> dict:
    """Microseconds of one `weighting.update` (the float64 coefficient computation from a
    K x K Gram matrix, conversions included) per method, K languages per meta batch out
    of N; median over `reps` meta steps on random correlated gradients (1 process)."""
    import numpy as np
    import torch

    from cats_ds.weighting import make_weighting

    out: dict[str, dict[str, float]] = {}
    for method in methods:
        for n in ns:
            rng = np.random.default_rng(0)
            cfg = load_config(None, [f"weighting.method={method}", "meta.every=[[null, 1]]"])
            weighting = make_weighting(cfg, [f"l{i}" for i in range(n)], vocab_size=1000)
            times = []
            for step in range(reps):
                g = rng.normal(size=(k, dim)) * rng.uniform(0.5, 2.0, size=(k, 1)) + 0.3 * rng.normal(size=dim)
                gram = torch.tensor(g @ g.T)
                batch = sorted(rng.choice(n, size=k, replace=False).tolist())
                losses = torch.tensor(rng.uniform(4.0, 6.0, size=k))
                shares = {b: 1.0 / k for b in batch}
                t0 = time.perf_counter()
                weighting.update(step, batch, losses, gram, shares)
                times.append(time.perf_counter() - t0)
            out.setdefault(method, {})[f"solve_us_n{n}"] = float(np.median(times)) * 1e6
    return out


def bench_cats(args) -> dict:
    methods = [m for m in (args.methods or "").split(",") if m]
    for m in methods:
        if m not in GRAM_METHODS:
            raise SystemExit(f"--methods: {m!r} is not a Gram-based weighting.method; choices: "
                             f"{', '.join(GRAM_METHODS)}")
    solve = solve_costs(methods) if methods else {}
    if methods:
        rows = [[m, solve[m]["solve_us_n8"], solve[m]["solve_us_n100"]] for m in methods]
        print_table("coefficient computation per meta step, K=8, float64, 1 process (median of 50)",
                    ["method", "us at N=8", "us at N=100"], rows)
    if args.solve_only:
        return {"methods": solve}
    _ensure_prepared(args.recipe, args.overrides)
    _ensure_prepared(args.recipe100, [])
    common = ["--deepspeed_config", args.ds_config, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    res = _launch_worker("cats", 2, common + ["--config", args.recipe, "--k", "4"]
                         + (["--methods", ",".join(methods)] if methods else []) + args.overrides)
    # N=8 vs N=100 on one model, vocabulary and token budget: the gettext100 recipe with all
    # its languages vs its first 8; alternating launches so drift in machine load hits both
    langs100 = load_config(args.recipe100, []).data.languages

    def g100(n: int, k: int, extra: tuple = ()) -> list[str]:  # gettext100's first n languages, K=k
        first = [f"data.languages=[{','.join(langs100[:n])}]"] if n < len(langs100) else []
        return common + ["--config", args.recipe100, "--k", str(k), *extra] + first

    n8_args, n100_args = g100(8, 8), g100(100, 8)
    runs8, runs100 = [], []
    for _ in range(2):
        runs8.append(_launch_worker("meta", 2, n8_args)["meta_step_s"])
        runs100.append(_launch_worker("meta", 2, n100_args)["meta_step_s"])
    n8 = {"meta_step_s": sum(runs8) / len(runs8)}
    n100 = {"meta_step_s": sum(runs100) / len(runs100)}
    if methods:  # each method's meta step over the plain step at K=4, N=8 and N=100 (gettext100 model)
        by_n = {n: _launch_worker("meta", 2, g100(n, 4, ("--methods", ",".join(methods))))["methods"]
                for n in (8, 100)}
    t_plain, t_meta = res["plain_step_s"], res["meta_step_s"]
    out = {
        "plain_step_s": t_plain, "meta_step_s": t_meta, "meta_over_plain": t_meta / t_plain,
        # a meta step every M updates: (M - 1) plain steps + 1 meta step, over M plain steps
        **{f"ratio_m{m}": ((m - 1) * t_plain + t_meta) / (m * t_plain) for m in (1, 10, 100)},
        "measured_ratio_m10": res["measured_ratio_m10"],
        "gram_rel_err": res["gram_rel_err"],
        "extra_mem_bytes": res["extra_mem_bytes"], "expected_extra_mem_bytes": res["expected_extra_mem_bytes"],
        "meta_step_s_n8": n8["meta_step_s"], "meta_step_s_n100": n100["meta_step_s"],
        "ratio_n100_over_n8": n100["meta_step_s"] / n8["meta_step_s"],
        "targets": {"ratio_m10": 1.10, "ratio_m100": 1.02, "ratio_n100_over_n8": 1.10, "gram_rel_err": 1e-5},
    }
    rows = [["ratio_m1", out["ratio_m1"], "-"], ["ratio_m10", out["ratio_m10"], "<= 1.10"],
            ["measured_ratio_m10", out["measured_ratio_m10"], "<= 1.10"],
            ["ratio_m100", out["ratio_m100"], "<= 1.02"], ["gram_rel_err", out["gram_rel_err"], "< 1e-5"],
            ["extra_mem_bytes", out["extra_mem_bytes"], f"~ {out['expected_extra_mem_bytes']}"],
            ["ratio_n100_over_n8", out["ratio_n100_over_n8"], "<= 1.10"]]
    print_table(f"CATS on 2 ranks, K=4 ({args.recipe}); plain step {t_plain:.3f}s, meta step {t_meta:.3f}s",
                ["metric", "value", "target"], rows)
    if methods:
        per = res["methods"]
        for m in methods:
            solve[m].update(per[m])
            for n, rows_n in by_n.items():
                solve[m].update({f"{k}_n{n}": v for k, v in rows_n[m].items()})
        print_table(f"meta step over plain step per method, 2 ranks, K=4, alternating steps: {args.recipe} "
                    f"(its N), and {args.recipe100} with its first 8 / all languages",
                    ["method", "plain s", "meta s", "meta/plain", "meta/plain N=8", "meta/plain N=100",
                     "us solve N=8", "us solve N=100"],
                    [[m, per[m]["plain_step_s"], per[m]["meta_step_s"], per[m]["meta_over_plain"],
                      solve[m]["meta_over_plain_n8"], solve[m]["meta_over_plain_n100"],
                      solve[m]["solve_us_n8"], solve[m]["solve_us_n100"]] for m in methods])
        out["methods"] = solve
    return out


# --------------------------------------------------------------------------- worker side (inside ranks)


def _worker_setup(args):
    import torch.distributed as dist

    from cats_ds.training.loop import setup

    overrides = list(args.overrides) + [f"train.save_dir={args.save_dir}", "train.tensorboard=false",
                                        "train.max_minutes=null"]
    if getattr(args, "k", None):
        overrides.append(f"sampling.langs_per_batch={args.k}")
    cfg = load_config(args.config, overrides)
    run = setup(cfg, args.deepspeed_config)
    return cfg, run, dist


def _close_process_group() -> None:
    """End a worker's process group before the interpreter exits (the loop's own
    shutdown): left to teardown, gloo's threads can abort a rank after the result is
    written ("terminate called without an active exception"), failing the launch."""
    import gc

    import torch.distributed as dist

    from cats_ds.training.loop import shutdown_distributed

    gc.collect()  # DDP's reducer and the engine hold work objects of the group
    if dist.is_initialized():
        dist.barrier()
    shutdown_distributed()


def _peak_rss_mb(dist) -> float:
    import torch

    t = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _timed(run, dist, n: int, fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        fn(run)
        run.step += 1
    dist.barrier()
    return time.perf_counter() - t0


class BareStep:
    """The same model and batches in a plain PyTorch loop: forward, label-smoothed cross
    entropy (torch's fused one, summed over the global target tokens), backward, Adam;
    torch DDP over the default (gloo) group on more than one rank. No DeepSpeed, no
    sampler, no per-language sums, no clipping."""

    def __init__(self, run):
        import torch

        from cats_ds.bench.flops import precision_of
        from cats_ds.model.build import model_from_config

        cfg = run.cfg
        model = model_from_config(cfg, len(run.vocab), run.languages).to(run.device)
        model.load_state_dict(run.model.state_dict())  # fp32 weights, also from a bf16 engine
        self.module = torch.nn.parallel.DistributedDataParallel(model) if run.world > 1 else model
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                    eps=cfg.train.adam_eps)
        self.smoothing, self.world, self.vocab = cfg.train.label_smoothing, run.world, len(run.vocab)
        # a bf16/fp16 engine is compared with PyTorch autocast at the same precision
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision_of(run.engine.config))
        self.autocast = torch.autocast(run.device.type, dtype=dtype, enabled=dtype is not None)
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=dtype == torch.float16)

    def update(self, micro_batches) -> None:
        """micro_batches: [(global target tokens, [(local batch, live), ...] one per forward)]."""
        import torch.nn.functional as F

        from cats_ds.data.manifest import PAD

        self.opt.zero_grad(set_to_none=True)
        for tokens, forwards in micro_batches:
            loss = 0.0
            for batch, live in forwards:
                with self.autocast:
                    logits = self.module(batch.src, batch.prev, batch.langs)
                ce = F.cross_entropy(logits.float().view(-1, self.vocab), batch.tgt.view(-1), ignore_index=PAD,
                                     label_smoothing=self.smoothing, reduction="sum")
                loss = loss + ce * (self.world / tokens if live else 0.0)
            self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()


def _local_forwards(run, plans) -> list:
    """The forwards the full step runs for these plans, collated for this rank (as
    train.forward_plan does): [(global target tokens, [(batch, live), ...])]."""
    from cats_ds.data.sampler import split_by_length, target_tokens
    from cats_ds.training.loop import local_batch

    out = []
    for plan in plans:
        groups = split_by_length(plan, run.train_splits, run.languages, micro_step_tokens(run.cfg, run.world))
        tokens = sum(target_tokens(plan, run.train_splits, run.languages).values())
        out.append((tokens, [local_batch(run, g, run.train_splits) for g in groups]))
    return out


def _upcoming_forwards(run, n: int) -> list:
    """The micro-batches of the next n updates (as train.next_batches picks them), without
    consuming them: [(global target tokens, [(local batch, live), ...])] per micro-batch."""
    import copy

    from cats_ds.training.loop import draws_as_drawn

    probe = copy.deepcopy(run.sampler)
    plans = []
    for step in range(run.step, run.step + n):
        draws = draws_as_drawn(run.cfg, step)
        plans += [probe.next_plan() if draws else probe.next_batch()[0] for _ in range(run.gas)]
    return _local_forwards(run, plans)


def worker_train(args) -> None:
    """Rounds of `steps` full training updates (train.plain_update: sampler, DeepSpeed
    engine, per-language losses) and `steps` bare updates on the very same micro-batches,
    alternating which goes first. Phases come from the full step's own timers."""
    import torch

    from cats_ds.bench.flops import peak_flops, precision_of, train_flops
    from cats_ds.data.manifest import PAD
    from cats_ds.training.loop import plain_update

    cfg, run, dist = _worker_setup(args)
    bare = BareStep(run)
    epilogue = run.engine._backward_epilogue  # ZeRO's gradient reduction at the end of engine.backward

    def timed_epilogue():
        t0 = time.perf_counter()
        epilogue()
        if run.timers is not None:
            run.timers["reduction"] = run.timers.get("reduction", 0.0) + time.perf_counter() - t0

    run.engine._backward_epilogue = timed_epilogue

    def run_bare(batches) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(0, len(batches), run.gas):
            bare.update(batches[i:i + run.gas])
        dist.barrier()
        return time.perf_counter() - t0

    def cpu_timed(fn, *a) -> tuple[float, float]:
        """(wall, this process's CPU seconds): CPU time is what other users' load on a
        shared machine disturbs least."""
        c0 = time.process_time()
        wall = fn(*a)
        return wall, time.process_time() - c0

    run_bare(_upcoming_forwards(run, args.warmup))
    _timed(run, dist, args.warmup, plain_update)
    full_s = bare_s = 0.0
    cpu = torch.zeros(2, dtype=torch.float64)  # full, bare CPU seconds
    tokens = 0
    counts = torch.zeros(6, dtype=torch.float64)  # forwards, src real, src padded, tgt real, tgt padded, FLOPs
    run.timers = {}
    for r in range(args.rounds):
        batches = _upcoming_forwards(run, args.steps)
        tokens += sum(t for t, _ in batches)
        for _, forwards in batches:
            for b, live in forwards:
                if live:
                    src, tgt = int(b.src.ne(PAD).sum()), int(b.tgt.ne(PAD).sum())
                    flops = train_flops(cfg.model, len(run.vocab), src, tgt, b.src.size(1), b.tgt.size(1))
                    counts += torch.tensor([0, src, b.src.numel(), tgt, b.tgt.numel(), flops], dtype=torch.float64)
            counts[0] += len(forwards)
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            if side == 0:
                wall, c = cpu_timed(_timed, run, dist, args.steps, plain_update)
                full_s += wall
            else:
                wall, c = cpu_timed(run_bare, batches)
                bare_s += wall
            cpu[side] += c
    timers, run.timers = run.timers, None
    padding = counts[1:].clone()
    dist.all_reduce(padding)
    counts[1:] = padding
    dist.all_reduce(cpu)
    n = args.rounds * args.steps
    phases = {p: timers.get(p, 0.0) / n for p in PHASES}
    phases["backward"] -= phases["reduction"]
    phases["other"] = full_s / n - sum(phases.values())
    precision = precision_of(run.engine.config)
    device_name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, precision)
    model_flops_per_s = float(counts[5]) / full_s  # all ranks' model FLOPs over the full step's wall time
    result = {"ranks": run.world, "tokens_per_s": tokens / full_s, "bare_tokens_per_s": tokens / bare_s,
              "ratio_to_bare": bare_s / full_s, "step_s": full_s / n, "bare_step_s": bare_s / n,
              "cpu_ratio_to_bare": float(cpu[1] / cpu[0]), "tokens_per_cpu_s": tokens / float(cpu[0]),
              "bare_tokens_per_cpu_s": tokens / float(cpu[1]),
              "tokens_per_update": tokens / n, "forwards_per_update": float(counts[0]) / n,
              "pad_src": 1 - float(counts[1] / counts[2]), "pad_tgt": 1 - float(counts[3] / counts[4]),
              "phases_s": phases, "rounds": args.rounds, "steps_per_round": args.steps,
              "zero_stage": run.engine.zero_optimization_stage(), "length_pool": run.sampler.length_pool,
              "peak_rss_mb": _peak_rss_mb(dist), "params": sum(p.numel() for p in run.model.parameters()),
              "max_tokens": cfg.train.max_tokens, "precision": precision, "device": device_name,
              "model_tflops_per_s": model_flops_per_s / 1e12,
              "mfu": None if peak is None else model_flops_per_s / (peak * run.world)}
    if run.rank == 0:
        Path(args.out).write_text(json.dumps(result))


def worker_peer(args) -> None:
    """Our side of the peer bench: `warmup` then `steps` updates of train_step (as
    launch/train.py runs them), the timed ones between barriers; global target tokens of
    the timed updates from the same sampler state."""
    cfg, run, dist = _worker_setup(args)
    _timed(run, dist, args.warmup, train_step_no_count)
    tokens = sum(t for t, _ in _upcoming_forwards(run, args.steps))
    seconds = _timed(run, dist, args.steps, train_step_no_count)
    result = {"processes": run.world, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
              "tokens_per_update": tokens / args.steps, "params": sum(p.numel() for p in run.model.parameters()),
              "max_tokens": cfg.train.max_tokens}
    if run.rank == 0:
        Path(args.out).write_text(json.dumps(result))


def _use_cats(run, cfg, every: int):
    from cats_ds.weighting.cats import CatsWeighting

    cfg.meta.every = [[None, every]]
    run.weighting = CatsWeighting(run.languages, cfg.cats)
    _ensure_grads(run)


def _ensure_grads(run) -> None:
    """The partition-gradient hook that meta steps need (a temperature recipe has none)."""
    from cats_ds.training.grads import PartitionGrads, is_expert_param

    if run.grads is None:
        run.grads = PartitionGrads(run.engine, include=lambda n, p: not is_expert_param(p))


def _method_steps(run, cfg, dist, args) -> dict:
    """Per `--methods` entry: the same batches through its meta step (M=1), alternating
    with plain steps so drift in machine load hits both; seconds per step and the ratio."""
    from cats_ds.training.loop import meta_update, plain_update
    from cats_ds.weighting import make_weighting

    out = {}
    for method in [m for m in (args.methods or "").split(",") if m]:
        cfg.weighting.method = method
        cfg.meta.every = [[None, 1]]
        run.weighting = make_weighting(cfg, run.languages, len(run.vocab))
        _ensure_grads(run)
        _timed(run, dist, 1, meta_update)
        t_plain = t_meta = 0.0
        for _ in range(args.steps):
            t_plain += _timed(run, dist, 1, plain_update)
            t_meta += _timed(run, dist, 1, meta_update)
        out[method] = {"plain_step_s": t_plain / args.steps, "meta_step_s": t_meta / args.steps,
                       "meta_over_plain": t_meta / t_plain}
    return out


def worker_cats(args) -> None:
    """Plain vs meta step cost (alternating blocks), measured M=10 end to end, the Gram
    error against a 1-process full-gradient reference, and the meta step's extra memory.

    Dropout is off so the reference sees the same function; the Gram check and the memory
    reading come after warm-up plain steps, so the first step's one-off allocations
    (activations, optimizer state) count in neither."""
    from cats_ds.model.build import model_from_config
    from cats_ds.training.grads import half_grams, reference_rows
    from cats_ds.training.loop import meta_update, per_language_gradients, plain_update
    from cats_ds.weighting.base import TemperatureWeighting

    args.overrides = list(args.overrides) + ["model.dropout=0.0", "model.attention_dropout=0.0",
                                             "model.activation_dropout=0.0"]
    cfg, run, dist = _worker_setup(args)
    for _ in range(args.warmup):
        _timed(run, dist, 1, plain_update)
    _use_cats(run, cfg, 1)

    # Gram error: partitions on every rank vs full gradients in one process (fp32 model)
    ref = model_from_config(cfg, len(run.vocab), run.languages)
    ref.load_state_dict(run.model.state_dict())  # ZeRO 0-2 keep full fp32 module weights on every rank
    plans = [run.sampler.next_plan() for _ in range(run.gas)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    half = per_language_gradients(run, plans, run.train_splits, log=False)
    langs, gram = half.langs, half_grams(run.grads, half).plain
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    buffer_bytes = half.rows.numel() * half.rows.element_size()
    del half
    _, ref_rows, _ = reference_rows(ref, plans, run.train_splits, run.languages, run.tag_ids,
                                    cfg.train.label_smoothing, run.gas)
    ref_gram = ref_rows @ ref_rows.T
    gram_err = float((gram - ref_gram).abs().max() / ref_gram.abs().max())
    n_params = sum(p.numel() for p in run.model.parameters())
    del ref_rows, ref
    run.engine.optimizer.zero_grad()

    for _ in range(args.warmup):
        plain_update(run)
        meta_update(run)
    plain, meta = 0.0, 0.0
    for _ in range(args.steps):  # alternate so drift in machine load hits both equally
        plain += _timed(run, dist, 1, plain_update)
        meta += _timed(run, dist, 1, meta_update)
    plain, meta = plain / args.steps, meta / args.steps

    # M = 10 end to end: 2 blocks of 10 updates with CATS(M=10) vs temperature, alternating
    measured = []
    for _ in range(2):
        _use_cats(run, cfg, 10)
        run.step = 0
        t_cats = _timed(run, dist, 10, train_step_no_count)
        run.weighting = TemperatureWeighting(run.languages)
        t_temp = _timed(run, dist, 10, train_step_no_count)
        measured.append(t_cats / t_temp)
    per_method = _method_steps(run, cfg, dist, args)
    result = {"plain_step_s": plain, "meta_step_s": meta, "measured_ratio_m10": sum(measured) / len(measured),
              "methods": per_method,
              "gram_rel_err": gram_err, "extra_mem_bytes": extra, "meta_buffer_bytes": buffer_bytes,
              "expected_extra_mem_bytes": 2 * len(langs) * n_params * 4 // run.world, "k_in_batch": len(langs)}
    if run.rank == 0:
        Path(args.out).write_text(json.dumps(result))


def train_step_no_count(run) -> None:
    """train_step without its step increment (_timed counts steps)."""
    from cats_ds.training.loop import meta_update, plain_update

    (meta_update if run.weighting.is_meta_step(run.step) else plain_update)(run)


def worker_meta(args) -> None:
    """CATS' meta-step time alone (for N=8 vs N=100 at the same K) or, with `--methods`,
    only each method's meta step against the plain step."""
    from cats_ds.training.loop import meta_update, plain_update

    cfg, run, dist = _worker_setup(args)
    result = {"languages": len(run.languages)}
    if args.methods:
        _timed(run, dist, args.warmup, plain_update)  # first-step allocations count in no row
        result["methods"] = _method_steps(run, cfg, dist, args)
    else:
        _use_cats(run, cfg, 1)
        _timed(run, dist, args.warmup, meta_update)
        result["meta_step_s"] = _timed(run, dist, args.steps, meta_update) / args.steps
    if run.rank == 0:
        Path(args.out).write_text(json.dumps(result))


# --------------------------------------------------------------------------- CLI


def peer_arguments(s) -> None:
    s.add_argument("--fairseq-python", required=True,
                   help="a python that can import fairseq (launch/fairseq_env.sh builds one)")
    s.add_argument("--processes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                   help="comma-separated process counts (default 1,2)")
    s.add_argument("--max-tokens", type=int, default=3000, help="per process, both sides (default 3000)")
    s.add_argument("--rounds", type=int, default=2, help="alternating launches per process count")
    s.add_argument("--warmup", type=int, default=10, help="untimed updates per launch")
    s.add_argument("--timed", type=int, default=30, help="timed updates per launch")
    s.add_argument("--export-dir", default=None, help="fairseq data (default: <data.dir>-fairseq)")
    s.add_argument("--fairseq-malloc", choices=["system", "reuse", "both"], default="both",
                   help="fairseq's glibc malloc: as the environment has it, with the setting of our "
                        "train.host_malloc=reuse (GLIBC_TUNABLES), or both, a launch each per round (default)")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cats_ds.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name, help_, recipe=True):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--json", help="write the results here")
        if recipe:
            s.add_argument("--recipe", default=RECIPE)
            s.add_argument("--ds_config", default=DS_CONFIG)
        s.add_argument("overrides", nargs="*", help="section.key=value overrides of the recipe")
        return s

    s = add("train", "training tokens/s on 1 and 2 ranks, against a bare PyTorch step")
    s.add_argument("--steps", type=int, default=8, help="updates per round, each of full and bare")
    s.add_argument("--rounds", type=int, default=4)
    s.add_argument("--ranks", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                   help="comma-separated rank counts (default 1,2)")
    s.add_argument("--warmup", type=int, default=3)
    s = add("pool", "padding per sampling.length_pool (sampler only, no training)")
    s.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[128, 256, 512, 1024, 2048])
    s.add_argument("--ranks", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2])
    s.add_argument("--batches", type=int, default=1000, help="micro-batches per row")
    s = add("decode", "beam-search sentences/s")
    s.add_argument("--checkpoint", default=None, help="trained checkpoint (default: untrained quickstart model)")
    s.add_argument("--sentences", type=int, default=200)
    s.add_argument("--beam", type=int, default=5)
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--processes", type=lambda v: [int(x) for x in v.split(",") if x], default=[1, 2],
                   help="evaluate.py data-parallel rows: comma-separated process counts (default 1,2; '' for none)")
    s.add_argument("--threads", type=int, default=1, help="threads of both decoders (default 1)")
    s = add("cats", "CATS meta-step cost, Gram error and memory on 2 ranks")
    s.add_argument("--recipe100", default="launch/recipes/gettext100.yaml")
    s.add_argument("--methods", default=None,
                   help="comma-separated Gram-based weighting.method values: a row each (meta step over "
                        "plain step at K=4 on 2 ranks: the recipe, and the gettext100 model at N=8 and N=100; "
                        "coefficient solve in us at K=8 for N=8 and N=100)")
    s.add_argument("--solve-only", action="store_true",
                   help="with --methods: only the coefficient-solve timings (1 process, no data, no launches)")
    s.add_argument("--steps", type=int, default=6)
    s.add_argument("--warmup", type=int, default=2)
    from cats_ds.bench.experts import add_arguments as experts_arguments

    experts_arguments(sub.add_parser("experts", help="dense vs family-expert placements"))
    peer_arguments(add("peer", "target tokens/s against fairseq on the same model, data and budget "
                               "(needs --fairseq-python: a python with fairseq)"))
    for name in ("train", "cats", "meta", "peer"):
        w = sub.add_parser(f"worker-{name}")
        w.add_argument("--out", required=True)
        w.add_argument("--save_dir", required=True)
        w.add_argument("--config", required=True)
        w.add_argument("--deepspeed_config", required=True)
        w.add_argument("--steps", type=int, default=10)
        w.add_argument("--warmup", type=int, default=2)
        w.add_argument("--k", type=int, default=None)
        w.add_argument("--methods", default=None)
        w.add_argument("--rounds", type=int, default=1)
        w.add_argument("overrides", nargs="*")
    argv = sys.argv[1:] if argv is None else argv
    # the deepspeed launcher adds --local_rank before the subcommand; ranks read LOCAL_RANK
    args = p.parse_args([a for a in argv if not a.startswith("--local_rank")])
    if args.cmd.startswith("worker-"):  # a launched rank: ends with its own status (runtime/rank_exit.py)
        from cats_ds.runtime.rank_exit import run_rank

        work = {"worker-train": worker_train, "worker-cats": worker_cats, "worker-meta": worker_meta,
                "worker-peer": worker_peer}[args.cmd]

        def worker() -> None:
            try:
                work(args)
            finally:
                _close_process_group()

        run_rank(worker)
    if args.cmd == "experts":
        from cats_ds.bench.experts import bench_experts

        bench_experts(args)  # prints its table and writes --json itself
        return
    write_json(args.json, {"train": bench_train, "decode": bench_decode, "cats": bench_cats,
                           "pool": bench_pool, "peer": bench_peer}[args.cmd](args))


if __name__ == "__main__":
    main()
