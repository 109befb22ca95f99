#!/usr/bin/env bash
# Fetches the Prometheus Operator's CustomResourceDefinitions that Kapsa uses
# (ServiceMonitor and PodMonitor, monitoring.coreos.com/v1) from the official
# Go module github.com/prometheus-operator/prometheus-operator at a pinned
# version (the module ships them under example/prometheus-operator-crd/),
# into a cache folder keyed by that version, the way
# hack/install-control-plane.sh caches the control plane. Nothing is written
# by hand. Prints the folder on its last line (hack/test.sh exports it as
# KAPSA_PROMETHEUS_OPERATOR_CRDS; kapsa-testenv runs this script itself when
# that is unset).
#
# If KAPSA_PROMETHEUS_OPERATOR_CRDS already names a folder with the files,
# nothing is fetched.
set -euo pipefail

PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-0.94.1}"
FILES=(monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_podmonitors.yaml)

# shellcheck source=lib/module-files.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/module-files.sh"
module_files install-prometheus-operator-crds KAPSA_PROMETHEUS_OPERATOR_CRDS \
  github.com/prometheus-operator/prometheus-operator "$PROMETHEUS_OPERATOR_VERSION" \
  example/prometheus-operator-crd "prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION" "${FILES[@]}"
