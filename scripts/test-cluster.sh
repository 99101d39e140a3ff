#!/usr/bin/env bash
# Run the test control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler; see tests/control_plane.py) in the background, outside pytest.
#
#   bash scripts/test-cluster.sh up       # build if needed, start; the LAST line
#                                         # printed is the admin kubeconfig path
#   bash scripts/test-cluster.sh down     # stop it and remove what `up` made
#   bash scripts/test-cluster.sh status   # running or not (exit 0 when running)
#
# `up` is idempotent: when the cluster is already running it only prints the
# kubeconfig path. State (certificates, etcd data, logs, kubeconfig) lives in
#   ${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/test-cluster/
# with the component logs in run/*.log and the supervisor's in supervisor.log.
#
# Environment:
#   KUBETUNE_CACHE_DIR             cache root (default: $HOME/.cache/kubetune)
#   KUBETUNE_VENV                  virtualenv whose python runs the supervisor
#                                  (default: <repo>/.venv; else python3)
#   KUBETUNE_CONTROL_PLANE_TIMEOUT start-up deadline in seconds (default 300)
#   KUBETUNE_TEST_CLUSTER_NODE_CMD shell command started once the control plane
#                                  is ready and stopped with it (node agent hook).
#                                  Unset: as root, the stand-in kubelet
#                                  (tests/kubelet.py) with Node gpu-node: 8 CPUs,
#                                  32Gi, 2 nvidia.com/gpu; its pods run as local
#                                  processes, its log is in run/kubelet/. Empty: no
#                                  node agent (pods stay Pending)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/test-cluster"
VENV="${KUBETUNE_VENV:-$REPO_ROOT/.venv}"
if [ -x "$VENV/bin/python" ]; then PY="$VENV/bin/python"; else PY="$(command -v python3)"; fi
UP_TIMEOUT=$(( ${KUBETUNE_CONTROL_PLANE_TIMEOUT:-300} + 60 ))

die() { echo "test-cluster.sh: error: $*" >&2; exit 1; }
say() { echo "test-cluster: $*" >&2; }

supervisor_pid() {
    local pid
    [ -f "$STATE/supervisor.pid" ] || return 1
    pid="$(cat "$STATE/supervisor.pid")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    # The pid may have been reused by an unrelated process.
    tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -q "control_plane.py serve" || return 1
    echo "$pid"
}

# --- node agents ---------------------------------------------------------------
# Commands started by the supervisor once the control plane is ready, with
# KUBECONFIG set to the admin kubeconfig and KUBETUNE_CONTROL_PLANE_DIR to its run
# folder (certificates, logs), and stopped with the control plane; each logs to
# run/after-ready-N.log. A node agent that needs its own credentials can mint them
# in Python with ControlPlane.kubeconfig_for("system:node:NAME", ("system:nodes",)).
NODE_NAME=gpu-node

# The stand-in kubelet: it needs root (mount namespaces, bind mounts, pod users).
default_node_cmd() {
    [ "$(id -u)" = 0 ] || return 0
    printf 'exec %q %q --kubeconfig "$KUBECONFIG" --node %q --cpu 8 --memory 32Gi --gpus 2 --state-dir "$KUBETUNE_CONTROL_PLANE_DIR/kubelet"' \
        "$PY" "$REPO_ROOT/tests/kubelet.py" "$NODE_NAME"
}

node_cmd() {
    if [ -n "${KUBETUNE_TEST_CLUSTER_NODE_CMD+set}" ]; then
        printf '%s' "$KUBETUNE_TEST_CLUSTER_NODE_CMD"
    else
        default_node_cmd
    fi
}

node_agent_args() {
    local cmd
    cmd="$(node_cmd)"
    if [ -n "$cmd" ]; then
        printf '%s\0' --after-ready "$cmd"
    fi
}

