#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the integration tests
# against a real local control plane. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "control-plane binaries (built from the official Go modules on first use, then cached)"
KUBEBUILDER_ASSETS="$(./hack/install-control-plane.sh)"
export KUBEBUILDER_ASSETS

step "helm (built from its official Go module on first use, then cached; the chart tests need it)"
KAPSA_HELM="$(./hack/install-helm.sh)"
# crates/kapsa/tests/chart.rs fails instead of skipping when helm is missing.
KAPSA_HELM_REQUIRED=1
export KAPSA_HELM KAPSA_HELM_REQUIRED

step "Prometheus Operator CRDs (fetched from its official Go module on first use, then cached; the app-metrics tests install them)"
KAPSA_PROMETHEUS_OPERATOR_CRDS="$(./hack/install-prometheus-operator-crds.sh)"
export KAPSA_PROMETHEUS_OPERATOR_CRDS

step "Gateway API CRDs, standard channel (fetched from its official Go module on first use, then cached; the Gateway routing tests install them)"
KAPSA_GATEWAY_API_CRDS="$(./hack/install-gateway-api-crds.sh)"
export KAPSA_GATEWAY_API_CRDS

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test (unit and integration, against the real control plane)"
cargo test --workspace --locked --no-fail-fast

step "perturbation suite, quick form: restarts at write points, stale caches, chaos (kapsa built with the test-only feature fault-injection; KAPSA_PERTURBATION_LONG=1 for the long form, docs/perturbation.md)"
cargo test -p kapsa --locked --features fault-injection --test perturbation
