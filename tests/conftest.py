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
