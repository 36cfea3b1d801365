#!/usr/bin/env bash
# Debian's chromium for the browser tests (tests/browser drive it headless through Playwright for Python with
# executable_path; `playwright install` is never run, so no browser is downloaded). Uses apt-get as root
# (CI runs as root) or through sudo without a password; does nothing when a chromium is already installed.
set -euo pipefail
for c in chromium chromium-browser; do
  if command -v "$c" >/dev/null 2>&1; then echo "chromium: $(command -v "$c")"; exit 0; fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "no apt-get here: install chromium to run tests/browser (they are skipped without it)" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
command -v chromium
