"""Model folders (cats_ds/inference/model_folder.py): model.safetensors with the tied embedding once,
config.json, spm.model and a README; a copy moved to a fresh directory translates and
(with --data-dir) scores there exactly like the checkpoint it came from; evaluate,
average, export and analyze take it; a missing data folder gets the --data-dir advice."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cats_ds.checkpoints import (MODEL_STATES, CheckpointError, ModelFolderError, load_for_inference, load_model,
                                 read_meta)
from cats_ds.cli import evaluate_main, export_main
from cats_ds.config import config_from_dict
from cats_ds.data.manifest import Manifest, load_split
from cats_ds.inference import search
from cats_ds.inference.average import average_checkpoints
from cats_ds.inference.evaluate import EvalError, evaluate_checkpoint
from cats_ds.inference.export import export_checkpoint
from cats_ds.inference.model_folder import write_model_folder
from cats_ds.model.build import model_from_config
from helpers import TINY_MODEL
from test_average import perturbed_copy
from test_evaluate import make_checkpoint


def test_folder_holds_weights_once_config_spm_and_readme(tmp_path, tiny_data):
    ckpt, state = make_checkpoint(tmp_path / "run" / "best", tiny_data, valid_loss=4.5)
    out = export_checkpoint(ckpt, tmp_path / "model", "pytorch")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "spm.model"]
    weights = load_file(str(out / "model.safetensors"))
    assert "embed.weight" in weights and "dec_embed.weight" not in weights  # tied: stored once
    assert set(weights) == set(state) - {"dec_embed.weight"}
    assert all(torch.equal(weights[k], state[k]) for k in weights)
    conf = json.loads((out / "config.json").read_text())
    assert conf["model"] == dict(config_from_dict({"model": TINY_MODEL}).to_dict()["model"])
    assert conf["vocab_size"] == Manifest.load(tiny_data).vocab_size == state["embed.weight"].shape[0]
    assert conf["languages"] == ["aa", "bb", "cc"]
    assert conf["language_tags"] == {"aa": "<2aa>", "bb": "<2bb>", "cc": "<2cc>"}
    assert conf["families"] is None and conf["training"]["step"] == 7
    assert conf["training"]["manifest_fingerprint"] == Manifest.load(tiny_data).fingerprint
    assert (out / "spm.model").read_bytes() == (tiny_data / "spm.model").read_bytes()
    readme = (out / "README.md").read_text()
    assert "updates: 7" in readme and "aa 400, bb 150, cc 50" in readme and "dev loss 4.5000" in readme
    assert "No test scores yet" in readme
    # the README's Python example translates with the folder alone
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    exec(code, {})
    assert "print(vocab.decode(hyp.tokens))" in code
    # once evaluate has written test scores beside the checkpoint, the README shows them
    evaluate_checkpoint(ckpt, limit=3, overrides=["eval.beam=1"])
    export_checkpoint(ckpt, out, "pytorch", force=True)
    assert "| en-bb | 3 |" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["training"]["test_scores"]["languages"]["bb"]["n"] == 3
    with pytest.raises(ModelFolderError, match="exists.*--force"):
        export_checkpoint(ckpt, out, "pytorch")


def test_folder_copied_to_a_fresh_directory_translates_and_scores_there(tmp_path, tiny_data, monkeypatch, capsys):
    """The data folder moves away, the model folder is copied elsewhere and evaluated from
    another working directory: translation needs nothing else, scoring needs --data-dir,
    and both give what the original checkpoint gives."""
    ckpt, _ = make_checkpoint(tmp_path / "run" / "best", tiny_data)
    reference = evaluate_checkpoint(ckpt, limit=4, out_dir=tmp_path / "ref", overrides=["eval.beam=2"])
    export_checkpoint(ckpt, tmp_path / "run" / "best" / "model", "pytorch")
    fresh = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tmp_path / "run" / "best" / "model", fresh)
    moved = tmp_path / "moved-data"
    shutil.copytree(tiny_data, moved)
    shutil.rmtree(tmp_path / "run")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    # the training data folder is gone from where config.json says it was
    hidden = tiny_data.with_name("bin-hidden")
    os.rename(tiny_data, hidden)
    try:
        cfg, model, vocab, langs, meta = load_model(fresh)  # translating needs only the folder
        test = load_split(moved, Manifest.load(moved), "test", ["cc"])["cc"]
        src = torch.tensor(test.src[0].astype("int64"))[None]
        hyp = search.greedy_search(model, src, torch.tensor([vocab.lang_ids["cc"]]), torch.tensor([2]))
        assert hyp[0].tokens[-1] == vocab.eos and meta["step"] == 7
        with pytest.raises(SystemExit):
            evaluate_main(["--checkpoint", str(fresh), "--limit", "2"])
        err = capsys.readouterr().err
        assert "does not exist" in err and "--data-dir" in err and "run prepare" not in err, err
        with pytest.raises(SystemExit):
            evaluate_main(["--checkpoint", str(fresh), "--data-dir", str(tmp_path), "data.dir=" + str(moved)])
        assert "disagree" in capsys.readouterr().err
        report = evaluate_checkpoint(fresh, limit=4, data_dir=moved, overrides=["eval.beam=2"])
        # data.dir=DIR as an override is the same as --data-dir DIR
        again = evaluate_checkpoint(fresh, limit=4, out_dir=tmp_path / "again",
                                    overrides=["eval.beam=2", f"data.dir={moved}"])
        assert again["languages"] == report["languages"]
    finally:
        os.rename(hidden, tiny_data)
    assert (fresh.parent / "eval" / "copy-test" / "bleu.json").is_file()
    for lang, r in reference["languages"].items():
        assert report["languages"][lang]["bleu"] == r["bleu"] and report["languages"][lang]["chrf"] == r["chrf"]
    # a data folder of other data is refused by its fingerprint, naming --data-dir
    manifest = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps(dict(manifest, fingerprint="ffffffffffffffff")))
    with pytest.raises(EvalError, match="fingerprint ffffffffffff.*--data-dir"):
        evaluate_checkpoint(fresh, limit=2, data_dir=moved)


def test_a_checkpoint_whose_data_moved_gets_the_data_dir_advice(tmp_path, tiny_data):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_data, moved)
    ckpt, _ = make_checkpoint(tmp_path / "best", tiny_data)
    meta = json.loads((ckpt / "cats_ds.json").read_text())
    meta["config"]["data"]["dir"] = str(tmp_path / "gone")
    (ckpt / "cats_ds.json").write_text(json.dumps(meta))
    with pytest.raises(EvalError, match=r"data.dir=\S*gone \(from \S*cats_ds.json.*does not exist.*--data-dir"):
        evaluate_checkpoint(ckpt, limit=1)
    report = evaluate_checkpoint(ckpt, limit=1, data_dir=moved, overrides=["eval.beam=1"])
    assert report["languages"]["aa"]["n"] == 1
    out = export_checkpoint(ckpt, tmp_path / "m", "pytorch", data_dir=moved)  # export too
    assert (out / "spm.model").is_file()


def test_average_stores_the_tied_embedding_once_and_takes_model_folders(tmp_path, tiny_data):
    run = tmp_path / "run"
    a_dir, a = make_checkpoint(run / "step_7", tiny_data)
    b = perturbed_copy(a_dir, run / "step_9", seed=1, step=9)
    out = average_checkpoints([run / "step_7", run / "step_9"], run / "avg2")
    saved = torch.load(out / MODEL_STATES, weights_only=True)["module"]
    assert "embed.weight" in saved and "dec_embed.weight" not in saved
    _, model, *_ = load_for_inference(out)
    assert model.dec_embed is model.embed
    expected = ((a["embed.weight"].double() + b["embed.weight"].double()) / 2).float()
    assert torch.equal(model.dec_embed.weight, expected)
    # model folders in, a model folder out
    fa = export_checkpoint(run / "step_7", tmp_path / "fa", "pytorch")
    fb = export_checkpoint(run / "step_9", tmp_path / "fb", "pytorch")
    avg = average_checkpoints([fa, fb], tmp_path / "favg")
    assert (avg / "model.safetensors").is_file() and (avg / "spm.model").is_file()
    assert read_meta(avg)["step"] == 9
    _, from_folders, *_ = load_for_inference(avg)
    for k, v in model.state_dict().items():
        assert torch.equal(from_folders.state_dict()[k], v), k


def test_expert_model_folder_routes_without_the_family_map_file(tmp_path, tiny_data):
    """A family-expert model with a custom family map: config.json keeps the assignment, so
    the folder loads after the map file is gone, with every expert's weights."""
    families = tmp_path / "families.yaml"
    families.write_text(yaml.safe_dump({"x": ["aa", "bb"], "y": ["cc"]}))
    cfg = config_from_dict({"data": {"dir": str(tiny_data)}, "model": dict(TINY_MODEL),
                            "experts": {"modules": ["ffn", "out_embed"], "families": str(families)}})
    manifest = Manifest.load(tiny_data)
    torch.manual_seed(0)
    model = model_from_config(cfg, manifest.vocab_size, manifest.languages).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # experts differ
    out = write_model_folder(cfg, model, manifest.languages, tiny_data / "spm.model", tmp_path / "m",
                             {"step": 3, "manifest_fingerprint": manifest.fingerprint})
    families.unlink()
    conf = json.loads((out / "config.json").read_text())
    assert conf["families"]["names"] == ["x", "y"] and conf["families"]["of_language"]["cc"] == "y"
    _, loaded, _, _, meta = load_model(out)
    assert loaded.lang_family.tolist() == [0, 0, 1]
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # the per-family exports take the folder's families too
    pytest.importorskip("transformers")
    hf = export_checkpoint(out, tmp_path / "hf", "transformers")
    assert json.loads((hf / "families.json").read_text())["folder"] == {"aa": "x", "bb": "x", "cc": "y"}
    pytest.importorskip("ctranslate2")
    ct2 = export_checkpoint(out, tmp_path / "ct2", "ctranslate2")
    assert json.loads((ct2 / "families.json").read_text())["folder"] == {"aa": "x", "bb": "x", "cc": "y"}


