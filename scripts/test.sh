#!/usr/bin/env bash
# The README's test command: installs what the tests need when it can, then runs them all.
#
#   bash scripts/test.sh                 set up, then cargo test (extra arguments go to it)
#   bash scripts/test.sh --dry-run       only say what is missing and how it would be installed
#
# What the tests need besides Rust: the PostgreSQL server binaries and pgbench (Debian package
# postgresql), psql (postgresql-client), headless Chromium (chromium: the status page test),
# systemd-analyze (systemd: the unit file checks), cargo-deb and dpkg-dev (the package test). Missing
# packages are installed with apt-get when this runs as root or sudo needs no password;
# otherwise the script prints the one command that installs them and stops.
# PGBROKER_SETUP_ROOT prefixes every path looked at (a test hides the machine's binaries).
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi
root="${PGBROKER_SETUP_ROOT:-}"

has() { [ -n "$root" ] && return 1; command -v "$1" >/dev/null 2>&1; }
need=()
compgen -G "$root/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
has psql || need+=(postgresql-client)
[ -x "$root/usr/bin/chromium" ] || [ -x "$root/usr/bin/chromium-browser" ] || need+=(chromium)
[ -x "$root/usr/bin/systemd-analyze" ] || need+=(systemd)
# cargo-deb reads the package's library dependencies with dpkg-shlibdeps.
[ -x "$root/usr/bin/dpkg-shlibdeps" ] || need+=(dpkg-dev)
cargo_deb=0
has cargo-deb || cargo_deb=1

install_cmd="apt-get install -y -q --no-install-recommends ${need[*]:-}"
if [ ${#need[@]} -eq 0 ] && [ $cargo_deb -eq 0 ]; then
  echo "set-up: everything the tests need is here"
elif [ $dry_run -eq 1 ]; then
  [ ${#need[@]} -gt 0 ] && echo "set-up: missing ${need[*]}; would run: $install_cmd"
  [ $cargo_deb -eq 1 ] && echo "set-up: missing cargo-deb; would run: cargo install cargo-deb --locked"
  exit 0
else
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
      as_root=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      as_root=(sudo)
    else
      echo "set-up: missing ${need[*]}. Install them, then run this again:" >&2
      echo "  sudo apt-get update && sudo $install_cmd" >&2
      exit 1
    fi
    echo "set-up: installing ${need[*]} (apt-get)"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    # shellcheck disable=SC2086
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive $install_cmd
  fi
  if [ $cargo_deb -eq 1 ]; then
    echo "set-up: installing cargo-deb (cargo install, about a minute)"
    cargo install cargo-deb --locked
  fi
fi
[ $dry_run -eq 1 ] && exit 0

# Tests start their own throwaway clusters (as the postgres user when run as root).
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "running as root needs a 'postgres' OS user for initdb; the postgresql package creates it" >&2
  exit 1
fi
exec cargo test "$@"
