#!/usr/bin/env bash
# Build the test control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, etcd) from source with the Go toolchain, once.
#
#   bash scripts/control-plane/build.sh      # prints the bin folder as its last line
#
# The binaries go to a cache folder keyed by the Kubernetes version and a hash
# of what decides them (go.mod, go.sum, etcd/main.go, the build flags):
#
#   ${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/control-plane/<version>-<hash>/bin/
#
# When that folder is already there nothing is built: it only ever appears
# complete, moved into place in one rename after a build into a temp folder, so
# an interrupted build is never taken for a finished one. Concurrent runs wait
# for each other (flock) rather than building twice.
#
# Why building is lean: the four commands are built by ONE `go build`, so the
# packages they share compile once; no cgo, no debug info (-s -w), -trimpath.
# The Go build cache (GOCACHE) is used as usual, so a rebuild after a go.mod
# change recompiles only what changed.
#
# Environment:
#   KUBETUNE_CACHE_DIR    cache root (default: $HOME/.cache/kubetune)
#   GO                    go command (default: go on PATH)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

die() { echo "build.sh: error: $*" >&2; exit 1; }
say() { echo "control-plane: $*" >&2; }

GO="${GO:-go}"
command -v "$GO" >/dev/null 2>&1 || die "'$GO' not found: install Go (>= 1.26) to build the test control plane"

K8S_VERSION="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' go.mod)"
[ -n "$K8S_VERSION" ] || die "no k8s.io/kubernetes requirement in $HERE/go.mod"
k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"

# Version stamp, as Kubernetes' own build (hack/lib/version.sh) sets it, so
# that the servers report v1.x.y rather than v0.0.0-master.
version_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    version_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1"
    version_ldflags+=" -X $pkg.gitMinor=$k8s_minor -X $pkg.gitTreeState=clean"
    version_ldflags+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
LDFLAGS="-s -w${version_ldflags}"
TAGS="providerless"
PACKAGES=(
    k8s.io/kubernetes/cmd/kube-apiserver
    k8s.io/kubernetes/cmd/kube-controller-manager
    k8s.io/kubernetes/cmd/kube-scheduler
    ./etcd
)
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler etcd)

recipe="$(printf '%s\n' "CGO_ENABLED=0 -trimpath -tags=$TAGS" "$LDFLAGS" "${PACKAGES[@]}")"
hash="$({ cat go.mod go.sum etcd/main.go; printf '%s\n' "$recipe"; } | sha256sum | cut -c1-12)"
CACHE_ROOT="${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}"
DEST="$CACHE_ROOT/control-plane/$K8S_VERSION-$hash"
BIN="$DEST/bin"

complete() {
    local b
    [ -d "$BIN" ] || return 1
    for b in "${BINARIES[@]}"; do [ -x "$BIN/$b" ] || return 1; done
}

if complete; then
    say "cached: $BIN"
    echo "$BIN"
    exit 0
fi

mkdir -p "$DEST"
exec 9>"$DEST/.lock"
if ! flock -n 9; then
    say "another build of $K8S_VERSION-$hash is running; waiting for it"
    flock 9
fi
if complete; then   # built by whoever held the lock
    say "cached: $BIN"
    echo "$BIN"
    exit 0
fi
# Leftovers of an interrupted build.
rm -rf "$BIN" "$DEST"/tmp.*

tmp="$(mktemp -d "$DEST/tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

say "building Kubernetes $K8S_VERSION (kube-apiserver, kube-controller-manager, kube-scheduler) and etcd"
say "into $BIN; the first build takes a while (about 10 minutes on 2 cores)"
start=$(date +%s)
# GOTOOLCHAIN=local: build with the installed Go, never download another.
# -mod=readonly: go.mod/go.sum are complete and committed; never rewrite them.
env CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false" \
    "$GO" build -trimpath -tags="$TAGS" -ldflags="$LDFLAGS" -o "$tmp/bin/" "${PACKAGES[@]}"

for b in "${BINARIES[@]}"; do
    [ -x "$tmp/bin/$b" ] || die "go build produced no $b"
done
printf '%s\n' "$recipe" > "$tmp/bin/.recipe"
mv -T "$tmp/bin" "$BIN"   # one rename: the folder appears complete or not at all
elapsed=$(( $(date +%s) - start ))
say "built in $((elapsed / 60))m$((elapsed % 60))s: $BIN"
echo "$BIN"
