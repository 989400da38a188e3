#!/usr/bin/env bash
# Build (once) a Debian 12 "bookworm" arm64 root and install the edgekit agent into it with
# the root's own stock Python (3.11.2), so the test-suite can run the agent on real aarch64
# binaries (LiteRT/XNNPACK, ONNX Runtime) through qemu-user emulation.
#
# Cached OUTSIDE the checkout (CI clones every submission afresh): $EDGEKIT_ARM64_CACHE,
# default /var/cache/edgekit. Three stages, each with a stamp file, under one lock:
#   1. base    debootstrap --arch=arm64 --variant=minbase bookworm (about 10 min, once)
#   2. deps    a venv at /opt/edgekit-agent inside the root, the agent extra's wheels
#              downloaded into /var/cache/edgekit-wheels (inside the root) and installed from
#              there; redone only when pyproject's base or agent dependencies change
#              (and a second venv, /opt/edgekit-litert-only: the same without onnxruntime, a
#              LiteRT-only device for the tests of bundles its runtime cannot load)
#   3. edgekit the checkout's package directories copied to /opt/edgekit-src and installed
#              into both venvs offline from the wheel cache; redone only when those files change
# A run with everything cached is a no-op (a hash of the sources and a few stat calls).
#
# Needs root, qemu-user-static, binfmt-support and debootstrap (scripts/setup-test-system.sh).
# Prints the root's path on its last line of stdout. Timings go to $CACHE/arm64-root.log.
set -euo pipefail

CHECKOUT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${EDGEKIT_ARM64_CACHE:-/var/cache/edgekit}
ROOT=${EDGEKIT_ARM64_ROOT:-$CACHE/arm64-root-bookworm}
LOG=$CACHE/arm64-root.log
VENV_IN_ROOT=/opt/edgekit-agent
LITERT_VENV_IN_ROOT=/opt/edgekit-litert-only
SRC_IN_ROOT=/opt/edgekit-src
WHEELS_IN_ROOT=/var/cache/edgekit-wheels
# Package directories and files that make the distribution (pyproject's [tool.setuptools]).
SOURCES=(pyproject.toml README.md edgekit converters device_agents fleet_server hybrid_router hardware_profiles)

die() { echo "Error: $1" >&2; echo "Hint: $2" >&2; exit 1; }
log() { echo "$(date -u +%FT%TZ) $*" | tee -a "$LOG" >&2; }

[ "$(id -u)" = 0 ] || die "building the arm64 root needs root (debootstrap, chroot, mount)." \
  "run it as root, or skip the arm64 tests on this machine."
for tool in debootstrap update-binfmts chroot; do
  command -v "$tool" >/dev/null || die "$tool is not installed." "run scripts/setup-test-system.sh (installs qemu-user-static binfmt-support debootstrap)."
done
[ -x /usr/bin/qemu-aarch64-static ] || die "qemu-aarch64-static is not installed." "apt-get install qemu-user-static"

mkdir -p "$CACHE"
exec 9>"$CACHE/arm64-root.lock"
flock 9   # two runs never build at once; the second one finds the first one's stamps

# -- aarch64 binaries run through the qemu binfmt interpreter (flag F: no copy in the root needed)
ensure_binfmt() {
  if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  if ! grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null; then
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || update-binfmts --import qemu-aarch64 >/dev/null
  fi
  grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
    || die "the qemu-aarch64 binfmt interpreter is not registered." "update-binfmts --enable qemu-aarch64 (needs binfmt_misc in the kernel)."
}

# -- /proc inside the root for the chroot steps; never the host's /sys (LiteRT/ORT segfault with it)
MOUNTED=()
mount_proc() {
  local target=$1/proc
  if ! mountpoint -q "$target"; then
    mount -t proc proc "$target"
    MOUNTED+=("$target")
  fi
}
unmount_all() {
  local m
  for m in "${MOUNTED[@]:-}"; do
    [ -n "$m" ] && umount -l "$m" 2>/dev/null || true
  done
  MOUNTED=()
}
trap unmount_all EXIT

