import math

import pytest

import yaml

from cats_ds.cli import train_main
from cats_ds.config import (Config, ConfigError, cats_start_note, default_config, field_docs, load_config,
                            meta_interval)


def test_defaults_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  embed_dim: 64\n  heads: 4\nsampling:\n  temperature: 1\n")
    cfg = load_config(str(recipe), ["sampling.temperature=inf", "train.betas=[0.9,0.99]",
                                    "meta.every=[[100,1],[null,10]]", "data.languages=de,af"])
    assert cfg.model.embed_dim == 64 and cfg.model.heads == 4
    assert math.isinf(cfg.sampling.temperature)
    assert cfg.train.betas == [0.9, 0.99]
    assert cfg.data.languages == ["de", "af"]
    assert meta_interval(cfg.meta.every, 5) == 1 and meta_interval(cfg.meta.every, 500) == 10


def test_unknown_key_names_key_and_closest_match(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_update: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_update'.*did you mean 'max_updates'"):
        load_config(str(recipe))
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*did you mean 'model'"):
        load_config(None, ["modle.embed_dim=3"])


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"model.norm: 'batchnorm' is not one of"):
        load_config(None, ["model.norm=batchnorm"])
    with pytest.raises(ConfigError, match=r"train.max_updates: expected an integer"):
        load_config(None, ["train.max_updates=ten"])
    with pytest.raises(ConfigError, match=r"not divisible"):
        load_config(None, ["model.embed_dim=30", "model.heads=4"])
    with pytest.raises(ConfigError, match=r"meta.every\[0\]"):
        load_config(None, ["meta.every=[[100]]"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_cats_eps_names_its_replacements(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("cats:\n  eps: 1.0\n")
    with pytest.raises(ConfigError, match=r"old.yaml: cats.eps .*cats.kappa .*cats.budget .*cats.alpha_min"):
        load_config(str(recipe))
    with pytest.raises(ConfigError, match="cats.alpha_min"):
        load_config(None, ["cats.eps=0.1"])


def test_moved_meta_keys_still_load(tmp_path, capsys):
    """cats.meta_every, cats.weight_by, cats.meta_data, cats.meta_temperature, cats.params are
    meta.every, meta.weight_by, meta.data, meta.temperature, meta.params (config.MOVED): the old names load from a recipe or an override with a note,
    a checkpoint's saved config compares equal to today's, and contradicting the new name
    is an error."""
    from cats_ds.config import MOVED, config_from_dict, upgrade_legacy
    from cats_ds.training.checkpoint import changed_settings

    recipe = tmp_path / "old.yaml"
    recipe.write_text("weighting: {method: gradnorm}\ncats: {meta_every: [[null, 3]], weight_by: language, "
                      "meta_data: dev, kappa: 0.9, meta_temperature: 2.0, params: all}\n")
    cfg = load_config(str(recipe))
    assert (cfg.meta.every, cfg.meta.weight_by, cfg.meta.data, cfg.cats.kappa) == ([[None, 3]], "language", "dev", 0.9)
    assert (cfg.meta.temperature, cfg.meta.params) == (2.0, "all")
    assert load_config(None, ["cats.meta_every=[[null, 4]]"]).meta.every == [[None, 4]]
    err = capsys.readouterr().err
    if "cats.meta_every" in MOVED and "cats.meta_every is now meta.every" not in err:
        # noted once per process: an earlier test may have loaded an old name already
        from cats_ds.config import _legacy_noted
        assert "cats.meta_every" in _legacy_noted
    saved = cfg.to_dict()
    old = {**saved, "cats": {**saved["cats"], "meta_every": [[None, 3]], "weight_by": "language", "meta_data": "dev",
                             "meta_temperature": 2.0, "params": "all"}}
    del old["meta"]  # the layout a checkpoint written before the meta section saved
    assert upgrade_legacy(old) == saved and changed_settings(old, saved) == []
    assert config_from_dict(old).meta == cfg.meta
    with pytest.raises(ConfigError, match=r"cats.meta_every \(the old name of meta.every\) is \[\[None, 4\]\] but "
                                          r"meta.every is \[\[None, 3\]\]"):
        load_config(None, ["meta.every=[[null, 3]]", "cats.meta_every=[[null, 4]]"])
    assert load_config(None, ["meta.every=[[null, 3]]", "cats.meta_every=[[null, 3]]"]).meta.every == [[None, 3]]


def test_cats_values_are_checked():
    for override, message in [("cats.kappa=1.5", r"cats.kappa must be in \[0, 1\]"),
                              ("cats.kappa=-0.1", r"cats.kappa must be in \[0, 1\]"),
                              ("cats.loss_term=maybe", r"cats.loss_term: 'maybe' is not one of 'off', 'descent', 'ascent'"),
                              ("cats.alpha_min=1", r"cats.alpha_min must be in \[0, 1\)"),
                              ("cats.loss_ema=1", r"cats.loss_ema must be in \[0, 1\)"),
                              ("cats.lr_alpha=-0.1", "cats.lr_alpha must be finite and >= 0"),
                              ("meta.temperature=0", "meta.temperature must be > 0"),
                              ("cats.update=sgd", r"cats.update: 'sgd' is not one of 'mirror', 'lagrangian'"),
                              ("meta.weight_by=sentences", "meta.weight_by")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    cfg = load_config(None, [])
    assert (cfg.cats.update, cfg.meta.weight_by, cfg.sampling.distinct) == ("mirror", "tokens", None)
    assert (cfg.cats.loss_term, cfg.cats.kappa, cfg.cats.lr_alpha, cfg.cats.lr_lambda) == ("off", 0.5, 0.1, 0.01)
    assert load_config(None, ["cats.kappa=0"]).cats.kappa == 0.0  # aim at the min-norm point


def test_sampling_temperature_default_depends_on_the_method(capsys):
    """Unset, sampling.temperature is inf for CATS (alpha = 1 = the paper's equal weights)
    and 5.0 for every other method; a set value wins; a loaded config always holds a float."""
    assert math.isinf(load_config(None, ["weighting.method=cats"]).sampling.temperature)
    for method in ("temperature", "gradnorm", "mgda", "pcgrad"):
        assert load_config(None, [f"weighting.method={method}"]).sampling.temperature == 5.0
    cfg = load_config(None, ["weighting.method=cats", "sampling.temperature=1"])
    assert cfg.sampling.temperature == 1.0
    assert cats_start_note(cfg).startswith("CATS from T=1: ")  # the start-up line of a CATS run not at T=inf
    assert cats_start_note(load_config(None, ["weighting.method=cats"])) is None
    assert cats_start_note(load_config(None, ["sampling.temperature=1"])) is None  # not CATS
    assert load_config(None, ["weighting.method=cats", "sampling.temperature=null"]).sampling.temperature == math.inf
    # --print-config of a CATS run: the resolved T, which is its default (no "# default:" line)
    train_main(["--print-config", "weighting.method=cats"])
    text = capsys.readouterr().out
    assert "  temperature: .inf\n" in text and "  # default: null\n  temperature" not in text
    assert yaml.safe_load(text)["sampling"]["temperature"] == math.inf


def test_old_loss_term_booleans_still_load(tmp_path, capsys):
    """cats.loss_term was a boolean: true reads as descent (its old meaning) with a note
    printed once per process, false as off (as YAML's `off` does); a checkpoint's saved
    true compares equal to descent when a run resumes."""
    from cats_ds import config as config_module
    from cats_ds.training.checkpoint import changed_settings

    config_module._legacy_noted.clear()
    recipe = tmp_path / "old.yaml"
    recipe.write_text("weighting:\n  method: cats\ncats:\n  loss_term: true\n")
    assert load_config(str(recipe)).cats.loss_term == "descent"
    assert load_config(None, ["cats.loss_term=true"]).cats.loss_term == "descent"
    err = capsys.readouterr().err
    assert err.count("note: cats.loss_term is no longer true/false but off | descent | ascent") == 1
    assert load_config(None, ["cats.loss_term=false"]).cats.loss_term == "off"
    assert load_config(None, ["cats.loss_term=off"]).cats.loss_term == "off"
    assert load_config(None, ["cats.loss_term=ascent"]).cats.loss_term == "ascent"
    saved = load_config(None, ["weighting.method=cats", "cats.loss_term=descent"]).to_dict()
    saved["cats"]["loss_term"] = True  # as an older checkpoint's cats_ds.json holds it
    assert changed_settings(saved, load_config(None, ["weighting.method=cats", "cats.loss_term=descent"]).to_dict()) == []
    assert changed_settings(saved, load_config(None, ["weighting.method=cats"]).to_dict()) == [
        "cats.loss_term: 'descent' -> 'off'"]


@pytest.mark.parametrize("override, message", [
    ("train.valid_every=0", r"train.valid_every must be >= 1, got 0"),
    ("train.log_every=0", r"train.log_every must be >= 1, got 0"),
    ("train.max_nonfinite=0", r"train.max_nonfinite must be >= 1, got 0"),
    ("train.lr=-1", r"train.lr must be a finite number > 0, got -1.0"),
    ("train.lr=nan", r"train.lr must be a finite number > 0, got nan"),
    ("train.max_updates=-5", r"train.max_updates must be >= 0, got -5"),
    ("model.max_positions=1", r"model.max_positions must be >= 2, got 1"),
])
def test_out_of_range_train_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_yaml_in_override_names_the_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match=r"^command-line argument 'data.languages=\[de,fr': the value is not valid YAML"):
        load_config(str(recipe), ["data.languages=[de,fr"])
    with pytest.raises(ConfigError, match=r"^command-line argument 'meta.every=\[\[null, 10\]': the value is not valid YAML"):
        load_config(None, ["meta.every=[[null, 10]"])


def test_duplicate_languages_refused():
    with pytest.raises(ConfigError, match=r"data.languages lists de more than once \(\['de', 'de', 'fr'\]\)"):
        load_config(None, ["data.languages=[de,de,fr]"])
    assert load_config(None, ["data.languages=[de,fr]"]).data.languages == ["de", "fr"]


def test_errors_name_the_command_line_argument_or_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  embed_dim: 30\n  heads: 5\n")
    with pytest.raises(ConfigError, match=r"^command-line argument 'train.max_update=10': unknown config key "
                                          r"'train.max_update'; did you mean 'max_updates'"):
        load_config(str(recipe), ["train.lr=0.1", "train.max_update=10"])
    with pytest.raises(ConfigError, match=r"^command-line argument 'train.max_updates=ten': train.max_updates: "
                                          r"expected an integer"):
        load_config(str(recipe), ["train.max_updates=ten"])
    # a cross-key check fails after the argument that broke it, not in the recipe
    with pytest.raises(ConfigError, match=r"^command-line argument 'model.heads=4': model.embed_dim=30 is not "
                                          r"divisible by model.heads=4"):
        load_config(str(recipe), ["train.lr=0.1", "model.heads=4"])
    # the recipe's own error names the recipe, and an argument can fix a recipe's value
    recipe.write_text("model:\n  embed_dim: 30\n  heads: 4\n")
    with pytest.raises(ConfigError, match=r"r.yaml: model.embed_dim=30 is not divisible by model.heads=4"):
        load_config(str(recipe), ["train.lr=0.1"])
    assert load_config(str(recipe), ["model.heads=5"]).model.heads == 5


def test_print_config_lists_every_key_with_doc_and_default(capsys):
    train_main(["--print-config"])
    text = capsys.readouterr().out
    assert yaml.safe_load(text) == default_config().to_dict()  # every section and key, the defaults
    docs = field_docs()
    every_key = {f"{sec}.{key}" for sec, fields in Config().to_dict().items() for key in fields}
    assert set(docs) == every_key and all(docs.values())  # every field of cats_ds/config.py has its doc string
    section, printed = None, set()
    lines = text.splitlines()
    for prev, line in zip(lines, lines[1:]):
        if line.endswith(":") and not line.startswith((" ", "#")):
            section = line[:-1]
        elif line.startswith("  ") and not line.startswith("  #"):
            printed.add(f"{section}.{line.split(':')[0].strip()}")
            assert prev.startswith("  # "), line  # its doc right above it
    assert printed == every_key
    assert "  # Peak learning rate (Adam).\n  lr: 0.0015\n" in text


def test_print_config_applies_recipe_and_overrides_and_shows_defaults(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 0.001\n")
    train_main(["--print-config", "--config", str(recipe), "sampling.temperature=inf", "data.languages=[de,fr]"])
    text = capsys.readouterr().out
    assert "  # default: 0.0015\n  lr: 0.001\n" in text and "  # default: []\n  languages: [de, fr]\n" in text
    # the printed YAML is a recipe giving the same config
    again = tmp_path / "printed.yaml"
    again.write_text(text)
    assert load_config(str(again)) == load_config(str(recipe), ["sampling.temperature=inf", "data.languages=[de,fr]"])
    with pytest.raises(SystemExit):
        train_main(["--config", str(recipe)])  # training needs the DeepSpeed JSON
    assert "--deepspeed_config" in capsys.readouterr().err


def test_run_config_written_and_printed(tmp_path, capsys):
    from cats_ds.training.loop import write_run_config

    cfg = load_config(None, [f"train.save_dir={tmp_path}", "train.max_updates=7"])
    write_run_config(cfg, {"train_micro_batch_size_per_gpu": 1}, "ds.json")
    assert load_config(str(tmp_path / "config.yaml")) == cfg
    assert "  # default: 1000\n  max_updates: 7\n" in (tmp_path / "config.yaml").read_text()
    assert (tmp_path / "ds_config.json").read_text().startswith("{")
    out = capsys.readouterr().out
    assert f"| config ({tmp_path / 'config.yaml'}" in out and "  max_updates: 7\n" in out
