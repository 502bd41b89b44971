"""DeepSpeed's monitor blocks in the DeepSpeed JSON receive the training events (csv_monitor
tested end to end), and the progress line's ETA toward max_updates / max_minutes."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest

from cats_ds import train
from helpers import ds_config, launch, read_log, write_json


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
    for name in ("train_lr.csv", "train_tokens_per_s.csv", "loss_en-aa.csv"):
        assert (folder / name).is_file(), name
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
