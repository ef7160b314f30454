#!/usr/bin/env bash
# Set up (idempotent) and run the demo: a private redis-server, real Yahoo
# replies through the classifier, the policy and the shared store, shown as the
# governor's decisions. Extra arguments go to `governor demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/governor" demo "$@"
