#!/usr/bin/env bash
# Installs the Debian packages given as arguments when they are missing, then
# checks that each one is really there.
#
# Used by `make demo`, `make test` and `make bench`, so a bare Debian 12
# machine with a Rust toolchain needs nothing done by hand. Any failure stops
# here with the name of the package (and apt's own output), never later as a
# compiler error in some build script.
#
#   scripts/install-deps.sh PKG...          install what is missing, verify
#   scripts/install-deps.sh --check PKG...  verify only (exit 1 naming the missing)
set -euo pipefail

check_only=0
if [ "${1:-}" = "--check" ]; then check_only=1; shift; fi

fail() { printf 'install-deps: %s\n' "$*" >&2; exit 1; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# What each package must leave on the machine: a command on PATH, or a file.
# The well-known protobuf types (google/protobuf/*.proto) come with
# libprotobuf-dev, which protobuf-compiler only recommends; without them
# etcd-client's build script fails.
probe() {
  case "$1" in
    etcd-server) command -v etcd >/dev/null ;;
    etcd-client) command -v etcdctl >/dev/null ;;
    protobuf-compiler) command -v protoc >/dev/null ;;
    libprotobuf-dev) [ -f /usr/include/google/protobuf/descriptor.proto ] ;;
    curl) command -v curl >/dev/null ;;
    iptables) command -v iptables >/dev/null && command -v iptables-save >/dev/null ;;
    iproute2) command -v ip >/dev/null ;;
    wrk) command -v wrk >/dev/null ;;
    nginx-light) [ -x /usr/sbin/nginx ] ;;
    haproxy) [ -x /usr/sbin/haproxy ] ;;
    valgrind) command -v valgrind >/dev/null ;;
    *) return 0 ;;
  esac
}

command -v dpkg-query >/dev/null || fail "dpkg-query not found: weft's set-up needs Debian 12 (or a derivative). Install by hand: $*"

missing=()
for pkg in "$@"; do
  installed "$pkg" || missing+=("$pkg")
done

if [ ${#missing[@]} -gt 0 ]; then
  [ "$check_only" = 0 ] || fail "missing Debian packages: ${missing[*]}"
  echo "installing missing Debian packages: ${missing[*]}"
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || fail "not root and no sudo: run as root, or install by hand: apt-get install ${missing[*]}"
    SUDO=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  log=$(mktemp -t weft-apt.XXXXXX)
  trap 'rm -f "$log"' EXIT
  if ! "${SUDO[@]}" apt-get update -q >"$log" 2>&1; then
    cat "$log" >&2
    fail "apt-get update failed (output above); cannot install: ${missing[*]}"
  fi
  # One package at a time, so a failure names the package it was.
  for pkg in "${missing[@]}"; do
    if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends "$pkg" >"$log" 2>&1; then
      tail -n 30 "$log" >&2
      fail "apt-get install $pkg failed (output above)"
    fi
  done
fi

# Verify, whether installed now or earlier: a package that is listed as
# installed but lost its files (or a half-configured one) is caught here.
for pkg in "$@"; do
  installed "$pkg" || fail "Debian package $pkg is not installed after apt-get install"
  probe "$pkg" || fail "Debian package $pkg is installed but what weft needs from it is missing (reinstall it: apt-get install --reinstall $pkg)"
done
