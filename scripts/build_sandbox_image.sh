#!/usr/bin/env bash
# Build the sandbox image (sandbox_image/Dockerfile) on this host, with or without
# Docker Hub and without network inside the build.
#
#   scripts/build_sandbox_image.sh [PYTHON]
#
#   PYTHON                  the interpreter whose pip makes the wheelhouse (default: .venv's)
#   MATHMILL_SANDBOX_BASE   base image to build on; default: python:3.11-slim-bookworm
#                           when it is present or can be pulled, else one made here
#                           from Debian packages (mmdebstrap, ~20 s, cached)
#   MATHMILL_SANDBOX_IMAGE  repository to tag (default mathmill-sandbox)
#   MATHMILL_DOCKER_SETUP=1 install docker.io and mmdebstrap with apt-get and start
#                           dockerd when no engine answers (root only; what CI does)
#
# Steps: make sure an engine answers; pick or make the base; build the wheelhouse
# (mathmill --no-deps and sandbox_image/requirements.txt) with the host's pip; then
# `docker build` with no network, tagged mathmill-sandbox:<version> and :latest. The
# image carries a label with the hash of its inputs (Dockerfile, requirements,
# mathmill's sources (seccomp profile included), the base image's id): when an image with that
# hash exists, nothing is rebuilt. Prints the tag and the image's size.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
IMAGE=${MATHMILL_SANDBOX_IMAGE:-mathmill-sandbox}
HUB_BASE=python:3.11-slim-bookworm
DEBIAN_BASE=mathmill-sandbox-base:bookworm
WORK=build/sandbox-image
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/mathmill
say() { echo "build_sandbox_image: $*" >&2; }

engine_up() { docker info > /dev/null 2>&1; }

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$@" > /dev/null 2>&1 || {
        apt-get update -q > /dev/null && apt-get install -y -q "$@" > /dev/null
    } || { say "apt-get install $* failed"; exit 3; }
}

ensure_engine() {
    engine_up && return 0
    if [ "${MATHMILL_DOCKER_SETUP:-0}" != 1 ]; then
        say "no Docker engine answers (docker info failed)."
        say "start one, or rerun with MATHMILL_DOCKER_SETUP=1 to install docker.io and start dockerd (root)"
        exit 3
    fi
    if [ "$(id -u)" != 0 ]; then
        say "MATHMILL_DOCKER_SETUP=1 needs root to install and start dockerd"
        exit 3
    fi
    if ! command -v dockerd > /dev/null; then
        say "installing docker.io (Debian's package)"
        apt_install docker.io
    fi
    mkdir -p "$CACHE"
    say "starting dockerd (log: $CACHE/dockerd.log)"
    setsid nohup dockerd > "$CACHE/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 60); do engine_up && return 0; sleep 1; done
    say "dockerd did not answer within 60 s; its log:"
    tail -20 "$CACHE/dockerd.log" >&2
    exit 3
}

debian_base() {
    if docker image inspect "$DEBIAN_BASE" > /dev/null 2>&1; then
        return 0
    fi
    if ! command -v mmdebstrap > /dev/null; then
        if [ "${MATHMILL_DOCKER_SETUP:-0}" = 1 ] && [ "$(id -u)" = 0 ]; then
            say "installing mmdebstrap"
            apt_install mmdebstrap
        else
            say "Docker Hub is unreachable and mmdebstrap is missing: apt-get install mmdebstrap"
            exit 3
        fi
    fi
    say "making $DEBIAN_BASE from Debian packages (mmdebstrap)"
    mkdir -p "$WORK"
    local sources=()
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && sources+=("$f")
    done
    cat "${sources[@]}" | mmdebstrap --quiet --variant=minbase \
        --include=python3,python3-venv \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        bookworm "$WORK/base.tar" -
    docker import "$WORK/base.tar" "$DEBIAN_BASE" > /dev/null
    rm -f "$WORK/base.tar"
}

pick_base() {
    if [ -n "${MATHMILL_SANDBOX_BASE:-}" ]; then
        echo "$MATHMILL_SANDBOX_BASE"
    elif docker image inspect "$HUB_BASE" > /dev/null 2>&1 ||
        timeout 20 docker pull -q "$HUB_BASE" > /dev/null 2>&1; then
        echo "$HUB_BASE"
    else
        say "Docker Hub is unreachable: building on Debian packages instead of $HUB_BASE"
        debian_base
        echo "$DEBIAN_BASE"
    fi
}

# pip wheel into the build context; its stderr is shown on failure, and otherwise
# without the warnings about index locations that some hosts' pip config names.
pip_wheel() {
    if ! "$PYTHON" -m pip wheel -q -w "$WORK/context/wheels" "$@" 2> "$WORK/pip.log"; then
        cat "$WORK/pip.log" >&2
        exit 1
    fi
    grep -v "^WARNING: Location" "$WORK/pip.log" >&2 || true
}

ensure_engine
BASE=$(pick_base)
VERSION=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
BASE_ID=$(docker image inspect --format '{{.Id}}' "$BASE")
HASH=$( (
    echo "$BASE_ID"
    cat sandbox_image/Dockerfile sandbox_image/requirements.txt pyproject.toml
    find mathmill -name "*.py" -o -name "*.md" -o -name "*.jsonl" -o -name "*.json" | LC_ALL=C sort | xargs cat
) | sha256sum | cut -c1-16)

if [ -n "$(docker images -q --filter "label=mathmill.inputs=$HASH" "$IMAGE:$VERSION")" ]; then
    say "$IMAGE:$VERSION is up to date (inputs $HASH)"
else
    say "building $IMAGE:$VERSION on $BASE (inputs $HASH)"
    rm -rf "$WORK/context" && mkdir -p "$WORK/context/wheels"
    cp sandbox_image/Dockerfile "$WORK/context/"
    cp sandbox_image/requirements.txt "$WORK/context/wheels/"
    pip_wheel --no-deps .
    pip_wheel -r sandbox_image/requirements.txt
    docker build -q --network none \
        --build-arg "BASE=$BASE" --build-arg "MATHMILL_VERSION=$VERSION" \
        --label "mathmill.inputs=$HASH" \
        -t "$IMAGE:$VERSION" -t "$IMAGE:latest" "$WORK/context" > /dev/null
    rm -rf "$WORK/context"
    # Earlier builds of this image, now untagged, and their install stages.
    docker image prune -f --filter "label=mathmill.inputs" > /dev/null
    docker image prune -f --filter "label=mathmill.stage=install" > /dev/null
fi
SIZE=$(docker image inspect --format '{{.Size}}' "$IMAGE:$VERSION")
say "$IMAGE:$VERSION ($((SIZE / 1000000)) MB)"
echo "$IMAGE:$VERSION"
