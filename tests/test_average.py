"""Checkpoint averaging: the elementwise mean of the inputs' weights, in a folder evaluate
loads; step_<n>/ checkpoints from train.save_every with train.keep_last rotation; family
experts averaged expert by expert from DeepSpeed MoE's per-expert files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cats_ds.checkpoints import MODEL_STATES, gather_state_dict, load_for_inference, read_meta
from cats_ds.cli import average_main
from cats_ds.inference.average import AverageError, average_checkpoints, last_checkpoints
from cats_ds.inference.evaluate import evaluate_checkpoint
from helpers import ds_config, launch, write_json
from test_evaluate import make_checkpoint


def perturbed_copy(src: Path, dst: Path, seed: int, step: int) -> dict:
    """A copy of checkpoint src with every weight moved by seeded noise; returns its state."""
    dst.mkdir(parents=True)
    state = torch.load(src / MODEL_STATES, weights_only=True)["module"]
    g = torch.Generator().manual_seed(seed)
    state = {k: v + torch.randn(v.shape, generator=g) for k, v in state.items()}
    state["dec_embed.weight"] = state["embed.weight"]  # tied, as the model saves it
    torch.save({"module": state, "optimizer": None}, dst / MODEL_STATES)
    meta = json.loads((src / "cats_ds.json").read_text())
    (dst / "cats_ds.json").write_text(json.dumps(dict(meta, step=step)))
    return state


def test_average_of_two_is_the_mean_and_evaluate_loads_it(tmp_path, tiny_data):
    run = tmp_path / "run"
    a_dir, a = make_checkpoint(run / "step_7", tiny_data)
    b = perturbed_copy(a_dir, run / "step_9", seed=1, step=9)
    out = average_checkpoints([run / "step_7", run / "step_9"], run / "avg2")
    _, model, *_ = load_for_inference(out)
    for k, v in model.state_dict().items():
        expected = ((a[k].double() + b[k].double()) / 2).float()
        assert torch.equal(v, expected), k
        assert not torch.equal(v, a[k]) and not torch.equal(v, b[k])
    meta = read_meta(out)
    assert meta["step"] == 9 and meta["zero_stage"] == 0
    assert [x["step"] for x in meta["averaged_from"]] == [7, 9]
    report = evaluate_checkpoint(out, limit=2, overrides=["eval.beam=1"])
    assert report["settings"]["step"] == 9 and all(r["n"] == 2 for r in report["languages"].values())
    assert (run / "eval" / "avg2-test" / "bleu.json").is_file()


def test_last_n_and_refusals(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    make_checkpoint(run / "step_2", tiny_data)
    s10 = perturbed_copy(run / "step_2", run / "step_10", seed=1, step=10)
    s3 = perturbed_copy(run / "step_2", run / "step_3", seed=2, step=3)
    average_main(["--last", "2", "--save-dir", str(run), "--out", str(run / "avg")])
    assert "steps 3, 10" in capsys.readouterr().out  # numeric order: step_10 is the newest
    got = gather_state_dict(run / "avg", read_meta(run / "avg"))
    assert torch.equal(got["embed.weight"], ((s3["embed.weight"].double() + s10["embed.weight"].double()) / 2).float())

    with pytest.raises(AverageError, match=r"--last 4: .* has 3 numbered checkpoints .*train.save_every"):
        last_checkpoints(run, 4)
    with pytest.raises(AverageError, match="exists; .*--force"):
        average_checkpoints([run / "step_2", run / "step_3"], run / "avg")
    other = tmp_path / "other"
    make_checkpoint(other, tiny_data)
    meta = json.loads((other / "cats_ds.json").read_text())
    meta["config"]["model"]["ffn_dim"] = 128
    (other / "cats_ds.json").write_text(json.dumps(meta))
    with pytest.raises(AverageError, match=rf"{other}: model.ffn_dim=128 but .* has 64"):
        average_checkpoints([run / "step_2", other], tmp_path / "bad")
    with pytest.raises(SystemExit):
        average_main(["--inputs", str(run / "step_2"), "--last", "2", "--save-dir", str(run), "--out", "x"])
    assert "not both" in capsys.readouterr().err


def test_save_every_keep_last_then_average_experts(tmp_path, tiny_recipe):
    """A real 1-rank run with family experts (DeepSpeed MoE writes expert files): step_<n>/
    every update, the newest 2 kept, best/latest untouched; their average is the mean of
    the two checkpoints' weights, experts included, and evaluate loads it."""
    families = tmp_path / "families.yaml"
    families.write_text(yaml.safe_dump({"x": ["aa", "bb"], "y": ["cc"]}))
    recipe = tiny_recipe("run", train={"max_updates": 4, "save_every": 1, "keep_last": 2, "valid_every": 2},
                         experts={"modules": ["ffn"], "families": str(families)})
    launch(["launch/train.py", "--deepspeed_config", write_json(tmp_path / "z0.json", ds_config(0)),
            "--config", recipe], 1)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["best", "latest", "step_3", "step_4"]
    assert list((run / "step_4").glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    states = [gather_state_dict(run / s, read_meta(run / s)) for s in ("step_3", "step_4")]
    expert_keys = [k for k in states[0] if "experts" in k]
    assert expert_keys and any(not torch.equal(states[0][k], states[1][k]) for k in expert_keys)
    out = average_checkpoints([run / "step_3", run / "step_4"], run / "avg")
    _, model, *_ = load_for_inference(out)
    got = model.state_dict()
    for k in expert_keys + ["embed.weight"]:
        assert torch.equal(got[k], ((states[0][k].double() + states[1][k].double()) / 2).float()), k
    report = evaluate_checkpoint(out, limit=2, overrides=["eval.beam=1"])
    assert report["settings"]["step"] == 4
    # the averaged expert checkpoint (DeepSpeed's expert layout, averaged) exports per family
    from cats_ds.cli import export_main

    export_main(["--checkpoint", str(out), "--out", str(tmp_path / "ct2")])
    assert json.loads((tmp_path / "ct2" / "families.json").read_text())["folder"] == {"aa": "x", "bb": "x", "cc": "y"}
    assert (tmp_path / "ct2" / "y" / "model.bin").is_file()
