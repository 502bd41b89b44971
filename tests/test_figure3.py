"""Figure 3 from run folders (cats_ds/reports/figure3.py): synthetic train_log.jsonl files of 2 arms
x 2 seeds x 4 languages; no training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cats_ds.analysis.records import load_run, seed_stats
from cats_ds.cli import figure3_main
from cats_ds.data.manifest import Manifest
from cats_ds.reports.figure3 import FigureError, group_train, make_figure3, smooth

HI, LO = ("de", "es"), ("af", "cy")
LANGS = HI + LO
STEPS = list(range(10, 210, 10))  # train log every 10 updates
VALID = list(range(20, 220, 20))  # validation every 20


def dev_curve(step: int, bottom: int, depth: float) -> float:
    """U-shaped: lowest (1.0 + depth) at `bottom`, up 0.001 per update either side."""
    return 1.0 + depth + 0.001 * abs(step - bottom)


def write_run(root: Path, name: str, lo_bottom: int, seed_shift: float = 0.0, alpha: bool = False,
              valid: bool = True, config_data: Path | None = None) -> Path:
    """A run folder: train loss lang-specific constants + a decay; dev loss U-shaped for Lo
    (minimum at `lo_bottom`), decreasing for Hi; `seed_shift` added to every value."""
    run = root / name
    run.mkdir(parents=True)
    log = []
    for s in STEPS:
        loss_lang = {l: 3.0 + i + 100.0 / s + seed_shift for i, l in enumerate(LANGS)}
        rec = {"kind": "train", "step": s, "loss": 4.0, "loss_lang": loss_lang}
        if alpha:
            rec["weighting"] = {**{f"alpha/{l}": 1.0 + (0.001 * s if l in HI else -0.001 * s) + seed_shift
                                   for l in LANGS}, "cats/lambda_c": 0.1}
        log.append(rec)
        if valid and s in VALID:
            langs = {l: {"loss": dev_curve(s, lo_bottom, 0.1 * i) + seed_shift, "nll": 1.0} for i, l in
                     enumerate(LO)}
            langs.update({l: {"loss": 2.0 + 10.0 / s + seed_shift, "nll": 1.0} for l in HI})
            log.append({"kind": "valid", "step": s, "mean_loss": 2.0, "langs": langs})
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    if config_data is not None:  # what train.py's write_run_config leaves (values; its comments do not matter)
        (run / "config.yaml").write_text(f"# resolved config\ndata:\n  dir: {config_data}\neval:\n  lo_max: 1000\n"
                                         f"  hi_min: 5000\n  groups: {{}}\n")
    return run


@pytest.fixture
def arms(tmp_path):
    """T=5: Lo dev lowest at 80 / 120 (seeds), CATS: at 160, with alpha."""
    root = tmp_path / "runs"
    return {"T=5": [write_run(root, "t5-s1", 80), write_run(root, "t5-s2", 120, seed_shift=0.02)],
            "CATS": [write_run(root, "cats-s1", 160, alpha=True), write_run(root, "cats-s2", 160, 0.02, alpha=True)]}


def spec(label: str, runs) -> str:
    return f"{label}:{','.join(str(r) for r in runs)}"


def test_smoothing_is_a_centered_moving_average_shrinking_at_the_ends():
    assert smooth([1.0, 2.0, 3.0, 4.0, 5.0], 1) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert smooth([1.0, 2.0, 3.0, 4.0, 5.0], 3) == pytest.approx([1.5, 2.0, 3.0, 4.0, 4.5])
    assert smooth([0.0, 0.0, 6.0, 0.0, 0.0], 5) == pytest.approx([2.0, 1.5, 1.2, 1.5, 2.0])
    assert smooth([1.0, 3.0], 2) == pytest.approx([2.0, 3.0])  # even: one point after, none before
    with pytest.raises(FigureError, match="window must be >= 1"):
        smooth([1.0], 0)


def test_group_macro_average_skips_windows_missing_a_language(tmp_path):
    run = write_run(tmp_path, "r", 100)
    lines = (run / "train_log.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    del rec["loss_lang"]["cy"]  # step 10 drew no cy
    lines[0] = json.dumps(rec)
    (run / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    (steps, values), skipped = group_train(load_run(run), list(LO))
    assert skipped == 1 and steps == STEPS[1:]
    assert values[0] == pytest.approx(np.mean([3.0 + 2 + 100 / 20, 3.0 + 3 + 100 / 20]))
    (steps, values), skipped = group_train(load_run(run), list(HI))
    assert skipped == 0 and values[0] == pytest.approx(3.5 + 100 / 10)


def test_seed_stats_keep_the_common_updates():
    stats = seed_stats([([1, 2, 3], [1.0, 2.0, 3.0]), ([2, 3], [4.0, 6.0])])
    assert stats.steps == [2, 3] and stats.mean == [3.0, 4.5] and stats.low == [2.0, 3.0] and stats.high == [4.0, 6.0]
    assert stats.sd == [1.0, 1.5] and stats.dropped == 1 and stats.seeds == 2
    assert seed_stats([([1], [1.0]), ([2], [1.0])]) is None


def test_figure3_png_table_and_summary(arms, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, js, alpha = tmp_path / "f" / "fig3.png", tmp_path / "f" / "fig3.json", tmp_path / "f" / "alpha.png"
    figure3_main(["--arm", spec("T=5", arms["T=5"]), "--arm", spec("CATS", arms["CATS"]), "--lo", "af,cy",
                  "--hi", "de,es", "--out", str(out), "--json", str(js), "--alpha-out", str(alpha), "--smooth", "3"])
    for png in (out, alpha):
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    summary = json.loads(js.read_text())
    t5 = summary["arms"]["T=5"]["groups"]
    assert t5["Lo"]["languages"] == ["af", "cy"] and t5["Hi"]["languages"] == ["de", "es"]
    # U-shaped Lo dev loss: the seeds' minima at 80 and 120 -> mean 100, sd 20
    assert [s["min_step"] for s in t5["Lo"]["seeds"]] == [80, 120]
    assert t5["Lo"]["min_step_mean"] == 100 and t5["Lo"]["min_step_sd"] == 20
    # macro-average of af (depth 0) and cy (0.1) at the bottom: 1.05; seed 2 is +0.02
    assert t5["Lo"]["min_loss_mean"] == pytest.approx(1.05 + 0.01)
    # final (200): 1.05 + 0.001 * (120 | 80) (+ 0.02 for seed 2)
    assert t5["Lo"]["final_loss_mean"] == pytest.approx(1.05 + 0.001 * 100 + 0.01)
    assert t5["Lo"]["overfit_mean"] == pytest.approx(0.1)
    assert summary["arms"]["CATS"]["groups"]["Lo"]["curve_min_step"] == 160
    # Hi dev loss keeps falling: lowest at the last validation, no overfitting
    assert t5["Hi"]["min_step_mean"] == 200 and t5["Hi"]["overfit_mean"] == 0
    # the plotted train curve: the group mean, smoothed over 3 log points, mean over seeds
    train = t5["Hi"]["train"]
    raw = [3.5 + 100.0 / s + 0.01 for s in STEPS]
    assert train["steps"] == STEPS and train["mean"] == pytest.approx(smooth(raw, 3))
    assert train["high"][0] - train["low"][0] == pytest.approx(0.02)
    table = capsys.readouterr().out
    assert "| T=5 | Lo | 2 | 100 ± 20 | 1.0600 | 200 | 1.1600 | +0.1000 |" in table
    assert f"written: {out}, {js}, {alpha}" in table


def test_groups_from_the_run_config_or_data_manifest(arms, tmp_path):
    pytest.importorskip("matplotlib")
    data = tmp_path / "data"
    data.mkdir()
    Manifest(languages=list(LANGS), pairs={"train": {"de": 9000, "es": 8000, "af": 300, "cy": 200}}, vocab_size=8,
             dtype="uint16", corpus="toy").save(data)
    runs = [write_run(tmp_path / "c", f"s{i}", 100, config_data=data) for i in (1, 2)]
    make_figure3([spec("T=1", runs)], tmp_path / "a.png", tmp_path / "a.json")  # config.yaml -> data.dir
    groups = json.loads((tmp_path / "a.json").read_text())["arms"]["T=1"]["groups"]
    assert groups["Lo"]["languages"] == ["af", "cy"] and groups["Hi"]["languages"] == ["de", "es"]
    make_figure3([spec("T=5", arms["T=5"])], tmp_path / "b.png", tmp_path / "b.json", data_dir=data,
                 columns=["Lo", "All"])  # no config: --data with the default lo_max / hi_min: all Lo
    groups = json.loads((tmp_path / "b.json").read_text())["arms"]["T=5"]["groups"]
    assert groups["Lo"]["languages"] == list(sorted(LANGS)) == groups["All"]["languages"]
    with pytest.raises(FigureError, match="cannot tell its Lo from its Hi"):
        make_figure3([spec("T=5", arms["T=5"])], tmp_path / "c.png")


def test_clear_errors(arms, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "x.png")
    names = ["--lo", "af,cy", "--hi", "de,es", "--out", out]
    with pytest.raises(SystemExit):
        figure3_main(["--arm", f"T=5:{arms['T=5'][0]},{tmp_path / 'nowhere'}"] + names)
    assert f"arm T=5: run folder not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err

    bad = write_run(tmp_path / "bad", "s1", 100)
    with open(bad / "train_log.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 2\n')
    n = len((bad / "train_log.jsonl").read_text().splitlines())
    with pytest.raises(SystemExit):
        figure3_main(["--arm", f"T=1:{bad}"] + names)
    assert f"{bad / 'train_log.jsonl'}:{n}: not valid JSON" in capsys.readouterr().err

    novalid = [write_run(tmp_path / "nv", f"s{i}", 100, valid=False) for i in (1, 2)]
    with pytest.raises(SystemExit):
        figure3_main(["--arm", spec("T=inf", novalid)] + names)
    err = capsys.readouterr().err
    assert f"arm T=inf: {novalid[0] / 'train_log.jsonl'} has no validation" in err

    with pytest.raises(SystemExit):
        figure3_main(["--arm", "T=5" + str(arms["T=5"][0])] + names)  # no ':'
    assert "should be LABEL:DIR[,DIR...]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        figure3_main(["--arm", spec("T=5", arms["T=5"]), "--lo", "af,xx", "--hi", "de", "--out", out])
    assert "--lo xx: not among the languages" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        figure3_main(["--arm", spec("T=5", arms["T=5"]), "--alpha-out", str(tmp_path / "a.png")] + names)
    assert "--alpha-out: no arm logged alpha/<lang>" in capsys.readouterr().err
    assert not Path(out).exists()
