#!/usr/bin/env bash
# One-time, idempotent, as root: the ARM cross toolchain on a plain Debian 12 machine.
# Debian's own rustc-web builds the target std from source (-Z build-std), so no rustup target
# download is needed; Debian's cross gcc links and compiles ring's C. qemu-user runs the result.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(rustc-web cargo-web rust-web-src
      gcc-aarch64-linux-gnu libc6-dev-arm64-cross
      gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
      qemu-user-static ca-certificates)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  # libc6-dev-*-cross are only Recommends of the gcc cross packages: name them explicitly.
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
ver=$(/usr/bin/rustc -V | awk '{print $2}')
src=$(readlink -f /usr/lib/rustlib/src/rust)
[ "$src" = "/usr/src/rustc-$ver" ] && [ -f "$src/library/Cargo.lock" ] \
  || { echo "rustc-web $ver does not match rust-web-src ($src): install matching versions" >&2; exit 1; }
echo "cross toolchain ready: $(/usr/bin/rustc -V)"
