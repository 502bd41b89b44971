"""Which micro-batches an update trains on (train.next_batches): length-pooled ones at
every update of a temperature run; the draws as drawn at the meta.every steps only
where sampling.draws_at_meta_steps is on (the Gram-based methods, and a temperature run
meant as CATS' alpha = 1 reference). No processes: the sampler on the tiny corpus."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cats_ds.config import load_config
from cats_ds.data.manifest import Manifest, load_split
from cats_ds.data.sampler import LanguageSampler
from cats_ds.training.loop import draws_as_drawn, next_batches


def _sampler(tiny_data):
    manifest = Manifest.load(tiny_data)
    splits = load_split(tiny_data, manifest, "train")
    return LanguageSampler(splits, manifest.languages, 5.0, 2, max_tokens=64, world_size=1, seed=3, length_pool=4)


@pytest.mark.parametrize("overrides,expected", [
    ([], False),  # temperature: pooled at every update
    (["sampling.draws_at_meta_steps=true"], True),  # temperature as CATS' alpha = 1 reference
    (["weighting.method=cats"], True),
    (["weighting.method=pcgrad"], True),
    (["weighting.method=cats", "sampling.draws_at_meta_steps=false"], False),
])
def test_draws_as_drawn_only_where_asked(overrides, expected):
    cfg = load_config(None, overrides + ["meta.every=[[null, 3]]"])
    assert [draws_as_drawn(cfg, s) for s in range(7)] == [expected and s % 3 == 0 for s in range(7)]


def test_temperature_run_pools_every_update(tiny_data, monkeypatch):
    """12 updates of a default temperature run take only pooled micro-batches (1 forward
    per update); the reference setting takes the draws themselves at steps 0, 3, 6, 9."""
    import cats_ds.training.loop as train

    monkeypatch.setattr(train, "count_slots", lambda run, plan: None)
    for overrides, direct_steps in (([], set()), (["sampling.draws_at_meta_steps=true"], {0, 3, 6, 9})):
        cfg = load_config(None, overrides + ["meta.every=[[null, 3]]"])
        run = SimpleNamespace(cfg=cfg, sampler=_sampler(tiny_data), gas=1, step=0)
        ref = _sampler(tiny_data)
        for step in range(12):
            run.step = step
            plans = next_batches(run)
            want = ref.next_plan() if step in direct_steps else ref.next_batch()[0]
            assert len(plans) == 1 and plans[0].langs == want.langs
            assert all(np.array_equal(a, b) for a, b in zip(plans[0].sents, want.sents))
        assert run.sampler.micro_step == ref.micro_step
