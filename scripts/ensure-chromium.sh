#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver when missing: the tests marked `browser` drive
# /usr/bin/chromium headless through /usr/bin/chromedriver against a real `mlflow ui`.
# (A test tool's own browser download cannot work on a closed network; Debian's package can.)
# Where they cannot be installed (not root, no apt-get): under CI=true this fails (exit 1: CI must
# run the browser tests); elsewhere it says so and exits 0 (those tests then skip, saying why).
set -u
have() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }
have && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }
  have && exit 0
fi
if [ "${CI:-}" = "true" ]; then
  echo "ensure-chromium: CI=true and chromium + chromium-driver could not be installed" \
    "(apt-get install chromium chromium-driver as root)" >&2
  exit 1
fi
echo "ensure-chromium: chromium/chromedriver not installed; the browser tests will skip" >&2
exit 0
