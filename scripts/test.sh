#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit, property, store,
# simulator and end-to-end tests against real redis-server, Postfix and Exim.
# Extra arguments go to pytest, e.g. scripts/test.sh -k store -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/pytest" "$@"
