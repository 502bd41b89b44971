"""launch/slurm/train.sbatch on this machine, as a one-node allocation with 2 slots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cats_ds.runtime.slurm import expand_nodelist, write_hostfile
from helpers import REPO, ds_config, free_port, read_log, write_json

FAKE_SRUN = """#!/usr/bin/env bash
# one-node stand-in for srun: drop the options, run the command once as node 0
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
SLURM_NODEID=0 SLURM_PROCID=0 exec "$@"
"""


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("n[8-10]x") == ["n8x", "n9x", "n10x"]
    assert expand_nodelist("localhost") == ["localhost"]
    with pytest.raises(ValueError, match="empty SLURM node list"):
        expand_nodelist("")


def test_hostfile(tmp_path):
    assert write_hostfile("a[1-2]", 4, tmp_path / "h") == ["a1", "a2"]
    assert (tmp_path / "h").read_text() == "a1 slots=4\na2 slots=4\n"


def test_sbatch_one_node_two_slots(tmp_path, tiny_recipe):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="42",
               SLOTS_PER_NODE="2", MASTER_PORT=str(free_port()), HOSTFILE=str(tmp_path / "hostfile"),
               SLURM_SUBMIT_DIR=str(REPO))
    env.pop("SLURM_GPUS_ON_NODE", None)
    ds = write_json(tmp_path / "z2.json", ds_config(2))
    proc = subprocess.run(["bash", "launch/slurm/train.sbatch", str(ds), str(tiny_recipe("slurm")),
                           "train.max_updates=3"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 node(s) x 2 slots" in proc.stdout and "world 2" in proc.stdout
    assert (tmp_path / "hostfile").read_text() == "localhost slots=2\n"
    assert [r["step"] for r in read_log(tmp_path / "slurm")] == [1, 2, 3]


def test_sbatch_outside_slurm_fails_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", "launch/slurm/train.sbatch", "a.json", "b.yaml"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "SLURM_JOB_NODELIST unset" in proc.stderr
