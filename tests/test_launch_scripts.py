"""The launch scripts parse, and gettext8_experiments.sh plans the protocol's commands
(DRY_RUN=1: printed, not run): seeds, resume and skip, evaluation, compare with marks."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "launch").glob("*.sh")))
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", f"launch/{script}"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def dry_run(tmp_path: Path, what: str, **env) -> list[str]:
    full = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), **env)
    done = subprocess.run(["bash", "launch/gettext8_experiments.sh", what], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_experiments_dry_run_trains_every_seed_and_compares_with_a_baseline(tmp_path):
    lines = dry_run(tmp_path, "weighting", SEEDS="3", UPDATES="50")
    trains = [l for l in lines if l.startswith("+ deepspeed")]
    arms = ("t1", "t5", "tinf", "cats", "t1d", "cats_noloss", "cats_literal", "gradnorm", "mgda")
    assert len(trains) == len(arms) * 3
    for arm in arms:
        for seed in (1, 2, 3):
            cmd = next(l for l in trains if f"train.save_dir={tmp_path}/{arm}-s{seed} " in l)
            assert f"train.seed={seed} " in cmd and "train.resume=auto" in cmd and "train.max_updates=50 " in cmd
    evals = [l for l in lines if l.startswith("+ python launch/evaluate.py")]
    assert len(evals) == len(arms) * 3 and f"--checkpoint {tmp_path}/cats-s2/best --split test" in "\n".join(evals)
    compare = [l for l in lines if l.startswith("+ python launch/compare.py")]
    assert len(compare) == 1 and "--baseline T5" in compare[0]
    seeds = ",".join(f"{tmp_path}/t5-s{s}/eval/best-test" for s in (1, 2, 3))
    assert f" T5={seeds} " in compare[0] + " "
    assert "cats.update=lagrangian" in next(l for l in trains if "/cats_literal-s1 " in l)
    assert "sampling.distinct=true" in next(l for l in trains if "/t1d-s1 " in l)
    assert " CATS-literal=" in compare[0] and " GradNorm=" in compare[0] and " MGDA=" in compare[0]


def test_experiments_gramspace_set(tmp_path):
    lines = dry_run(tmp_path, "gramspace", SEEDS="2")
    trains = [l for l in lines if l.startswith("+ deepspeed")]
    methods = ("pcgrad", "gradvac", "cagrad", "nashmtl", "imtl")
    assert len(trains) == (2 + len(methods)) * 2
    for m in methods:
        assert f"weighting.method={m}" in next(l for l in trains if f"/{m}-s2 " in l)
    compare = [l for l in lines if l.startswith("+ python launch/compare.py")]
    assert len(compare) == 1 and "--baseline T5" in compare[0] and "gramspace.md" in compare[0]
    for label, arm in (("T5", "t5"), ("CATS", "cats"), ("PCGrad", "pcgrad"), ("Nash-MTL", "nashmtl"),
                       ("IMTL-G", "imtl")):
        seeds = ",".join(f"{tmp_path}/{arm}-s{s}/eval/best-test" for s in (1, 2))
        assert f" {label}={seeds} " in compare[0] + " "


def test_experiments_skip_finished_runs_and_fresh_evaluations(tmp_path):
    """t5-s1 finished and evaluated after its best checkpoint: nothing to do; t5-s2
    stopped at step 40 of 100: resumed, then evaluated; x_all-s1 finished, best newer
    than its evaluation: re-evaluated only."""
    def checkpoint(run: str, step: int, mtime: float) -> None:
        for name in ("best", "latest"):
            (tmp_path / run / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / run / name / "cats_ds.json").write_text(json.dumps({"step": step}))
            os.utime(tmp_path / run / name / "cats_ds.json", (mtime, mtime))

    def evaluation(run: str, mtime: float) -> None:
        (tmp_path / run / "eval" / "best-test").mkdir(parents=True)
        (tmp_path / run / "eval" / "best-test" / "bleu.json").write_text("{}")
        os.utime(tmp_path / run / "eval" / "best-test" / "bleu.json", (mtime, mtime))

    now = time.time()
    checkpoint("t5-s1", 100, now - 100)
    evaluation("t5-s1", now - 50)
    checkpoint("t5-s2", 40, now - 100)
    evaluation("x_all-s1", now - 100)
    checkpoint("x_all-s1", 100, now - 50)
    lines = dry_run(tmp_path, "experts", SEEDS="2", UPDATES="100")
    text = "\n".join(lines)
    assert f"| t5 seed 1: finished ({tmp_path}/t5-s1)" in lines
    assert f"train.save_dir={tmp_path}/t5-s1 " not in text and f"--checkpoint {tmp_path}/t5-s1/best" not in text
    assert f"train.save_dir={tmp_path}/t5-s2 train.seed=2 train.resume=auto" in text
    assert f"--checkpoint {tmp_path}/t5-s2/best" in text
    assert f"train.save_dir={tmp_path}/x_all-s1 " not in text and f"--checkpoint {tmp_path}/x_all-s1/best" in text
    assert "--baseline dense" in text and " -- dense=" in text and " -Attn=" in text


def test_experiments_reject_bad_settings(tmp_path):
    full = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), SEEDS="0")
    done = subprocess.run(["bash", "launch/gettext8_experiments.sh", "experts"], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "SEEDS=0 must be a positive integer" in done.stderr
    full["SEEDS"] = "2"
    done = subprocess.run(["bash", "launch/gettext8_experiments.sh", "expert"], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown set 'expert'" in done.stderr


def test_quickstart_installs_the_export_extra():
    """CTranslate2 (export, evaluate --backend ctranslate2) works right after the quickstart."""
    text = (REPO / "launch" / "quickstart.sh").read_text()
    assert "pip install -q -e '.[export]'" in text
    assert "pip install -q -e .\n" not in text


def quickstart_dry_run(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, DRY_RUN="1", CORPUS="plain", RAW=str(tmp_path), LANGS="de,fr", RUN=str(tmp_path / "run"),
                VENV=str(tmp_path / "venv"), **env)
    for knob in ("UPDATES", "MINUTES"):
        if knob not in env:
            full.pop(knob, None)
    return subprocess.run(["bash", "launch/quickstart.sh"], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=60)


def train_command(out: str) -> str:
    return next(l for l in out.splitlines() if l.startswith("+ python launch/supervise.py deepspeed"))


def test_quickstart_trains_a_fixed_number_of_updates_and_reports_its_wall_time(tmp_path):
    """By default the quickstart trains UPDATES (1525, the README's number) updates with no time
    limit, so a slower machine reaches the same model, only later; DRY_RUN=1 installs nothing."""
    done = quickstart_dry_run(tmp_path)
    assert done.returncode == 0, done.stderr
    cmd = train_command(done.stdout)
    assert " train.max_updates=1525 train.max_minutes=null" in cmd + " " and f"train.save_dir={tmp_path}/run" in cmd
    assert "== 4/5 train 1525 updates on 2 ranks" in done.stdout
    assert "| training wall time: 0:00:0" in done.stdout and "Wall time: training 0:00:0" in done.stdout
    assert "+ python launch/prepare.py" in done.stdout and "+ python launch/evaluate.py" in done.stdout
    assert not (tmp_path / "venv").exists()
    done = quickstart_dry_run(tmp_path, UPDATES="3000")
    assert " train.max_updates=3000 train.max_minutes=null" in train_command(done.stdout) + " "


def test_quickstart_minutes_limits_by_time_instead(tmp_path):
    done = quickstart_dry_run(tmp_path, MINUTES="20")
    assert done.returncode == 0, done.stderr
    assert " train.max_minutes=20 train.max_updates=100000" in train_command(done.stdout) + " "
    assert "== 4/5 train 20 minutes on 2 ranks" in done.stdout
    done = quickstart_dry_run(tmp_path, MINUTES="0.5", UPDATES="800")  # both: whichever comes first
    assert " train.max_minutes=0.5 train.max_updates=800" in train_command(done.stdout) + " "


@pytest.mark.parametrize("env, message", [({"UPDATES": "0"}, "UPDATES=0 must be a positive integer"),
                                          ({"UPDATES": "10min"}, "UPDATES=10min must be a positive integer"),
                                          ({"MINUTES": "0"}, "MINUTES=0 must be a positive number"),
                                          ({"MINUTES": "ten"}, "MINUTES=ten must be a positive number")])
def test_quickstart_refuses_bad_limits(tmp_path, env, message):
    done = quickstart_dry_run(tmp_path, **env)
    assert done.returncode == 2 and message in done.stderr
    assert "== 1/5" not in done.stdout


def ted_dry_run(tmp_path: Path, what: str, **env) -> list[str]:
    full = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "runs"), **env)
    done = subprocess.run(["bash", "launch/ted_regime.sh", what], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def fake_evaluated_run(folder: Path, updates: int, eval_sub: str = "eval/best-test") -> None:
    (folder / eval_sub).mkdir(parents=True)
    (folder / eval_sub / "bleu.json").write_text("{}")
    (folder / "config.yaml").write_text(f"train:\n  max_updates: {updates}\n")
    (folder / "train_log.jsonl").write_text("")


def test_ted_regime_keeps_evaluated_runs_and_counts_kept_seeds(tmp_path):
    """KEEP: an evaluated run's config, log and evaluation are copied; a seed whose run folder is
    gone but whose kept copy has the same budget is not retrained and compare reads the copy;
    a kept copy of another budget does not count."""
    keep = tmp_path / "kept"
    fake_evaluated_run(tmp_path / "runs" / "t5-s1", 2500)  # evaluated here: kept
    fake_evaluated_run(keep / "t5-s2", 2500, "eval")  # from another session: counts
    fake_evaluated_run(keep / "cats-s1", 1500, "eval")  # another budget: retrained
    lines = ted_dry_run(tmp_path, "all", SEEDS="2", SEEDS2="1", UPDATES="2500", KEEP=str(keep), ONLY="t5 cats")
    trains = [l for l in lines if l.startswith("+ deepspeed")]
    assert not any("t5-s2" in l for l in trains)
    assert any("t5-s1" in l for l in trains)  # no latest/ checkpoint in the fake folder: resumed
    assert any("cats-s1 " in l for l in trains)
    assert f"+ cp -r {tmp_path}/runs/t5-s1/eval/best-test {keep}/t5-s1/eval" in lines
    assert f"| t5 seed 2: kept in {keep}/t5-s2 (run folder not here)" in lines
    compare = next(l for l in lines if l.startswith("+ python launch/compare.py"))
    assert f"T5={tmp_path}/runs/t5-s1/eval/best-test,{keep}/t5-s2/eval " in compare
