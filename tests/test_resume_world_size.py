"""Resume on another world size (docs/usage.md, "Resuming on another number of ranks"): a ZeRO-2
checkpoint of 2 gloo ranks resumes on 1 rank, and that one's on 2 again, through DeepSpeed
universal checkpoints; the chain logs the losses of an uninterrupted 2-rank run and ends
with its weights. Expert and ZeRO-3 checkpoints are refused before anything is loaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cats_ds.checkpoints import CheckpointError, gather_state_dict, read_meta
from cats_ds.config import config_from_dict
from cats_ds.training.checkpoint import needs_universal
from helpers import ds_config, launch, read_log, write_json

TRAIN = "launch/train.py"


def final_weights(folder):
    return gather_state_dict(folder, read_meta(folder))


def test_two_ranks_to_one_and_back_continue_exactly(tmp_path, tiny_recipe):
    z2 = write_json(tmp_path / "z2.json", ds_config(2))
    ref = tiny_recipe("ref", train={"max_updates": 10, "valid_every": 100, "max_tokens": 256})
    launch([TRAIN, "--deepspeed_config", z2, "--config", ref], 2)

    chain = tiny_recipe("chain", train={"max_updates": 4, "valid_every": 100, "max_tokens": 256})
    launch([TRAIN, "--deepspeed_config", z2, "--config", chain], 2)
    # 2 -> 1 with the same per-rank budget: the sampler's global batch would change; refused
    out = launch([TRAIN, "--deepspeed_config", z2, "--config", chain, "train.max_updates=7"], 1, check=False)
    assert out.returncode == 2
    assert ("the world size changed (2 -> 1 ranks) and with it the global batch the sampler plans (train.max_tokens x "
            "world size: 256 x 2 = 512 tokens, now 256 x 1 = 256): resume with train.max_tokens=512") in out.stderr
    assert not list((tmp_path / "chain").glob("*.universal*"))
    out = launch([TRAIN, "--deepspeed_config", z2, "--config", chain, "train.max_updates=7", "train.max_tokens=512"], 1)
    assert "world size changed (2 -> 1 ranks): converting" in out.stdout and "resumed from" in out.stdout
    assert json.loads((tmp_path / "chain" / "latest" / "cats_ds.json").read_text())["world_size"] == 1
    out = launch([TRAIN, "--deepspeed_config", z2, "--config", chain, "train.max_updates=10"], 2)
    assert "world size changed (1 -> 2 ranks): converting" in out.stdout and "at step 7" in out.stdout
    assert not list((tmp_path / "chain").glob("*.universal*")) and not (tmp_path / "chain" / "latest_universal").exists()

    want, got = read_log(tmp_path / "ref"), read_log(tmp_path / "chain")
    assert [r["step"] for r in got] == list(range(1, 11)) == [r["step"] for r in want]
    for a, b in zip(want, got):  # the optimizer moments and the schedule came along: steps 5-7, 8-10 too
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["lr"] == pytest.approx(a["lr"], rel=1e-9)
    w_ref, w_got = final_weights(tmp_path / "ref" / "latest"), final_weights(tmp_path / "chain" / "latest")
    assert w_ref.keys() == w_got.keys()
    for name in w_ref:
        # a key bias has gradient 0 in exact arithmetic (softmax ignores a shift shared by all
        # keys); Adam turns the round-off, which differs between 1 and 2 ranks, into steps of ~lr
        atol = 1e-3 if name.endswith("k_proj.bias") else 1e-6
        torch.testing.assert_close(w_got[name], w_ref[name], rtol=1e-5, atol=atol, msg=name)


def fake_checkpoint(tmp_path, world: int, stage: int, modules: list[str]):
    folder = tmp_path / "run" / "latest"
    folder.mkdir(parents=True)
    saved = config_from_dict({"experts": {"modules": modules}} if modules else {}).to_dict()
    (folder / "cats_ds.json").write_text(json.dumps({"step": 4, "world_size": world, "zero_stage": stage,
                                                     "config": saved}))
    return config_from_dict({"train": {"save_dir": str(tmp_path / "run")}})


@pytest.mark.parametrize("stage, modules, message", [
    (2, ["ffn"], "Checkpoints with family experts (experts.modules=['ffn']) resume only on the world size they "
                 "were saved with"),
    (3, [], "ZeRO-3 checkpoints resume only on the world size they were saved with")])
def test_refused_before_anything_is_loaded(tmp_path, stage, modules, message):
    cfg = fake_checkpoint(tmp_path, 2, stage, modules)
    with pytest.raises(CheckpointError) as e:
        needs_universal(cfg, 1, ds_config(2))
    assert message in str(e.value) and "was saved by 2 ranks" in str(e.value) and "resume with 2 ranks" in str(e.value)


def test_universal_only_when_needed(tmp_path):
    cfg = fake_checkpoint(tmp_path, 2, 2, [])
    assert needs_universal(cfg, 1, ds_config(2)) and needs_universal(cfg, 4, ds_config(1))
    assert not needs_universal(cfg, 2, ds_config(2))  # same world size: DeepSpeed's own partitions
    with pytest.raises(CheckpointError, match="loads into ZeRO stage 1 or 2 only"):
        needs_universal(cfg, 1, ds_config(0))
    shutil.rmtree(tmp_path / "run")
    assert not needs_universal(fake_checkpoint(tmp_path, 2, 0, []), 1, ds_config(0))  # ZeRO-0: nothing partitioned
