"""bf16 on the CPU accelerator, our stand-in for GPU precision: every shipped bf16
DeepSpeed config trains on 2 gloo ranks, the Gram matrix from bf16 partitions matches the
fp32 one-process reference, and the checkpoints resume, evaluate, average and export.

A covering set of launches rather than the full product (precision x ZeRO x method x
experts): every value of each axis appears at least once (docs/precision.md):

    launch                 ZeRO  methods (one meta step each)        experts
    gram[0]                0     cats, mgda                          -
    gram[1]                1     cats, gradnorm, pcgrad              -
    gram[2]                2     cats, gradvac x2, cagrad            -
    gram[3]                3     cats, nashmtl, imtl                 -
    zero2_bf16 (+resume)   2     temperature, dev translation        -
    zero3_bf16             3     cats (training loop)                -
    zero1_bf16             1     gradnorm (training loop)            all, ep_size 2
    zero2_offload_bf16     2     temperature                         ffn, ep_size 1

fp16 cannot train on the CPU accelerator; its loss-scale and overflow paths are unit
tests at the end of this file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from helpers import REPO, ds_config, launch, read_log, write_json

TRAIN = "launch/train.py"
META = "tests/scripts/meta_check.py"
SHIPPED = REPO / "ds_configs"
BF16 = {"bf16": {"enabled": True}}

# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3) in weights and activations;
# at the same weights the per-language gradients of the tiny 2+2-layer model differ from the
# fp32 ones by about that much (measured: largest |G - G_ref| / max |G_ref| 0.06-0.20% over
# the four stages and eight methods), so the Gram is held to 1% of its largest entry, the
# losses to 1% and the methods' weights to 1% (+0.005).
GRAM_TOL = 0.01
LOSS_TOL = 0.01

METHODS_BY_STAGE = {0: ["cats", "mgda"], 1: ["cats", "gradnorm", "pcgrad"],
                    2: ["cats", "gradvac", "gradvac", "cagrad"], 3: ["cats", "nashmtl", "imtl"]}
# the optimizer wrapper DeepSpeed 0.19 picks, i.e. where the gradient partition lives: ZeRO-1
# with fp32 gradient accumulation is the BF16_Optimizer (a flat fp32 buffer of whole
# parameters); ZeRO-1 with the default bf16 accumulation (the shipped zero1_bf16.json, trained
# below) is the ZeRO optimizer, as stage 2
OPTIMIZER_BY_STAGE = {0: "FP16_UnfusedOptimizer", 1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer",
                      3: "DeepSpeedZeroOptimizer_Stage3"}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_gram_from_partitions_matches_fp32_reference(tmp_path, tiny_recipe, stage):
    """One meta step per method through the real meta_update on bf16 ZeRO-`stage`
    partitions (gradient accumulation 2, clipping): the Gram matrix and losses each
    method was given match the one-process fp32 full-gradient reference at the same
    weights (loaded from the engine before each step), the weights
    it computed match the reference method's on the reference Gram, and the step moved
    the weights."""
    methods = METHODS_BY_STAGE[stage]
    extra = {"data_types": {"grad_accum_dtype": "fp32"}} if stage == 1 else {}
    ds = write_json(tmp_path / "ds.json", ds_config(stage, gas=2, clip=0.5, **BF16, **extra))
    recipe = tiny_recipe("gram", weighting={"method": "cats"}, sampling={"langs_per_batch": 3},
                         train={"warmup_init_lr": 0.003, "adam_eps": 1e-3})
    launch([META, "--deepspeed_config", ds, "--config", recipe, "--out", tmp_path / "out",
            "--methods", ",".join(methods), "--sync"], 2)
    for rank in (0, 1):
        rows = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        assert [r["method"] for r in rows] == methods
        for r in rows:
            gram, ref = np.array(r["gram"]), np.array(r["ref_gram"])
            err = np.abs(gram - ref).max() / np.abs(ref).max()
            print(f"rank {rank} ZeRO-{stage} {r['optimizer']} {r['method']}: Gram error {err:.2e}, "
                  f"weights {np.round(r['weights'], 4)} ref {np.round(r['ref_weights'], 4)}")
            assert len(r["langs"]) == 3 and err < GRAM_TOL, r
            assert np.allclose(r["losses"], r["ref_losses"], rtol=LOSS_TOL), r
            assert np.isfinite(r["weights"]).all() and r["param_moved"] > 1e-4, r
            assert np.allclose(r["weights"], r["ref_weights"], rtol=0.01, atol=0.005), r
        assert rows[0]["optimizer"] == OPTIMIZER_BY_STAGE[stage]


# --------------------------------------------------------------------------- decoding in bf16


def test_bf16_decoding_gives_the_fp32_hypotheses_on_most_sentences(tiny_data):
    """A tiny model trained in-process until it translates the made-up languages, then
    beam 5 over every test sentence in fp32 and in bf16 (evaluate --dtype bf16 casts the
    same way): no dtype clash in the beam scores, and most hypotheses are identical
    (measured on one thread: 79 of 90, 88%; bf16 rounding reorders near-ties of this small
    model)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernels' reduction order, hence near-ties, depend on it (other tests change it)
    try:
        same, total = _bf16_vs_fp32_hypotheses(tiny_data)
    finally:
        torch.set_num_threads(threads)
    print(f"bf16 == fp32 hypotheses: {same}/{total}")
    assert total == 90 and same >= 0.8 * total