def test_damaged_or_incomplete_folders_are_named(tmp_path, tiny_data):
    ckpt, _ = make_checkpoint(tmp_path / "best", tiny_data)
    out = export_checkpoint(ckpt, tmp_path / "m", "pytorch")
    (out / "spm.model").unlink()
    with pytest.raises(CheckpointError, match="m/spm.model is missing.*copy the whole folder"):
        load_model(out)
    out = export_checkpoint(ckpt, tmp_path / "m", "pytorch", force=True)
    (out / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors: damaged"):
        load_model(out)
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(out), "--format", "pytorch", "--out", str(tmp_path / "x")])


def test_analyze_takes_a_model_folder_with_data_dir(tmp_path, tiny_data):
    """analyze on a model folder whose recorded data folder is gone: --data-dir gives the
    data, and the record equals the checkpoint's (same weights, same batches)."""
    from cats_ds.analysis.analyze import analyze_checkpoint, default_out_dir

    ckpt, _ = make_checkpoint(tmp_path / "run" / "best", tiny_data)
    folder = export_checkpoint(ckpt, ckpt / "model", "pytorch")
    assert default_out_dir(folder) == (tmp_path / "run" / "analysis" / "best.model").resolve()
    conf = json.loads((folder / "config.json").read_text())
    conf["training"]["config"]["data"]["dir"] = str(tmp_path / "gone")
    (folder / "config.json").write_text(json.dumps(conf))
    overrides = ["analysis.sentences=8", "analysis.hessian_iters=2"]
    with pytest.raises(CheckpointError, match="gone.*does not exist.*--data-dir"):
        analyze_checkpoint(folder, overrides=overrides)
    got = analyze_checkpoint(folder, overrides=overrides, data_dir=tiny_data)
    ref = analyze_checkpoint(ckpt, overrides=overrides)
    assert got["step"] == ref["step"] == 7
    assert got["pair_types"] == ref["pair_types"] and got["lambda_max"] == ref["lambda_max"]


