#!/usr/bin/env bash
# The test command: installs the node and its test tools into ./.venv, then runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k wire -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
# System tools the speech realm uses (audio conversion, offline text to speech).
if ! command -v ffmpeg >/dev/null || ! command -v espeak-ng >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq ffmpeg espeak-ng >/dev/null
  else
    echo "scripts/test.sh: ffmpeg and espeak-ng are needed (apt-get install ffmpeg espeak-ng)" >&2
  fi
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# llama-cpp-python builds from source the first time (about 6 minutes on 2 cores); pip caches it.
python -m pip install -q -e ".[test,all]"
exec python -m pytest "$@"
