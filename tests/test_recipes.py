"""Every shipped recipe and DeepSpeed config is valid; the quickstart explains missing catalogs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cats_ds.config import load_config
from cats_ds.training.loop import TrainError, load_ds_config
from helpers import REPO

RECIPES = sorted((REPO / "launch" / "recipes").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("method", ["temperature", "cats", "gradnorm", "mgda", "pcgrad", "gradvac", "cagrad", "nashmtl",
                                    "imtl"])
def test_recipe_loads_with_each_method(recipe, method):
    cfg = load_config(str(recipe), [f"weighting.method={method}"])
    assert cfg.weighting.method == method and cfg.data.dir and cfg.train.max_updates > 0


def test_paper_recipes_follow_the_paper():
    for name, dropout, k in (("ted8_related", 0.3, 4), ("ted8_diverse", 0.3, 4), ("wmt10", 0.1, 4),
                             ("opus100", 0.1, 8)):
        cfg = load_config(str(REPO / "launch" / "recipes" / f"{name}.yaml"))
        assert (cfg.train.lr, cfg.train.betas, cfg.train.warmup_updates) == (0.0015, [0.9, 0.98], 4000)
        assert cfg.train.label_smoothing == 0.1 and cfg.model.dropout == dropout
        assert cfg.sampling.langs_per_batch == k and cfg.eval.beam == 5 and cfg.eval.lenpen == 1.0


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.stem)
def test_ds_configs_are_valid_deepspeed_configs(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    ds = DeepSpeedConfig(dict(raw))
    assert ds.train_micro_batch_size_per_gpu == 1
    assert ds.zero_optimization_stage == int(path.stem.split("zero")[1][0])
    assert ("bf16" in path.stem) == bool(raw.get("bf16", {}).get("enabled"))
    assert ("fp16" in path.stem) == bool(raw.get("fp16", {}).get("enabled"))
    cfg = load_config(None, ["train.tensorboard=false"])
    for world in (1, 2, 8):
        assert load_ds_config(str(path), world, cfg)["train_micro_batch_size_per_gpu"] == 1


def test_ds_config_errors_name_the_numbers(tmp_path):
    cfg = load_config(None, ["train.max_tokens=1000", "train.update_tokens=4000"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2}))
    with pytest.raises(TrainError, match=r"update_tokens=4000 but train.max_tokens=1000 x gradient_accumulation"
                                         r"_steps=2 .* x world_size=1 = 2000"):
        load_ds_config(str(bad), 1, cfg)
    assert load_ds_config(str(bad), 2, cfg)["gradient_accumulation_steps"] == 2
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(TrainError, match="train_micro_batch_size_per_gpu must be 1"):
        load_ds_config(str(bad), 1, cfg)
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam"}}))
    with pytest.raises(TrainError, match="remove 'optimizer'"):
        load_ds_config(str(bad), 1, cfg)
    bad.write_text("{not json")
    with pytest.raises(TrainError, match="not valid JSON"):
        load_ds_config(str(bad), 1, cfg)
    with pytest.raises(TrainError, match="DeepSpeed config not found"):
        load_ds_config(str(tmp_path / "nope.json"), 1, cfg)


def test_quickstart_explains_missing_catalogs(tmp_path):
    env = dict(os.environ, RAW=str(tmp_path), LANGS="de,af", VENV=str(tmp_path / "venv"))
    proc = subprocess.run(["bash", "launch/quickstart.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "too few gettext catalogs" in proc.stderr and "none for de af" in proc.stderr
    assert "CORPUS=plain RAW=my_corpus" in proc.stderr
    assert not Path(tmp_path / "venv").exists()  # it stopped before installing anything
