"""Where the config checks live (docs/architecture.md, "Where the config checks live"): each
section's own keys in its `check` (config.Section), the keys of two sections in
Config.validate; every one fires at load_config, before training starts."""

import dataclasses
import json
import re

import pytest

from cats_ds.config import Config, ConfigError, Section, _build, load_config, merge_overrides

BAD = {
    "data": ("data.vocab_temperature=0", r"data.vocab_temperature must be > 0"),
    "model": ("model.max_positions=1", r"model.max_positions must be >= 2, got 1"),
    "sampling": ("sampling.langs_per_batch=0", r"sampling.langs_per_batch must be >= 1, got 0"),
    "meta": ("meta.every=[[null,0]]", r"meta.every\[0\]"),
    "cats": ("cats.kappa=2", r"cats.kappa must be in \[0, 1\], got 2.0"),
    "gradvac": ("gradvac.beta=0", r"gradvac.beta must be in \(0, 1\], got 0.0"),
    "cagrad": ("cagrad.iters=0", r"cagrad.iters must be >= 1, got 0"),
    "nashmtl": ("nashmtl.iters=0", r"nashmtl.iters must be >= 1, got 0"),
    "experts": ("experts.ep_size=0", r"experts.ep_size must be >= 1, got 0"),
    "train": ("train.keep_last=-1", r"train.keep_last must be >= 0 \(0: off\), got -1"),
    "eval": ("eval.beam=0", r"eval.beam must be >= 1, got 0"),
    "analysis": ("analysis.sentences=0", r"analysis.sentences must be >= 1, got 0"),
}
"""A bad value of each section with checks of its own -> the message naming its key. The other
sections (weighting, gradnorm, mgda, grads) have only choices and types, which _coerce checks."""


def test_every_section_is_a_section_with_a_check():
    for f in dataclasses.fields(Config):
        assert isinstance(getattr(Config(), f.name), Section), f.name


def test_validate_calls_every_sections_check(monkeypatch):
    called = []
    for f in dataclasses.fields(Config):
        cls = type(getattr(Config(), f.name))
        original = cls.check
        monkeypatch.setattr(cls, "check", lambda self, _name=f.name, _check=original: (called.append(_name), _check(self)))
    load_config(None, [])
    assert sorted(called) == sorted(f.name for f in dataclasses.fields(Config))


@pytest.mark.parametrize("section", sorted(BAD))
def test_a_bad_value_of_each_section_fails_at_load_config(section):
    override, message = BAD[section]
    with pytest.raises(ConfigError, match=rf"^command-line argument '{re.escape(override)}': {message}"):
        load_config(None, [override])
    cfg = _build(Config, merge_overrides({}, [override]), "")  # parsed, not validated
    with pytest.raises(ConfigError, match=message):
        getattr(cfg, section).check()  # the section's own check finds it


@pytest.mark.parametrize("overrides, message", [
    (["analysis.hessian_iters=0"], r"analysis.hessian_iters must be >= 1, got 0"),
    (["analysis.hessian_tol=-1"], r"analysis.hessian_tol must be >= 0, got -1.0"),
    (["analysis.every=-1"], r"analysis.every must be >= 0, got -1"),
    (["experts.modules=[ffn]", "experts.ep_size=2", "analysis.every=5"],
     r"analysis.every=5 with experts.ep_size=2: the Hessian needs every expert in one process"),
    (["experts.modules=[ffn]", "experts.ep_size=2", "eval.valid_every=500"],
     r"eval.valid_every=500: dev translation during training is not supported with experts.ep_size=2"),
    (["data.max_train_pairs={de: 0}"], r"data.max_train_pairs.de must be >= 1, got 0"),
    (["data.languages=[de]", "data.max_train_pairs={xx: 5}"], r"data.max_train_pairs.xx: 'xx' is not in data.languages"),
    (["data.dev_fraction=0.6", "data.test_fraction=0.5"], r"data.dev_fraction=0.6 and data.test_fraction=0.5"),
    (["data.vocab_size=1"], r"data.vocab_size must be >= 2, got 1"),
])
def test_moved_checks_fire_at_load_config(overrides, message):
    """The checks that were in analysis/analyze.py (check_settings, at training setup),
    training/validation.py (check_supported, after the engine was built) and data/prepare.py
    (check_settings, at prepare) are config checks now: load_config refuses."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_key_only_cross_checks_need_both_keys():
    """Experts without expert parallelism, or expert parallelism without experts, translate
    and analyze as before."""
    load_config(None, ["experts.modules=[ffn]", "experts.ep_size=1", "eval.valid_every=500", "analysis.every=5"])
    load_config(None, ["experts.ep_size=2", "eval.valid_every=500", "analysis.every=5"])


def test_prepare_and_analysis_keep_their_error_types():
    """A DataConfig / Config built without load_config still fails with the error its
    caller catches (PrepareError, and ConfigError, a ValueError, at training setup)."""
    from cats_ds.analysis.analyze import check_settings as analysis_settings
    from cats_ds.analysis.similarity import AnalysisError
    from cats_ds.config import DataConfig
    from cats_ds.data.prepare import PrepareError, check_settings

    with pytest.raises(PrepareError, match=r"data.vocab_size must be >= 2, got 1"):
        check_settings(DataConfig(vocab_size=1))
    cfg = Config()
    cfg.analysis.hessian_iters = 0
    with pytest.raises(ConfigError, match=r"analysis.hessian_iters must be >= 1, got 0"):
        analysis_settings(cfg, ["de", "fr"])
    cfg = load_config(None, ["analysis.pairs=[de:xx]"])  # needs the languages: not a config check
    with pytest.raises(AnalysisError, match=r"analysis.pairs: unknown language 'xx'"):
        analysis_settings(cfg, ["de", "fr"])


def test_zero3_dev_translation_is_refused_where_the_deepspeed_json_is_read(tmp_path):
    from cats_ds.training.loop import TrainError, load_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}))
    with pytest.raises(TrainError, match=r"ds.json: eval.valid_every=500: dev translation during training is not "
                                         r"supported with ZeRO-3"):
        load_ds_config(str(path), 1, load_config(None, ["eval.valid_every=500"]))
    assert load_ds_config(str(path), 1, load_config(None, []))["zero_optimization"]["stage"] == 3
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}))
    assert load_ds_config(str(path), 1, load_config(None, ["eval.valid_every=500"]))
