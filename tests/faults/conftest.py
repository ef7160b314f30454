"""Fixtures of the fault-injection suite (tests/faults/).

The labs are the end-to-end ones: the Postfix lab fixtures of tests/e2e/conftest.py
(loaded from there, not copied) and, in test_exim_faults.py, the Exim pieces of
tests/e2e/test_exim_e2e.py.
``fault_report`` prints each scenario's one-line outcome, merges it into
tests/faults/results.json and asserts the invariants (nothing lost, nothing
rejected or bounced, no lease left, cap kept).
"""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from governor.lab.faults import Outcome, record

HERE = Path(__file__).resolve().parent
E2E = HERE.parent / "e2e"
RESULTS = HERE / "results.json"


def load(path: Path, name: str) -> ModuleType:
    """Import a test-tree module by path (tests/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_e2e = load(E2E / "conftest.py", "governor_e2e_fixtures")
lab_workdir = _e2e.lab_workdir
private_redis = _e2e.private_redis
yahoo_sim = _e2e.yahoo_sim
lab_factory = _e2e.lab_factory


@pytest.fixture
def fault_report() -> Callable[[Outcome], None]:
    def report(outcome: Outcome) -> None:
        print("\n" + outcome.line())
        record(RESULTS, outcome)
        assert not outcome.problems(), outcome.line()

    return report
