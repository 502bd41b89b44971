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


MONITOR_BLOCKS = ("tensorboard", "csv_monitor", "wandb", "comet")
"""DeepSpeed JSON blocks that enable a monitor. The training loop hands them to its own
DeepSpeed MonitorMaster (`monitor`) instead of the engine: an engine with a monitor
enabled also writes its own per-sample events (Train/Samples/lr, train_loss,
loss_scale: a second x-axis for quantities train/ already logs per update)."""


def split_monitors(ds: dict) -> tuple[dict, dict]:
    """(the DeepSpeed JSON without monitor blocks, the monitor blocks)."""
    blocks = {k: v for k, v in ds.items() if k in MONITOR_BLOCKS}
    return {k: v for k, v in ds.items() if k not in MONITOR_BLOCKS}, blocks


def monitor(blocks: dict):
    """DeepSpeed's MonitorMaster for these blocks (writers on rank 0 only)."""
    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.monitor.monitor import MonitorMaster

    return MonitorMaster(get_monitor_config(blocks))


def write_events(run, events: list) -> None:
    """(name, value, step) events to the run's monitors (a no-op when none is enabled)."""
    monitor = getattr(run, "monitor", None) or getattr(run.engine, "monitor", None)
    if monitor is not None and monitor.enabled:
        monitor.write_events(events)
