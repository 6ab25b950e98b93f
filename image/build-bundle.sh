#!/usr/bin/env bash
# Builds the air-gapped bundle: one tarball per architecture with the binaries, systemd units,
# sysusers/tmpfiles files, commented default configs, the install script and SHA256SUMS.
#
# Usage: image/build-bundle.sh [x86_64] [aarch64] [armv7]     (default: all three)
# Output: dist/codemantle-<version>-<arch>.tar.gz (+ .sha256)
# ARM builds need image/setup-cross.sh once (Debian cross gcc + rustc-web + build-std).
# BIN_DIR=DIR packs binaries already built there instead of building (one arch only);
# OUT_DIR=DIR writes the tarballs there instead of dist/.
set -euo pipefail
cd "$(dirname "$0")/.."
archs=("$@"); [ ${#archs[@]} -gt 0 ] || archs=(x86_64 aarch64 armv7)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
bins=(codemantle-daemon codemantle-control-plane codemantle)
out_dir=${OUT_DIR:-dist}
mkdir -p "$out_dir"

for arch in "${archs[@]}"; do
  case "$arch" in
    x86_64)  triple=""
             if [ -n "${BIN_DIR:-}" ]; then out=$BIN_DIR
             else cargo build --release --locked --bins; out=target/release; fi ;;
    aarch64) triple=aarch64-unknown-linux-gnu ;;
    armv7)   triple=armv7-unknown-linux-gnueabihf ;;
    *) echo "unknown architecture '$arch' (use x86_64, aarch64 or armv7)" >&2; exit 2 ;;
  esac
  if [ -n "$triple" ] && [ -n "${BIN_DIR:-}" ]; then
    out=$BIN_DIR
  elif [ -n "$triple" ]; then
    STATIC=${STATIC:-0} image/cross-cargo.sh "$triple" build --release --locked --bins
    out=target/cross/$triple/release
    [ "${STATIC:-0}" = 1 ] && out=target/cross-static/$triple/release
  fi
  name=codemantle-$version-$arch
  stage=$(mktemp -d); root=$stage/$name
  mkdir -p "$root/bin" "$root/systemd" "$root/config"
  for b in "${bins[@]}"; do install -m 0755 "$out/$b" "$root/bin/$b"; done
  install -m 0644 systemd/*.service "$root/systemd/"
  install -m 0644 systemd/codemantle.sysusers systemd/codemantle.tmpfiles "$root/systemd/"
  install -m 0644 image/config/*.toml "$root/config/"
  install -m 0755 image/install.sh "$root/install.sh"
  install -m 0644 README.md "$root/README.md"
  (cd "$root" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort | xargs sha256sum > SHA256SUMS)
  tar -C "$stage" --owner=0 --group=0 --numeric-owner --sort=name -czf "$out_dir/$name.tar.gz" "$name"
  (cd "$out_dir" && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256")
  rm -rf "$stage"
  echo "built $out_dir/$name.tar.gz"
done
