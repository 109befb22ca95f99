# Kapsa's two everyday commands (see README.md):
#   make dev   start the local control plane (and Kapsa) in the foreground
#   make test  the whole test suite, as CI runs it
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: dev test assets lint unit crds bench

# Builds (once per machine, cached) and prints the control-plane binaries' folder.
assets:
	@./hack/install-control-plane.sh >/dev/null

dev: assets
	$(CARGO) run --bin kapsa -- dev up --demo

test:
	./hack/test.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

crds:
	KAPSA_UPDATE_CRDS=1 $(CARGO) test -p kapsa-api --test crds_drift
