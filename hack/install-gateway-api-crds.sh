#!/usr/bin/env bash
# Fetches the Gateway API CustomResourceDefinitions of the standard channel
# (Gateway, HTTPRoute, ListenerSet and the others, gateway.networking.k8s.io)
# from the official Go module sigs.k8s.io/gateway-api at a pinned version
# (the module ships them under config/crd/standard/), into a cache folder
# keyed by that version, the way hack/install-control-plane.sh caches the
# control plane. Nothing is written by hand. Prints the folder on its last
# line (hack/test.sh exports it as KAPSA_GATEWAY_API_CRDS; kapsa-testenv runs
# this script itself when that is unset).
#
# The standard channel's ValidatingAdmissionPolicy
# (gateway.networking.k8s.io_vap_safeupgrades.yaml) is not a CRD and is not
# copied.
#
# If KAPSA_GATEWAY_API_CRDS already names a folder with the files, nothing is
# fetched.
set -euo pipefail

GATEWAY_API_VERSION="${GATEWAY_API_VERSION:-1.6.3}"
FILES=(
  gateway.networking.k8s.io_gatewayclasses.yaml
  gateway.networking.k8s.io_gateways.yaml
  gateway.networking.k8s.io_httproutes.yaml
  gateway.networking.k8s.io_grpcroutes.yaml
  gateway.networking.k8s.io_listenersets.yaml
  gateway.networking.k8s.io_referencegrants.yaml
  gateway.networking.k8s.io_backendtlspolicies.yaml
  gateway.networking.k8s.io_tcproutes.yaml
  gateway.networking.k8s.io_tlsroutes.yaml
  gateway.networking.k8s.io_udproutes.yaml
)

# shellcheck source=lib/module-files.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/module-files.sh"
module_files install-gateway-api-crds KAPSA_GATEWAY_API_CRDS sigs.k8s.io/gateway-api \
  "$GATEWAY_API_VERSION" config/crd/standard "gateway-api-crds-$GATEWAY_API_VERSION" "${FILES[@]}"
