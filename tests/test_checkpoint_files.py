"""Damaged and untrusted checkpoint files on the inference side: a truncated model-states
file is reported by name with what to do; a file whose unpickling would run code is refused
and the code does not run (evaluate, export and average all load through checkpoint.py)."""

from __future__ import annotations

import pathlib

import pytest
import torch

from cats_ds.checkpoints import MODEL_STATES, CheckpointError, load_for_inference, load_states
from cats_ds.cli import evaluate_main
from test_evaluate import make_checkpoint


class Payload:
    """Unpickling it creates `marker`: stands for any code a crafted checkpoint would run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_truncated_model_states_name_the_file(tmp_path, tiny_data, capsys):
    ckpt, _ = make_checkpoint(tmp_path / "run" / "best", tiny_data)
    states = ckpt / MODEL_STATES
    data = states.read_bytes()
    states.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{states}: damaged or truncated .*use another checkpoint"):
        load_for_inference(ckpt)
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["--checkpoint", str(ckpt), "--limit", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and str(states) in err and "Traceback" not in err
    states.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{states}: damaged or truncated \(0 bytes\)"):
        load_for_inference(ckpt)


def test_pickle_payload_is_refused_and_does_not_run(tmp_path, tiny_data):
    ckpt, state = make_checkpoint(tmp_path / "run" / "best", tiny_data)
    marker = tmp_path / "payload-ran"
    torch.save({"module": state, "optimizer": None, "extra": Payload(marker)}, ckpt / MODEL_STATES)
    with pytest.raises(CheckpointError, match=rf"{ckpt / MODEL_STATES}: refused, not loaded.*could run code"):
        load_for_inference(ckpt)
    assert not marker.exists()
    # the same file loaded the unsafe way would have run it: the test can tell
    torch.load(ckpt / MODEL_STATES, weights_only=False)
    assert marker.exists()


def test_expert_file_payload_is_refused(tmp_path, tiny_data):
    ckpt, _ = make_checkpoint(tmp_path / "best", tiny_data)
    marker = tmp_path / "payload-ran"
    bad = ckpt / "layer_0_expert_0_mp_rank_00_model_states.pt"
    torch.save({"x": Payload(marker)}, bad)
    with pytest.raises(CheckpointError, match=rf"{bad}: refused"):
        load_for_inference(ckpt)
    assert not marker.exists()
    assert set(load_states(ckpt / MODEL_STATES)) == {"module", "optimizer"}


def test_diagnosing_a_damaged_folder_runs_no_payload(tmp_path, tiny_data):
    """issue 27, item 3: when DeepSpeed's load fails, unreadable_files() names the damaged
    files; it opens every *.pt with weights_only=True, so a payload planted in an RNG file
    is listed as refused and never runs."""
    from cats_ds.training.checkpoint import unreadable_files
    from cats_ds.training.state import rng_state

    ckpt, _ = make_checkpoint(tmp_path / "run" / "latest", tiny_data)
    rng = rng_state()
    torch.save(rng, ckpt / "rng_rank0.pt")  # a healthy RNG file, as save_checkpoint writes it
    marker = tmp_path / "payload-ran"
    torch.save({**rng, "extra": Payload(marker)}, ckpt / "rng_rank1.pt")
    states = ckpt / MODEL_STATES
    states.write_bytes(states.read_bytes()[:1000])
    bad = unreadable_files(ckpt)
    assert not marker.exists()
    assert len(bad) == 2, bad
    assert bad[0].startswith(f"{states}: damaged or truncated (1000 bytes)")
    assert bad[1].startswith(f"{ckpt / 'rng_rank1.pt'}: refused, not loaded") and "could run code" in bad[1]
    torch.load(ckpt / "rng_rank1.pt", weights_only=False)  # the old way would have run it
    assert marker.exists()
