#!/usr/bin/env bash
# System packages the test-suite needs beyond Python. Installed here, never by hand.
# openssh-server: the SSH push tests start a real sshd on 127.0.0.1.
# postgresql: the fleet tests run once on SQLite and once on a throwaway PostgreSQL cluster.
# qemu-user-static binfmt-support debootstrap: scripts/arm64-root.sh builds the Debian 12 arm64
#   root in which tests/e2e/test_arm64_device.py runs the agent on real aarch64 binaries.
# systemd: systemd-analyze verify checks the units in packaging/systemd.
# chromium chromium-driver: tests/fleet_server/test_dashboard.py drives the dashboard in real headless Chromium (selenium).
# nginx: tests/e2e/test_nginx_tls.py runs packaging/nginx/edgekit.conf (TLS, two replicas, the authorizing artifact cache).
set -euo pipefail
NEEDED=(openssh-server postgresql qemu-user-static binfmt-support debootstrap systemd chromium chromium-driver nginx)
missing=()
for pkg in "${NEEDED[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing system packages: ${missing[*]} (install them as root)" >&2
    exit 1
  fi
fi
# The Debian 12 arm64 root (cached outside the checkout; a no-op once built and current).
# A machine that cannot run it (no binfmt_misc) still runs the suite: the arm64 tests then say why.
if [ "$(id -u)" = 0 ]; then
  "$(dirname "$0")/arm64-root.sh" >/dev/null || echo "warning: the arm64 root was not built; tests/e2e/test_arm64_device.py reports why" >&2
fi
