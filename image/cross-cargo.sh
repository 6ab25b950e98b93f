#!/usr/bin/env bash
# Usage: image/cross-cargo.sh <target-triple> <cargo subcommand> [cargo args...]
#   image/cross-cargo.sh aarch64-unknown-linux-gnu build --release -p codemantle-daemon
#   STATIC=1 image/cross-cargo.sh armv7-unknown-linux-gnueabihf build --release
# Uses Debian's rustc/cargo by full path (rustup's proxies shadow them on PATH) and builds std
# for the target from Debian's rust-web-src. Runners in .cargo/config.toml make `cargo run`
# and `cargo test` go through qemu-user.
set -euo pipefail
target=$1; sub=$2; shift 2
cd "$(dirname "$0")/.."
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export RUSTC_BOOTSTRAP=1            # lets Debian's stable cargo use -Z build-std
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cross}
if [ "${STATIC:-0}" = 1 ]; then
  v=CARGO_TARGET_$(echo "$target" | tr 'a-z-' 'A-Z_')_RUSTFLAGS
  export "$v"="${!v:-} -C target-feature=+crt-static"
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR}-static
fi
exec /usr/bin/cargo "$sub" --target "$target" -Z build-std=std,panic_abort,test "$@"
