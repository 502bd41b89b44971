"""launch/gpu_check.sh end to end on the CPU accelerator with tiny settings, so that the
first time a GPU is available it is one command that works: bf16 with the shipped
ds_configs/zero2_bf16.json, dense (with dev translation), CATS and family experts
(ep_size 2), a resume, evaluation in fp32 and bf16, and bench train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import REPO


def test_gpu_check_runs_every_path_on_cpu(tmp_path, tiny_recipe, tiny_data):
    families = tmp_path / "families.yaml"
    families.write_text(yaml.safe_dump({"x": ["aa", "bb"], "y": ["cc"]}))
    raw = Path(tiny_data).parent / "raw"
    recipe = tiny_recipe("unused", data={"corpus": "plain", "raw": str(raw), "vocab_size": 100,
                                         "vocab_temperature": 1.0},
                         meta={"every": [[None, 2]]})
    out = tmp_path / "check"
    env = dict(os.environ, DS_ACCELERATOR="cpu", DEVICE="cpu", NPROC="2", UPDATES="4", RESUME_UPDATES="2",
               EP="2", EVAL_LIMIT="10", MAX_TOKENS="256", RECIPE=str(recipe), FAMILIES=str(families), OUT=str(out),
               BENCH_STEPS="2", BENCH_ROUNDS="1", OMP_NUM_THREADS="1", PYTHON=sys.executable,
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", "launch/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    paths = ["prepare", "dense", "cats", "experts", "resume", "evaluate_fp32", "evaluate_bf16", "bench"]
    assert all(summary[p]["status"] == "PASS" for p in paths), summary
    assert all(summary[p]["tokens_per_s"] > 0 for p in ("dense", "cats", "experts"))
    assert summary["identical_hypotheses"]["total"] == 30  # 10 sentences x 3 languages
    bench = summary["bench_train"]
    assert bench["precision"] == "bf16" and bench["model_tflops_per_s"] > 0 and bench["mfu"] is None  # CPU
    # the dense run translated dev sentences during training, in bf16
    valid = [json.loads(line) for line in (out / "dense" / "train_log.jsonl").read_text().splitlines()]
    assert any("bleu" in json.dumps(r) for r in valid if r["kind"] == "valid")
    assert "8 of 8 paths passed" in proc.stdout


def test_gpu_check_reports_a_failed_path(tmp_path):
    """A path whose command passed but whose files show missing work is a failure, and the
    exit status counts the failures."""
    from cats_ds.bench.gpu_check import main

    out = tmp_path / "check"
    (out / "dense").mkdir(parents=True)
    (out / "results.tsv").write_text("prepare\tPASS\t1\ndense\tPASS\t5\ncats\tFAIL(exit 1)\t3\n")
    (out / "dense" / "train_log.jsonl").write_text(
        "".join(json.dumps({"kind": "train", "step": s, "tokens_per_s": 100.0 * s}) + "\n" for s in (1, 2, 3)))
    failed = main([str(out), "4", "2"])
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["prepare"]["status"] == "PASS"
    assert summary["dense"]["status"] == "FAIL" and "ends at step 3, expected 4" in summary["dense"]["detail"]
    assert summary["cats"]["status"] == "FAIL(exit 1)" and summary["resume"]["status"] == "NOT RUN"
    assert failed == 7  # all but prepare
