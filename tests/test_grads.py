"""The CATS hook on ZeRO partitions: 2 gloo ranks vs a 1-process full-gradient reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import ds_config, launch, read_log, write_json

SCRIPT = "tests/scripts/meta_check.py"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_gram_from_partitions_and_cats_step(tmp_path, tiny_recipe, stage):
    """G and the split S from 2 ranks' partitions of the halves == from full gradients of
    the same halves in one process (gradient accumulation 2); G from halves == the Gram of
    the whole slots (one backward per language, as before halves); the nll handed on
    matches; and the parameters after one CATS step == a reference Adam step on sum_n
    alpha_n L_n (with DeepSpeed's clipping)."""
    ds = write_json(tmp_path / "ds.json", ds_config(stage, gas=2, clip=0.5))
    recipe = tiny_recipe("meta", weighting={"method": "cats"}, cats={"loss_term": "descent"},  # alpha moves at step 0
                         train={"warmup_init_lr": 0.003, "adam_eps": 1e-3})
    launch([SCRIPT, "--deepspeed_config", ds, "--config", recipe, "--out", tmp_path / "out"], 2)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        assert res["langs"] == res["ref_langs"] and len(res["langs"]) >= 2
        gram, ref = np.array(res["gram"]), np.array(res["ref_gram"])
        assert np.abs(gram - ref).max() / np.abs(ref).max() < 1e-5
        assert res["whole_langs"] == res["langs"]
        whole = np.array(res["whole_gram"])  # plain from halves is the whole slots' Gram
        assert np.abs(gram - whole).max() / np.abs(whole).max() < 1e-5
        split, ref_split = np.array(res["split"]), np.array(res["ref_split"])
        assert np.abs(split - ref_split).max() / np.abs(ref_split).max() < 1e-5
        assert np.allclose(res["noise"], res["ref_noise"], rtol=1e-4)
        assert np.allclose(res["agreement"], res["ref_agreement"], rtol=1e-5, atol=1e-6)
        assert np.allclose(np.array(res["rho"]).sum(1), 1.0) and (np.array(res["rho"]) > 0.3).all()
        assert np.allclose(res["losses"], res["ref_losses"], rtol=1e-5)
        assert np.allclose(res["losses"], res["whole_losses"], rtol=1e-5)
        assert np.allclose(res["nll"], res["ref_nll"], rtol=1e-5)
        assert np.abs(np.array(res["nll"]) - res["losses"]).min() > 1e-4  # the un-smoothed NLL, not the loss
        assert res["param_moved"] > 1e-3  # the step did move the weights ...
        assert res["param_diff"] < 1e-3 * res["param_moved"]  # ... exactly as the reference did
        assert all(a != 1.0 for a in np.array(res["alpha"])[res["langs"]])  # alpha was updated


def test_split_gram_with_small_slots_and_empty_halves(tmp_path, tiny_recipe):
    """Slots of one to four sentences (train.max_tokens=48): a slot of one sentence has an
    empty half b on every rank (in both micro-steps: its S row and column are G's; in one:
    the other micro-step's halves give S), and a half of one sentence leaves the other
    rank with none (it runs the filler at weight 0). G, S, v and the losses still equal the
    one-process reference on the same halves (2 ranks, ZeRO-2, gradient accumulation 2)."""
    ds = write_json(tmp_path / "ds.json", ds_config(2, gas=2, clip=0.5))
    recipe = tiny_recipe("small", weighting={"method": "cats"}, sampling={"langs_per_batch": 3},
                         train={"max_tokens": 48, "warmup_init_lr": 0.003, "adam_eps": 1e-3})
    launch([SCRIPT, "--deepspeed_config", ds, "--config", recipe, "--out", tmp_path / "out"], 2)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        rho = np.array(res["rho"])
        print(rank, "rho", rho.round(3).tolist())
        assert res["langs"] == res["ref_langs"] == res["whole_langs"]
        empty = (rho == 0).any(axis=1)
        assert empty.any() and not empty.all()  # a language with an empty half, and one with two halves
        for key in ("gram", "split"):
            got, ref = np.array(res[key]), np.array(res[f"ref_{key}"])
            assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5, key
        whole = np.array(res["whole_gram"])
        assert np.abs(np.array(res["gram"]) - whole).max() / np.abs(whole).max() < 1e-5
        noise, ref_noise = np.array(res["noise"], dtype=float), np.array(res["ref_noise"], dtype=float)
        assert np.array_equal(np.isnan(noise), (rho == 0).any(axis=1))
        assert np.allclose(noise, ref_noise, rtol=1e-4, equal_nan=True)
        assert np.allclose(res["losses"], res["ref_losses"], rtol=1e-5)
        assert res["param_moved"] > 1e-3 and res["param_diff"] < 1e-3 * res["param_moved"]


def test_gramspace_methods_on_zero2_partitions(tmp_path, tiny_recipe):
    """issue 12: on 2 gloo ranks with ZeRO-2 (accumulation 2, clipping), one meta step
    with each of PCGrad, GradVac, CAGrad, Nash-MTL, IMTL-G (in turn, one launch) moves
    the parameters exactly as a 1-process reference step on sum_n c_n g_n, with c from the
    method on the full-gradient Gram matrix; the weights kept for the steps between meta
    steps are the reference's."""
    methods = ["pcgrad", "gradvac", "gradvac", "cagrad", "nashmtl", "imtl"]  # GradVac's 1st step sets targets
    ds = write_json(tmp_path / "ds.json", ds_config(2, gas=2, clip=0.5))
    recipe = tiny_recipe("gram", weighting={"method": "pcgrad"}, sampling={"langs_per_batch": 3},
                         train={"warmup_init_lr": 0.003, "adam_eps": 1e-3})
    launch([SCRIPT, "--deepspeed_config", ds, "--config", recipe, "--out", tmp_path / "out",
            "--methods", ",".join(methods)], 2)
    for rank in (0, 1):
        rows = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        assert [r["method"] for r in rows] == methods
        for r in rows:
            print(rank, r["method"], "K", len(r["langs"]), "weights", np.round(r["weights"], 4),
                  f"diff/moved {r['param_diff'] / r['param_moved']:.2e}")
            assert len(r["langs"]) == 3 and r["gram_kind"] == "split"  # grads.gram's default for these
            assert np.allclose(r["gram"], r["ref_gram"], rtol=1e-5, atol=1e-5 * np.abs(r["ref_gram"]).max()), r
            assert np.allclose(r["nll"], r["ref_nll"], rtol=1e-5), r
            assert r["param_moved"] > 1e-4 and r["param_diff"] < 1e-3 * r["param_moved"], r
            assert np.allclose(r["weights"], r["ref_weights"], rtol=1e-5, atol=1e-7), r
        for r in rows[2:]:  # GradVac's vaccine (2nd step), CAGrad, Nash-MTL, IMTL-G move the weights off 1
            assert np.abs(np.array(r["weights"]) - 1).max() > 1e-3, r


def test_cats_resume_reproduces_alpha_and_lambda(tmp_path, tiny_recipe):
    """Resume mid-run reproduces the alpha / lambda trajectories exactly."""
    ds = write_json(tmp_path / "z2.json", ds_config(2))
    cats, meta = {"lr_alpha": 0.05}, {"every": [[None, 2]]}
    full = tiny_recipe("full", weighting={"method": "cats"}, cats=cats, meta=meta,
                       train={"max_updates": 12, "valid_every": 6})
    part = tiny_recipe("part", weighting={"method": "cats"}, cats=cats, meta=meta,
                       train={"max_updates": 6, "valid_every": 6})
    launch(["launch/train.py", "--deepspeed_config", ds, "--config", full], 2)
    launch(["launch/train.py", "--deepspeed_config", ds, "--config", part], 2)
    launch(["launch/train.py", "--deepspeed_config", ds, "--config", part, "train.max_updates=12"], 2)
    ref, got = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        wa, wb = a["weighting"], b["weighting"]
        assert set(wa) == set(wb) and any(k.startswith("alpha/") for k in wa)
        for key in wa:
            if key.startswith(("alpha/", "cats/")):
                assert wb[key] == pytest.approx(wa[key], rel=1e-9, abs=1e-12), (a["step"], key)
    assert ref[-1]["weighting"]["cats/lambda_c"] > 0


@pytest.mark.parametrize("method", ["gradnorm", "mgda", "pcgrad", "nashmtl"])
def test_other_gram_methods_train(tmp_path, tiny_recipe, method):
    ds = "ds_configs/cpu_zero1.json"  # the shipped file as it is
    recipe = tiny_recipe(method, weighting={"method": method}, meta={"every": [[None, 2]]},
                         train={"max_updates": 4})
    launch(["launch/train.py", "--deepspeed_config", ds, "--config", recipe], 2)
    log = read_log(tmp_path / method)
    assert len(log) == 4 and all(np.isfinite(r["loss"]) for r in log)
    assert any(k.startswith("weight/") for k in log[-1]["weighting"])


def test_meta_batches_from_dev(tmp_path, tiny_recipe):
    ds = write_json(tmp_path / "z2.json", ds_config(2))
    recipe = tiny_recipe("dev", weighting={"method": "cats"}, meta={"every": [[None, 2]], "data": "dev"},
                         train={"max_updates": 4})
    launch(["launch/train.py", "--deepspeed_config", ds, "--config", recipe], 2)
    log = read_log(tmp_path / "dev")
    w = log[-1]["weighting"]
    assert len(log) == 4 and any(v != 1.0 for k, v in w.items() if k.startswith("alpha/"))  # dev moved alpha
    assert w["cats/alpha_sum"] == pytest.approx(3.0, abs=1e-9)


def test_non_finite_gram_skips_the_weighting_update(tmp_path, tiny_recipe):
    """An inf in one rank's partial Gram (an fp16 overflow at step 0) makes G non-finite on
    every rank: both skip the alpha update, both still take the training step, and
    training goes on with later meta steps updating alpha."""
    ds = write_json(tmp_path / "z2.json", ds_config(2))
    recipe = tiny_recipe("skip", weighting={"method": "cats"}, meta={"every": [[None, 2]]},
                         train={"max_updates": 6, "warmup_init_lr": 0.003})
    launch(["tests/scripts/skip_check.py", "--deepspeed_config", ds, "--config", recipe, "--out", tmp_path / "out"], 2)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        assert res["alpha_after_skip"] == [1.0, 1.0, 1.0]  # the weighting update was skipped ...
        assert res["moved"] > 1e-4                          # ... the training step was not
        assert res["step"] == 6 and res["skipped"] == 1 and res["meta_steps"] == 2  # steps 2 and 4
        assert res["alpha_end"] != [1.0, 1.0, 1.0] and np.isfinite(res["alpha_end"]).all()
    log = read_log(tmp_path / "skip")
    assert [r["step"] for r in log] == [2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in log)  # fit() logs
    assert log[-1]["weighting"]["meta/skipped"] == 1.0


@pytest.mark.parametrize("gas", [1, 2])
def test_cats_at_alpha_one_is_the_temperature_run(tmp_path, tiny_recipe, gas):
    """meta.weight_by=tokens: with alpha held at 1 (lr_alpha = lr_lambda = 0), CATS trains
    exactly like the temperature baseline at the same T and sampler, meta steps included
    (their sum_n S_n g_n is the plain update). 20 updates, 1 process."""
    ds = write_json(tmp_path / "z0.json", ds_config(0, gas=gas))
    common = {"sampling": {"temperature": 5.0, "langs_per_batch": 2, "distinct": True},
              "train": {"max_updates": 20, "valid_every": 100}}
    # the reference: a temperature run with the same meta-step schedule and
    # sampling.draws_at_meta_steps=true trains on the draws as drawn at those updates and on
    # length-pooled micro-batches between them, as CATS does (train.draws_as_drawn); a plain
    # temperature run pools every update (tests/test_batches.py)
    temp = tiny_recipe("temp", weighting={"method": "temperature"}, meta={"every": [[None, 3]]},
                       sampling={**common["sampling"], "draws_at_meta_steps": True},
                       **{k: v for k, v in common.items() if k != "sampling"})
    cats = tiny_recipe("cats", weighting={"method": "cats"},
                       cats={"lr_alpha": 0.0, "lr_lambda": 0.0}, meta={"every": [[None, 3]]}, **common)
    launch(["launch/train.py", "--deepspeed_config", ds, "--config", temp], 1)
    launch(["launch/train.py", "--deepspeed_config", ds, "--config", cats], 1)
    ref, got = read_log(tmp_path / "temp"), read_log(tmp_path / "cats")
    assert len(ref) == len(got) == 20
    assert all(v == 1.0 for k, v in got[-1]["weighting"].items() if k.startswith("alpha/"))
    diffs = [abs(b["loss"] - a["loss"]) / a["loss"] for a, b in zip(ref, got)]
    print("max relative loss difference over 20 updates:", max(diffs))
    assert max(diffs) < 1e-6  # float32 summation order of K backwards vs one (measured ~1e-7)
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.1  # it did train


def test_gram_methods_refused_under_optimizer_offload(tmp_path):
    from cats_ds.config import load_config
    from cats_ds.training.loop import TrainError, load_ds_config

    path = write_json(tmp_path / "offload.json", ds_config(2, zero_optimization={
        "stage": 2, "offload_optimizer": {"device": "cpu"}}))
    for method in ("cats", "gradnorm", "mgda", "pcgrad", "gradvac", "cagrad", "nashmtl", "imtl"):
        cfg = load_config(None, [f"weighting.method={method}"])
        with pytest.raises(TrainError, match=rf"offload\.json: zero_optimization\.offload_optimizer\.device='cpu' "
                                             rf"is not supported with weighting\.method={method}"):
            load_ds_config(str(path), 1, cfg)
    assert load_ds_config(str(path), 1, load_config(None, []))["zero_optimization"]["stage"] == 2


def test_weighting_blow_up_exits_2(tmp_path, tiny_recipe):
    """issue 15: lr_alpha=1e6 stops at the first out-of-range alpha with the message and
    exit status 2, no traceback, no OverflowError."""
    ds = write_json(tmp_path / "z0.json", ds_config(0))
    recipe = tiny_recipe("blow", weighting={"method": "cats"}, cats={"update": "lagrangian", "lr_alpha": 1e6,
                                                                        "loss_term": "descent"})
    proc = launch(["launch/train.py", "--deepspeed_config", ds, "--config", recipe], 1, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: CATS alpha out of range at step 0" in proc.stderr and "cats.lr_alpha=1000000.0" in proc.stderr
    assert "Traceback" not in proc.stderr and "OverflowError" not in proc.stderr
