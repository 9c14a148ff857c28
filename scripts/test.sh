#!/usr/bin/env bash
# Set up, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A headless browser for the test that opens a run's HTML page (moco page) and checks every image loaded.
if ! command -v chromium-headless-shell >/dev/null && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"; else SUDO="none"; fi
  if [ "$SUDO" != none ] && command -v apt-get >/dev/null; then
    echo "test: installing Debian's chromium-headless-shell"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium-headless-shell >/dev/null \
      || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium-headless-shell >/dev/null; } \
      || echo "test: could not install chromium-headless-shell: the HTML page's browser test will be skipped" >&2
  else
    echo "test: no headless chromium and no way to install it: the HTML page's browser test will be skipped" >&2
  fi
fi
exec .venv/bin/python -m pytest -q "$@"
