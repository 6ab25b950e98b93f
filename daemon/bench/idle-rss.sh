#!/bin/sh
# Idle RSS and binary size of the release daemon (figures for the closing note).
#
# Builds the release binary, then runs the idle_rss example over ws:// and wss://: a fake
# control plane on 127.0.0.1, the daemon connected to it for $1 seconds (default 10), VmRSS
# sampled from /proc/<pid>/status, then 200 listings and an orderly SIGTERM. Goals on x86_64: binary
# <= 6 MiB, idle RSS <= 8 MiB. Writes only to cargo's target dir and a temp dir.
set -eu
cd "$(dirname "$0")/../.."
secs="${1:-10}"
cargo build --release -p codemantle-daemon
target="${CARGO_TARGET_DIR:-target}"
for scheme in ws wss; do
    cargo run --release -q -p codemantle-daemon --example idle_rss -- "$target/release/codemantle-daemon" "$secs" "$scheme"
done
