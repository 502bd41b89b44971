"""Benchmark of family-expert placements: training tokens/s of the dense model and of each
placement, and parameters per rank with ep_size 1 and 2.

    python -m cats_ds.bench experts --json out.json     (cats_ds/bench/suite.py wires the CLI:
                                                          `add_arguments` + `bench_experts`)

Throughput is measured on this one process with ep_size 1: forward + backward + Adam step
of the real model, on fixed synthetic batches over the languages of a family map (default
ted8_related: 8 languages, 4 families), in two mixes: `balanced` cycles through the
languages, so every family gets 1/E of the batch; `skewed` puts half the sentences in the
first family and spreads the rest. Each expert placement runs with two dispatches
(`--dispatch`): `local`, what ep_size 1 trains with (tokens sorted by family, each expert
on its own rows), and `moelayer`, DeepSpeed's MOELayer dispatch/combine as ep_size > 1
computes it (capacity blocks: E x capacity rows per expert layer, which is the token count
in the balanced mix and E/2 x it in the skewed one; the out_embed input padded to V). No
all-to-all is timed: with ep_size > 1 each expert layer adds two all-to-alls of E x
capacity x width values per forward (and two in backward).

Configurations run in interleaved rounds, so a change in machine load hits them alike.
Each is reported by its best round (timeit's estimator: on a shared machine slower rounds
measure the neighbours), in wall-clock tokens/s and in tokens per CPU-second of this
process, each with its ratio to the dense model of the same run; every round is in the JSON.

Parameters per rank are counted on the model each ep_size builds: shared parameters plus
the rank's num_families / ep_size local experts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cats_ds.config import Config, config_from_dict, load_config
from cats_ds.model.build import model_from_config
from cats_ds.model.experts import MODULES, set_local_dispatch
from cats_ds.model.families import load_family_map
from cats_ds.training.grads import is_expert_param

PLACEMENTS = {"dense": [], **{m: [m] for m in MODULES}, "all": list(MODULES)}
"""Benchmarked configurations: experts.modules of each."""


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options `bench_experts` reads."""
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--config", default=None, help="recipe whose model section sizes the model (else the flags)")
    p.add_argument("--families", default="ted8_related", help="family map; its languages make the batch")
    p.add_argument("--side", default="decoder", choices=["encoder", "decoder", "both"], help="experts.side")
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--ffn-dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=3, help="encoder and decoder layers each")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch-tokens", type=int, default=2048, help="target tokens per step")
    p.add_argument("--length", type=int, default=32, help="source and target length of every sentence")
    p.add_argument("--steps", type=int, default=1, help="timed steps per configuration and round")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (the best is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--mixes", default="balanced,skewed", help="batch mixes to time (see the module docstring)")
    p.add_argument("--dispatch", default="local,moelayer", help="expert dispatches to time (module docstring)")
    p.add_argument("--seed", type=int, default=1)
    return p


def _config(args: argparse.Namespace, modules: list[str], fam_path: str) -> Config:
    tree: dict[str, Any] = {}
    if args.config:
        tree["model"] = dict(load_config(args.config).to_dict()["model"])
    else:
        tree["model"] = {"embed_dim": args.embed_dim, "ffn_dim": args.ffn_dim, "encoder_layers": args.layers,
                         "decoder_layers": args.layers, "heads": args.heads, "max_positions": args.length + 8}
    tree["model"].update(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    tree["experts"] = {"modules": modules, "side": args.side, "families": fam_path}
    return config_from_dict(tree)


def _counts(cfg: Config, vocab: int, languages: list[str], ep: int) -> dict[str, int]:
    model = model_from_config(cfg, vocab, languages, ep_size=ep)
    params = list(model.parameters())
    return {"params": sum(p.numel() for p in params),
            "expert_params": sum(p.numel() for p in params if is_expert_param(p))}


def bench_experts(args: argparse.Namespace) -> dict[str, Any]:
    """Time every placement, print a table, write args.json if set; returns the results."""
    if args.threads:
        torch.set_num_threads(args.threads)
    fmap = load_family_map(args.families)
    languages = [lang for langs in fmap.families.values() for lang in langs]
    families, lang_family = fmap.assign(languages)
    n_sent = max(1, args.batch_tokens // args.length)
    g = torch.Generator().manual_seed(args.seed)
    src = torch.randint(4, args.vocab, (n_sent, args.length), generator=g)
    prev = torch.randint(4, args.vocab, (n_sent, args.length), generator=g)
    tgt = torch.randint(4, args.vocab, (n_sent, args.length), generator=g)
    first = [i for i, f in enumerate(lang_family) if f == 0]
    rest = [i for i, f in enumerate(lang_family) if f != 0]
    batches = {"balanced": torch.arange(n_sent) % len(languages),  # (B,) language of each sentence
               "skewed": torch.tensor([first[i % len(first)] if i % 2 == 0 else rest[i // 2 % len(rest)]
                                       for i in range(n_sent)])}
    mixes = [m for m in args.mixes.split(",") if m]
    unknown = [m for m in mixes if m not in batches]
    if unknown or not mixes:
        raise ValueError(f"--mixes: unknown mix {unknown[0] if unknown else '(none)'}; choices: balanced, skewed")
    dispatches = [d for d in args.dispatch.split(",") if d]
    if not dispatches or any(d not in ("local", "moelayer") for d in dispatches):
        raise ValueError(f"--dispatch {args.dispatch!r}: a comma list of local, moelayer")
    tokens = n_sent * args.length

    models = {}  # configuration -> (model, optimizer, counts, modules, dispatch)
    for placement, modules in PLACEMENTS.items():
        cfg = _config(args, modules, fmap.source)
        counts = {ep: (_counts(cfg, args.vocab, languages, ep) if (not modules or len(families) % ep == 0) else None)
                  for ep in (1, 2)}
        for dispatch in (dispatches if modules else ["-"]):
            torch.manual_seed(args.seed)
            model = model_from_config(cfg, args.vocab, languages, ep_size=1).train()
            set_local_dispatch(model, dispatch == "local")
            name = placement if dispatch == "-" else f"{placement}/{dispatch}"
            models[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-4), counts, placement, dispatch)
    timed = {(mix, name): {"wall": [], "cpu": []} for mix in mixes for name in models}

    def step(name: str, mix: str) -> None:
        model, opt = models[name][:2]
        logits = model(src, prev, batches[mix])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for mix, name in timed:  # warm-up: allocator, Adam state
        step(name, mix)
    for _ in range(args.rounds):
        for (mix, name), t in timed.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(name, mix)
            t["wall"].append(tokens * args.steps / (time.perf_counter() - t0))
            t["cpu"].append(tokens * args.steps / (time.process_time() - c0))

    rows = []
    for (mix, name), t in timed.items():
        dense = timed[(mix, "dense")]
        _, _, counts, placement, dispatch = models[name]
        rows.append({"mix": mix, "placement": placement, "dispatch": dispatch, "modules": PLACEMENTS[placement],
                     "tokens_per_s": max(t["wall"]), "ratio_to_dense": max(t["wall"]) / max(dense["wall"]),
                     "tokens_per_cpu_s": max(t["cpu"]), "cpu_ratio_to_dense": max(t["cpu"]) / max(dense["cpu"]),
                     "tokens_per_s_rounds": t["wall"], "tokens_per_cpu_s_rounds": t["cpu"],
                     "params_per_rank": {str(ep): (c["params"] if c else None) for ep, c in counts.items()},
                     "expert_params_per_rank": {str(ep): (c["expert_params"] if c else None)
                                                for ep, c in counts.items()}})
    model_cfg = _config(args, [], fmap.source).model
    result = {"benchmark": "experts", "device": "cpu", "threads": torch.get_num_threads(),
              "families": fmap.source, "num_families": len(families), "languages": languages,
              "side": args.side, "model": {k: getattr(model_cfg, k) for k in
                                           ("embed_dim", "ffn_dim", "encoder_layers", "decoder_layers", "heads")},
              "vocab": args.vocab, "tokens_per_step": tokens, "steps": args.steps, "rounds": args.rounds,
              "mixes": mixes, "dispatches": dispatches,
              "results": rows}
    _print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def _print_table(result: dict[str, Any]) -> None:
    print(f"| experts benchmark: {result['num_families']} families ({Path(result['families']).stem}), "
          f"side {result['side']}, model {result['model']}, vocab {result['vocab']}, "
          f"{result['tokens_per_step']} tokens/step, {result['threads']} threads")
    head = (f"{'mix':<9} {'placement':<10} {'dispatch':<9} {'tokens/s':>9} {'vs dense':>9} {'tok/cpu-s':>10} {'vs dense':>9} "
            f"{'params/rank ep1':>16} {'params/rank ep2':>16}")
    print(head)
    print("-" * len(head))
    for r in result["results"]:
        p1, p2 = r["params_per_rank"]["1"], r["params_per_rank"]["2"]
        print(f"{r['mix']:<9} {r['placement']:<10} {r['dispatch']:<9} {r['tokens_per_s']:>9.0f} {r['ratio_to_dense']:>8.2f}x "
              f"{r['tokens_per_cpu_s']:>10.0f} {r['cpu_ratio_to_dense']:>8.2f}x "
              f"{p1:>16,} {('n/a' if p2 is None else f'{p2:,}'):>16}")
