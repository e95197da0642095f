#!/usr/bin/env bash
# The test command: installs the node and its test tools into ./.venv, then runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k wire -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
# System tools: the speech realm's (audio conversion, offline text to speech) and the browser
# the web UI is tested in (Debian's chromium, driven headless over the DevTools protocol).
if ! command -v ffmpeg >/dev/null || ! command -v espeak-ng >/dev/null || ! [ -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg espeak-ng chromium >/dev/null
  else
    echo "scripts/test.sh: ffmpeg, espeak-ng and chromium are needed (apt-get install ffmpeg espeak-ng chromium)" >&2
  fi
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# llama-cpp-python builds from source the first time (about 6 minutes on 2 cores); pip caches it.
python -m pip install -q -e ".[test,all]"
exec python -m pytest "$@"
