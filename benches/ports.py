"""Loopback ports for the benches' processes.

Two picks in a row of a free ephemeral port may return the same port (the first socket
is closed before the second bind); a gateway once got its listen and control port that
way. So a port is handed out at most once per bench process.
"""

from __future__ import annotations

import socket

_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, never handed out before in this process."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port")
