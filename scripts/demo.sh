#!/usr/bin/env bash
# Set up (idempotent) and run the demo: private redis-server, Postfix and Yahoo
# simulator on loopback; real mail through Postfix and the governor, shown as the
# governor's decisions. Extra arguments go to `governor demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/governor" demo "$@"
