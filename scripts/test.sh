#!/usr/bin/env bash
# Install everything the test suite needs into .venv and run the whole suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
# headless Chromium for the web-chat test (Playwright drives Debian's build; its own download needs the network)
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU machines: the CPU wheel of torch first, so that the project's `torch>=2.4` pulls nothing bigger
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'
python -m pytest "$@"
