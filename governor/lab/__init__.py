"""Lab tooling: a private Postfix instance and recording test doubles (SMTP sink, socketmap).

Used by the demo, the e2e tests and the benchmarks; never by the product at run time.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any


def wait_for(what: str, cond: Callable[[], Any], timeout: float, tick: float = 0.1) -> Any:
    """Poll ``cond`` until it is truthy (its value is returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(tick)


def readsocket(path: str | os.PathLike[str], line: bytes | str, *, newline: bool = True,
               timeout: float = 10.0, errors: str = "strict") -> str:
    """One request the way Exim's ``${readsocket}`` makes it: connect, write,
    half-close, read to EOF. ``errors`` is how undecodable reply bytes are decoded."""
    data = line.encode() if isinstance(line, str) else line
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(path))
        s.sendall(data + (b"\n" if newline else b""))
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors)
