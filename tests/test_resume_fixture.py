"""A checkpoint written by an older version of the code resumes with this one, exactly.

tests/data/resume_before_layout/latest/ was written by the code before the package
restructure (flat cats_ds/, commit 8678718): 4 updates of a tiny model on one process
(CATS meta steps, dropout, ZeRO-2). It must resume here, with the CATS settings it was
trained with spelled out (cats.loss_term: true is read as descent, kappa was 0.9; today's
defaults differ and a resume that changes them is refused), and continue exactly: resumed
to 8 updates in one go, it ends bit-identical to resumed to 6 and then to 8 (weights,
optimizer state, step, sampler position, weighting state, RNG, logged losses). Anything
the checkpoint names by module path (pickled classes, config keys) breaks this test when
it moves. (At the restructure itself, commit 1672f2a, the resumed run was also
bit-identical to a from-scratch run of today's code; the CATS objective changed after
that on purpose, so a from-scratch run no longer repeats the fixture's first 4 updates.)

The prepared data folder is not committed: `make_data` rebuilds it (fixed corpus, fixed
prepare settings); its manifest fingerprint must equal the one the checkpoint recorded.

Regenerate the fixture (only when its format is meant to change; it then no longer
tests the old code): python tests/test_resume_fixture.py --make tests/data/resume_before_layout
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from helpers import REPO, make_plain_corpus, read_log

FIXTURE = REPO / "tests" / "data" / "resume_before_layout"
TRAIN = REPO / "launch" / "train.py"
DATA_SIZES = {"aa": 400, "bb": 150, "cc": 50}


def make_data(root: Path) -> Path:
    """The prepared data folder the fixture was trained on (rebuilt, deterministic)."""
    from cats_ds.config import config_from_dict
    from cats_ds.data.prepare import prepare

    make_plain_corpus(root / "raw", DATA_SIZES)
    cfg = config_from_dict({"data": {"dir": str(root / "bin"), "corpus": "plain", "raw": str(root / "raw"),
                                     "vocab_size": 100, "vocab_temperature": 1.0}})
    prepare(cfg)
    return root / "bin"


OLD_CATS = ["cats.loss_term=descent", "cats.kappa=0.9"]
"""The fixture's CATS settings in today's spelling (it was trained with loss_term true, kappa 0.9)."""


def train_one_process(data: Path, save_dir: Path, updates: int, extra: tuple = ()) -> subprocess.CompletedProcess:
    """`python launch/train.py` without a launcher (rank 0 of 1) on the fixture's config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(TRAIN), "--deepspeed_config", str(FIXTURE / "ds.json"),
           "--config", str(FIXTURE / "config.yaml"), f"data.dir={data}", f"train.save_dir={save_dir}",
           f"train.max_updates={updates}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def make_fixture(out: Path, work: Path) -> None:
    """Train the fixture's 4 updates and keep latest/ (the only part the test needs)."""
    data = make_data(work / "data")
    run = work / "run"
    train_one_process(data, run, 4)
    if (out / "latest").exists():
        shutil.rmtree(out / "latest")
    shutil.copytree(run / "latest", out / "latest")


def assert_same(a, b, where: str = "") -> None:
    """a == b, tensors bit for bit, through nested dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ (max |diff| {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), f"{where}: keys differ"
        for k in a:
            if k not in ("elapsed",):  # wall time
                assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not callable(a):  # DeepSpeed's loss scaler (no __eq__)
        assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def test_checkpoint_from_before_the_restructure_resumes_exactly(tmp_path):
    saved = json.loads((FIXTURE / "latest" / "cats_ds.json").read_text())
    assert saved["step"] == 4
    data = make_data(tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["fingerprint"] == saved["manifest_fingerprint"], (
        "the rebuilt data folder differs from the one the fixture was trained on (a changed corpus "
        "generator, prepare setting or sentencepiece version); see this file's docstring")
    resumed, scratch = tmp_path / "resumed", tmp_path / "twice"
    shutil.copytree(FIXTURE / "latest", resumed / "latest")
    shutil.copytree(FIXTURE / "latest", scratch / "latest")
    out = train_one_process(data, resumed, 8, OLD_CATS)
    assert f"| resumed from {resumed / 'latest'} at step 4" in out.stdout, out.stdout[-3000:]
    train_one_process(data, scratch, 6, OLD_CATS)
    out = train_one_process(data, scratch, 8, OLD_CATS)
    assert f"| resumed from {scratch / 'latest'} at step 6" in out.stdout, out.stdout[-3000:]

    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt"):
        a = torch.load(scratch / "latest" / name, map_location="cpu", weights_only=False)
        b = torch.load(resumed / "latest" / name, map_location="cpu", weights_only=False)
        for key in ("ds_config", "ds_version"):  # identical by construction; not state
            a.pop(key, None), b.pop(key, None)
        assert_same(a, b, name)
    states = torch.load(resumed / "latest" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert states["train"]["step"] == 8 and states["sampler"]  # the client state: step, sampler position, weighting
    meta_a, meta_b = (json.loads((d / "latest" / "cats_ds.json").read_text()) for d in (scratch, resumed))
    for key in ("step", "valid_loss", "languages", "manifest_fingerprint", "vocab_size", "zero_stage"):
        assert meta_a[key] == meta_b[key], key
    got = {r["step"]: r["loss"] for r in read_log(resumed)}
    ref = {r["step"]: r["loss"] for r in read_log(scratch)}
    assert sorted(got) == [5, 6, 7, 8] and all(got[s] == ref[s] for s in got), (got, ref)


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make", type=Path, required=True, help="fixture folder (holds config.yaml, ds.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_fixture(args.make.resolve(), Path(tmp))
