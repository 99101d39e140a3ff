#!/usr/bin/env bash
# Quick-start demo: set up the environment, then tune the digits MLP example.
# Extra arguments are passed to `kubetune run`.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
VENV="${KUBETUNE_VENV:-$REPO_ROOT/.venv}"

bash scripts/setup.sh
echo "==> running kubetune on examples/digits-mlp.yaml"
exec "$VENV/bin/kubetune" run examples/digits-mlp.yaml "$@"
