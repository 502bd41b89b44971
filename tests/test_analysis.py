"""The optimization analysis: lambda_max vs the exact Hessian, group-wise cos / gamma on 2
ZeRO-2 ranks vs one process, figures and the report from a short real run."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from helpers import TINY_MODEL, ds_config, launch, read_log, write_json

from cats_ds.analysis.hessian import language_loss, power_iteration, top_eigenvalue
from cats_ds.analysis.records import load_run
from cats_ds.analysis.report import evaluate_claims, write_report
from cats_ds.analysis.similarity import (GROUPS, AnalysisError, cos_gamma, group_grams, group_sizes, module_segments,
                                         param_group, parse_pairs, summarize)
from cats_ds.cli import analyze_main
from cats_ds.config import ModelConfig
from cats_ds.data.sampler import Batch
from cats_ds.model.transformer import build_model
from cats_ds.training.losses import per_language_sums

# resource groups of the tiny corpus (aa 400, bb 150, cc 50 pairs): aa Hi, bb and cc Lo
GROUPS_SPLIT = {"eval": {"lo_max": 200, "hi_min": 200}}


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tensors here are tiny: on the 2 shared cores, extra intra-op threads only
    spin (eigvalsh of the exact Hessian took 6 s with 2 threads, 20 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- Hessian


def _tiny_batch(vocab: int, n_langs: int, lang: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (3, 5), generator=g)
    src[0, 3:] = 0  # padding
    tgt = torch.randint(4, vocab, (3, 4), generator=g)
    tgt[1, 2:] = 0
    prev = torch.cat([torch.full((3, 1), 2), tgt[:, :-1]], dim=1)
    return Batch(src, prev, tgt, torch.full((3,), lang), torch.arange(3))


def test_power_iteration_equals_exact_hessian_top_eigenvalue():
    """lambda_max by power iteration with double-backward HVPs == the dominant eigenvalue
    of the exact Hessian (autograd.functional.hessian + eigvalsh), to 1e-3 relative, on a
    real (tiny) Transformer with label smoothing, padding and a pre-norm LayerNorm."""
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=4, ffn_dim=8, encoder_layers=1, decoder_layers=1, heads=2, dropout=0.0,
                      max_positions=16)
    model = build_model(cfg, vocab_size=12).double().eval()
    batch = _tiny_batch(12, n_langs=2, lang=1)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    # functional_call leaves a module whose embedding is reachable under two names (embed,
    # dec_embed) holding the last call's tensor instead of its Parameter: use a copy
    reference = copy.deepcopy(model)

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        """The same loss as language_loss, as a function of the flat parameter vector."""
        tensors, offset = {}, 0
        for name, shape in zip(names, shapes):
            n = math.prod(shape)
            tensors[name] = flat[offset:offset + n].view(shape)
            offset += n
        with sdpa_kernel(SDPBackend.MATH):
            logits = torch.func.functional_call(reference, tensors, (batch.src, batch.prev, batch.langs))
        loss_sum, _, tok = per_language_sums(logits, batch.tgt, batch.langs, 2, 0.1)
        return loss_sum[1] / tok[1]

    exact = torch.autograd.functional.hessian(loss_of, flat0, vectorize=True)  # (P, P)
    # symmetric up to the fp32 log_softmax of cats_ds.training.losses (the model itself is fp64 here)
    assert torch.allclose(exact, exact.T, atol=1e-6)
    eig = torch.linalg.eigvalsh((exact + exact.T) / 2)
    dominant = float(eig[eig.abs().argmax()])

    loss = language_loss(model, batch, 1, 2, smoothing=0.1)
    res = top_eigenvalue(loss, params, iters=2000, tol=1e-8, seed=3)
    assert res.converged, res.history[-5:]
    assert abs(res.value - dominant) <= 1e-3 * abs(dominant), (res.value, dominant, eig[-3:], eig[:3])
    assert len(params) > 20 and flat0.numel() > 300  # every kind of parameter of the model took part


def test_power_iteration_keeps_the_sign_and_reports_non_convergence():
    diag = torch.tensor([1.0, -3.0, 2.0], dtype=torch.float64)
    res = power_iteration(lambda v: [diag * v[0]], [diag], iters=200, tol=1e-12)
    assert res.converged and res.value == pytest.approx(-3.0, rel=1e-9)
    # +-2 of equal magnitude: the Rayleigh quotient cannot settle
    flip = torch.tensor([2.0, -2.0], dtype=torch.float64)
    res = power_iteration(lambda v: [flip * v[0]], [flip], iters=5, tol=1e-12)
    assert not res.converged and res.iters == 5
    with pytest.raises(ValueError, match="analysis.hessian_iters"):
        power_iteration(lambda v: v, [flip], iters=0, tol=1e-3)


# --------------------------------------------------------------------------- groups and pairs


def test_parameter_groups_by_name():
    model = build_model(ModelConfig(**TINY_MODEL), vocab_size=50)
    sizes = group_sizes(model)
    assert sum(sizes.values()) == sum(p.numel() for p in model.parameters())
    for g in ("Emb", "E.SA", "E.FC", "E.LN", "D.SA", "D.EA", "D.FC", "D.LN"):
        assert sizes[g] > 0, g
    assert sizes["experts"] == sizes["other"] == 0
    assert param_group("decoder_layers.1.cross_attn.k_proj.weight") == "D.EA"
    assert param_group("encoder_layers.0.norm2.bias") == "E.LN" and param_group("dec_norm.weight") == "D.LN"
    assert param_group("decoder_layers.0.ffn.deepspeed_moe.experts.deepspeed_experts.1.fc1.weight") == "D.FC"
    assert param_group("out_proj.experts.0.weight", expert=True) == "experts"
    noaffine = build_model(ModelConfig(**{**TINY_MODEL, "norm": "layernorm_noaffine"}), vocab_size=50)
    assert group_sizes(noaffine)["E.LN"] == group_sizes(noaffine)["D.LN"] == 0


def test_group_grams_and_pairs_on_a_plain_module():
    """Per-group Grams from a flat layout == dot products of the per-group pieces; cos and
    gamma follow their definitions; pair types aggregate the right pairs."""
    model = build_model(ModelConfig(**TINY_MODEL), vocab_size=50)
    n = sum(p.numel() for p in model.parameters())
    rows = torch.randn(3, n, generator=torch.Generator().manual_seed(1))
    grams = group_grams(rows, module_segments(model), block=1000)  # blocks split groups too
    assert torch.allclose(grams.sum(0), rows.double() @ rows.double().T, rtol=1e-10)
    offset, expect = 0, torch.zeros_like(grams)
    for name, p in model.named_parameters():
        piece = rows[:, offset:offset + p.numel()].double()
        expect[GROUPS.index(param_group(name))] += piece @ piece.T
        offset += p.numel()
    assert torch.allclose(grams, expect, rtol=1e-10)
    cos, gamma = cos_gamma(grams)
    q = GROUPS.index("D.FC")
    a, b = np.sqrt(grams[q, 0, 0].item()), np.sqrt(grams[q, 2, 2].item())
    assert cos[q, 0, 2] == pytest.approx(grams[q, 0, 2].item() / (a * b))
    assert gamma[q, 0, 2] == pytest.approx(2 * a * b / (a * a + b * b))
    assert np.isnan(cos[GROUPS.index("experts")]).all()  # no parameters: undefined, not 0
    resource = {"aa": "Hi", "bb": "Lo", "cc": "Lo"}
    res = summarize(["aa", "bb", "cc"], grams, group_sizes(model), resource, parse_pairs("cc:aa", ["aa", "bb", "cc"]))
    assert list(res["pairs"]) == ["cc:aa"] and res["pairs"]["cc:aa"]["type"] == "HiLo"
    assert res["pair_types"]["HiLo"]["n"] == 2 and res["pair_types"]["LoLo"]["n"] == 1
    all_cos, _ = cos_gamma(grams.sum(0))  # "all" is the cos of the summed Gram, not a mean over groups
    assert res["pair_types"]["HiLo"]["cos"]["all"] == pytest.approx((all_cos[0, 1] + all_cos[0, 2]) / 2)
    assert "experts" not in res["param_groups"] and "experts" not in res["pair_types"]["LoLo"]["cos"]
    assert "split_cos" not in res["pairs"]["cc:aa"]
    # split_cos: a PSD split Gram equal to G gives cos; a negative eigenvalue is projected away
    res = summarize(["aa", "bb", "cc"], grams, group_sizes(model), resource, [("aa", "bb")], split=grams)
    assert res["pairs"]["aa:bb"]["split_cos"] == pytest.approx(res["pairs"]["aa:bb"]["cos"])
    assert res["pair_types"]["HiLo"]["split_cos"] == pytest.approx(res["pair_types"]["HiLo"]["cos"])
    flipped = grams.clone()
    flipped[:, 0, 1] = flipped[:, 1, 0] = 2 * (flipped[:, 0, 0] * flipped[:, 1, 1]).sqrt()  # |cos| 2: not PSD
    res = summarize(["aa", "bb", "cc"], grams, group_sizes(model), resource, [("aa", "bb")], split=flipped)
    assert all(-1 - 1e-9 <= v <= 1 + 1e-9 for v in res["pairs"]["aa:bb"]["split_cos"].values())


def test_pairs_are_checked():
    langs = ["de", "af", "uk", "kk"]
    assert parse_pairs("de:af,uk:kk", langs) == [("de", "af"), ("uk", "kk")]
    assert len(parse_pairs([], langs)) == 6
    with pytest.raises(AnalysisError, match="unknown language 'xx' in 'de:xx'.*de, af, uk, kk"):
        parse_pairs(["de:xx"], langs)
    with pytest.raises(AnalysisError, match="analysis.pairs: 'de-af'"):
        parse_pairs(["de-af"], langs)


# --------------------------------------------------------------------------- 2 ranks vs 1 process


def test_group_similarity_on_zero2_partitions_equals_single_process(tmp_path, tiny_recipe):
    """cos, gamma and split_cos (batch halves) of every parameter group (and all parameters)
    from 2 ZeRO-2 ranks' gradient partitions == the single-process values (< 1e-5), with group boundaries
    inside the flat partitions; the per-language loss and lambda_max (languages spread
    over ranks) match too; and training around the analysis (dropout on) is exactly
    training without it."""
    ds = write_json(tmp_path / "z2.json", ds_config(2))
    recipe = tiny_recipe("check", model={"dropout": 0.1}, analysis={"sentences": 24}, **GROUPS_SPLIT)
    launch(["tests/scripts/analysis_check.py", "--deepspeed_config", ds, "--config", recipe,
            "--out", tmp_path / "out"], 2)
    spans = []
    for rank in (0, 1):
        res = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        record, ref = res["record"], res["ref"]
        assert set(record["pairs"]) == set(ref["pairs"]) == {"aa:bb", "aa:cc", "bb:cc"}
        worst = 0.0
        for pair, want in ref["pairs"].items():
            got = record["pairs"][pair]
            assert set(got["cos"]) == set(want["cos"]) and len(got["cos"]) == 9  # 8 groups + all
            assert set(got["split_cos"]) == set(want["split_cos"])
            for measure in ("cos", "gamma", "split_cos"):
                for group, v in want[measure].items():
                    worst = max(worst, abs(got[measure][group] - v))
        assert worst < 1e-5
        assert record["pairs"]["aa:bb"]["type"] == "HiLo" and record["pairs"]["bb:cc"]["type"] == "LoLo"
        for lang, v in ref["loss"].items():
            assert record["loss"][lang] == pytest.approx(v, rel=1e-5)
            # power iteration with a fixed number of steps: where the eigengap is small it carries the
            # two paths' summation-order differences further (2.3e-4 measured since the length pools
            # changed which sentences the run trains on before the analysis)
            assert record["lambda_max"][lang] == pytest.approx(ref["lambda_max"][lang], rel=1e-3)
        assert res["finite"]
        assert res["losses_analyzed"] == pytest.approx(res["losses_plain"], rel=1e-6)
        assert len(set(res["losses_plain"])) == 4  # four different updates
        spans.append(res)
    # the partition of some rank ends inside a parameter, and each spans several groups
    assert spans[0]["partial_params"] or spans[1]["partial_params"]
    assert all(len(s["partition_groups"]) >= 2 for s in spans)


# --------------------------------------------------------------------------- a short real run


def test_training_analysis_figures_and_report(tmp_path, tiny_recipe, capsys):
    """analysis.every during 2-rank ZeRO-2 training writes analysis.jsonl and TensorBoard
    scalars and images; the CLI on the checkpoint reproduces the in-training record in one
    process and draws every figure (two runs side by side) and the report."""
    ds = write_json(tmp_path / "z2.json", ds_config(2))
    recipe = tiny_recipe("an", train={"max_updates": 4, "valid_every": 2, "warmup_updates": 3, "tensorboard": True},
                         analysis={"every": 2, "sentences": 16, "pairs": ["aa:cc"]}, **GROUPS_SPLIT)
    launch(["launch/train.py", "--deepspeed_config", ds, "--config", recipe], 2)
    run = tmp_path / "an"
    assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4]
    records = [json.loads(line) for line in (run / "analysis.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert list(records[0]["pairs"]) == ["aa:cc"] and set(records[0]["pair_types"]) == {"HiLo", "LoLo"}
    assert all(math.isfinite(v) for r in records for v in r["lambda_max"].values())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "analysis/lambda_max/en-cc" in tags["scalars"] and "analysis/cos/HiLo/D.FC" in tags["scalars"]
    assert [e.step for e in acc.Scalars("analysis/cos/HiLo/all")] == [2, 4]
    assert "analysis/group_similarity" in tags["images"]

    # the CLI on the step-4 checkpoint; the run drawn twice to get panels side by side
    out = tmp_path / "figs"
    analyze_main(["--checkpoint", str(run / "latest"), "--run", f"first={run}", "--run", f"second={run}", "--out", str(out),
                  "--report", "analysis.sentences=16"])
    for name in ("lambda_max", "hilo_cos", "group_similarity", "loss_curves"):
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name
    # one process on the checkpoint == 2 ranks during training, at the same step and weights
    ckpt = json.loads((out / "analysis.json").read_text())
    last = records[-1]
    assert ckpt["step"] == last["step"] == 4
    for lang in ("aa", "bb", "cc"):
        assert ckpt["loss"][lang] == pytest.approx(last["loss"][lang], rel=1e-5)
        assert ckpt["lambda_max"][lang] == pytest.approx(last["lambda_max"][lang], rel=1e-4)
    for measure in ("cos", "gamma"):
        for group, v in last["pairs"]["aa:cc"][measure].items():
            assert ckpt["pairs"]["aa:cc"][measure][group] == pytest.approx(v, abs=1e-5)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert {"figures/lambda_max", "figures/loss_curves"} <= set(acc.Tags()["images"])
    report = json.loads((out / "report.json").read_text())
    claims = {c["name"]: c for c in report["claims"]}
    assert claims["hilo_orthogonal"]["holds"] is not None and "first: " in claims["hilo_orthogonal"]["measured"]
    assert claims["sharpness_temperature"]["holds"] is None  # no T=1 / T=inf pair among these runs
    md = (out / "report.md").read_text()
    assert "![lambda_max](lambda_max.png)" in md and "| hilo_orthogonal |" in md

    capsys.readouterr()
    with pytest.raises(SystemExit):
        analyze_main(["--checkpoint", str(run / "latest"), "--pairs", "aa:zz", "--out", str(out)])
    assert "--pairs: unknown language 'zz' in 'aa:zz'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        analyze_main(["--checkpoint", str(run / "latest"), "--out", str(out), "model.heads=2"])
    assert "only analysis.*, eval.lo_max, eval.hi_min and eval.groups" in capsys.readouterr().err


# --------------------------------------------------------------------------- report logic


def _fake_run(root, name, temperature, norm="layernorm", method="temperature", lo_lambda=1.0, hilo=0.02,
              lo_valid=2.5, lo_converged=True):
    """A run folder with a checkpoint config, two analyses (updates 5 and 20, warm-up 10)
    and train / valid logs: every train loss 2.0, Lo valid loss `lo_valid`."""
    run = root / name
    (run / "latest").mkdir(parents=True)
    cfg = {"sampling": {"temperature": temperature}, "model": {"norm": norm}, "weighting": {"method": method},
           "experts": {"modules": []}, "train": {"warmup_updates": 10}}
    (run / "latest" / "cats_ds.json").write_text(json.dumps({"config": cfg, "languages": ["hi", "lo"]}))
    records = [{"step": step, "resource": {"hi": "Hi", "lo": "Lo"}, "lambda_max": {"hi": 1.0, "lo": lo_lambda},
                "hessian": {"hi": {"converged": True}, "lo": {"converged": lo_converged}},
                "pair_types": {"HiLo": {"n": 1, "cos": {"all": hilo, "D.FC": 2 * hilo}, "gamma": {"all": 0.5}}}}
               for step in (5, 20)]
    (run / "analysis.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    log = [{"kind": "train", "step": s, "loss": 2.0, "loss_lang": {"hi": 2.0, "lo": 2.0}} for s in range(1, 21)]
    log.append({"kind": "valid", "step": 20, "mean_loss": 2.5,
                "langs": {"hi": {"loss": 2.2, "nll": 2.0}, "lo": {"loss": lo_valid, "nll": 2.0}}})
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return run


def test_report_judges_each_claim(tmp_path):
    runs = [load_run(_fake_run(tmp_path, "t1", 1.0, lo_lambda=2.0)),
            load_run(_fake_run(tmp_path, "tinf", float("inf"), lo_lambda=5.0)),
            load_run(_fake_run(tmp_path, "t5", 5.0, lo_valid=2.8)),
            load_run(_fake_run(tmp_path, "noaffine", 5.0, norm="layernorm_noaffine", lo_valid=2.3)),
            load_run(_fake_run(tmp_path, "cats", 1.0, method="cats", lo_valid=2.4, hilo=0.3))]
    claims = {c.name: c for c in evaluate_claims(runs)}
    # early = update 5 (<= warm-up 10): Lo lambda 5 under T=inf vs 2 under T=1
    assert claims["sharpness_temperature"].holds is True and "5 vs" in claims["sharpness_temperature"].measured
    # gap = Lo valid - Lo train: 0.3 (noaffine) vs 0.8 (t5, same temperature)
    assert claims["noaffine_gap"].holds is True and "noaffine 0.300" in claims["noaffine_gap"].measured
    assert "t5 0.800" in claims["noaffine_gap"].measured
    # Lo valid 2.4 (cats, T=1) vs 2.5 (t1)
    assert claims["cats_low_resource"].holds is True and "t1 2.500" in claims["cats_low_resource"].measured
    # after warm-up (update 20) cats' HiLo cos is 0.3 > 0.1
    assert claims["hilo_orthogonal"].holds is False and "cats: +0.300" in claims["hilo_orthogonal"].measured
    assert "t1: +0.020" in claims["hilo_orthogonal"].measured

    flipped = [load_run(_fake_run(tmp_path / "b", "t1", 1.0, lo_lambda=6.0)),
               load_run(_fake_run(tmp_path / "b", "tinf", float("inf"), lo_lambda=5.0)),
               load_run(_fake_run(tmp_path / "b", "cats", 1.0, method="cats", lo_valid=2.6))]
    flipped_claims = {c.name: c for c in evaluate_claims(flipped)}
    assert flipped_claims["sharpness_temperature"].holds is False
    assert flipped_claims["cats_low_resource"].holds is False
    assert flipped_claims["hilo_orthogonal"].holds is True
    loose = [runs[0], load_run(_fake_run(tmp_path / "c", "tinf", float("inf"), lo_lambda=5.0, lo_converged=False))]
    loose_claim = {c.name: c for c in evaluate_claims(loose)}["sharpness_temperature"]
    assert loose_claim.holds is None and "no converged early lambda_max" in loose_claim.measured
    alone = {c.name: c for c in evaluate_claims(runs[:1])}
    assert alone["sharpness_temperature"].holds is None and "T=inf" in alone["sharpness_temperature"].measured
    assert alone["noaffine_gap"].holds is None and alone["cats_low_resource"].holds is None
    md, _ = write_report(runs, tmp_path / "report")
    text = md.read_text()
    assert "| sharpness_temperature |" in text and "| no |" in text and "| yes |" in text


def test_default_output_is_beside_the_checkpoint(tmp_path):
    """best/ and latest/ are replaced whole at the next save: the analysis must not live inside."""
    from cats_ds.analysis.analyze import default_out_dir

    assert default_out_dir(tmp_path / "run" / "best") == (tmp_path / "run" / "analysis" / "best").resolve()
