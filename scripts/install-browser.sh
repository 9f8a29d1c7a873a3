#!/usr/bin/env bash
# Debian's Chromium for the browser tests (webinbox/tests/test_browser.py). Playwright drives it
# through executable_path=/usr/bin/chromium; `playwright install` is never used.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium
