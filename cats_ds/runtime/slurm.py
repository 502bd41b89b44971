"""SLURM helpers: expand SLURM_JOB_NODELIST and write a DeepSpeed hostfile.

Used by launch/slurm/train.sbatch when `scontrol` is not on PATH (e.g. inside a
container); `scontrol show hostnames` gives the same list.
"""

from __future__ import annotations

import re
from pathlib import Path


def expand_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-03,07],login1' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1'] (zero padding kept)."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    if not hosts:
        raise ValueError(f"empty SLURM node list: {nodelist!r}")
    return hosts


def write_hostfile(nodelist: str, slots: int, path: str | Path) -> list[str]:
    """One `host slots=N` line per node, in SLURM's order (node 0 is the master)."""
    hosts = expand_nodelist(nodelist)
    Path(path).write_text("".join(f"{h} slots={slots}\n" for h in hosts))
    return hosts
