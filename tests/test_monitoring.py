"""DeepSpeed's monitor blocks in the DeepSpeed JSON receive the training events (csv_monitor
tested end to end); TensorBoard as written (read back from the event file): tag groups,
weighting scalars, gradient norms, hparams with dev and test scores; the run's config.yaml;
DeepSpeed's zero_to_fp32 on a checkpoint (tag=); the progress line's ETA."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

from cats_ds.training import loop as train
from helpers import ds_config, launch, read_log, write_json

GROUPS = ("train/", "valid/", "weighting/", "gram/", "perf/", "hparams/")


def test_csv_monitor_block_gets_the_train_events(tmp_path, tiny_recipe):
    ds = write_json(tmp_path / "ds.json", ds_config(0, csv_monitor={
        "enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "tiny"}))
    recipe = tiny_recipe("run", train={"max_updates": 3, "log_every": 1})
    out = launch(["launch/train.py", "--deepspeed_config", ds, "--config", recipe], 1)
    folder = tmp_path / "csv" / "tiny"
    with open(folder / "train_loss.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss"]
    logged = [(r["step"], r["loss"]) for r in read_log(tmp_path / "run")]
    assert [int(s) for s, _ in rows[1:]] == [s for s, _ in logged] == [1, 2, 3]
    assert [float(v) for _, v in rows[1:]] == pytest.approx([v for _, v in logged], rel=1e-12)
    for name in ("train_lr.csv", "perf_tokens_per_s.csv", "train_loss_en-aa.csv", "train_grad_norm.csv",
                 "valid_mean_loss.csv"):
        assert (folder / name).is_file(), name
    # DeepSpeed's engine writes no per-sample events of its own (Train/Samples/lr, ...)
    assert not [p.name for p in folder.iterdir() if not p.name.startswith(("train_", "valid_", "weighting_", "gram_",
                                                                            "perf_", "hparams_"))]
    assert "| 3/3 (100.0%)" in out.stdout and "ETA 0:00:00 (max_updates)" in out.stdout
    assert "| 1/3 (33.3%)" in out.stdout


def fake_run(step, max_updates, max_minutes, elapsed_before, started_ago, now=1000.0):
    cfg = SimpleNamespace(train=SimpleNamespace(max_updates=max_updates, max_minutes=max_minutes))
    return SimpleNamespace(cfg=cfg, step=step, elapsed=elapsed_before, t_start=now - started_ago)


def test_progress_eta(monkeypatch):
    monkeypatch.setattr(train.time, "time", lambda: 1000.0)
    # 100 of 1000 updates in 50 s (20 before a resume + 30 since): 900 left at 0.5 s each
    eta, line = train.progress(fake_run(100, 1000, None, 20.0, 30.0))
    assert eta == pytest.approx(450.0)
    assert line == " | 100/1000 (10.0%) | 0:00:50 elapsed | ETA 0:07:30 (max_updates)"
    # a 5-minute budget ends first: 250 s left of it
    eta, line = train.progress(fake_run(100, 1000, 5.0, 20.0, 30.0))
    assert eta == pytest.approx(250.0) and line.endswith("ETA 0:04:10 (max_minutes)")
    # a budget that ends later than max_updates does not matter
    assert train.progress(fake_run(100, 1000, 60.0, 20.0, 30.0))[1].endswith("(max_updates)")
    assert train.progress(fake_run(0, 1000, None, 0.0, 1.0)) == (None, "")


def test_tensorboard_tags_weighting_grad_norms_hparams_and_fp32_weights(tmp_path, tiny_recipe):
    """2 ranks, ZeRO-2, CATS with a meta step every update: every scalar tag in one of the
    groups, one tag per quantity on the update axis; the weighting/ tags carry the
    train_log.jsonl values; gradient norms per group add up to the total; the hparams
    session holds the settings and the final dev and (after evaluate) test scores."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from cats_ds.config import load_config
    from cats_ds.inference.evaluate import evaluate_checkpoint

    ds = write_json(tmp_path / "z2.json", ds_config(2))
    recipe = tiny_recipe("tb", train={"max_updates": 4, "log_every": 1, "valid_every": 2, "tensorboard": True},
                         weighting={"method": "cats"}, meta={"every": [[None, 1]]})
    out = launch(["launch/train.py", "--deepspeed_config", ds, "--config", recipe], 2)
    run = tmp_path / "tb"
    # the run explains itself: config.yaml (printed at start) reads back to the config it ran with
    assert load_config(str(run / "config.yaml")) == load_config(str(recipe))
    assert f"| config ({run / 'config.yaml'}" in out.stdout and "  method: cats" in out.stdout
    evaluate_checkpoint(run / "best", split="test", limit=3)

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert [t for t in tags if not t.startswith(GROUPS)] == []  # no Train/Samples/lr, no loss/, alpha/ ...
    assert not [t for t in tags if t.lower().startswith("train/samples")]
    log = read_log(run)
    for lang in ("aa", "bb", "cc"):
        events = acc.Scalars(f"weighting/alpha/{lang}")
        assert [e.step for e in events] == [r["step"] for r in log] == [1, 2, 3, 4]
        assert [e.value for e in events] == pytest.approx([r["weighting"][f"alpha/{lang}"] for r in log], rel=1e-6)
    assert "weighting/cats/lambda_c" in tags and "weighting/meta/curvature" in tags
    # the meta steps' Gram diagnostics (grads.gram), as in train_log.jsonl
    for key in ("split_cos_mean", "plain_cos_mean"):
        events = acc.Scalars(f"gram/{key}")
        assert [e.step for e in events] == [1, 2, 3, 4], key
        assert [e.value for e in events] == pytest.approx([r["gram"][key] for r in log], rel=1e-6), key
    assert any(t.startswith("gram/r/") for t in tags) and any(t.startswith("gram/noise_share/") for t in tags)
    assert [e.step for e in acc.Scalars("train/lr")] == [1, 2, 3, 4]
    # gradient norms: the total and per parameter group, consistent with each other
    groups = [t for t in tags if t.startswith("train/grad_norm/")]
    assert {"train/grad_norm/Emb", "train/grad_norm/E.SA", "train/grad_norm/D.FC"} <= set(groups)
    for i, total in enumerate(acc.Scalars("train/grad_norm")):
        parts = [acc.Scalars(t)[i].value for t in groups]
        assert total.value > 0 and total.value == pytest.approx(math.sqrt(sum(v * v for v in parts)), rel=1e-4)
        assert total.value == pytest.approx(log[i]["grad_norm"]["all"], rel=1e-6)
    # hparams: the settings, the final dev loss, the test scores evaluate added
    assert acc.Scalars("hparams/valid_loss")[-1].value == pytest.approx(read_log(run, "valid")[-1]["mean_loss"])
    test = json.loads((run / "eval" / "best-test" / "bleu.json").read_text())["averages"]["All"]
    assert acc.Scalars("hparams/test_chrf")[-1].value == pytest.approx(test["chrf"], rel=1e-6)
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["weighting.method"].string_value == "cats"
    assert start.session_start_info.hparams["train.max_updates"].number_value == 4
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"hparams/dev_bleu", "hparams/test_bleu"}

    # DeepSpeed's own zero_to_fp32 on a checkpoint folder: tag=<folder name>; it leaves
    # out the tied decoder embedding, which is the shared embedding
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cats_ds.checkpoints import load_for_inference

    assert (run / "zero_to_fp32.py").is_file()  # DeepSpeed's script, as docs/usage.md says
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(run), tag="best")
    model = load_for_inference(run / "best")[1].state_dict()
    assert set(model) - set(fp32) == {"dec_embed.weight"}
    for name, value in fp32.items():
        assert torch.equal(value.float(), model[name]), name
    assert torch.equal(model["dec_embed.weight"], fp32["embed.weight"])


