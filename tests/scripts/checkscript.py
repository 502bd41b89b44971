"""What every check script run under `deepspeed --num_gpus W` starts with: its command
line (--config, --deepspeed_config, --out, any extra flags, then section.key=value
overrides) and a training Run built from it."""

from __future__ import annotations

import argparse

from cats_ds.config import load_config
from cats_ds.training.loop import setup


def setup_from_command_line(add_arguments=None):
    """Returns (args, cfg, run). add_arguments(parser) adds a script's own flags."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--deepspeed_config")
    ap.add_argument("--out")
    ap.add_argument("--local_rank", type=int, default=-1)
    if add_arguments is not None:
        add_arguments(ap)
    args, overrides = ap.parse_known_args()
    cfg = load_config(args.config, overrides)
    return args, cfg, setup(cfg, args.deepspeed_config)
