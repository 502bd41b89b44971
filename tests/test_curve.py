"""Learning curve from a run's numbered checkpoints (cats_ds/reports/curve.py), on hand-made
checkpoint metadata and evaluate outputs: which checkpoints are points, where minutes
and dev loss come from, the budget rows, and the errors."""

import json

import pytest
import torch

from cats_ds.cli import curve_main
from cats_ds.inference.evaluate import EvalError
from cats_ds.reports.curve import at_minutes, curve_checkpoints, curve_points, write_curve


def _ckpt(run, name, step, elapsed_s=None, valid_loss=None, states_elapsed=None):
    d = run / name
    d.mkdir(parents=True)
    meta = {"step": step, "valid_loss": valid_loss}
    if elapsed_s is not None:
        meta["elapsed_s"] = elapsed_s
    (d / "cats_ds.json").write_text(json.dumps(meta))
    if states_elapsed is not None:
        torch.save({"elapsed": states_elapsed, "step": step}, d / "mp_rank_00_model_states.pt")
    return d


def _scores(run, name, chrf, limit=200, split="test"):
    d = run / "eval" / f"{name}-{split}"
    d.mkdir(parents=True)
    av = {"Lo": {"chrf": chrf, "bleu": chrf / 2, "copy_chrf": 17.0, "copy_bleu": 9.0},
          "Mid": None,
          "Hi": {"chrf": chrf + 1, "bleu": chrf / 2 + 1, "copy_chrf": 24.8, "copy_bleu": 19.7},
          "All": {"chrf": chrf + 0.5, "bleu": chrf / 2 + 0.5, "copy_chrf": 20.9, "copy_bleu": 14.3}}
    (d / "bleu.json").write_text(json.dumps({"averages": av, "settings": {"limit": limit, "split": split}}))


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    _ckpt(run, "step_100", 100, elapsed_s=300.0, valid_loss=5.0)
    _ckpt(run, "step_200", 200, states_elapsed=650.0)           # older checkpoint: time in the client state
    _ckpt(run, "latest", 260, elapsed_s=1805.0)                  # final state, past step_200
    (run / "train_log.jsonl").write_text(
        json.dumps({"kind": "valid", "step": 200, "mean_loss": 4.25}) + "\n{cut by a cra\n"
        + json.dumps({"kind": "train", "step": 250, "loss": 9.0}) + "\n")
    for name, chrf in (("step_100", 10.0), ("step_200", 20.0), ("latest", 30.0)):
        _scores(run, name, chrf)
    return run


def test_points_minutes_and_dev_loss(run):
    pts = curve_points(run)
    assert [(p.checkpoint, p.step) for p in pts] == [("step_100", 100), ("step_200", 200), ("latest", 260)]
    assert [p.minutes for p in pts] == pytest.approx([5.0, 650 / 60, 1805 / 60])
    assert [p.valid_loss for p in pts] == [5.0, 4.25, None]  # meta, then the train log's validation record
    assert pts[1].scores["Hi"]["chrf"] == 21.0 and "Mid" not in pts[1].scores


def test_latest_only_when_past_the_last_numbered(run):
    (run / "latest" / "cats_ds.json").write_text(json.dumps({"step": 200, "elapsed_s": 650.0}))
    assert [p.name for p in curve_checkpoints(run)] == ["step_100", "step_200"]


def test_budget_rows_take_the_last_checkpoint_within(run):
    marks = at_minutes(curve_points(run), [4, 10, 11, 30])
    assert marks[4] is None
    assert marks[10].checkpoint == "step_100"
    assert marks[11].checkpoint == "step_200"
    assert marks[30].checkpoint == "latest"  # 30.08 min: a max_minutes=30 run's final save lands just past


def test_missing_or_stale_scores_are_named(run):
    _ckpt(run, "step_150", 150, elapsed_s=400.0)
    with pytest.raises(EvalError, match=r"step_150: no scores on test .*--limit 200"):
        curve_points(run, limit=200)


def test_points_scored_on_different_sentences_are_refused(run):
    (run / "eval" / "step_200-test" / "bleu.json").unlink()
    _ckpt_scores = run / "eval" / "step_200-test"
    _ckpt_scores.rmdir()
    _scores(run, "step_200", 20.0, limit=500)
    with pytest.raises(EvalError, match=r"step_200 was scored with --limit 500, step_100 with 200"):
        curve_points(run)


def test_no_checkpoints(tmp_path):
    with pytest.raises(EvalError, match="train.save_every"):
        curve_points(tmp_path)


def test_files_and_cli(run, tmp_path, capsys):
    out = tmp_path / "out"
    table = write_curve(curve_points(run), out, "test", [10, 30])
    assert "| copy baseline | | | | 17.00 | 24.80 | 20.90 |" in table
    assert "| 30 min | latest | 260 | 30.1 |" in table
    saved = json.loads((out / "curve.json").read_text())
    assert saved["at_minutes"] == {"10": "step_100", "30": "latest"} and len(saved["points"]) == 3
    pytest.importorskip("matplotlib")
    assert (out / "curve.png").stat().st_size > 10_000
    curve_main(["--run", str(run), "--minutes", "60"])
    assert "| 60 min | latest |" in capsys.readouterr().out
    assert (run / "eval" / "curve-test" / "curve.png").is_file()
    with pytest.raises(SystemExit):
        curve_main(["--run", str(run), "--minutes", "ten"])
