"""train.host_malloc: glibc malloc set to reuse freed buffers on CPU ranks (runtime/host_malloc.py)."""

import json
import os
import platform
import subprocess
import sys

import pytest

from cats_ds.config import ConfigError, load_config
from cats_ds.runtime.host_malloc import configure, environment_setting

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# mallinfo2's hblkhd: bytes held in mmapped blocks, read while a 128 MB tensor is alive
PROBE = """
import ctypes, json, sys
import torch
from cats_ds.runtime.host_malloc import configure

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
note = configure(sys.argv[1])
sums = []
for _ in range(3):  # allocate, free, allocate again: the second one reuses the first one's pages under reuse
    x = torch.ones(32 << 20)
    sums.append(float(x.sum()))
    mapped = libc.mallinfo2().hblkhd
    del x
print(json.dumps({"note": note, "mapped": mapped, "heap": libc.mallinfo2().arena, "sums": sums}))
"""


def probe(policy: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", PROBE, policy], env={**clean, **env}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_reuse_keeps_large_buffers_out_of_mmap():
    system, reuse = probe("system"), probe("reuse")
    assert system["mapped"] >= 128 << 20, system  # glibc's default: the tensor is its own mmap
    assert reuse["mapped"] < 64 << 20, reuse  # reuse: from the heap, which keeps it after free
    assert reuse["heap"] >= 128 << 20, reuse
    assert "reused" in reuse["note"] and "system" in system["note"]
    assert system["sums"] == reuse["sums"] == [float(32 << 20)] * 3


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_the_environment_wins():
    res = probe("reuse", MALLOC_ARENA_MAX_="2")
    assert "MALLOC_ARENA_MAX_" in res["note"] and res["mapped"] >= 128 << 20


def test_environment_setting():
    assert environment_setting({}) is None
    assert environment_setting({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.rtld.nns=2"}) is None
    assert environment_setting({"MALLOC_TOP_PAD_": "1", "MALLOC_ARENA_MAX": "2"}) == "MALLOC_TOP_PAD_"
    assert "GLIBC_TUNABLES" in environment_setting({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"})
    assert "jemalloc" in environment_setting({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
    assert configure("reuse", {"MALLOC_TOP_PAD_": "1"}) == "host malloc: left as the environment sets it (MALLOC_TOP_PAD_)"


def test_policy_is_checked():
    with pytest.raises(ValueError, match="train.host_malloc must be one of reuse, system"):
        configure("jemalloc")
    with pytest.raises(ConfigError, match="train.host_malloc"):
        load_config(None, ["train.host_malloc=jemalloc"])
    assert load_config(None, []).train.host_malloc == "reuse"
