#!/usr/bin/env bash
# Installs OpenCode (npm package `opencode-ai`, pinned) for the end-to-end test
# tests/tests/e2e_opencode.rs, into a project-local directory, and prints the absolute path of
# the real OpenCode binary (the platform package's ELF, symlinks resolved) as the last line;
# the same path is written to <install dir>/opencode-binary-path.
#
# Why here and not under $HOME: the daemon runs OpenCode as an unprivileged user (`nobody`),
# which must be able to read and execute the binary, so every directory on the way must be
# world-searchable; /root is not. Default directory: <workspace>/target/opencode-ai (removed
# by `cargo clean`, ignored by git). Override with OPENCODE_INSTALL_DIR (absolute path).
#
# Idempotent: when the pinned version is already installed, nothing is downloaded. npm runs
# with a throw-away HOME, so the package's postinstall (which runs `opencode --version`) leaves
# nothing in the real home. Needs node and npm, and the npm registry reachable.
set -euo pipefail
umask 022

OPENCODE_VERSION="1.18.33"
here="$(cd "$(dirname "$0")" && pwd)"
workspace="$(cd "$here/../.." && pwd)"
dir="${OPENCODE_INSTALL_DIR:-$workspace/target/opencode-ai}"
case "$dir" in
  /*) ;;
  *) echo "install.sh: OPENCODE_INSTALL_DIR must be an absolute path, got '$dir'" >&2; exit 2 ;;
esac

for tool in node npm; do
  if ! command -v "$tool" >/dev/null; then
    echo "install.sh: '$tool' is missing — install Node.js 18+ with npm (Debian: apt-get install nodejs npm) to run the OpenCode end-to-end test" >&2
    exit 3
  fi
done

# The platform binary npm's postinstall picked: the platform package's file that is the same
# inode as opencode-ai/bin/opencode.exe (the postinstall hard-links it), else that file itself.
resolve_binary() {
  local linked="$dir/node_modules/opencode-ai/bin/opencode.exe" candidate
  [ -f "$linked" ] || return 1
  for candidate in "$dir"/node_modules/opencode-*/bin/opencode; do
    if [ -f "$candidate" ] && [ "$candidate" -ef "$linked" ]; then
      realpath "$candidate"
      return 0
    fi
  done
  # Not hard-linked (copied, or a different layout): the linked file, if it is an ELF.
  if [ "$(head -c 4 "$linked" | od -An -c | tr -d ' ')" = '177ELF' ]; then
    realpath "$linked"
    return 0
  fi
  return 1
}

installed_version() {
  node -e 'try{process.stdout.write(require(process.argv[1]).version)}catch(e){}' \
    "$dir/node_modules/opencode-ai/package.json" 2>/dev/null || true
}

if [ "$(installed_version)" != "$OPENCODE_VERSION" ] || ! resolve_binary >/dev/null; then
  echo "install.sh: installing opencode-ai@$OPENCODE_VERSION into $dir" >&2
  mkdir -p "$dir"
  scratch_home="$(mktemp -d)"
  trap 'if [ -n "${scratch_home:-}" ] && [ -d "$scratch_home" ]; then rm -rf -- "$scratch_home"; fi' EXIT
  HOME="$scratch_home" npm install --prefix "$dir" --no-audit --no-fund --no-save \
    --loglevel=error "opencode-ai@$OPENCODE_VERSION" >&2
  if [ "$(installed_version)" != "$OPENCODE_VERSION" ]; then
    echo "install.sh: npm finished but $dir has opencode-ai '$(installed_version)', not $OPENCODE_VERSION" >&2
    exit 4
  fi
fi

binary="$(resolve_binary)" || {
  echo "install.sh: no OpenCode platform binary under $dir/node_modules (did the opencode-ai postinstall run?)" >&2
  exit 4
}

# Every directory on the way must be searchable, and the binary readable and executable, by
# any user (the sessions run as an unprivileged one).
path="$binary"
while [ "$path" != "/" ]; do
  mode="$(stat -c '%a' "$path")"
  if [ "$path" = "$binary" ]; then
    need=5  # r-x for others
  else
    need=1  # --x for others
  fi
  if [ $(( 8#$mode & need )) -ne "$need" ]; then
    echo "install.sh: $path has mode $mode; an unprivileged user cannot reach $binary — make it o+rx (files) / o+x (directories), or set OPENCODE_INSTALL_DIR elsewhere" >&2
    exit 5
  fi
  path="$(dirname "$path")"
done

# Recorded for other tools (an operator's allowlist entry, scripts): the real binary's path.
echo "$binary" >"$dir/opencode-binary-path"
echo "$binary"
