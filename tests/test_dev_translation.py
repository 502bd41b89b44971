"""Validation by translation during training (eval.valid_every): BLEU / chrF++ per language
on 2 gloo ranks == evaluate.py on the saved checkpoint in one process; best/ chosen by
train.best_metric=chrf; train.patience stops early."""

from __future__ import annotations

import json

import pytest

from cats_ds.config import ConfigError, config_from_dict
from cats_ds.inference.evaluate import evaluate_checkpoint
from cats_ds.training.loop import is_better
from helpers import ds_config, launch, read_log, write_json

TRAIN = "launch/train.py"
DEV = {"valid_every": 2, "valid_beam": 1, "valid_sentences": 12}


def test_two_ranks_select_best_by_chrf_and_score_like_evaluate(tmp_path, tiny_recipe):
    recipe = tiny_recipe("run", train={"max_updates": 8, "valid_every": 2, "best_metric": "chrf"}, eval=DEV)
    out = launch([TRAIN, "--deepspeed_config", write_json(tmp_path / "z2.json", ds_config(2)), "--config", recipe], 2)
    valid = read_log(tmp_path / "run", "valid")
    assert [r["step"] for r in valid] == [2, 4, 6, 8]
    for r in valid:
        assert sorted(r["scores"]) == ["aa", "bb", "cc"] and all(v["n"] == 12 for v in r["scores"].values())
        assert r["chrf"] == pytest.approx(sum(v["chrf"] for v in r["scores"].values()) / 3)
    assert "dev BLEU" in out.stdout
    chrf = [r["chrf"] for r in valid]
    best_step = valid[chrf.index(max(chrf))]["step"]  # the first of equal maxima: later ties do not replace it
    meta = json.loads((tmp_path / "run" / "best" / "cats_ds.json").read_text())
    assert meta["step"] == best_step and meta["valid_scores"]["chrf"] == pytest.approx(max(chrf))
    assert len(set(chrf)) > 1  # the scores moved, so the choice was made among different values

    # the data-parallel scores of the final model == one process' evaluate.py on latest/
    latest = json.loads((tmp_path / "run" / "latest" / "cats_ds.json").read_text())
    assert latest["step"] == 8
    report = evaluate_checkpoint(tmp_path / "run" / "latest", split="dev", limit=12, out_dir=tmp_path / "eval",
                                 overrides=["eval.beam=1"])
    for lang, got in latest["valid_scores"]["languages"].items():
        want = report["languages"][lang]
        assert got["bleu"] == pytest.approx(want["bleu"], abs=1e-9) and got["chrf"] == pytest.approx(want["chrf"],
                                                                                                     abs=1e-9)


def test_patience_stops_early(tmp_path, tiny_recipe):
    """A learning rate so small that greedy output never changes: chrF++ never improves on
    the first validation, so patience 2 stops at the third (step 6 of 40)."""
    recipe = tiny_recipe("run", train={"max_updates": 40, "valid_every": 2, "best_metric": "chrf", "patience": 2,
                                       "lr": 1e-9, "warmup_init_lr": 1e-9}, eval=DEV)
    out = launch([TRAIN, "--deepspeed_config", write_json(tmp_path / "z0.json", ds_config(0)), "--config", recipe], 1)
    assert "| early stop: mean chrf did not improve" in out.stdout and "(train.patience=2)" in out.stdout
    assert [r["step"] for r in read_log(tmp_path / "run", "valid")] == [2, 4, 6]
    assert read_log(tmp_path / "run")[-1]["step"] == 6
    assert json.loads((tmp_path / "run" / "best" / "cats_ds.json").read_text())["step"] == 2


def test_best_metric_direction_and_config_checks():
    assert is_better("loss", 1.0, None) and is_better("loss", 1.0, 2.0) and not is_better("loss", 2.0, 2.0)
    assert is_better("chrf", 30.0, 20.0) and not is_better("bleu", 20.0, 20.0) and not is_better("chrf", 10.0, 20.0)
    with pytest.raises(ConfigError, match="train.best_metric=bleu needs dev translation: set eval.valid_every"):
        config_from_dict({"train": {"best_metric": "bleu"}})
    with pytest.raises(ConfigError, match="eval.valid_every=150 must be 0 .off. or a multiple of train.valid_every=100"):
        config_from_dict({"train": {"valid_every": 100}, "eval": {"valid_every": 150}})
    with pytest.raises(ConfigError, match="train.best_metric: 'bleu4' is not one of"):
        config_from_dict({"train": {"best_metric": "bleu4"}})
