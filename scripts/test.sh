#!/usr/bin/env bash
# The test command: installs the node and its test tools into ./.venv, then runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k wire -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
# System tools: the speech realm's (audio conversion, offline text to speech), the browser
# the web UI is tested in (Debian's chromium, driven headless by Playwright), and
# the multi-host testbed's (network namespaces with iproute2, NAT routers with nftables).
if ! command -v ffmpeg >/dev/null || ! command -v espeak-ng >/dev/null || ! [ -x /usr/bin/chromium ] \
    || ! command -v ip >/dev/null || ! command -v nft >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      ffmpeg espeak-ng chromium iproute2 nftables >/dev/null
  else
    echo "scripts/test.sh: ffmpeg, espeak-ng, chromium, iproute2 and nftables are needed" \
      "(apt-get install ffmpeg espeak-ng chromium iproute2 nftables); multi-host tests will skip" >&2
  fi
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# llama-cpp-python builds from source the first time (about 6 minutes on 2 cores); pip caches it.
python -m pip install -q -e ".[test,all]"
# A standard js-libp2p peer for the interop test (versions pinned in its lockfile, ~40 MB).
# Node.js from Debian if there is none (as root); the registry is retried, since a skipped
# interop test is an untested feature.
if ! command -v npm >/dev/null && [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null \
    || echo "scripts/test.sh: could not install nodejs and npm" >&2
fi
if command -v npm >/dev/null; then
  for try in 1 2 3; do
    if npm ci --prefix tests/js_peer --no-audit --no-fund --silent; then break; fi
    echo "scripts/test.sh: npm ci for tests/js_peer failed (try $try of 3)" >&2
    if [ "$try" = 3 ]; then echo "scripts/test.sh: the interop test will skip" >&2; else sleep $((try * 10)); fi
  done
else
  echo "scripts/test.sh: no npm; the js-libp2p interop test will skip" >&2
fi
exec python -m pytest "$@"
