#!/usr/bin/env bash
# Set up the kubetune development environment (idempotent).
#
#   bash scripts/setup.sh          # venv + kubetune (runtime deps only)
#   bash scripts/setup.sh --test   # also test extras, the Debian packages the tests need
#                                  # (postgresql, prometheus, pgbouncer, chromium and
#                                  # chromium-driver for the dashboard's browser test) and the test
#                                  # Kubernetes control plane (built with Go, cached)
#
# Environment:
#   KUBETUNE_VENV=DIR          virtualenv location (default: <repo>/.venv)
#   KUBETUNE_SETUP_FORCE=1     re-run pip even if nothing seems to have changed
set -euo pipefail

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

WITH_TEST=0
for arg in "$@"; do
    case "$arg" in
        --test) WITH_TEST=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup.sh: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
VENV="${KUBETUNE_VENV:-$REPO_ROOT/.venv}"
TORCH_VERSION="2.13.0"   # the exact pin: pip's cache keeps the one build it downloaded

step() { echo "==> $*"; }
die() { echo "setup.sh: error: $*" >&2; exit 1; }

# --- Debian packages (only needed for the test suite) -----------------------
ensure_debian_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        step "Debian packages present: $*"
        return 0
    fi

    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 \
            || die "need root or sudo to install Debian packages: ${missing[*]}"
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "apt-get not found; install these packages manually: ${missing[*]}"

    step "installing Debian packages: ${missing[*]}"
    # apt output goes to a log, shown only on failure. Package postinst scripts
    # try to start services; without an init system (containers) that is
    # refused harmlessly: the tests start their own servers.
    local log; log="$(mktemp)"
    if ! { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q \
           && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
           >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "installing Debian packages failed: ${missing[*]}"
    fi
    rm -f "$log"
}

if [ "$WITH_TEST" -eq 1 ]; then
    ensure_debian_packages postgresql prometheus pgbouncer chromium chromium-driver
    # Kubernetes' own binaries, built from its Go modules once per version (minutes the
    # first time, nothing after): see scripts/control-plane/build.sh.
    step "test control plane"
    bash scripts/control-plane/build.sh >/dev/null
fi

# --- virtualenv --------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    step "creating virtualenv in $VENV"
    python3 -m venv "$VENV"
else
    step "using virtualenv $VENV"
fi
PY="$VENV/bin/python"

# Skip pip entirely when an earlier run already installed the same thing
# (same pyproject.toml, same extras, same checkout). Source edits need no
# reinstall: the package is installed in editable mode.
if [ "$WITH_TEST" -eq 1 ]; then extras="[test]"; else extras=""; fi
stamp_file="$VENV/.kubetune-setup-stamp"
stamp_of() {
    printf '%s\n%s\n%s\n' "$REPO_ROOT" "$1" "$(sha256sum pyproject.toml | cut -d' ' -f1)"
}
stamp_ok() {
    [ "${KUBETUNE_SETUP_FORCE:-0}" != "1" ] || return 1
    [ -f "$stamp_file" ] || return 1
    # A --test install also satisfies a plain install.
    local have; have="$(cat "$stamp_file")"
    [ "$have" = "$(stamp_of "$extras")" ] || [ "$have" = "$(stamp_of "[test]")" ] || return 1
    # Cheap sanity check that the install is still there.
    "$PY" - "$TORCH_VERSION" "$extras" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
assert version("torch").split("+")[0] == sys.argv[1]
version("kubetune")
if sys.argv[2]:
    version("pytest")
EOF
}

if stamp_ok; then
    step "kubetune${extras} already installed (pyproject.toml unchanged)"
    exit 0
fi
rm -f "$stamp_file"

# torch first, at the exact pin: pyproject.toml only says torch>=2.4, which would
# otherwise resolve to whatever is newest and download a second multi-GB build.
# pip does not reinstall it when it is already present.
step "installing torch==$TORCH_VERSION"
"$PY" -m pip install -q "torch==$TORCH_VERSION"

step "installing kubetune${extras} (editable)"
"$PY" -m pip install -q -e ".${extras}"

stamp_of "$extras" > "$stamp_file"
step "done: $VENV"
