#!/usr/bin/env bash
# Set up graphopt on a fresh Debian machine: the system packages it needs, a virtualenv in .venv
# with the pinned Python dependencies, and the aarch64 sysroot that runs ARM builds under qemu.
# Idempotent: a second run only checks, and finishes in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

# Debian packages: real data, the ARM cross toolchain and emulator, a browser for report tests.
need=()
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v chromium >/dev/null || need+=(chromium)
if ((${#need[@]})); then
  echo "setup: installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.graphopt-setup
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python dependencies into .venv"
  # torch 2.13.0 CPU first: a bare `torch` requirement would pull a multi-GB CUDA build.
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test,bench]"
  echo "$want" > "$stamp"
fi

# The aarch64 Python + TVM runtime sysroot for running ARM artifacts under qemu-user.
.venv/bin/python -m graphopt.targets.arm_sysroot
