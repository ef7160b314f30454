"""Lab tooling: a private Postfix instance and recording test doubles (SMTP sink, socketmap).

Used by the demo, the e2e tests and the benchmarks; never by the product at run time.
"""
from __future__ import annotations

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
