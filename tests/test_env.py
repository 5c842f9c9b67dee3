"""The test environment itself: the redis-server fixture the KV-store tests
build on is a real server that stores and returns data."""

from __future__ import annotations

import socket


def resp(*args: bytes) -> bytes:
    out = b"*%d\r\n" % len(args)
    for a in args:
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def test_redis_server_fixture(redis_server):
    host, port = redis_server.removeprefix("redis://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(resp(b"SET", b"cacheroute:test", b"v" * 1000))
        assert s.recv(16) == b"+OK\r\n"
        s.sendall(resp(b"GET", b"cacheroute:test"))
        data = b""
        while len(data) < 1000 + 9:
            chunk = s.recv(4096)
            assert chunk, "redis closed the connection"
            data += chunk
        assert data == b"$1000\r\n" + b"v" * 1000 + b"\r\n"
        s.sendall(resp(b"CONFIG", b"GET", b"save"))
        assert b"save" in s.recv(4096)
