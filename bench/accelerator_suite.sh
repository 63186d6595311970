#!/usr/bin/env bash
# The accelerator suite of issue 10 in one command (bench/accelerator_suite.py says what it measures):
# under 8 minutes on one GPU, with only what such a machine has (jax, flax, optax, orbax, torch,
# transformers); the repository need not be installed.
#
#   bench/accelerator_suite.sh [--small] [--steps N] [--parts smollm2,llama2_7b]
#
# Settings (environment variables; defaults in brackets):
#   OUT [bench/results/accelerator_suite/<date>-<backend>.json]   PYTHON [.venv/bin/python if present, else python3]
#   SUITE_XLA_FLAGS [MaxText's GPU set, MAXTEXT_GPU_XLA_FLAGS in launch/common.sh]: appended to XLA_FLAGS
#   XLA_PYTHON_CLIENT_MEM_FRACTION [0.9]   XLA_PYTHON_CLIENT_PREALLOCATE [false]: JAX takes GPU memory as it
#   needs it, so PyTorch's step in part (a) finds room; part (b) fills up to the fraction.
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh
if [[ -x .venv/bin/python ]]; then default_python=.venv/bin/python; else default_python=python3; fi
PYTHON="${PYTHON:-$default_python}"
backend="$("$PYTHON" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo unknown)"
OUT="${OUT:-bench/results/accelerator_suite/$(date -u +%F)-$backend.json}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_FLAGS="${XLA_FLAGS:-} ${SUITE_XLA_FLAGS-$MAXTEXT_GPU_XLA_FLAGS}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec "$PYTHON" bench/accelerator_suite.py --out "$OUT" "$@"
