"""What happens when things go wrong (docs/faults.md): orphaned ranks, non-finite training,
interrupted saves, resume mismatches, corrupt files. Ranks are real gloo ranks under the
real `deepspeed` launcher where ranks matter."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cats_ds.config import config_from_dict
from helpers import REPO, TINY_MODEL, ds_config, free_port, launch, make_plain_corpus, read_log, write_json

TRAIN = "launch/train.py"


def wait_for(condition, timeout: float, what: str, poll: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --------------------------------------------------------------------------- 1. orphans


WATCHED = """
import sys, time, psutil
from cats_ds.runtime import preempt
from cats_ds.runtime.watchdog import watch
parent = psutil.Process(int(sys.argv[1]))
watch([parent], "rank test", poll=0.1, launch=parent)
print("watching", flush=True)
# the training loop's part: stop at the next update boundary once a stop is requested
print("stop requested:", preempt.requested.wait(30) and preempt.received, flush=True)
"""

PARENT = """
import subprocess, sys, time
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 1):
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(__import__("os").getpid())] + sys.argv[3:])
    print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_watchdog_turns_a_lost_launcher_into_a_stop(tmp_path, sig):
    """The launcher (here the parent) dies while this node's ranks live: a stop request,
    as on SIGTERM (the ranks save latest/ and exit 75), not an exit that loses the work."""
    err = open(tmp_path / "err.txt", "w")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, WATCHED], stdout=subprocess.PIPE, stderr=err,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    child = psutil.Process(int(parent.stdout.readline()))
    assert parent.stdout.readline() == "watching\n" and child.is_running()
    parent.send_signal(sig)
    parent.wait(10)
    child.wait(10)  # psutil.TimeoutExpired if it is still running
    assert parent.stdout.read() == f"stop requested: ['launcher pid {parent.pid} gone']\n"
    text = (tmp_path / "err.txt").read_text()
    assert f"| rank test: its launcher (pid {parent.pid}" in text and "is gone; stopping as on SIGTERM" in text
    assert "error:" not in text


def test_watchdog_exits_at_once_when_a_peer_rank_is_gone_too(tmp_path):
    """Launcher and a peer rank both gone: no all_reduce can complete, so the other rank
    exits at once (code 1) instead of waiting for a save that cannot happen."""
    err = open(tmp_path / "err.txt", "w")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, WATCHED, "2"], stdout=subprocess.PIPE, stderr=err,
                              text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    a, b = (psutil.Process(int(parent.stdout.readline())) for _ in range(2))
    assert [parent.stdout.readline() for _ in range(2)] == ["watching\n"] * 2
    time.sleep(0.5)  # each watchdog has seen its peer
    b.kill()
    parent.kill()
    parent.wait(10)
    a.wait(10)  # long before its 30 s wait for a stop request would end
    assert parent.stdout.read() == ""  # no stop was requested
    text = (tmp_path / "err.txt").read_text()
    assert (f"error: rank test: its launcher (pid {parent.pid}: " in text
            and f"is gone and so is rank process pid {b.pid}: no save possible" in text), text
    assert "stopping as on SIGTERM" not in text


SAVING = """
import sys, time, psutil
from cats_ds.runtime import preempt
from cats_ds.runtime.watchdog import watch
watch([psutil.Process(int(sys.argv[1]))], "rank test", poll=0.05, grace=float(sys.argv[3]))
preempt.requested.set()  # as the SIGTERM handler does: this rank is saving latest/
print("watching", flush=True)
time.sleep(float(sys.argv[2]))
print("saved", flush=True)
"""

@pytest.mark.parametrize("save_s, grace_s, finishes", [(1.5, 30.0, True), (60.0, 1.0, False)])
def test_watchdog_lets_a_stopping_rank_finish_its_save(tmp_path, save_s, grace_s, finishes):
    """The grace path of a SIGTERM to the whole process group, with the save's length under
    the test's control: a real rank's save can end before the watchdog's next look."""
    err = open(tmp_path / "err.txt", "w")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, SAVING, "1", str(save_s), str(grace_s)],
                              stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    child = psutil.Process(int(parent.stdout.readline()))
    assert parent.stdout.readline() == "watching\n"
    parent.kill()
    parent.wait(10)
    child.wait(30)
    rest = parent.stdout.read()
    text = (tmp_path / "err.txt").read_text()
    assert f"| rank test: its launcher (pid {parent.pid}" in text
    assert f"is gone after a stop signal; finishing the save (at most {grace_s:.0f} s)" in text, text
    assert "no rank trains on orphaned" not in text
    if finishes:
        assert rest == "saved\n" and "still running" not in text
    else:
        assert rest == "" and f"error: rank test: still running {grace_s:.0f} s after its launcher went away" in text


