"""TrainState (cats_ds/training/state.py): the loop's counters with state_dict /
load_state_dict, the client-state layout a checkpoint saves ({"train", "sampler",
"dev_sampler", "weighting"}), and the reader that maps the flat layout of checkpoints
written before it, by resume() itself on a checkpoint folder whose client state is a
hand-written dict in that layout (the layout main wrote up to this change).
tests/test_resume_fixture.py resumes a real checkpoint of the flat layout bit for bit."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from cats_ds.config import Config
from cats_ds.training.checkpoint import resume
from cats_ds.training.loop import Run, inverse_sqrt
from cats_ds.training.state import TrainState, read_client_state


def test_state_dict_round_trip():
    a = TrainState(step=7, elapsed=12.5, best_valid=3.25, best_score=30.5, stale=2, nonfinite=1,
                   t_start=time.time() - 2.0)
    saved = a.state_dict()
    assert set(saved) == set(TrainState.SAVED) and "t_start" not in saved
    assert 14.0 < saved["elapsed"] < 20.0  # earlier sessions plus this one up to now
    b = TrainState()
    b.load_state_dict(saved)
    assert (b.step, b.best_valid, b.best_score, b.stale, b.nonfinite) == (7, 3.25, 30.5, 2, 1)
    assert b.elapsed == saved["elapsed"] and b.t_start == 0.0


def test_run_fields_are_the_state():
    run = Run(*[None] * 15)
    run.step += 3
    run.best_score, run.stale = 1.5, 2
    assert run.state == TrainState(step=3, best_score=1.5, stale=2)
    run.state.nonfinite = 4
    assert run.nonfinite == 4


FLAT = {"step": 40, "best_valid": 4.5, "best_score": 21.0, "stale": 1, "elapsed": 600.0,
        "sampler": {"micro_step": 40}, "dev_sampler": None, "weighting": {"alpha": [1.0, 2.0]}}
"""A client state as main wrote it before TrainState (the counters at the top level)."""


def test_flat_layout_is_mapped():
    new = read_client_state(FLAT)
    assert new == {"train": {"step": 40, "best_valid": 4.5, "best_score": 21.0, "stale": 1, "elapsed": 600.0},
                   "sampler": {"micro_step": 40}, "dev_sampler": None, "weighting": {"alpha": [1.0, 2.0]}}
    assert read_client_state(new) is new  # the current layout passes through
    # before train.best_metric and train.patience: best/ was chosen by loss
    old = {k: v for k, v in FLAT.items() if k not in ("best_score", "stale", "dev_sampler")}
    state = TrainState()
    state.load_state_dict(read_client_state(old)["train"])
    assert (state.best_score, state.stale, state.nonfinite) == (4.5, 0, 0)
    old["best_valid"] = math.inf
    assert read_client_state(old)["train"]["best_score"] is None


class Part:
    """A sampler or weighting: records what load_state_dict got."""

    def __init__(self):
        self.loaded = None

    def state_dict(self):
        return {"part": 1}

    def load_state_dict(self, state):
        self.loaded = state


class Engine:
    """What resume() asks of a DeepSpeed engine; load_checkpoint returns `client`."""

    def __init__(self, client: dict, lr: float):
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=lr)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        self.client = client

    def load_universal_checkpoint(self):
        return False

    def load_checkpoint(self, load_dir, tag):
        return f"{load_dir}/{tag}", dict(self.client)


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_resume_reads_both_layouts(tmp_path, layout, capsys):
    cfg = Config()
    cfg.train.save_dir = str(tmp_path / "run")
    cfg.validate()
    latest = tmp_path / "run" / "latest"
    latest.mkdir(parents=True)
    meta = {"step": 40, "config": cfg.to_dict(), "languages": ["aa", "bb"], "manifest_fingerprint": "f" * 64,
            "vocab_size": 3, "world_size": 1, "zero_stage": 0}
    (latest / "cats_ds.json").write_text(json.dumps(meta))
    client = FLAT if layout == "flat" else read_client_state(FLAT)
    run = Run(cfg=cfg, engine=Engine(client, cfg.train.lr), model=None, manifest=type("M", (), {"fingerprint": "f" * 64}),
              vocab=[0, 1, 2], languages=["aa", "bb"], train_splits={}, dev_splits={}, sampler=Part(),
              weighting=Part(), device=torch.device("cpu"), rank=0, world=1, gas=1, tag_ids=[1, 2])
    resume(run, inverse_sqrt(cfg.train))
    assert run.state == TrainState(step=40, elapsed=600.0, best_valid=4.5, best_score=21.0, stale=1)
    assert run.sampler.loaded == {"micro_step": 40} and run.weighting.loaded == {"alpha": [1.0, 2.0]}
    assert f"| resumed from {latest} at step 40" in capsys.readouterr().out