def _bf16_vs_fp32_hypotheses(tiny_data) -> tuple[int, int]:
    import dataclasses

    import torch.nn.functional as F

    from cats_ds.config import config_from_dict
    from cats_ds.data.manifest import PAD, Manifest, Vocab, load_split
    from cats_ds.data.sampler import Plan, collate
    from cats_ds.inference.evaluate import decode_batches, decode_chunk
    from cats_ds.model.transformer import build_model
    from helpers import TINY_MODEL

    manifest = Manifest.load(tiny_data)
    vocab, langs = Vocab(tiny_data, manifest.languages), list(manifest.languages)
    train, test = (load_split(tiny_data, manifest, split, langs) for split in ("train", "test"))
    cfg = config_from_dict({"data": {"dir": str(tiny_data)}, "model": dict(TINY_MODEL)})
    tag_ids = [vocab.lang_ids[lang] for lang in langs]
    torch.manual_seed(0)
    model = build_model(cfg.model, len(vocab))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    for step in range(600):
        li = step % len(langs)
        b = collate(Plan([li], [rng.choice(len(train[langs[li]]), 24, replace=False)]), train, langs, tag_ids)
        loss = F.cross_entropy(model(b.src, b.prev, b.langs).flatten(0, 1), b.tgt.flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0  # it translates: bf16 is compared on real hypotheses, not noise
    model.eval()
    ecfg = dataclasses.replace(cfg.eval, beam=5)
    half = build_model(cfg.model, len(vocab))
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16).eval()
    same = total = 0
    for li, lang in enumerate(langs):
        for chunk in decode_batches(test[lang], len(test[lang]), ecfg.batch_tokens):
            a = decode_chunk(model, test[lang], chunk, tag_ids[li], li, ecfg)
            b = decode_chunk(half, test[lang], chunk, tag_ids[li], li, ecfg)
            same += sum(x == y for x, y in zip(a, b))
            total += len(a)
    return same, total


# --------------------------------------------------------------------------- the shipped configs train

FAMILIES = {"x": ["aa", "bb"], "y": ["cc"]}  # two families: ep_size 2 puts one on each rank
SHIPPED_RUNS = {
    # config file: recipe sections (every run: 2 ranks, 4 updates, step_<n>/ at 2 and 4)
    "zero3_bf16.json": {"weighting": {"method": "cats"}, "meta": {"every": [[None, 2]]}},
    "zero1_bf16.json": {"weighting": {"method": "gradnorm"}, "meta": {"every": [[None, 2]]},
                        "experts": {"modules": ["all"], "ep_size": 2}},
    "zero2_offload_bf16.json": {"experts": {"modules": ["ffn"], "ep_size": 1}},
}


@pytest.mark.parametrize("config", list(SHIPPED_RUNS))
def test_shipped_bf16_config_trains_and_its_checkpoint_is_usable(tmp_path, tiny_recipe, config):
    """The shipped file as it is, on 2 gloo ranks: 4 finite updates (meta steps of CATS /
    GradNorm move the weights), then the bf16 checkpoint evaluates in bf16, its two
    step_<n>/ checkpoints average, and the average exports to CTranslate2."""
    from cats_ds.inference.average import average_checkpoints
    from cats_ds.inference.evaluate import evaluate_checkpoint
    from cats_ds.inference.export import export_checkpoint

    sections = {k: dict(v) for k, v in SHIPPED_RUNS[config].items()}
    if "experts" in sections:
        (tmp_path / "families.yaml").write_text(yaml.safe_dump(FAMILIES))
        sections["experts"]["families"] = str(tmp_path / "families.yaml")
    sections.setdefault("train", {}).update(max_updates=4, save_every=2, valid_every=2)
    recipe = tiny_recipe("run", **sections)
    launch([TRAIN, "--deepspeed_config", SHIPPED / config, "--config", recipe], 2)
    run = tmp_path / "run"
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)
    weights = {k: v for k, v in log[-1]["weighting"].items() if k.startswith(("alpha/", "weight/"))}
    if sections.get("weighting"):
        assert weights and any(abs(v - 1.0) > 1e-6 for v in weights.values()), weights
    report = evaluate_checkpoint(run / "best", limit=5, out_dir=tmp_path / "eval", dtype="bf16")
    assert set(report["languages"]) == {"aa", "bb", "cc"} and report["settings"]["dtype"] == "bf16"
    avg = average_checkpoints([run / "step_2", run / "step_4"], tmp_path / "avg")
    export_checkpoint(avg, tmp_path / "ct2")
    assert list((tmp_path / "ct2").rglob("model.bin"))