def test_sigterm_to_the_deepspeed_runner_saves_and_leaves_no_orphans(tmp_path, tiny_recipe):
    """SIGTERM to the `deepspeed` runner alone (`kill <pid>`, docker stop, systemd: the main
    process; it installs no handler and dies at once): the ranks' watchdogs find it gone
    while both ranks live, so they stop as on SIGTERM: latest/ at the update reached, exit
    75, and the launch process and both ranks are gone (it used to be exit 1, nothing saved)."""
    recipe = tiny_recipe("orphan", train={"max_updates": 100000, "valid_every": 100000})
    ds = write_json(tmp_path / "z2.json", ds_config(2))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               CATS_WATCHDOG_POLL_S="0.1")
    port = free_port()
    out = open(tmp_path / "out.txt", "w")
    runner = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                               "--master_port", str(port), TRAIN, "--deepspeed_config", str(ds),
                               "--config", str(recipe)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        log = tmp_path / "orphan" / "train_log.jsonl"
        wait_for(lambda: log.is_file() and log.read_text().count("\n") >= 2, 120, "two logged updates")
        tree = psutil.Process(runner.pid).children(recursive=True)
        launchers = [p for p in tree if "deepspeed.launcher.launch" in p.cmdline()]
        ranks = [p for p in tree if p not in launchers and TRAIN in p.cmdline()]
        assert len(launchers) == 1 and len(ranks) == 2 and len(tree) == 3
        runner.terminate()
        assert runner.wait() == -signal.SIGTERM
        gone, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, f"still running after the runner was terminated: {alive}"
        text = (tmp_path / "out.txt").read_text()
        assert f"its launcher (pid {runner.pid}" in text and "is gone; stopping as on SIGTERM" in text
        assert "no rank trains on orphaned" not in text, text[-3000:]
        step = json.loads((tmp_path / "orphan" / "latest" / "cats_ds.json").read_text())["step"]
        # rank 0 prints the stop: its own watchdog's finding, or (when only rank 1's watchdog had
        # looked before the ranks agreed) "a signal on another rank"; the watched process is the
        # runner or, once that ended too, DeepSpeed's launch process
        watched = {runner.pid} | {p.pid for p in launchers}
        said = re.findall(rf"\| (?:launcher pid (\d+) gone|a signal on another rank): stopped at step {step}, "
                          rf"latest/ saved; exit 75", text)
        assert said and {int(pid) for pid in said if pid} <= watched, text[-3000:]
        assert read_log(tmp_path / "orphan")[-1]["step"] == step >= 2
        assert not (tmp_path / "orphan" / "train.lock").exists()
    finally:  # on failure the orphans are no longer our children: kill them by pid
        if runner.poll() is None:
            tree = psutil.Process(runner.pid).children(recursive=True) + [psutil.Process(runner.pid)]
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        runner.wait()
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            leftover.unlink(missing_ok=True)


# --------------------------------------------------------------------------- 2, 3, 5: checkpoints


def lr_at(step: int, lr: float, warmup: int, init: float = 1e-7) -> float:
    """The logged lr after `step` updates: train.lr x the inverse-sqrt factor."""
    if step < warmup:
        return init + (lr - init) * step / warmup
    return lr * (warmup / step) ** 0.5


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A 2-rank ZeRO-2 run of 4 updates with best/ and latest/ (validation at 2 and 4)."""
    root = tmp_path_factory.mktemp("trained")
    recipe = {"data": {"dir": str(tiny_data)}, "model": dict(TINY_MODEL),
              "sampling": {"temperature": 5.0, "langs_per_batch": 2},
              "train": {"save_dir": str(root / "run"), "max_tokens": 256, "max_updates": 4, "log_every": 1,
                        "valid_every": 2, "warmup_updates": 10, "lr": 0.003, "tensorboard": False}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    ds = write_json(root / "z2.json", ds_config(2))
    launch([TRAIN, "--deepspeed_config", ds, "--config", root / "recipe.yaml"], 2)
    return root


def copy_run(trained: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A private copy of the trained run; the args that resume it."""
    save_dir = tmp_path / "run"
    shutil.copytree(trained / "run", save_dir)
    return save_dir, [TRAIN, "--deepspeed_config", trained / "z2.json", "--config", trained / "recipe.yaml",
                      f"train.save_dir={save_dir}"]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # best/ holds the model folder best/model/


