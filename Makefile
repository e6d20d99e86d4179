# mome — build, test, demo, bench.
#   make          build everything (release): binaries, preload, test apps
#   make demo     build, then run a demo job
#   make test     build, then run the whole test suite
#   make bench    build, then run the benchmarks (results in bench/RESULTS.md)

CARGO   ?= cargo
BIN     := $(CURDIR)/target/release
APPS    := $(CURDIR)/test-apps/build
export MOME_BIN_DIR := $(BIN)
export MOME_APPS_DIR := $(APPS)

.PHONY: all build rust test-apps demo test bench lint clean

all: build

build: rust test-apps

rust:
	$(CARGO) build --release --workspace

test-apps: rust
	$(MAKE) -C test-apps BIN=$(BIN) OUT=$(APPS)

demo: build
	bash scripts/demo.sh

test: build
	$(CARGO) test --release --workspace -- --test-threads=2

bench: build
	bash bench/run.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
	$(MAKE) -C test-apps clean OUT=$(APPS)
