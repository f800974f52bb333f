# weft — see README.md. Every target installs the Debian packages it needs.
SHELL := /bin/bash
CARGO ?= cargo
# protoc builds the gRPC bindings (ours and etcd-client's); libprotobuf-dev
# holds the well-known types (google/protobuf/*.proto) that etcd-client's
# protos import, which protobuf-compiler only recommends.
# iptables, iproute2 and curl: the capture tests (rules in a network
# namespace of their own, an unchanged app calling through them).
TEST_DEPS := etcd-server etcd-client protobuf-compiler libprotobuf-dev iptables iproute2 curl
DEMO_DEPS := $(TEST_DEPS)
BENCH_DEPS := $(DEMO_DEPS) wrk nginx-light haproxy valgrind

.PHONY: all deps demo-deps toolchain build lint fmt test demo bench fuzz clean print-deps

all: build

deps: toolchain
	@scripts/install-deps.sh $(TEST_DEPS)

demo-deps: toolchain
	@scripts/install-deps.sh $(DEMO_DEPS)

toolchain:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (rustup, stable >= 1.89) first"; exit 1; }

# Every Debian package a target may install (scripts/fresh-check.sh purges them).
print-deps:
	@echo $(BENCH_DEPS)

build: deps
	$(CARGO) build --workspace --bins

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# fmt + clippy, then every unit and integration test (real etcd, real
# binaries, real sockets). The integration tests run the binaries built here.
test: lint build
	@set -o pipefail; $(CARGO) test --workspace 2>&1 | tee target/test-output.txt
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "weft: %d passed, %d failed\n", p, f }' target/test-output.txt

demo: demo-deps build
	bash examples/demo.sh

bench: toolchain
	@scripts/install-deps.sh $(BENCH_DEPS) $$(command -v python3 >/dev/null || echo python3)
	$(CARGO) build --release --workspace --bins
	bash bench/run.sh

# cargo-fuzz on every target for FUZZ_SECS each (default 60; nightly).
fuzz: deps
	scripts/fuzz.sh

clean:
	$(CARGO) clean
