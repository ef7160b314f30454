"""The Lua scripts, read from package data and registered as redis-py Script objects.

Script objects run EVALSHA and reload on NOSCRIPT by themselves (after SCRIPT
FLUSH, a restart or a failover), so nothing here hand-rolls EVALSHA.
``lib.lua`` is prepended to the scripts that use it: Redis has no include, and
this keeps the GCRA/ramp/warm-up arithmetic in one place.
"""
from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

SCRIPT_NAMES = ("acquire", "release", "state", "apply", "admin", "status", "assign")
_STANDALONE = frozenset({"release"})


@cache
def script_text(name: str) -> str:
    """Full text of one script as sent to Redis (lib.lua + body)."""
    if name not in SCRIPT_NAMES:
        raise KeyError(name)
    pkg = resources.files("governor.store")
    body = pkg.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    if name in _STANDALONE:
        return body
    return pkg.joinpath("lib.lua").read_text(encoding="utf-8") + "\n" + body


def register(client: Any) -> dict[str, Any]:
    """Script objects for a sync or asyncio client (no round trip until first use)."""
    return {name: client.register_script(script_text(name)) for name in SCRIPT_NAMES}
