"""Training under the real DeepSpeed launcher with 2 gloo ranks, against 1-process references."""

from __future__ import annotations

import pytest

from helpers import ds_config, launch, read_log, write_json

TRAIN = "launch/train.py"


def losses(save_dir):
    return [(r["step"], r["loss"]) for r in read_log(save_dir)]


def test_two_ranks_zero2_match_one_rank_zero0(tmp_path, tiny_recipe):
    """Batch B on each of 2 ZeRO-2 ranks == batch 2B on 1 ZeRO-0 rank, update by update
    (the shipped CPU configs as they are)."""
    one = tiny_recipe("one", train={"max_tokens": 512, "max_updates": 5})
    two = tiny_recipe("two", train={"max_tokens": 256, "max_updates": 5})
    launch([TRAIN, "--deepspeed_config", "ds_configs/cpu_zero0.json", "--config", one], 1)
    launch([TRAIN, "--deepspeed_config", "ds_configs/cpu_zero2.json", "--config", two], 2)
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in ref] == [1, 2, 3, 4, 5] == [s for s, _ in got]
    for (_, a), (_, b) in zip(ref, got):
        assert b == pytest.approx(a, rel=1e-5)
    assert ref[0][1] != ref[-1][1]  # it did train


def test_resume_continues_exactly(tmp_path, tiny_recipe):
    """10 updates, stop, resume, 10 more == 20 uninterrupted (dropout on, ZeRO-2, 2 ranks)."""
    ds = write_json(tmp_path / "z2.json", ds_config(2))
    model = {"dropout": 0.1, "attention_dropout": 0.1}
    full = tiny_recipe("full", model=model, train={"max_updates": 20, "valid_every": 10})
    part = tiny_recipe("part", model=model, train={"max_updates": 10, "valid_every": 10})
    launch([TRAIN, "--deepspeed_config", ds, "--config", full], 2)
    launch([TRAIN, "--deepspeed_config", ds, "--config", part], 2)
    out = launch([TRAIN, "--deepspeed_config", ds, "--config", part, "train.max_updates=20"], 2)
    assert "resumed from" in out.stdout and "at step 10" in out.stdout
    ref, got = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert [s for s, _ in got] == list(range(1, 21))
    for (sa, a), (sb, b) in zip(ref, got):
        assert sa == sb and b == pytest.approx(a, rel=1e-6), f"step {sa}"
    valid_ref, valid_got = read_log(tmp_path / "full", "valid"), read_log(tmp_path / "part", "valid")
    assert valid_got[-1]["mean_loss"] == pytest.approx(valid_ref[-1]["mean_loss"], rel=1e-6)
    for name in ("best", "latest"):
        assert (tmp_path / "part" / name / "cats_ds.json").is_file()
    assert not list((tmp_path / "part").glob("*.tmp"))


def test_batch_sizes_contradicting_world_size(tmp_path, tiny_recipe):
    ds = write_json(tmp_path / "bad.json", ds_config(2, train_batch_size=3))
    out = launch([TRAIN, "--deepspeed_config", ds, "--config", tiny_recipe()], 2, check=False)
    assert out.returncode != 0
    assert "train_batch_size=3 contradicts" in out.stderr and "world_size=2" in out.stderr


def test_unknown_language_and_missing_checkpoint(tmp_path, tiny_recipe):
    ds = write_json(tmp_path / "z0.json", ds_config(0))
    out = launch([TRAIN, "--deepspeed_config", ds, "--config", tiny_recipe(), "data.languages=[aa,zz]"], 1,
                 check=False)
    assert out.returncode != 0 and "unknown language 'zz'" in out.stderr and "aa, bb, cc" in out.stderr
    out = launch([TRAIN, "--deepspeed_config", ds, "--config", tiny_recipe(), f"train.resume={tmp_path}/nope"], 1,
                 check=False)
    assert out.returncode != 0 and f"no checkpoint at {tmp_path}/nope" in out.stderr
