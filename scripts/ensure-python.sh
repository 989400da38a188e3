#!/usr/bin/env bash
# Debian's python3 has no venv/ensurepip until python3-venv is installed; install it when missing.
set -euo pipefail
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing python3-venv (needed to create .venv)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "Error: $PYTHON cannot create virtual environments." >&2
    echo "Hint: sudo apt-get install python3-venv" >&2
    exit 1
  fi
fi
