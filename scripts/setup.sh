#!/usr/bin/env bash
# Set up from a fresh clone, in one command (run from any folder):
#   bash scripts/setup.sh [--require-servers]
# 1. the servers the serving tests start on loopback (HAProxy, Redis, Debian's Chromium and its
#    driver, Prometheus and promtool for deploy/prometheus), with apt-get as root or through
#    sudo; without those it says what to install and goes on (--require-servers, as CI runs
#    it: then it fails at the end);
# 2. .venv (made if absent) with torch 2.13.0, then paraflow and its dev tools under
#    constraints.txt, which keeps the CPU build of torch. Where pip's sources offer CUDA builds,
#    point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index to get the CPU one; a torch 2.13.0
#    already in .venv (a CUDA build installed first) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

require_servers=false
for arg in "$@"; do
  case "$arg" in
    --require-servers) require_servers=true ;;
    *) echo "usage: bash scripts/setup.sh [--require-servers]" >&2; exit 2 ;;
  esac
done

say() { echo "setup: $*"; }

# The commands the tests start, and the Debian package of each.
servers="haproxy:haproxy redis-server:redis-server chromium:chromium chromedriver:chromium-driver
prometheus:prometheus promtool:prometheus"

missing_servers() {
  local pair
  for pair in $servers; do
    command -v "${pair%%:*}" >/dev/null || echo "${pair%%:*}"
  done
}

packages_of() {  # each package once (prometheus brings two commands)
  local command pair
  for command in "$@"; do
    for pair in $servers; do
      if [ "${pair%%:*}" = "$command" ]; then echo "${pair#*:}"; fi
    done
  done | awk '!seen[$0]++'
}

missing=$(missing_servers | tr '\n' ' ')
if [ -n "$missing" ]; then
  # shellcheck disable=SC2086  # word splitting wanted: one argument per command
  packages=$(packages_of $missing | tr '\n' ' ')
  sudo=none
  if [ "$(id -u)" -eq 0 ]; then
    sudo=""
  elif command -v sudo >/dev/null && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then
    sudo=sudo  # passwordless, or a terminal to ask for the password on
  fi
  if [ "$sudo" != none ] && command -v apt-get >/dev/null; then
    say "installing ${packages}with apt-get"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || true
    # shellcheck disable=SC2086
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $packages >/dev/null \
      || say "apt-get install failed"
    missing=$(missing_servers | tr '\n' ' ')
  fi
fi
if [ -n "$missing" ]; then
  # shellcheck disable=SC2086
  packages=$(packages_of $missing | tr '\n' ' ')
  say "not found: ${missing}(the serving tests start them; those tests fail without them)."
  say "install them as root (Debian/Ubuntu): apt-get install ${packages% }"
  say "or with your system's package manager; setting up Python goes on."
fi

if [ ! -x .venv/bin/python ]; then
  say "making .venv with ${PYTHON:-python3}"
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip
if [ "$(python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" != 2.13.0 ]
then
  say "installing torch 2.13.0"
  pip install -q torch==2.13.0
fi
say "installing paraflow (editable) with its dev tools"
pip install -q -c constraints.txt -e '.[dev]'

if [ -n "$missing" ] && [ "$require_servers" = true ]; then
  say "--require-servers: ${missing}still missing" >&2
  exit 1
fi
say "done. Run the tests (-m \"not slow\" for the fast tier):"
echo "  . .venv/bin/activate && python -m pytest -q"