# --------------------------------------------------------------------------- every shipped file, fp16 logic


def test_every_shipped_ds_config_is_valid_and_exercised():
    """Each file in ds_configs/ passes the config check at 1 and 2 ranks, and is either
    launched by a test (named here, checked to exist) or is fp16, which the CPU accelerator
    cannot train (its logic: the unit tests below)."""
    from cats_ds.config import load_config
    from cats_ds.training.loop import load_ds_config

    launched_by = {"cpu_zero0.json": "test_train.py", "cpu_zero1.json": "test_grads.py",
                   "cpu_zero2.json": "test_train.py", "zero2_bf16.json": "test_gpu_check.py",
                   **{name: "test_bf16.py" for name in SHIPPED_RUNS}}
    cfg = load_config(None, [])
    names = sorted(p.name for p in SHIPPED.glob("*.json"))
    for name in names:
        for world in (1, 2):
            ds = load_ds_config(str(SHIPPED / name), world, cfg)
            assert ds["train_micro_batch_size_per_gpu"] == 1
        if "fp16" in name:
            assert ds["fp16"]["enabled"] and name not in launched_by
            continue
        test_file = REPO / "tests" / launched_by[name]
        assert f"ds_configs/{name}" in test_file.read_text() or name in SHIPPED_RUNS, (name, test_file)
    assert {n for n in names if "fp16" not in n} == set(launched_by)


class _FakeEngine:
    """What PartitionGrads reads of a DeepSpeed engine: the stage, the module, the optimizer."""

    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer

    def zero_optimization_stage(self):
        return 0


def test_fp16_loss_scale_is_divided_out_of_the_gram():
    """Under fp16 the captured gradients are multiplied by DeepSpeed's dynamic loss scale
    (FP16_Optimizer.cur_scale, ZeRO's loss_scale): the Gram of the half rows is divided by
    scale^2, so G and S equal the unscaled ones, and the losses and nll are untouched."""
    from types import SimpleNamespace

    from cats_ds.training.grads import HalfGrads, PartitionGrads, fold_halves, half_grams

    torch.manual_seed(0)
    rows = torch.randn(6, 60, dtype=torch.float64)  # halves a, b of 3 languages; the Linear(5, 10) weight and bias
    rho = torch.tensor([[0.5, 0.5], [0.4, 0.6], [1.0, 0.0]], dtype=torch.float64)
    losses, nll, tokens = torch.tensor([2.0, 4.0, 9.0]), torch.tensor([1.0, 3.0, 6.0]), torch.tensor([2.0, 2.0, 3.0])
    plain, split, _, _ = fold_halves(rows @ rows.T, rho)
    module = torch.nn.Linear(5, 10)
    for attr in ("cur_scale", "loss_scale"):
        grads = PartitionGrads(_FakeEngine(module, SimpleNamespace(**{attr: 1024.0})))
        grads._layout = [50, 10]
        got = half_grams(grads, HalfGrads([0, 1, 2], rows * 1024.0, rho, losses, nll, tokens, {}))
        assert torch.allclose(got.plain, plain, rtol=1e-12) and torch.allclose(got.split, split, rtol=1e-12)
        assert got.losses.tolist() == [1.0, 2.0, 3.0] and got.nll.tolist() == [0.5, 1.5, 2.0]
    grads = PartitionGrads(_FakeEngine(module, SimpleNamespace()))  # bf16 / fp32: no scale
    assert grads.loss_scale() == 1.0


def test_fp16_overflow_skips_the_weighting_update_not_the_step():
    """An fp16 overflow makes G non-finite: train.weighting_update hands the step to
    weighting.skip (weights unchanged, counted in meta/skipped) for every method, and a
    finite G afterwards updates them."""
    from types import SimpleNamespace

    from cats_ds.config import load_config
    from cats_ds.training.loop import weighting_update
    from cats_ds.weighting import make_weighting

    langs, shares = [0, 1, 2], {0: 0.5, 1: 0.3, 2: 0.2}
    losses = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    good = torch.tensor([[2.0, 0.3, 0.1], [0.3, 1.0, 0.2], [0.1, 0.2, 0.5]], dtype=torch.float64)
    for method in ("cats", "gradnorm", "mgda", "pcgrad", "gradvac", "cagrad", "nashmtl", "imtl"):
        cfg = load_config(None, [f"weighting.method={method}"])
        run = SimpleNamespace(step=0, weighting=make_weighting(cfg, ["aa", "bb", "cc"], 100))
        before = [run.weighting.weight(lang) for lang in langs]
        bad = good.clone()
        bad[1, 1] = float("inf")
        weighting_update(run, langs, losses, bad, shares)
        assert [run.weighting.weight(lang) for lang in langs] == before, method
        assert run.weighting.scalars()["meta/skipped"] == 1.0, method
        run.step = 1
        weighting_update(run, langs, losses, good, shares)
        assert np.isfinite([run.weighting.weight(lang) for lang in langs]).all(), method
