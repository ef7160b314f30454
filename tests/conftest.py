"""Shared fixtures: a real, private redis-server for the whole test session."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from governor.redisproc import RedisProc

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisProc]:
    """One redis-server per test session, on a private unix socket and loopback port."""
    with RedisProc() as proc:
        yield proc


@pytest.fixture
def redis_url(redis_proc: RedisProc) -> Iterator[str]:
    """URL of the session's server, flushed before each test."""
    client = redis.Redis.from_url(redis_proc.url)
    client.flushall()
    client.close()
    yield redis_proc.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# --------------------------------------------------------------------------- fuzzing
#: Examples per fuzz property: a quick pass in every run (CI), a long one when the run
#: selects the ``fuzz`` marker (``pytest -m fuzz``, nightly). GOVERNOR_FUZZ_EXAMPLES
#: overrides both.
FUZZ_CI_EXAMPLES = 1_000
FUZZ_NIGHTLY_EXAMPLES = 100_000
FUZZ_PROFILE = "governor-fuzz"
_FUZZ_KEY = pytest.StashKey[int]()


def fuzz_selected(markexpr: str) -> bool:
    """True when ``-m`` asks for the fuzz tests: the expression holds for a test marked
    ``fuzz`` and not for an unmarked one (so ``-m "not fuzz"`` is not a fuzz run)."""
    if not markexpr:
        return False
    try:
        from _pytest.mark.expression import Expression

        expr = Expression.compile(markexpr)
        return expr.evaluate(lambda name, **_: name == "fuzz") and not expr.evaluate(lambda name, **_: False)
    except Exception:  # noqa: BLE001 - pytest internals moved: fall back to the plain word
        return markexpr.strip() == "fuzz"


def pytest_configure(config: pytest.Config) -> None:
    """Register the hypothesis profile the ``fuzz`` tests use (``settings.get_profile``):
    one mechanism for every fuzz test, sized by the marker selection."""
    import os

    from hypothesis import HealthCheck, settings

    nightly = fuzz_selected(config.getoption("markexpr") or "")
    examples = int(os.environ.get("GOVERNOR_FUZZ_EXAMPLES", 0)) or (
        FUZZ_NIGHTLY_EXAMPLES if nightly else FUZZ_CI_EXAMPLES)
    extra = {"database": None} if nightly else {}  # 10^5 examples: no example database to grow
    settings.register_profile(
        FUZZ_PROFILE, max_examples=examples, deadline=None, **extra,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    config.stash[_FUZZ_KEY] = examples


def pytest_report_header(config: pytest.Config) -> str:
    examples = config.stash.get(_FUZZ_KEY, FUZZ_CI_EXAMPLES)
    return f"fuzz: {examples} examples per fuzz property" + ("" if examples > FUZZ_CI_EXAMPLES else " (-m fuzz: 10^5)")
