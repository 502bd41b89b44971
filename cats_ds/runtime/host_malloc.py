"""How a CPU rank's C allocator treats the large buffers of a training step.

PyTorch's CPU tensors come from glibc malloc. glibc serves a request above its mmap
threshold (dynamic, at most 32 MB on 64-bit Linux) with a fresh mmap and returns it to
the kernel on free. At a few thousand target tokens a step holds several such buffers
(the (tokens, vocabulary) logits, their log-probabilities and gradient: 96 MB each at
3000 tokens and 8000 pieces), so every step maps them again and takes a page fault per
4 KB page on first touch: time spent in the kernel, not in arithmetic.

`reuse` (train.host_malloc, the default) tells glibc not to mmap (M_MMAP_MAX = 0) and to
keep freed memory in the heap (a trim threshold of 2 GB, 64 MB of top padding), so a step
reuses the pages the previous step touched. The process holds on to its peak heap, as
PyTorch's CUDA caching allocator does on a GPU. The arithmetic, and so every number a run
computes, is unchanged (PyTorch aligns CPU tensors itself). Where the environment already
configures the allocator (MALLOC_*_ variables, glibc.malloc tunables in GLIBC_TUNABLES,
or another allocator in LD_PRELOAD), or the C library is not glibc, nothing is changed
and the reason is returned for the log.

`GLIBC_TUNABLES_REUSE` is the same setting as an environment value for processes that
are not ours (the peer benchmark gives it to fairseq, to compare like with like).
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc's mallopt parameter numbers
TRIM_THRESHOLD = 2**31 - 1  # bytes of free heap top kept before giving memory back (mallopt takes an int)
TOP_PAD = 64 << 20  # extra bytes asked of the kernel whenever the heap grows
GLIBC_TUNABLES_REUSE = (f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={TRIM_THRESHOLD}:"
                        f"glibc.malloc.top_pad={TOP_PAD}")
POLICIES = ("reuse", "system")


def environment_setting(env: dict | None = None) -> str | None:
    """What in the environment already configures the allocator, or None."""
    env = os.environ if env is None else env
    names = sorted(k for k in env if k.startswith("MALLOC_") and k.endswith("_"))
    if names:
        return ", ".join(names)
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES (glibc.malloc.*)"
    preload = env.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"LD_PRELOAD={preload}"
    return None


def configure(policy: str, env: dict | None = None) -> str:
    """Apply train.host_malloc to this process; returns what was done, for the log."""
    if policy not in POLICIES:
        raise ValueError(f"train.host_malloc must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy == "system":
        return "host malloc: as configured (train.host_malloc=system)"
    found = environment_setting(env)
    if found:
        return f"host malloc: left as the environment sets it ({found})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "host malloc: unchanged (not glibc)"
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return "host malloc: unchanged (no mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in
             ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    if not ok:
        return "host malloc: unchanged (mallopt refused a setting)"
    return "host malloc: freed buffers reused, no mmap per allocation (train.host_malloc=reuse)"
