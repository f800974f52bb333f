# weft — see README.md. Every target installs the Debian packages it needs.
SHELL := /bin/bash
CARGO ?= cargo
TEST_DEPS := etcd-server etcd-client protobuf-compiler
BENCH_DEPS := $(TEST_DEPS) wrk nginx-light haproxy valgrind

.PHONY: all deps build lint fmt test demo bench clean

all: build

deps:
	@scripts/install-deps.sh $(TEST_DEPS)

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

demo: build
	bash examples/demo.sh

bench:
	@scripts/install-deps.sh $(BENCH_DEPS)
	$(CARGO) build --release --workspace --bins
	bash bench/run.sh

clean:
	$(CARGO) clean
