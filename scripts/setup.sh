#!/usr/bin/env bash
# Set up everything moco needs on a fresh machine: Debian's Fashion-MNIST package (when we can
# install packages), a virtual environment in .venv with the pinned PyTorch, and moco itself.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"; else SUDO="none"; fi
  if [ "$SUDO" != none ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST is not installed and this user cannot apt-get install it." >&2
    echo "setup: run 'sudo apt-get install dataset-fashion-mnist', or pass data.download=true to moco." >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
pip_install() {
  # Some machines' local package index warns about every missing mirror folder; hide only that line.
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
# What is installed already is not installed again: pip takes most of a minute just to find that out.
if .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(not (m.version('torch') == '2.14.1' and m.version('torchvision') == '0.29.1'))" 2>/dev/null; then
  echo "setup: torch==2.14.1 and torchvision==0.29.1 already in .venv"
else
  echo "setup: installing torch==2.14.1 torchvision==0.29.1 into .venv"
  pip_install torch==2.14.1 torchvision==0.29.1
fi
# moco itself (editable, with the test extras) again only when pyproject.toml has changed since.
STAMP=.venv/.moco-installed-from
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1) $(pwd)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('moco') is None)" 2>/dev/null; then
  echo "setup: moco already installed (editable) in .venv"
else
  echo "setup: installing moco (editable, with the test extras) into .venv"
  pip_install -e ".[dev]"
  echo "$WANT" > "$STAMP"
fi
echo "setup: done"
