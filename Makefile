# SPDX-License-Identifier: MPL-2.0
# The two commands of README.md: `make demo` and `make test`.
SHELL := /bin/bash
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: setup build test demo bench

setup:
	@$(SUDO) bash scripts/setup

build: setup
	cargo build --workspace

test: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	bash scripts/lint-docker
	cargo test --workspace
	scripts/readme-commands

demo: setup
	cargo run -p rivulet-launch --bin rivulet -- demo

bench: setup
	cargo bench --workspace
