"""Lab tooling: a private Postfix instance and recording test doubles (SMTP sink, socketmap).

Used by the demo, the e2e tests and the benchmarks; never by the product at run time.
"""
from __future__ import annotations