# Remove a directory tree, first detaching anything still mounted inside it (a killed run).
remove_tree() {
  local dir=$1 m
  [ -e "$dir" ] || return 0
  for m in $(awk -v d="$dir" 'index($2, d "/") == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" || true
  done
  rm -rf --one-file-system "$dir"
}

apt_mirror() {
  if [ -n "${EDGEKIT_DEBIAN_MIRROR:-}" ]; then echo "$EDGEKIT_DEBIAN_MIRROR"; return; fi
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

in_root() { chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

copy_network_config() {
  # pip inside the root resolves names and verifies TLS with the host's files.
  cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$ROOT/etc/ssl/certs"
    cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
  fi
}

ensure_binfmt

# -- stage 1: base -----------------------------------------------------------------------------
BASE_STAMP=$ROOT/.edgekit-base-stamp
if [ ! -f "$BASE_STAMP" ]; then
  start=$(date +%s)
  mirror=$(apt_mirror)
  log "arm64 root: debootstrap bookworm from $mirror into $ROOT (once; about 10 min)"
  remove_tree "$ROOT.partial"
  remove_tree "$ROOT"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$ROOT.partial" "$mirror" >>"$LOG" 2>&1 \
    || die "debootstrap failed (see $LOG)." "check that $mirror is reachable; set EDGEKIT_DEBIAN_MIRROR to another mirror."
  mv "$ROOT.partial" "$ROOT"
  echo "bookworm arm64 $(date -u +%FT%TZ) $(( $(date +%s) - start ))s" >"$BASE_STAMP"
  log "arm64 root: base built in $(( $(date +%s) - start )) s"
fi

# -- stage 2: deps -----------------------------------------------------------------------------
# The requirement list comes from pyproject.toml (base dependencies + the agent extra).
REQS=$(python3 - "$CHECKOUT/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
for req in project["dependencies"] + project["optional-dependencies"]["agent"]:
    print(req)
PY
)
DEPS_KEY=$(printf '%s\n' "$REQS" "setuptools>=68" "wheel" "litert-only-v1" | sha256sum | cut -c1-16)
DEPS_STAMP=$ROOT/.edgekit-deps-stamp
if [ "$(cat "$DEPS_STAMP" 2>/dev/null)" != "$DEPS_KEY" ]; then
  start=$(date +%s)
  log "arm64 root: installing the agent's dependencies (key $DEPS_KEY) with the root's python3"
  copy_network_config
  mount_proc "$ROOT"
  rm -f "$DEPS_STAMP"
  printf '%s\n' "$REQS" "setuptools>=68" "wheel" >"$ROOT/opt/edgekit-requirements.txt"
  [ -x "$ROOT$VENV_IN_ROOT/bin/python" ] || in_root python3 -m venv "$VENV_IN_ROOT" >>"$LOG" 2>&1
  mkdir -p "$ROOT$WHEELS_IN_ROOT"
  in_root "$VENV_IN_ROOT/bin/python" -m pip --disable-pip-version-check download -q \
    -d "$WHEELS_IN_ROOT" -r /opt/edgekit-requirements.txt >>"$LOG" 2>&1 \
    || die "pip could not download the agent's wheels inside the arm64 root (see $LOG)." "check that PyPI is reachable from this machine."
  in_root "$VENV_IN_ROOT/bin/python" -m pip --disable-pip-version-check install -q \
    --no-index --find-links "$WHEELS_IN_ROOT" -r /opt/edgekit-requirements.txt >>"$LOG" 2>&1 \
    || die "pip could not install the agent's wheels inside the arm64 root (see $LOG)." "read $LOG."
  grep -v '^onnxruntime' "$ROOT/opt/edgekit-requirements.txt" >"$ROOT/opt/edgekit-litert-only-requirements.txt"
  [ -x "$ROOT$LITERT_VENV_IN_ROOT/bin/python" ] || in_root python3 -m venv "$LITERT_VENV_IN_ROOT" >>"$LOG" 2>&1
  in_root "$LITERT_VENV_IN_ROOT/bin/python" -m pip --disable-pip-version-check install -q \
    --no-index --find-links "$WHEELS_IN_ROOT" -r /opt/edgekit-litert-only-requirements.txt >>"$LOG" 2>&1 \
    || die "pip could not install the LiteRT-only venv inside the arm64 root (see $LOG)." "read $LOG."
  echo "$DEPS_KEY" >"$DEPS_STAMP"
  log "arm64 root: dependencies installed in $(( $(date +%s) - start )) s"
  unmount_all
fi

# -- stage 3: edgekit from the checkout --------------------------------------------------------
cd "$CHECKOUT"
# Files git would commit (tracked or untracked, not ignored) that still exist.
list_sources() {
  git ls-files -co --exclude-standard -- "${SOURCES[@]}" | while IFS= read -r f; do
    [ -f "$f" ] && printf '%s\n' "$f"
  done | sort
}
SRC_KEY=$(list_sources | tr '\n' '\0' | xargs -0 sha256sum | sha256sum | cut -c1-16)
SRC_STAMP=$ROOT/.edgekit-src-stamp
if [ "$(cat "$SRC_STAMP" 2>/dev/null)" != "$SRC_KEY" ]; then
  start=$(date +%s)
  log "arm64 root: installing edgekit from $CHECKOUT (sources $SRC_KEY) with the root's python3"
  rm -f "$SRC_STAMP"
  rm -rf "$ROOT$SRC_IN_ROOT"
  mkdir -p "$ROOT$SRC_IN_ROOT"
  list_sources | tar -cf - -T - | tar -xf - -C "$ROOT$SRC_IN_ROOT"
  mount_proc "$ROOT"
  # The agent extra resolves from the cached wheels only (offline); only edgekit is rebuilt.
  in_root "$VENV_IN_ROOT/bin/python" -m pip --disable-pip-version-check install -q \
    --no-index --find-links "$WHEELS_IN_ROOT" --no-build-isolation "$SRC_IN_ROOT[agent]" >>"$LOG" 2>&1 \
    || die "pip could not install edgekit[agent] from the checkout inside the arm64 root (see $LOG)." "read $LOG; a new dependency needs the deps stage (it reruns when pyproject changes)."
  rm -rf "$ROOT$SRC_IN_ROOT/build" "$ROOT$SRC_IN_ROOT"/*.egg-info
  in_root "$LITERT_VENV_IN_ROOT/bin/python" -m pip --disable-pip-version-check install -q \
    --no-index --no-deps --no-build-isolation --force-reinstall "$SRC_IN_ROOT" >>"$LOG" 2>&1 \
    || die "pip could not install edgekit into the LiteRT-only venv of the arm64 root (see $LOG)." "read $LOG."
  rm -rf "$ROOT$SRC_IN_ROOT/build" "$ROOT$SRC_IN_ROOT"/*.egg-info
  echo "$SRC_KEY" >"$SRC_STAMP"
  log "arm64 root: edgekit installed in $(( $(date +%s) - start )) s"
  unmount_all
fi

echo "$ROOT"
