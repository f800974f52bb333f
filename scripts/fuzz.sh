#!/usr/bin/env bash
# `make fuzz`: runs each cargo-fuzz target (fuzz/fuzz_targets/) for a bounded
# time with the nightly toolchain, starting from fuzz/corpus/<target>/ and
# the crashes already found (fuzz/regressions/<target>/).
#
#   FUZZ_SECS=60 (per target)   FUZZ_TARGETS="policy update" (default: all)
#
# A crash stops the run with libFuzzer's report; copy the input it names
# (fuzz/artifacts/<target>/crash-*) into fuzz/regressions/<target>/, where
# the stable property tests (make test) replay it forever after.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECS:-60}
targets=${FUZZ_TARGETS:-"policy request_head service_config update"}
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
for t in $targets; do
  work=$(mktemp -d -t "weft-fuzz-$t.XXXXXX")
  # New inputs go to a scratch corpus; the committed seeds stay small.
  echo "fuzz: $t for ${secs}s"
  cargo +nightly fuzz run --fuzz-dir fuzz "$t" "$work" "fuzz/corpus/$t" "fuzz/regressions/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 2>&1 | tail -n 25
  rm -rf "$work"
done
