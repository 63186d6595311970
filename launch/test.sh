#!/usr/bin/env bash
# The project's test command (README, .ci/run): the whole suite, slow tests included, on CPU with 8 fake
# devices (tests/conftest.py). Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
export NOTELLM_SHARED="${NOTELLM_SHARED:-$(cd .. && pwd)/shared}"
exec .venv/bin/python -m pytest -p no:cacheprovider --durations=15 "$@"
