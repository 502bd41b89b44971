from __future__ import annotations

import inspect
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


# --- the launcher tier -------------------------------------------------------------------
# A test is marked `launcher` when it (or a function of its module, helpers.py or a fixture
# it uses) starts other processes: the deepspeed launcher (helpers.launch), a subprocess, or
# a multiprocessing pool. `pytest -m "not launcher"` is the everyday fast tier.
SPAWNING_NAMES = {"launch", "subprocess", "Popen", "multiprocessing", "spawn"}


def _code_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):  # lambdas, comprehensions, nested functions
            names |= _code_names(const)
    return names


def _spawns(func, seen: set) -> bool:
    func = inspect.unwrap(func)
    code = getattr(func, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names = _code_names(code)
    if names & SPAWNING_NAMES:
        return True
    scope = getattr(func, "__globals__", {})
    for name in names:
        obj = scope.get(name)
        if inspect.isfunction(obj) and obj.__module__ in (func.__module__, "helpers", "conftest"):
            if _spawns(obj, seen):
                return True
    return False


def pytest_configure(config):
    config.addinivalue_line("markers", "launcher: starts the deepspeed launcher or other processes "
                                       "(applied automatically; deselect with -m 'not launcher')")


def pytest_collection_modifyitems(config, items):
    for item in items:
        funcs = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        for name in getattr(item, "fixturenames", ()):
            defs = info.name2fixturedefs.get(name) if info else None
            if defs:
                funcs.append(defs[-1].func)
        seen: set = set()
        if any(f is not None and _spawns(f, seen) for f in funcs):
            item.add_marker(pytest.mark.launcher)
