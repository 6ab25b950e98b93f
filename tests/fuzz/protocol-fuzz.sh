#!/usr/bin/env bash
# Fuzzes the protocol decoders (cargo-fuzz, nightly) for SECONDS per target (default 60):
# every target of protocol/fuzz, or only the ones named.
#
#   tests/fuzz/protocol-fuzz.sh 120
#   tests/fuzz/protocol-fuzz.sh 30 decode_cbor decode_json
#
# Needs a nightly toolchain (installs cargo-fuzz if missing); crashes land in
# protocol/fuzz/artifacts/<target>/. See protocol/fuzz/run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec protocol/fuzz/run.sh "${1:-60}" "${@:2}"
