"""The training loop's progress as one object, TrainState, with state_dict() /
load_state_dict() beside the sampler's and the weighting's; the layout of the training
part of a checkpoint (DeepSpeed's client state) and the reader of the older flat layout;
the per-rank RNG states.

A checkpoint's client state is

    {"train": TrainState.state_dict(), "sampler": LanguageSampler.state_dict(),
     "dev_sampler": the dev sampler's (meta.data=dev) or None,
     "weighting": Weighting.state_dict()}

Checkpoints written before TrainState kept the counters flat beside the sampler and the
weighting ({"step", "best_valid", "best_score", "stale", "elapsed", "sampler", ...});
`read_client_state` maps the older one to the current layout. The RNG states are per rank, so they stay in
rng_rank<r>.pt beside the states files (`rng_state` / `set_rng_state`).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0
    """Optimizer updates done."""
    elapsed: float = 0.0
    """Training seconds of the sessions before this process (resumed runs)."""
    best_valid: float = float("inf")
    """Lowest mean validation loss so far."""
    best_score: Optional[float] = None
    """Best value of train.best_metric so far (None before the first validation that measures it)."""
    stale: int = 0
    """Validations of train.best_metric in a row without improvement (train.patience)."""
    nonfinite: int = 0
    """Consecutive updates whose training loss was NaN or inf on some rank (train.max_nonfinite)."""
    t_start: float = 0.0
    """time.time() at the start of this session (not saved: a session's own clock)."""

    SAVED = ("step", "elapsed", "best_valid", "best_score", "stale", "nonfinite")
    """The fields state_dict() holds."""

    def total_elapsed(self) -> float:
        """Training seconds up to now, earlier sessions included."""
        return self.elapsed + time.time() - self.t_start

    def state_dict(self) -> dict:
        """The saved fields, elapsed counted up to now."""
        state = {name: getattr(self, name) for name in self.SAVED}
        state["elapsed"] = self.total_elapsed()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the saved fields; a key a checkpoint lacks (written before the field
        existed) keeps its start value, except best_score (see client_state)."""
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed", 0.0))
        self.best_valid = float(state.get("best_valid", math.inf))
        score = state.get("best_score")
        self.best_score = None if score is None else float(score)
        self.stale = int(state.get("stale", 0))
        self.nonfinite = int(state.get("nonfinite", 0))


FLAT_TRAIN_KEYS = ("step", "best_valid", "best_score", "stale", "elapsed")
"""The counters the flat client state (before TrainState) kept at its top level."""


def client_state(run) -> dict:
    """The training part of a checkpoint (DeepSpeed's client state) of `run`."""
    return {"train": run.state.state_dict(), "sampler": run.sampler.state_dict(),
            "dev_sampler": run.dev_sampler.state_dict() if run.dev_sampler else None,
            "weighting": run.weighting.state_dict()}


def read_client_state(client: dict) -> dict:
    """A checkpoint's client state in the current layout (see the module docstring). A flat
    one (written before TrainState) is mapped: its counters go under "train"; a checkpoint
    from before train.best_metric has no best_score, its best/ was chosen by loss, so
    best_score is best_valid when that is finite."""
    if "train" in client:
        return client
    train = {key: client[key] for key in FLAT_TRAIN_KEYS if key in client}
    if "best_score" not in train:
        best = float(train.get("best_valid", math.inf))
        train["best_score"] = best if math.isfinite(best) else None
    return {"train": train, "sampler": client["sampler"], "dev_sampler": client.get("dev_sampler"),
            "weighting": client["weighting"]}


# --------------------------------------------------------------------------- RNG (per rank)


def numpy_rng_to_tensors(state: tuple) -> tuple:
    """np.random.get_state() with its key array as a tensor, so the RNG file loads with
    torch.load(weights_only=True) (a numpy array would need unpickling)."""
    name, keys, pos, has_gauss, gauss = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)


def numpy_rng_from_tensors(state: tuple) -> tuple:
    name, keys, pos, has_gauss, gauss = state
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss


def rng_state() -> dict:
    """This rank's RNG states (torch, numpy, python, cuda when present): rng_rank<r>.pt."""
    rng = {"torch": torch.get_rng_state(), "numpy": numpy_rng_to_tensors(np.random.get_state()),
           "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def set_rng_state(rng: dict) -> None:
    """Restore what rng_state() returned (torch.load(weights_only=True) of rng_rank<r>.pt)."""
    torch.set_rng_state(rng["torch"])
    np.random.set_state(numpy_rng_from_tensors(rng["numpy"]))
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
