#!/usr/bin/env bash
# Runs a cross-built daemon under qemu-user against a native (x86_64) control plane on
# loopback: handshake, then a directory listing through the HTTP API.
#
# Usage: image/cross-smoke.sh <target-triple> [daemon-binary]
#   image/cross-smoke.sh aarch64-unknown-linux-gnu
#   image/cross-smoke.sh armv7-unknown-linux-gnueabihf
# Needs: image/setup-cross.sh done, the daemon cross-built (image/cross-cargo.sh ... build
# --release -p codemantle-daemon), and the native control plane built (cargo build --bins).
set -euo pipefail
cd "$(dirname "$0")/.."
triple=${1:?usage: image/cross-smoke.sh <target-triple> [daemon-binary]}
daemon=${2:-target/cross/$triple/release/codemantle-daemon}
cp_bin=${CP_BIN:-target/debug/codemantle-control-plane}
case "$triple" in
  aarch64-*) qemu=(qemu-aarch64-static -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib) ;;
  armv7-*)   qemu=(qemu-arm-static -L /usr/arm-linux-gnueabihf -E LD_LIBRARY_PATH=/usr/arm-linux-gnueabihf/lib) ;;
  *) echo "unsupported target $triple" >&2; exit 2 ;;
esac
[ -x "$daemon" ] || { echo "$daemon missing: build it with image/cross-cargo.sh $triple build --release -p codemantle-daemon" >&2; exit 2; }
[ -x "$cp_bin" ] || { echo "$cp_bin missing: cargo build --bins" >&2; exit 2; }

work=$(mktemp -d); chmod 700 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
token=$("$cp_bin" --data-dir "$work/cp" init 2>/dev/null)
id=$("$cp_bin" --data-dir "$work/cp" device add "cross-$triple" --out-key "$work/device.key" | sed -n 's/^device id: *//p')
mkdir -p "$work/project/src"; printf 'hello from %s\n' "$triple" > "$work/project/README.md"
cat > "$work/daemon.toml" <<TOML
data_dir = "$work/daemon-data"
[server]
url = "ws://127.0.0.1:$port/ws"
[device]
id = "$id"
key_file = "$work/device.key"
[roots]
cwd = "$work/project"
TOML
chmod 600 "$work/daemon.toml"

"$cp_bin" --data-dir "$work/cp" --listen "127.0.0.1:$port" serve > "$work/cp.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
"${qemu[@]}" "$daemon" --config "$work/daemon.toml" > "$work/daemon.log" 2>&1 & pids+=($!)

auth=(-H "authorization: Bearer $token")
online=""
for _ in $(seq 300); do
  if curl -fs "${auth[@]}" "http://127.0.0.1:$port/devices/$id" | grep -q '"status":"online"'; then online=1; break; fi
  sleep 0.1
done
if [ -z "$online" ]; then
  echo "FAIL: the $triple daemon did not come online"; echo "--- daemon log"; cat "$work/daemon.log"; echo "--- cp log"; tail -20 "$work/cp.log"; exit 1
fi
grep -m1 'handshake complete' "$work/daemon.log" | sed 's/^/daemon: /'
listing=$(curl -s "${auth[@]}" -H 'content-type: application/json' -d '{"path":"."}' "http://127.0.0.1:$port/devices/$id/dir" || true)
echo "listing: $listing"
case "$listing" in
  *'"README.md"'*'"src"'*) echo "PASS: $triple daemon under qemu-user: handshake and directory listing through an x86_64 control plane" ;;
  *) echo "FAIL: unexpected listing"; echo "--- daemon log"; tail -20 "$work/daemon.log"; exit 1 ;;
esac
file "$daemon" | sed 's/^/binary: /'
echo "stripped size: $(stat -c %s "$daemon") bytes"
