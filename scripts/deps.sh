#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Shared helpers for scripts/test.sh, scripts/quickstart.sh and
# scripts/bench.sh: install the Debian 12 packages cowchain needs, and
# build the plugin out of tree.
#
# Source it:   . scripts/deps.sh; cowchain_install_deps [EXTRA-PKG...]
# Or run it:   scripts/deps.sh [EXTRA-PKG...]    (installs only)
#
# Environment:
#   COWCHAIN_BUILDDIR  the plain (no sanitizers) build directory,
#                      default build/ in the repository.
#   COWCHAIN_JOBS      make -j value, default 2.

# Everything needed to build, test, demo and benchmark cowchain.
COWCHAIN_PACKAGES=(
    nbdkit nbdkit-plugin-dev
    libnbd-dev libnbd-bin python3-libnbd
    qemu-utils fio
    systemd
    qemu-system-common      # qemu-storage-daemon, a peer in scripts/bench.sh
    libcmocka-dev zlib1g-dev
    pkg-config autoconf automake libtool make gcc libc6-dev
    clang libclang-rt-14-dev
    bash-completion
    perl man-db groff-base          # pod2man, podchecker; man -l (tests)
)

# The repository root: the parent of the directory holding this file.
COWCHAIN_SRCDIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COWCHAIN_BUILDDIR=${COWCHAIN_BUILDDIR:-$COWCHAIN_SRCDIR/build}
COWCHAIN_JOBS=${COWCHAIN_JOBS:-2}
COWCHAIN_PLUGIN_SO=$COWCHAIN_BUILDDIR/.libs/nbdkit-cowchain-plugin.so

# Where Debian's python3-libnbd lives.  A python3 earlier on PATH (pyenv)
# may lack the nbd module, and nbdsh runs whatever python3 PATH finds, so
# the scripts call this instead of nbdsh.
COWCHAIN_PYTHON=/usr/bin/python3

cowchain_log() {
    printf '==> %s\n' "$*" >&2
}

# Run a command as root: directly when root, through sudo otherwise.
cowchain_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "error: need root (or sudo) to run: $*" >&2
        return 1
    fi
}

# True when the Debian package is installed (not merely known to dpkg,
# e.g. removed with its configuration files left behind).
cowchain_pkg_installed() {
    local status
    status=$(dpkg -s "$1" 2>/dev/null | sed -n 's/^Status: //p') || return 1
    [ "$status" = "install ok installed" ]
}

# Install COWCHAIN_PACKAGES plus any packages given as arguments, asking
# apt only when something is missing.
cowchain_install_deps() {
    local pkg missing=()
    if ! command -v dpkg >/dev/null 2>&1; then
        echo "error: dpkg not found; cowchain's scripts expect Debian 12" >&2
        return 1
    fi
    for pkg in "${COWCHAIN_PACKAGES[@]}" "$@"; do
        cowchain_pkg_installed "$pkg" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        return 0
    fi
    cowchain_log "installing missing packages: ${missing[*]}"
    cowchain_as_root env DEBIAN_FRONTEND=noninteractive apt-get update || return 1
    cowchain_as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y "${missing[@]}" || return 1
}

# cowchain_autoreconf always|if-needed: generate the configure script and
# its helpers (every time, or only when something is missing or stale).
cowchain_autoreconf() {
    local s=$COWCHAIN_SRCDIR
    if [ "$1" = always ] || [ ! -x "$s/configure" ] ||
        [ ! -f "$s/Makefile.in" ] || [ ! -f "$s/build-aux/ltmain.sh" ] ||
        [ ! -f "$s/build-aux/install-sh" ] ||
        [ "$s/configure.ac" -nt "$s/configure" ]; then
        cowchain_log "autoreconf -fi in $COWCHAIN_SRCDIR"
        (cd "$COWCHAIN_SRCDIR" && autoreconf -fi) || return 1
    fi
}

# cowchain_configure BUILDDIR [CONFIGURE-ARG...]: configure out of tree.
cowchain_configure() {
    local builddir=$1
    shift
    mkdir -p "$builddir" || return 1
    cowchain_log "configure in $builddir $*"
    (cd "$builddir" && "$COWCHAIN_SRCDIR/configure" "$@") || return 1
}

# Build the plain (no sanitizers) tree when needed, for the demo and the
# benchmark.  make itself decides what is out of date.
cowchain_build_plugin() {
    cowchain_autoreconf if-needed || return 1
    if [ ! -f "$COWCHAIN_BUILDDIR/Makefile" ]; then
        cowchain_configure "$COWCHAIN_BUILDDIR" || return 1
    fi
    cowchain_log "make -j$COWCHAIN_JOBS in $COWCHAIN_BUILDDIR"
    make -C "$COWCHAIN_BUILDDIR" -j"$COWCHAIN_JOBS" || return 1
    if [ ! -f "$COWCHAIN_PLUGIN_SO" ]; then
        echo "error: build finished but $COWCHAIN_PLUGIN_SO is missing" >&2
        return 1
    fi
}

# nbdsh, run by Debian's python3 whatever python3 is first on PATH.
cowchain_nbdsh() {
    "$COWCHAIN_PYTHON" -m nbd "$@"
}

# cowchain_wait_for FILE [SECONDS]: wait until FILE exists (a socket or a
# pidfile), for at most SECONDS (default 30).
cowchain_wait_for() {
    local file=$1 tenths=$((${2:-30} * 10))
    while [ ! -e "$file" ]; do
        if [ "$tenths" -le 0 ]; then
            echo "error: timed out waiting for $file" >&2
            return 1
        fi
        sleep 0.1
        tenths=$((tenths - 1))
    done
}

# cowchain_pid_alive PID: true while PID runs (a zombie counts as gone).
cowchain_pid_alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null) || true
    [ "$state" != Z ]
}

# cowchain_wait_pidfile FILE [SECONDS]: wait until FILE holds a PID (as
# written by nbdkit -P once it is listening) and print that PID.
cowchain_wait_pidfile() {
    local file=$1 tenths=$((${2:-30} * 10)) pid=
    while :; do
        if [ -s "$file" ]; then
            pid=$(tr -dc '0-9' < "$file")
            if [ -n "$pid" ]; then
                echo "$pid"
                return 0
            fi
        fi
        if [ "$tenths" -le 0 ]; then
            echo "error: timed out waiting for a PID in $file" >&2
            return 1
        fi
        sleep 0.1
        tenths=$((tenths - 1))
    done
}

# cowchain_stop_pid PID: SIGTERM one process we started, wait up to 10 s
# for it to go, then SIGKILL it.  Never by name.
cowchain_stop_pid() {
    local pid=$1 tenths=100
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || return 0
    while cowchain_pid_alive "$pid"; do
        if [ "$tenths" -le 0 ]; then
            echo "warning: PID $pid ignored SIGTERM for 10 s; sending SIGKILL" >&2
            kill -9 "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        tenths=$((tenths - 1))
    done
    # Reap it if it is our own child (qemu-nbd started with &).
    wait "$pid" 2>/dev/null || true
}

# Run as a script: just install.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    cowchain_install_deps "$@"
fi
