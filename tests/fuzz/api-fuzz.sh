#!/usr/bin/env bash
# HTTP API fuzzing of a real control plane for SECONDS (default 60).
#
#   tests/fuzz/api-fuzz.sh                 # 60 s, seed 1
#   tests/fuzz/api-fuzz.sh 600 --seed 7    # 10 min, another seed (same seed = same requests)
#
# Builds the control plane and cm-apifuzz (debug, so handler panics show up as 500s instead of
# aborting), then runs cm-apifuzz: it starts its own server on 127.0.0.1 with a connected
# simulated daemon, fuzzes for the budget, prints counts, and exits 1 on any violation (an
# undocumented 5xx, an error without an {"error","message"} body, no answer, a dead server).
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-60}"
shift || true
cargo build --locked -q -p codemantle-control-plane -p codemantle-tests --bins
exec "${CARGO_TARGET_DIR:-target}/debug/cm-apifuzz" "${seconds}" "$@"
