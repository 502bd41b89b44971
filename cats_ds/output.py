"""Rank-0 output of a training run: the one print helper and the DeepSpeed monitor writer
(TensorBoard / csv / wandb blocks of the DeepSpeed JSON), shared by the training loop,
checkpointing and the in-training analysis."""

from __future__ import annotations

import torch.distributed as dist


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args) -> None:
    if is_rank0():
        print(*args, flush=True)


def write_events(run, events: list) -> None:
    """(name, value, step) events to the engine's monitors (a no-op when none is enabled)."""
    monitor = getattr(run.engine, "monitor", None)
    if monitor is not None and monitor.enabled:
        monitor.write_events(events)
