#!/usr/bin/env bash
# Proves the README's two-command set-up from scratch on this machine:
#
#   1. purges every Debian package the Makefile installs (`make print-deps`),
#      with the libraries only they pulled in (but not those of Debian's base
#      system, such as iproute2, which other packages depend on);
#   2. clones the repository's committed HEAD into a new temporary folder,
#      with an empty CARGO_HOME, so every crate is fetched and built anew;
#   3. runs `make demo`, then `make test` there, and prints the time of each.
#
# Needs root (or sudo) and a Rust toolchain; takes the machine's packages
# away, so run it on a machine meant for it. Uncommitted changes are not
# part of the check (it clones what is committed).
#
#   scripts/fresh-check.sh [--keep]   --keep: leave the clone for a look
set -euo pipefail
keep=0
[ "${1:-}" = "--keep" ] && keep=1

repo=$(cd "$(dirname "$0")/.." && git rev-parse --show-toplevel)
SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)

if [ -n "$(git -C "$repo" status --porcelain)" ]; then
  echo "fresh-check: note: uncommitted changes in $repo are not checked (the clone takes HEAD $(git -C "$repo" rev-parse --short HEAD))"
fi

read -r -a all <<<"$(make -s -C "$repo" print-deps)"
# Packages of Debian's base system (priority required or important, like
# iproute2) are on every Debian 12 machine and others depend on them:
# purging them would take more than weft installed, so they stay.
pkgs=()
for p in "${all[@]}"; do
  case "$(dpkg-query -W -f='${Priority}' "$p" 2>/dev/null)" in
    required | important) echo "fresh-check: keeping $p (part of Debian's base system)" ;;
    *) pkgs+=("$p") ;;
  esac
done
echo "fresh-check: purging ${pkgs[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get purge -y -q --autoremove "${pkgs[@]}" >/dev/null
for p in "${pkgs[@]}"; do
  if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    echo "fresh-check: $p is still installed after the purge" >&2
    exit 1
  fi
done
if [ -e /usr/include/google/protobuf/descriptor.proto ] || command -v protoc >/dev/null || command -v etcd >/dev/null; then
  echo "fresh-check: protoc, etcd or the protobuf well-known types are still on the machine after the purge" >&2
  exit 1
fi

work=$(mktemp -d -t weft-fresh.XXXXXX)
cleanup() { if [ "$keep" = 1 ]; then echo "fresh-check: clone kept in $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT
git clone -q "$repo" "$work/weft"
export CARGO_HOME="$work/cargo-home"
mkdir -p "$CARGO_HOME"
cd "$work/weft"
echo "fresh-check: clone of $(git rev-parse --short HEAD) in $work/weft, CARGO_HOME=$CARGO_HOME"

elapsed() { # seconds -> "Xm Ys"
  printf '%dm %02ds' $(($1 / 60)) $(($1 % 60))
}
run() { # name command...
  local name=$1 start end
  shift
  echo "fresh-check: --- make $name ---"
  start=$(date +%s)
  if ! "$@" >"$work/$name.log" 2>&1; then
    end=$(date +%s)
    tail -n 60 "$work/$name.log"
    echo "fresh-check: make $name FAILED after $(elapsed $((end - start))) (log: $work/$name.log)"
    keep=1
    exit 1
  fi
  end=$(date +%s)
  tail -n 3 "$work/$name.log"
  times+=("make $name: $(elapsed $((end - start)))")
}
times=()
run demo make demo
run test make test

echo "fresh-check: passed on $(. /etc/os-release && echo "$PRETTY_NAME"), $(rustc --version), $(nproc) cores"
for t in "${times[@]}"; do echo "fresh-check:   $t"; done
echo "fresh-check:   target dir: $(du -sh target | cut -f1), crates fetched: $(du -sh "$CARGO_HOME" | cut -f1)"
