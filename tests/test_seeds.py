"""train.seed decides the initial weights, the batches and dropout: the same seed the
same, another seed different (the pieces train.setup builds, in one process)."""

from __future__ import annotations

import numpy as np
import torch

from cats_ds.config import config_from_dict
from cats_ds.data.manifest import Manifest, Vocab, load_split
from cats_ds.data.sampler import LanguageSampler, collate
from cats_ds.model.build import model_from_config
from cats_ds.training.loop import seed_dropout, seed_everything
from helpers import TINY_MODEL


def built(seed: int, tiny_data):
    """What train.setup builds from train.seed: the model, then the sampler's first plans,
    then (train.train) the dropout stream; returns weights, plans and a dropout forward."""
    cfg = config_from_dict({"data": {"dir": str(tiny_data)}, "model": {**TINY_MODEL, "dropout": 0.3},
                            "train": {"seed": seed, "max_tokens": 128}})
    manifest = Manifest.load(tiny_data)
    vocab = Vocab(tiny_data, manifest.languages)
    langs = list(manifest.languages)
    train = load_split(tiny_data, manifest, "train", langs)
    seed_everything(cfg.train.seed)
    model = model_from_config(cfg, len(vocab), langs)
    sampler = LanguageSampler(train, langs, 1.0, 2, cfg.train.max_tokens, 1, cfg.train.seed)
    plans = [sampler.next_plan() for _ in range(6)]
    seed_dropout(cfg.train.seed, 0)
    batch = collate(plans[0], train, langs, [vocab.lang_ids[l] for l in langs])
    with torch.no_grad():
        model.train()
        out = model(batch.src, batch.prev, batch.langs)
        model.eval()
        clean = model(batch.src, batch.prev, batch.langs)
    assert not torch.allclose(out, clean)  # dropout is on
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    return weights, plans, out, clean


def same_plans(a, b) -> bool:
    return all(x.langs == y.langs and all(np.array_equal(s, t) for s, t in zip(x.sents, y.sents))
               for x, y in zip(a, b))


def test_seed_decides_weights_batches_and_dropout(tiny_data):
    w1, p1, d1, _ = built(1, tiny_data)
    w1b, p1b, d1b, _ = built(1, tiny_data)
    w2, p2, _, _ = built(2, tiny_data)
    assert all(torch.equal(w1[k], w1b[k]) for k in w1)
    assert same_plans(p1, p1b) and torch.equal(d1, d1b)
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)
    assert sum(not torch.equal(w1[k], w2[k]) for k in w1) >= len(w1) // 2
    assert not same_plans(p1, p2)
    # dropout alone: seed 1's weights and batch, dropout stream of seed 2
    cfg = config_from_dict({"data": {"dir": str(tiny_data)}, "model": {**TINY_MODEL, "dropout": 0.3}})
    manifest = Manifest.load(tiny_data)
    vocab = Vocab(tiny_data, manifest.languages)
    langs = list(manifest.languages)
    model = model_from_config(cfg, len(vocab), langs)
    model.load_state_dict(w1)
    train = load_split(tiny_data, manifest, "train", langs)
    batch = collate(p1[0], train, langs, [vocab.lang_ids[l] for l in langs])
    model.train()
    with torch.no_grad():
        seed_dropout(1, 0)
        again = model(batch.src, batch.prev, batch.langs)
        seed_dropout(2, 0)
        other = model(batch.src, batch.prev, batch.langs)
        seed_dropout(1, 1)
        rank1 = model(batch.src, batch.prev, batch.langs)
    assert torch.equal(again, d1) and not torch.equal(other, d1) and not torch.equal(rank1, d1)
