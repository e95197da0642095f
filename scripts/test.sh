#!/usr/bin/env bash
# The test command: installs the node and its test tools into ./.venv, then runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k wire -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# llama-cpp-python builds from source the first time (about 6 minutes on 2 cores); pip caches it.
python -m pip install -q -e ".[test]"
exec python -m pytest "$@"
