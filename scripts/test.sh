#!/usr/bin/env bash
# Set up the test environment and run pytest. Arguments go to pytest.
# Exits with pytest's status, except that "no tests collected" (5) is a failure.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
VENV="${KUBETUNE_VENV:-$REPO_ROOT/.venv}"

bash scripts/setup.sh --test
# The whole suite, the slow fault tests included (KUBETUNE_SLOW=0 leaves them out).
export KUBETUNE_SLOW="${KUBETUNE_SLOW:-1}"
echo "==> running pytest $*"
rc=0
# --durations: the 25 slowest tests at the end, to see where the suite's time goes.
"$VENV/bin/python" -m pytest --durations=25 "$@" || rc=$?

if [ "$rc" -eq 5 ]; then
    echo "test.sh: error: pytest collected no tests (exit code 5); treating as failure" >&2
    exit 1
fi
exit "$rc"