def test_grad_norms_per_group_and_total():
    """grads.grad_norms on a one-process model: per group and total equal the norms of the
    parameters' .grad (ZeRO-0 layout: the whole gradient), loss scale divided out."""
    from cats_ds.analysis.similarity import param_group
    from cats_ds.config import config_from_dict
    from cats_ds.model.build import model_from_config
    from cats_ds.training.grads import _Slot, grad_norms
    from helpers import TINY_MODEL

    torch.manual_seed(0)
    model = model_from_config(config_from_dict({"model": TINY_MODEL}), 50, ["aa", "bb"])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    slots = [_Slot(n, p, True, 1) for n, p in model.named_parameters()]
    fake = SimpleNamespace(slots=slots, _read=lambda s: s.param.grad.view(-1), loss_scale=lambda: 4.0)
    norms = grad_norms(fake, lambda n, p: param_group(n), "cpu")
    expected: dict[str, float] = {}
    for n, p in model.named_parameters():
        expected[param_group(n)] = expected.get(param_group(n), 0.0) + float(p.grad.double().pow(2).sum())
    assert set(norms) == set(expected) | {"all"} and {"Emb", "E.SA", "D.EA", "D.FC", "D.LN"} <= set(norms)
    for group, sq in expected.items():
        assert norms[group] == pytest.approx(math.sqrt(sq) / 4.0, rel=1e-9), group
    assert norms["all"] == pytest.approx(math.sqrt(sum(expected.values())) / 4.0, rel=1e-9)
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert norms["all"] * 4.0 == pytest.approx(float(total), rel=1e-5)