def test_non_finite_loss_stops_and_keeps_latest(tmp_path, trained):
    """lr 1e30 on resume: both ranks stop after train.max_nonfinite non-finite updates with an
    error naming the steps and the last good checkpoint; latest/ is left as it was."""
    save_dir, args = copy_run(trained, tmp_path)
    before = digest(save_dir / "latest")
    out = launch(args + ["train.lr=1e30", "train.max_updates=100", "train.valid_every=100",
                         "train.max_nonfinite=3"], 2, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    m = re.search(r"training loss is NaN or inf at 3 consecutive updates \(steps (\d+)-(\d+), "
                  r"train.max_nonfinite=3\): stopped at step (\d+) without saving a checkpoint. "
                  r"Last good checkpoint: (\S+) \(step 4\)", out.stderr)
    assert m, out.stderr[-3000:]
    assert int(m[2]) - int(m[1]) == 2 and m[2] == m[3] and int(m[1]) >= 5 and m[4] == str(save_dir / "latest")
    assert digest(save_dir / "latest") == before
    assert not list(save_dir.glob("*.tmp")) and not list(save_dir.glob("*.old"))
    logged = [r["loss"] for r in read_log(save_dir)]
    assert all(math.isfinite(v) for v in logged[:4]) and not math.isfinite(logged[-1])


def test_last_good_checkpoint_names_a_numbered_one_once_the_next_update_is_finite(tmp_path):
    """train.save_every=2, no validation yet, NaN from update 5 on: the error names step_4/
    (it said "none yet" though step_<n>/ existed); step_4/ counts only once update 5's loss
    is finite, since it holds the weights after update 4."""
    from types import SimpleNamespace

    from cats_ds.training.checkpoint import note_saved
    from cats_ds.training.loop import Run, TrainError, check_finite_update

    cfg = config_from_dict({"train": {"max_nonfinite": 2}})
    run = SimpleNamespace(step=0, world=1, update_loss=0.0, nonfinite=0, stop_signal=False, cfg=cfg,
                          **{k: getattr(Run, k) for k in ("last_good", "good_step", "unconfirmed")})

    def update(loss: float) -> None:  # what fit() does around one update
        run.update_loss = loss
        run.step += 1
        check_finite_update(run)
        if run.step % 2 == 0 and not run.nonfinite:
            note_saved(run, tmp_path / f"step_{run.step}", validated=False)

    for _ in range(4):
        update(1.0)
    assert run.last_good == f"{tmp_path / 'step_2'} (step 2)"  # step_4/ not confirmed yet
    update(1.0)
    assert run.last_good == f"{tmp_path / 'step_4'} (step 4)"
    update(1.0)  # step_6/ saved ...
    with pytest.raises(TrainError, match=re.escape(f"Last good checkpoint: {tmp_path / 'step_4'} (step 4).")):
        update(float("nan"))  # ... but update 7 gave NaN: its weights are not good
        update(float("nan"))
    note_saved(run, tmp_path / "latest", validated=True)
    assert run.last_good == f"{tmp_path / 'latest'} (step 8)" and run.good_step == 8


def test_non_finite_validation_loss_stops_without_saving(tmp_path, trained):
    save_dir, args = copy_run(trained, tmp_path)
    before = {name: digest(save_dir / name) for name in ("latest", "best")}
    out = launch(args + ["train.lr=1e30", "train.max_updates=100", "train.valid_every=5",
                         "train.max_nonfinite=1000"], 2, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert (f"validation loss is NaN or inf at step 5 (en-aa, en-bb, en-cc): stopped without saving a checkpoint. "
            f"Last good checkpoint: {save_dir / 'latest'} (step 4)") in out.stderr
    assert {name: digest(save_dir / name) for name in ("latest", "best")} == before


def test_resume_applies_new_lr_and_warmup(tmp_path, trained):
    """A changed train.lr and train.warmup_updates both take effect from the resumed step."""
    save_dir, args = copy_run(trained, tmp_path)
    old = read_log(save_dir)
    assert [r["lr"] for r in old] == pytest.approx([lr_at(s, 0.003, 10) for s in (1, 2, 3, 4)], rel=1e-6)
    out = launch(args + ["train.lr=0.001", "train.warmup_updates=2", "train.max_updates=6"], 2)
    assert "resumed from" in out.stdout and "at step 4" in out.stdout
    new = [r for r in read_log(save_dir) if r["step"] > 4]
    assert [r["step"] for r in new] == [5, 6]
    assert [r["lr"] for r in new] == pytest.approx([lr_at(s, 0.001, 2) for s in (5, 6)], rel=1e-6)


def test_save_interrupted_between_renames_is_recovered(tmp_path, trained):
    """A crash after `latest` -> `latest.old` and before `latest.tmp` -> `latest`: resume=auto
    continues from the complete latest.tmp (step 4), not from step 0."""
    save_dir, args = copy_run(trained, tmp_path)
    os.replace(save_dir / "latest", save_dir / "latest.tmp")
    shutil.copytree(save_dir / "best", save_dir / "latest.old")
    out = launch(args + ["train.max_updates=5"], 2)
    assert f"| recovered {save_dir / 'latest'} <- latest.tmp (step 4" in out.stdout
    assert "resumed from" in out.stdout and "at step 4" in out.stdout
    assert json.loads((save_dir / "latest" / "cats_ds.json").read_text())["step"] == 5
    assert sorted(p.name for p in save_dir.iterdir() if p.is_dir()) == ["best", "latest"]


def test_recover_interrupted_saves_every_crash_point(tmp_path):
    from cats_ds.training.checkpoint import recover_interrupted_saves

    def ckpt(path: Path, step=None):
        path.mkdir(parents=True)
        (path / "mp_rank_00_model_states.pt").write_text(str(step))
        if step is not None:
            (path / "cats_ds.json").write_text(json.dumps({"step": step}))

    # before the first rename, .tmp complete: the newer .tmp wins, the older one is dropped
    ckpt(tmp_path / "a" / "latest", 2), ckpt(tmp_path / "a" / "latest.tmp", 4)
    # between the renames, .tmp incomplete (cats_ds.json missing): back to .old
    ckpt(tmp_path / "b" / "latest.old", 2), ckpt(tmp_path / "b" / "latest.tmp")
    # after the second rename, before deleting .old
    ckpt(tmp_path / "c" / "latest", 4), ckpt(tmp_path / "c" / "latest.old", 2)
    assert "latest <- latest.tmp (step 4" in recover_interrupted_saves(tmp_path / "a")[0]
    assert "latest <- latest.old (step 2" in recover_interrupted_saves(tmp_path / "b")[0]
    assert recover_interrupted_saves(tmp_path / "c") == []
    for case, step in (("a", 4), ("b", 2), ("c", 4)):
        assert [p.name for p in (tmp_path / case).iterdir()] == ["latest"], case
        assert json.loads((tmp_path / case / "latest" / "cats_ds.json").read_text())["step"] == step


def test_fresh_start_over_checkpoints_needs_overwrite(tmp_path, trained):
    save_dir, args = copy_run(trained, tmp_path)
    before = digest(save_dir / "best")
    out = launch(args + ["train.resume=none"], 1, check=False)
    assert out.returncode == 2
    assert (f"train.save_dir={save_dir} already holds checkpoints: {save_dir / 'latest'} (step 4), "
            f"{save_dir / 'best'} (step ") in out.stderr
    assert "Set train.overwrite=true to replace them" in out.stderr
    assert digest(save_dir / "best") == before
    (save_dir / "eval" / "best-test").mkdir(parents=True)
    (save_dir / "eval" / "best-test" / "bleu.json").write_text("{}")
    out = launch(args + ["train.resume=none", "train.overwrite=true", "train.max_updates=1"], 1)
    deleted = next(l for l in out.stdout.splitlines() if "train.overwrite=true: deleted" in l)
    assert ", train_log.jsonl" in deleted and deleted.endswith(", eval")
    assert not (save_dir / "eval").exists()  # the old run's scores would pass for the new one's
    assert [r["step"] for r in read_log(save_dir)] == [1]
    assert json.loads((save_dir / "latest" / "cats_ds.json").read_text())["step"] == 1


def test_changed_settings_on_resume_are_named(tmp_path, trained):
    save_dir, args = copy_run(trained, tmp_path)
    # (512 on 1 rank would keep the 2 x 256 global batch: allowed on another world size)
    out = launch(args + ["weighting.method=cats", "train.max_tokens=1024", "model.embed_dim=64",
                         "train.max_updates=8"], 1, check=False)
    assert out.returncode == 2
    assert (f"{save_dir / 'latest'}: this run changes settings the checkpoint was trained with: "
            f"model.embed_dim: 32 -> 64; train.max_tokens: 256 -> 1024; weighting.method: 'temperature' -> "
            f"'cats'.") in out.stderr
    assert "Traceback" not in out.stderr


def test_changed_settings_allowed_keys():
    from cats_ds.config import config_from_dict
    from cats_ds.training.checkpoint import changed_settings

    saved = config_from_dict({}).to_dict()
    free = config_from_dict({"train": {"lr": 0.1, "warmup_updates": 3, "max_updates": 7, "valid_every": 2,
                                       "log_every": 2, "save_dir": "x", "max_minutes": 1.0},
                             "eval": {"beam": 2}, "analysis": {"every": 3}, "data": {"dir": "y"}}).to_dict()
    assert changed_settings(saved, free) == []
    bound = config_from_dict({"sampling": {"temperature": 1.0}, "train": {"seed": 3},
                              "model": {"encoder_layers": 2}}).to_dict()
    assert changed_settings(saved, bound) == ["model.encoder_layers: 6 -> 2", "sampling.temperature: 5.0 -> 1.0",
                                              "train.seed: 1 -> 3"]
    del saved["train"]["seed"]  # a key an older checkpoint does not know is not compared
    assert changed_settings(saved, bound)[-1] == "sampling.temperature: 5.0 -> 1.0"


def test_resume_ignores_settings_the_method_never_reads():
    """A temperature run may change the Gram methods' settings (defaults that moved since it
    was trained included); a Gram method may change the other methods' sections; a changed
    method, or a setting the method reads, is still refused."""
    from cats_ds.config import config_from_dict
    from cats_ds.training.checkpoint import changed_settings

    def cfg(**sections):
        return config_from_dict(sections).to_dict()

    saved = cfg()  # temperature
    unused = cfg(cats={"kappa": 0.9, "loss_term": "descent"}, gradnorm={"lr": 0.5}, grads={"gram": "plain"},
                 meta={"every": [[None, 5]], "weight_by": "language"})
    assert changed_settings(saved, unused) == []
    # under sampling.draws_at_meta_steps the meta steps shape a temperature run's batches
    draws = {"draws_at_meta_steps": True}
    assert changed_settings(cfg(sampling=draws), cfg(sampling=draws, meta={"every": [[None, 5]]})) == [
        "meta.every: [[None, 10]] -> [[None, 5]]"]
    assert "weighting.method: 'temperature' -> 'cats'" in changed_settings(saved, cfg(weighting={"method": "cats"}))
    cats = {"weighting": {"method": "cats"}}
    assert changed_settings(cfg(**cats), cfg(**cats, gradnorm={"lr": 0.5}, mgda={"iters": 5})) == []
    assert changed_settings(cfg(**cats), cfg(**cats, cats={"kappa": 0.9}, grads={"gram": "split"})) == [
        "cats.kappa: 0.5 -> 0.9", "grads.gram: None -> 'split'"]
    gradvac = {"weighting": {"method": "gradvac"}}
    assert changed_settings(cfg(**gradvac), cfg(**gradvac, cats={"kappa": 0.9}, meta={"params": "all"},
                                                 gradvac={"beta": 0.5})) == [
        "gradvac.beta: 0.01 -> 0.5", "meta.params: 'shared' -> 'all'"]


@pytest.mark.parametrize("victim", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank0.pt"])
def test_damaged_checkpoint_file_is_named(tmp_path, trained, victim):
    save_dir, args = copy_run(trained, tmp_path)
    path = save_dir / "latest" / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = launch(args + ["train.max_updates=6"], 2, check=False)
    assert out.returncode == 2
    assert str(path) in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]


def test_payload_in_rng_file_does_not_run_when_another_file_is_damaged(tmp_path, trained):
    """issue 27, item 3: DeepSpeed's load fails on a truncated optimizer partition; naming the
    damaged file must not unpickle the other files unrestricted (a payload in rng_rank1.pt ran)."""
    import torch

    from test_checkpoint_files import Payload

    save_dir, args = copy_run(trained, tmp_path)
    latest = save_dir / "latest"
    marker = tmp_path / "payload-ran"
    rng = torch.load(latest / "rng_rank1.pt", weights_only=True)
    torch.save({**rng, "extra": Payload(marker)}, latest / "rng_rank1.pt")
    victim = latest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out = launch(args + ["train.max_updates=6"], 2, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert not marker.exists(), "the payload in rng_rank1.pt ran"
    assert f"{victim}: damaged or truncated" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"{latest / 'rng_rank1.pt'}: refused, not loaded" in out.stderr
    for healthy in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.pt"):
        assert f"{latest / healthy}:" not in out.stderr, healthy


@contextlib.contextmanager
def small_file_system(path: Path, size: str, readonly: bool = False):
    """A tmpfs of `size` mounted at `path` (needs root or CAP_SYS_ADMIN; skipped otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if readonly else ""), "tmpfs",
                               str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        done = None
    if done is None or done.returncode:
        pytest.skip(f"cannot mount a {size} tmpfs here ({done.stderr.strip() if done else 'no mount command'}; "
                    f"needs root or CAP_SYS_ADMIN): the file-system cases need a small file system")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_unwritable_save_dir_named_at_start_up(tmp_path):
    """issue 27, item 4: a save_dir that is a file, or under a file, gave FileExistsError /
    NotADirectoryError tracebacks after data loading and the engine build."""
    from cats_ds.checkpoints import CheckpointError
    from cats_ds.training.checkpoint import check_save_dir

    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(CheckpointError, match=re.escape(f"train.save_dir={afile} is a file, not a folder. "
                                                        f"Choose another train.save_dir")):
        check_save_dir(afile, 0, 1)
    with pytest.raises(CheckpointError, match=re.escape(f"train.save_dir={afile / 'a' / 'run'} cannot be created: "
                                                        f"{afile} is a file, not a folder")):
        check_save_dir(afile / "a" / "run", 0, 1)
    check_save_dir(tmp_path / "new" / "run", 0, 1)  # created, the probe file gone
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())


def test_read_only_save_dir_named_at_start_up(tmp_path):
    from cats_ds.checkpoints import CheckpointError
    from cats_ds.training.checkpoint import check_save_dir

    with small_file_system(tmp_path / "ro", "64k", readonly=True) as ro:
        with pytest.raises(CheckpointError, match=re.escape(f"train.save_dir={ro} is not writable by rank 0: "
                                                            f"Read-only file system")):
            check_save_dir(ro, 0, 1)
        with pytest.raises(CheckpointError, match=re.escape(f"train.save_dir={ro / 'run'} is not writable by rank "
                                                            f"0: Read-only file system ({ro / 'run'})")):
            check_save_dir(ro / "run", 0, 1)


def test_unwritable_save_dir_refused_on_every_rank_before_data_loading(tmp_path, tiny_recipe):
    """2 ranks; data.dir does not exist, so an error about the data would mean the save_dir
    check came after data loading."""
    afile = tmp_path / "run-is-a-file"
    afile.write_text("x")
    ds = write_json(tmp_path / "z2.json", ds_config(2))
    out = launch([TRAIN, "--deepspeed_config", ds, "--config", tiny_recipe(), f"train.save_dir={afile}",
                  f"data.dir={tmp_path / 'no-data'}"], 2, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: train.save_dir={afile} is a file, not a folder. Choose another train.save_dir (or "
                      f"make this one a writable folder); checkpoints, logs and evaluation outputs go there"] * 2
    assert "manifest.json" not in out.stderr and "Traceback" not in out.stderr


def test_full_disk_during_save_named_on_every_rank_and_previous_checkpoints_kept(tmp_path, trained):
    """issue 27, item 4: a full disk mid-save gave `RuntimeError: [enforce fail at
    inline_container.cc]` on both ranks and left a partial latest.tmp. The run resumes on a
    small tmpfs, filled up to 256 KiB (a checkpoint of the tiny model needs more), and
    validates at step 6: the save fails on every rank with the folder and the cause named,
    best/ and latest/ stay as they were, no .tmp is left, and every rank exits 2."""
    save_dir = tmp_path / "run"
    with small_file_system(save_dir, "16m"):
        shutil.copytree(trained / "run", save_dir, dirs_exist_ok=True)
        before = {name: digest(save_dir / name) for name in ("latest", "best")}
        (save_dir / "filler").write_bytes(b"\1" * (shutil.disk_usage(save_dir).free - 256 * 1024))
        out = launch([TRAIN, "--deepspeed_config", trained / "z2.json", "--config", trained / "recipe.yaml",
                      f"train.save_dir={save_dir}", "train.max_updates=6"], 2, check=False)
        assert out.returncode == 2, out.stderr[-3000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 2, out.stderr[-3000:]
        m = re.match(rf"error: saving {save_dir}/(best|latest) at step 6 failed: rank \d could not write (\S+): No "
                     rf"space left on device", errors[0])
        assert m, errors
        name = m[1]
        assert f"{save_dir / name} keeps its previous contents (step " in errors[0]
        assert f"the partial {save_dir / name}.tmp was removed" in errors[0]
        assert "Traceback" not in out.stderr and "enforce fail" not in out.stderr
        assert {name: digest(save_dir / name) for name in ("latest", "best")} == before
        assert not list(save_dir.glob("*.tmp")) and not list(save_dir.glob("*.old"))
        assert json.loads((save_dir / "latest" / "cats_ds.json").read_text())["step"] == 4


def test_training_log_that_cannot_be_written_is_named(tmp_path):
    from types import SimpleNamespace

    from cats_ds.training.loop import TrainError, write_log

    afile = tmp_path / "gone"
    afile.write_text("x")
    run = SimpleNamespace(rank=0, step=3, log_path=afile / "train_log.jsonl", last_good=f"{afile}/latest (step 2)",
                          cfg=SimpleNamespace(train=SimpleNamespace(save_dir=str(afile))))
    with pytest.raises(TrainError, match=re.escape(f"{afile / 'train_log.jsonl'}: cannot write the training log at "
                                                   f"step 3: Not a directory (")):
        write_log(run, {"kind": "train", "step": 3})


# --------------------------------------------------------------------------- 5. late crashes


def test_sentences_longer_than_max_positions_refused_at_start_up(tmp_path, tiny_recipe, tiny_data):
    from cats_ds.config import load_config
    from cats_ds.data.manifest import Manifest, load_split
    from cats_ds.training.loop import TrainError, check_lengths

    manifest = Manifest.load(tiny_data)
    splits = {s: load_split(tiny_data, manifest, s) for s in ("train", "dev", "test")}
    longest = max(int(shard.sizes.max()) for split in splits.values() for d in split.values()
                  for shard in (d.src, d.tgt))
    check_lengths(splits, load_config(None, [f"model.max_positions={longest}"]))  # every split fits
    dev_only = {"dev": splits["dev"]}
    limit = max(int(shard.sizes.max()) for d in splits["dev"].values() for shard in (d.src, d.tgt)) - 1
    with pytest.raises(TrainError, match=rf"model.max_positions={limit}, but sentence \d+ of the prepared dev split "
                                         rf"of en-\w\w \((en|\w\w) side, dev.en-\w\w.\w+.bin in data.dir="):
        check_lengths(dev_only, load_config(None, [f"model.max_positions={limit}"]))

    ds = write_json(tmp_path / "z0.json", ds_config(0))
    out = launch([TRAIN, "--deepspeed_config", ds, "--config", tiny_recipe(), "model.max_positions=4"], 1,
                 check=False)
    assert out.returncode == 2 and "error: model.max_positions=4, but sentence" in out.stderr
    assert "raise model.max_positions to" in out.stderr and "data.max_tokens_per_side=4" in out.stderr


def test_truncated_shard_named_at_start_up_and_rebuilt_by_prepare(tmp_path, tiny_recipe, capsys):
    from cats_ds.data.manifest import Manifest
    from cats_ds.data.prepare import prepare

    raw = make_plain_corpus(tmp_path / "raw", {"aa": 60, "bb": 40})
    cfg = config_from_dict({"data": {"dir": str(tmp_path / "bin"), "corpus": "plain", "raw": str(raw),
                                     "vocab_size": 100, "vocab_temperature": 1.0}})
    prepare(cfg)
    shard = tmp_path / "bin" / "train.en-bb.bb.bin"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])

    recipe = tiny_recipe()
    ds = write_json(tmp_path / "z0.json", ds_config(0))
    out = launch([TRAIN, "--deepspeed_config", ds, "--config", recipe, f"data.dir={tmp_path / 'bin'}"], 1,
                 check=False)
    assert out.returncode == 2
    assert f"error: {shard}: size {size // 2} bytes does not match {size // 2} tokens" in out.stderr
    assert "rebuild it with `python launch/prepare.py --config <recipe> --force`" in out.stderr

    capsys.readouterr()
    manifest = prepare(cfg)
    text = capsys.readouterr()
    assert "up to date" not in text.out and f"{shard}: size {size // 2} bytes" in text.err
    assert "rebuilding" in text.err and shard.stat().st_size == size
    assert manifest == Manifest.load(tmp_path / "bin")
    capsys.readouterr()
    prepare(cfg)
    assert "up to date" in capsys.readouterr().out


# --------------------------------------------------------------------------- 6. silent data issues


def test_language_codes_checked_for_iso_shape():
    from cats_ds.data.readers import non_iso_code

    ok = ["de", "pt_BR", "pt-BR", "sr@latin", "ca@valencia", "zh_Hans", "zh_Hant_TW", "es_419", "ast", "kor",
          "en_GB"]
    assert [c for c in ok if non_iso_code(c)] == []
    bad = ["xx_YY", "xx", "qq", "english", "de_de", "DE", "d", "pt_BR.UTF-8"]
    assert [c for c in bad if not non_iso_code(c)] == []


def test_train_copies_of_dev_test_dropped_and_counted_and_odd_codes_warned(tmp_path, capsys):
    from cats_ds.data.manifest import Manifest, Vocab, load_split
    from cats_ds.data.prepare import prepare

    raw = make_plain_corpus(tmp_path / "raw", {"de": 80, "xx_YY": 60}, dev=20, test=20)
    leaked = {}
    for split, k in (("test", 5), ("dev", 3)):
        en = (raw / f"{split}.en-de.en").read_text().splitlines()[:k]
        de = (raw / f"{split}.en-de.de").read_text().splitlines()[:k]
        leaked[split] = en
        for side, lines in (("en", en), ("de", de)):
            with open(raw / f"train.en-de.{side}", "a") as f:
                f.write("".join(line + "\n" for line in lines))
    original = set((raw / "train.en-de.en").read_text().splitlines()[:80])
    n_leaked = len(set(leaked["test"] + leaked["dev"]) - original)
    assert n_leaked >= 6  # random sentences of 2-10 words rarely repeat
    cfg = config_from_dict({"data": {"dir": str(tmp_path / "bin"), "corpus": "plain", "raw": str(raw),
                                     "vocab_size": 100, "vocab_temperature": 1.0}})
    manifest = prepare(cfg)
    out = capsys.readouterr()
    dropped = [line for line in out.err.splitlines() if "whose English side is in its dev or test" in line]
    assert len(dropped) == 1 and dropped[0].startswith("warning: de: dropped ")
    n = int(dropped[0].split()[3])
    assert n >= n_leaked and f"in dev/test {n}" in out.out
    vocab = Vocab(tmp_path / "bin", manifest.languages)
    train = load_split(tmp_path / "bin", Manifest.load(tmp_path / "bin"), "train")["de"]
    train_en = {vocab.decode(train.src[i]) for i in range(len(train))}
    assert not train_en & {vocab.decode(vocab.encode(s)) for s in leaked["test"] + leaked["dev"]}
    assert "warning: language code(s) xx_YY not ISO 639-1/639-3" in out.err


def flip_token(data_dir: Path, name: str, index: int) -> tuple[Path, int, int, int]:
    """Flip the high byte of token `index` of a uint16 shard (an id far above the tiny
    vocabulary); returns (file, sentence number, token number in it, new id)."""
    import numpy as np

    from cats_ds.data.indexed import read_offsets

    path = data_dir / f"{name}.bin"
    raw = bytearray(path.read_bytes())
    raw[2 * index + 1] ^= 0xFF
    path.write_bytes(bytes(raw))
    offsets = read_offsets(data_dir / f"{name}.idx")
    sent = int(np.searchsorted(offsets, index, side="right")) - 1
    return path, sent + 1, index - int(offsets[sent]) + 1, int(np.frombuffer(bytes(raw), np.uint16)[index])


def test_token_ids_outside_the_vocabulary_named_when_a_shard_is_opened(tmp_path, tiny_data, capsys):
    """issue 27, item 6: bytes flipped in a .bin gave `IndexError: index out of range in self`
    at the first forward. Now opening the shard names the file, the sentence and the id;
    evaluate adds the fix (prepare --force)."""
    import numpy as np

    from cats_ds.cli import evaluate_main
    from cats_ds.data.indexed import out_of_vocab
    from cats_ds.data.manifest import Manifest, load_split
    from test_evaluate import make_checkpoint

    data = tmp_path / "bin"
    shutil.copytree(tiny_data, data)
    manifest = Manifest.load(data)
    assert manifest.dtype == "uint16" and manifest.vocab_size == 100
    path, sent, pos, token = flip_token(data, "train.en-bb.bb", 123)
    assert token >= 256
    with pytest.raises(ValueError, match=re.escape(f"{path}: token id {token} (sentence {sent}, token {pos}) is "
                                                   f"outside the vocabulary of 100 ids")):
        load_split(data, manifest, "train")
    assert set(load_split(data, manifest, "dev")) == {"aa", "bb", "cc"}  # the other splits are fine

    ckpt, _ = make_checkpoint(tmp_path / "run" / "best", data)
    test_file, *_ = flip_token(data, "test.en-aa.en", 0)
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["--checkpoint", str(ckpt), "--limit", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"error: {test_file}: token id" in err and "Traceback" not in err
    assert "is damaged; rebuild it with `python launch/prepare.py" in err and "--force`" in err
    # int32 shards (vocabularies over 65536 ids) can also turn negative
    tokens = np.array([5, 7, 9, -3, 4], dtype=np.int32)
    assert out_of_vocab(tokens, np.array([0, 2, 5]), 70000) == (1, 1, -3)
    assert out_of_vocab(tokens.clip(0), np.array([0, 2, 5]), 70000) is None


def test_token_ids_outside_the_vocabulary_refused_at_training_start_up(tmp_path, tiny_recipe, tiny_data):
    data = tmp_path / "bin"
    shutil.copytree(tiny_data, data)
    path, sent, pos, token = flip_token(data, "train.en-aa.aa", 10)
    ds = write_json(tmp_path / "z0.json", ds_config(0))
    out = launch([TRAIN, "--deepspeed_config", ds, "--config", tiny_recipe(), f"data.dir={data}"], 1, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert (f"error: {path}: token id {token} (sentence {sent}, token {pos}) is outside the vocabulary of 100 ids"
            in out.stderr) and "IndexError" not in out.stderr
    assert "rebuild it with `python launch/prepare.py --config <recipe> --force`" in out.stderr
