#!/usr/bin/env bash
# Runs every fuzz target of this package for N seconds each (default 60).
#
#   protocol/fuzz/run.sh            # 60 s per target
#   protocol/fuzz/run.sh 600        # 10 min per target
#   protocol/fuzz/run.sh 30 decode_cbor decode_json   # only these
#
# Needs a nightly toolchain; installs cargo-fuzz if it is missing. Crashes land in
# protocol/fuzz/artifacts/<target>/, the growing corpus in protocol/fuzz/corpus/<target>/.
# seeds/<target>/ (committed) starts a target off with real frames, e.g. the 38 frames captured
# from CodeMantle 0.1.50 for decode_json and their CBOR encodings for decode_cbor.
set -euo pipefail

cd "$(dirname "$0")"
seconds="${1:-60}"
shift || true

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

status=0
for target in "${targets[@]}"; do
    echo "=== fuzz ${target} for ${seconds}s ==="
    corpora=("corpus/${target}")
    mkdir -p "corpus/${target}"
    if [ -d "seeds/${target}" ]; then
        corpora+=("seeds/${target}")
    fi
    if ! cargo +nightly fuzz run "${target}" "${corpora[@]}" -- -max_total_time="${seconds}"; then
        echo "!!! ${target} failed; see artifacts/${target}/"
        status=1
    fi
done
exit "${status}"