def test_training_ends_with_a_model_folder_in_best(tmp_path, tiny_recipe, tiny_data, monkeypatch):
    """The default end of train: best/model/, which loads to best/'s weights and, copied to
    a fresh directory, evaluates there like best/."""
    from helpers import ds_config, launch, write_json

    ds = write_json(tmp_path / "z0.json", ds_config(0))
    launch(["launch/train.py", "--deepspeed_config", ds, "--config", tiny_recipe("run", train={"max_updates": 3})], 1)
    best = tmp_path / "run" / "best"
    assert (best / "model" / "model.safetensors").is_file()
    _, from_ckpt, *_ = load_for_inference(best)
    _, from_folder, *_ = load_model(best / "model")
    for k, v in from_ckpt.state_dict().items():
        assert torch.equal(from_folder.state_dict()[k], v), k
    assert "updates: 3" in (best / "model" / "README.md").read_text()
    fresh = tmp_path / "fresh" / "model"
    shutil.copytree(best / "model", fresh)
    monkeypatch.chdir(fresh.parent)
    report = evaluate_checkpoint("model", limit=2, data_dir=tiny_data, overrides=["eval.beam=1"])
    ref = evaluate_checkpoint(best, limit=2, out_dir=tmp_path / "ref", overrides=["eval.beam=1"])
    assert report["languages"] == {**ref["languages"]}
