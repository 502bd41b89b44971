from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import TINY_MODEL, make_plain_corpus


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared data folder: 3 languages (400 / 150 / 50 training pairs), tiny vocab."""
    from cats_ds.config import config_from_dict
    from cats_ds.data.prepare import prepare

    root = tmp_path_factory.mktemp("tiny")
    make_plain_corpus(root / "raw", {"aa": 400, "bb": 150, "cc": 50})
    cfg = config_from_dict({"data": {"dir": str(root / "bin"), "corpus": "plain", "raw": str(root / "raw"),
                                     "vocab_size": 100, "vocab_temperature": 1.0}})
    prepare(cfg)
    return root / "bin"


@pytest.fixture
def tiny_recipe(tmp_path, tiny_data):
    """Write a recipe for the tiny model on tiny_data; keyword sections override it."""

    def make(save_dir: str = "run", **sections) -> Path:
        recipe = {"data": {"dir": str(tiny_data)}, "model": dict(TINY_MODEL),
                  "sampling": {"temperature": 5.0, "langs_per_batch": 2},
                  "train": {"save_dir": str(tmp_path / save_dir), "max_tokens": 256, "max_updates": 6,
                            "log_every": 1, "valid_every": 100, "warmup_updates": 10, "lr": 0.003,
                            "tensorboard": False}}
        for section, values in sections.items():
            recipe.setdefault(section, {}).update(values)
        path = tmp_path / f"{save_dir}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return make
