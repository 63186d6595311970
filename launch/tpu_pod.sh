#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create the slice (or reuse it if it exists), copy and install this
# project on every worker, then run `python -m notellm_jax.train` on all workers at once
# (`gcloud ... ssh --worker=all`). Every worker is one JAX process; they find each other through
# NOTELLM_DISTRIBUTED=auto (jax.distributed.initialize() detects the pod).
#
#   launch/tpu_pod.sh [--dry-run] [--skip-create] [--skip-install] [--] TRAIN_ARGS...
#   TPU_NAME=notellm-v5p ACCELERATOR_TYPE=v5p-8 ZONE=us-east5-a CHECKPOINT_DIR=gs://bucket/run1/ckpt \
#     SHARED_GCS=gs://bucket/shared launch/tpu_pod.sh -- --config configs/paper_7b.py:llama2_7b
#
# Settings (environment variables; defaults in brackets):
#   TPU_NAME [notellm-pod]   ZONE [us-east5-a]   PROJECT [gcloud's default project]
#   ACCELERATOR_TYPE [v5p-8] (v4-32, v5p-16, ...)   RUNTIME_VERSION [v2-alpha-tpuv5] (v4: tpu-ubuntu2204-base)
#   SPOT [0]                 1 = create a Spot slice
#   REMOTE_DIR [notellm_jax] project folder in each worker's home
#   JAX_TPU_REQUIREMENT ["jax[tpu]==0.10.2"] pip requirement that brings libtpu (match requirements.txt)
#   SHARED_GCS [""]          a gs:// copy of ../shared (weights, Stack Exchange dumps), synced next to
#                            the project folder on every worker: the default paths.shared_dir finds it
#   CHECKPOINT_DIR [""]      where all workers write checkpoints (train.checkpoint_dir). Workers share no
#                            disk, so a multi-worker slice needs a gs:// path here.
#   LIBTPU_INIT_ARGS         libtpu/XLA TPU flags [MaxText's LLaMA-2-7B set, MAXTEXT_LIBTPU_INIT_ARGS in
#                            common.sh (collective fusion and overlap), plus its v6e VMEM limit on v6e-*]
#   TPU_XLA_FLAGS [""]       XLA_FLAGS on the workers
# Options: --dry-run prints every command instead of running it; --skip-create requires the slice to
# exist; --skip-install reuses the code and virtual environment already on the workers.
# Code shipped: the files git tracks, as they are in the working tree. Only worker 0 writes logs,
# metrics and the export (under the run's work_dir on worker 0's disk).
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=common.sh
source launch/common.sh
TPU_NAME="${TPU_NAME:-notellm-pod}"
ZONE="${ZONE:-us-east5-a}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5}"
SPOT="${SPOT:-0}"
REMOTE_DIR="${REMOTE_DIR:-notellm_jax}"
JAX_TPU_REQUIREMENT="${JAX_TPU_REQUIREMENT:-jax[tpu]==0.10.2}"
SHARED_GCS="${SHARED_GCS:-}"
CHECKPOINT_DIR="${CHECKPOINT_DIR:-}"
default_libtpu="$MAXTEXT_LIBTPU_INIT_ARGS"
if [[ "$ACCELERATOR_TYPE" == v6e-* ]]; then default_libtpu+=" $MAXTEXT_V6E_LIBTPU_INIT_ARGS"; fi
LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:-$default_libtpu}"
TPU_XLA_FLAGS="${TPU_XLA_FLAGS:-}"
BUNDLE="${TMPDIR:-/tmp}/notellm_jax_bundle.tar.gz"

DRY_RUN=0
CREATE=1
INSTALL=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --skip-create) CREATE=0; shift ;;
    --skip-install) INSTALL=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "tpu_pod.sh: give the training arguments, e.g. -- --config configs/paper_7b.py:llama2_7b (see --help)" >&2
  exit 2
fi

# Print (dry run) or run one command; the printed line is exactly what runs.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then command_line "$@"; else "$@"; fi
}

tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$ZONE")
if [[ -n "$PROJECT" ]]; then where+=("--project=$PROJECT"); fi

# 1. Create the slice unless it exists.
create=("${tpu[@]}" create "$TPU_NAME" "${where[@]}" "--accelerator-type=$ACCELERATOR_TYPE"
  "--version=$RUNTIME_VERSION")
if [[ "$SPOT" == 1 ]]; then create+=(--spot); fi
describe="$(run "${tpu[@]}" describe "$TPU_NAME" "${where[@]}") >/dev/null 2>&1"
if [[ "$DRY_RUN" == 1 && "$CREATE" == 1 ]]; then
  echo "$describe || $(run "${create[@]}")"
elif [[ "$DRY_RUN" == 1 ]]; then
  echo "$describe"
elif ! "${tpu[@]}" describe "$TPU_NAME" "${where[@]}" >/dev/null 2>&1; then
  if [[ "$CREATE" == 0 ]]; then
    echo "tpu_pod.sh: TPU $TPU_NAME not found in $ZONE and --skip-create was given" >&2
    exit 1
  fi
  "${create[@]}"
fi

# 2. Ship the code and install it on every worker.
if [[ "$INSTALL" == 1 ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "git ls-files -z | tar --null -czf $(quote "$BUNDLE") -T -"
  else
    git ls-files -z | tar --null -czf "$BUNDLE" -T -
  fi
  run "${tpu[@]}" scp "$BUNDLE" "$TPU_NAME:notellm_jax_bundle.tar.gz" --worker=all "${where[@]}"
  install="set -e; mkdir -p ~/$REMOTE_DIR; tar -xzf ~/notellm_jax_bundle.tar.gz -C ~/$REMOTE_DIR; cd ~/$REMOTE_DIR;"
  install+=" python3 -m venv .venv; .venv/bin/pip install -q -r requirements.txt \"$JAX_TPU_REQUIREMENT\";"
  install+=" .venv/bin/pip install -q --no-deps -e ."
  if [[ -n "$SHARED_GCS" ]]; then
    install+="; mkdir -p ../shared; gcloud storage rsync -r $SHARED_GCS ../shared"
  fi
  run "${tpu[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" --command "$install"
fi

# 3. Train: the same command on every worker at once.
train_args=("$@")
if [[ -n "$CHECKPOINT_DIR" ]]; then train_args+=(--set "train.checkpoint_dir=$CHECKPOINT_DIR"); fi
train="cd ~/$REMOTE_DIR && NOTELLM_DISTRIBUTED=auto LIBTPU_INIT_ARGS=\"$LIBTPU_INIT_ARGS\""
train+=" XLA_FLAGS=\"$TPU_XLA_FLAGS\" .venv/bin/python -m notellm_jax.train"
for arg in "${train_args[@]}"; do train+=" $(quote "$arg")"; done
run "${tpu[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" --command "$train"
