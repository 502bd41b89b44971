"""The weighting registry (cats_ds/weighting/registry.py): every method config.METHODS
declares has exactly one registered class, make_weighting builds it, and the method-
dependent defaults (GRAM_METHODS, SPLIT_GRAM_METHODS, weighting.method's choices) come
from the one declaration."""

from __future__ import annotations

import typing

import pytest

from cats_ds.config import GRAM_METHODS, METHODS, SPLIT_GRAM_METHODS, WeightingConfig, gram_kind, load_config
from cats_ds.weighting import REGISTRY, make_weighting, register_method


def test_every_declared_method_has_its_class():
    assert set(REGISTRY) == set(METHODS)
    for name, cls in REGISTRY.items():
        w = make_weighting(load_config(None, [f"weighting.method={name}"]), ["a", "b"], vocab_size=100)
        assert type(w) is cls and w.name == name
        assert (w.meta_every is not None) == METHODS[name].gram  # only Gram methods run meta steps


def test_choices_and_flags_come_from_the_declaration():
    assert typing.get_args(typing.get_type_hints(WeightingConfig)["method"]) == tuple(METHODS)
    assert GRAM_METHODS == tuple(n for n in METHODS if n != "temperature")
    assert set(SPLIT_GRAM_METHODS) == set(GRAM_METHODS) - {"cats"}
    for name in METHODS:
        want = "split" if name in SPLIT_GRAM_METHODS else "plain"
        assert gram_kind(load_config(None, [f"weighting.method={name}"])) == want


def test_undeclared_or_twice_registered_names_are_refused():
    with pytest.raises(ValueError, match="'nomethod' is not declared in cats_ds.config.METHODS"):
        register_method("nomethod")
    with pytest.raises(ValueError, match="'cats' is registered twice"):
        @register_method("cats")
        class Other:
            pass
    assert REGISTRY["cats"].__name__ == "CatsWeighting"
