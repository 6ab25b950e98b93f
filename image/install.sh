#!/usr/bin/env bash
# Installs a CodeMantle bundle: checks SHA256SUMS first, then lays out binaries, units,
# sysusers/tmpfiles and default configs (existing configs are never overwritten).
#
# Usage (from the unpacked bundle):  ./install.sh [--root DIR] [--no-start]
#   --root DIR   install into DIR instead of / (image building, tests); nothing is started
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=/; start=1
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --no-start) start=0; shift ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
root=${root%/}
cd "$here"
if ! sha256sum --quiet -c SHA256SUMS; then
  echo "install.sh: checksum mismatch: the bundle is damaged or was altered; fetch it again" >&2
  exit 1
fi
install -d -m 0755 "$root/usr/bin" "$root/etc/systemd/system" "$root/usr/lib/sysusers.d" \
  "$root/usr/lib/tmpfiles.d" "$root/usr/share/doc/codemantle"
install -d -m 0750 "$root/etc/codemantle"
for b in bin/*; do install -m 0755 "$b" "$root/usr/bin/$(basename "$b")"; done
install -m 0644 systemd/*.service "$root/etc/systemd/system/"
install -m 0644 systemd/codemantle.sysusers "$root/usr/lib/sysusers.d/codemantle.conf"
install -m 0644 systemd/codemantle.tmpfiles "$root/usr/lib/tmpfiles.d/codemantle.conf"
install -m 0644 README.md "$root/usr/share/doc/codemantle/README.md"
for c in config/*.toml; do
  dest="$root/etc/codemantle/$(basename "$c")"
  if [ -e "$dest" ]; then echo "keeping existing $dest"; else install -m 0640 "$c" "$dest"; fi
done
if [ "$root" = "" ]; then
  systemd-sysusers
  systemd-tmpfiles --create codemantle.conf
  chgrp codemantle /etc/codemantle /etc/codemantle/*.toml
  systemctl daemon-reload
  echo "installed. Next: put the device key in /etc/codemantle/device.key (0600, owner codemantle),"
  echo "set server.url and device.id in /etc/codemantle/daemon.toml, then:"
  echo "  systemctl enable --now codemantle-daemon"
  [ "$start" = 1 ] || true
else
  # Offline root: create users and directories inside it, start nothing.
  systemd-sysusers --root="$root" >/dev/null 2>&1 || echo "note: systemd-sysusers --root failed; users are created on first boot"
  systemd-tmpfiles --create --root="$root" "$root/usr/lib/tmpfiles.d/codemantle.conf" >/dev/null 2>&1 \
    || echo "note: systemd-tmpfiles --root failed; directories are created on first boot"
  echo "installed into $root"
fi
