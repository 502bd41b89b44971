"""A free TCP port on this host for a launcher's rendezvous (--master_port, tcp://)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the kernel reports free now (another process may still take it before use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