cmd_up() {
    local pid bin log_lines
    if pid="$(supervisor_pid)" && [ -f "$STATE/ready" ]; then
        say "already running (supervisor pid $pid)"
        cat "$STATE/ready"
        return 0
    fi
    if pid="$(supervisor_pid)"; then
        say "a start is in progress (supervisor pid $pid); stop it with: $0 down"
        exit 1
    fi
    cmd_down >/dev/null 2>&1 || true   # leftovers of a crashed run

    bin="$(bash "$REPO_ROOT/scripts/control-plane/build.sh" | tail -n 1)"
    [ -d "$bin" ] || die "build.sh printed no bin folder"

    mkdir -p "$STATE"
    local -a extra=()
    while IFS= read -r -d '' arg; do extra+=("$arg"); done < <(node_agent_args)
    # setsid: its own session, so that the terminal's Ctrl-C does not reach it.
    setsid "$PY" "$REPO_ROOT/tests/control_plane.py" serve --state-dir "$STATE" \
        --bin-dir "$bin" "${extra[@]}" \
        >"$STATE/supervisor.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" > "$STATE/supervisor.pid"
    say "starting (supervisor pid $pid, log $STATE/supervisor.log)"

    local deadline=$(( $(date +%s) + UP_TIMEOUT ))
    until [ -f "$STATE/ready" ]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "--- $STATE/supervisor.log ---" >&2
            tail -n 80 "$STATE/supervisor.log" >&2 || true
            die "the control plane did not start"
        fi
        if [ "$(date +%s)" -gt "$deadline" ]; then
            tail -n 80 "$STATE/supervisor.log" >&2 || true
            cmd_down >/dev/null 2>&1 || true
            die "the control plane was not ready after ${UP_TIMEOUT}s"
        fi
        sleep 0.5
    done
    if [ -z "${KUBETUNE_TEST_CLUSTER_NODE_CMD+set}" ]; then
        if [ -z "$(default_node_cmd)" ]; then
            say "not root: no stand-in kubelet, so no node (pods stay Pending)"
        else
            # The stand-in kubelet writes run/kubelet/ready once its Node is registered.
            until [ -f "$STATE/run/kubelet/ready" ]; do
                if ! kill -0 "$pid" 2>/dev/null || [ "$(date +%s)" -gt "$deadline" ]; then
                    tail -n 40 "$STATE/run/after-ready-0.log" "$STATE/run/kubelet/kubelet.log" >&2 || true
                    cmd_down >/dev/null 2>&1 || true
                    die "the stand-in kubelet did not register node $NODE_NAME"
                fi
                sleep 0.5
            done
            say "node $NODE_NAME ready (stand-in kubelet, log $STATE/run/kubelet/kubelet.log)"
        fi
    fi
    say "ready"
    cat "$STATE/ready"
}

cmd_down() {
    local pid i
    if pid="$(supervisor_pid)"; then
        say "stopping (supervisor pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        # The supervisor stops the components (SIGTERM, 20 s grace, SIGKILL).
        for i in $(seq 1 120); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "supervisor did not exit; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    # Components die with their supervisor (PR_SET_PDEATHSIG); make sure anyway,
    # checking that each pid still runs one of our binaries before killing it.
    if [ -f "$STATE/components" ]; then
        local cpid name
        while read -r cpid name; do
            [ -n "$cpid" ] || continue
            if tr '\0' ' ' 2>/dev/null < "/proc/$cpid/cmdline" | grep -q -- "$STATE/run\|control-plane/"; then
                say "killing leftover $name (pid $cpid)"
                kill -KILL "$cpid" 2>/dev/null || true
            fi
        done < "$STATE/components"
    fi
    rm -rf "$STATE"
    say "down"
}

cmd_status() {
    local pid
    if pid="$(supervisor_pid)" && [ -f "$STATE/ready" ]; then
        echo "running (supervisor pid $pid): KUBECONFIG=$(cat "$STATE/ready")"
    elif pid="$(supervisor_pid)"; then
        echo "starting (supervisor pid $pid)"
        return 1
    else
        echo "not running"
        return 1
    fi
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    -h|--help|help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;;
    *) awk 'NR > 1 && !/^#/ {exit} NR > 1' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
