# shellcheck shell=bash
# Helpers the launch scripts source (not run on its own): printing commands for --dry-run.

# One word as a shell reads it back: bare when that is safe, else single-quoted (easier to read than %q).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The command "$@" as one line that a shell runs exactly as given.
command_line() {
  local words=() word
  for word in "$@"; do words+=("$(quote "$word")"); done
  echo "${words[*]}"
}

# XLA flags of MaxText's LLaMA-2-7B recipes (AI-Hypercomputer/maxtext: configs/gpu/a3/llama_2_7b/1vm.sh and
# the v5p/v6e llama2_7b scripts): the launchers' defaults, each replaceable through its own variable.
# GPU: the latency-hiding scheduler overlaps FSDP's all-gathers / reduce-scatters with compute; the combine
# thresholds batch them into large transfers; pipelining and while-loop double buffering overlap a scanned
# layer's collectives with the previous layer's compute; cuBLAS rather than Triton GEMMs; no CUDA command
# buffers; XLA's own rematerialisation pass off (the model's remat policy decides). The recipe's
# `--xla_gpu_pipeline_<collective>=on` are spelt `--xla_gpu_enable_pipelined_<collective>=true` in the jaxlib
# we pin (it refuses the former; tests/test_launch_scripts.py starts XLA with these flags).
# shellcheck disable=SC2034  # these three are read by the scripts that source this file
MAXTEXT_GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false \
--xla_gpu_enable_command_buffer= --xla_gpu_enable_highest_priority_async_stream=true \
--xla_gpu_all_reduce_combine_threshold_bytes=134217728 --xla_gpu_all_gather_combine_threshold_bytes=134217728 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864 --xla_gpu_enable_pipelined_all_gather=true \
--xla_gpu_enable_pipelined_reduce_scatter=true --xla_gpu_enable_pipelined_all_reduce=true \
--xla_gpu_enable_while_loop_double_buffering=true --xla_gpu_enable_all_gather_combine_by_dim=false \
--xla_gpu_enable_reduce_scatter_combine_by_dim=false --xla_disable_hlo_passes=rematerialization"
# TPU (libtpu, LIBTPU_INIT_ARGS): asynchronous collective fusion and compute/collective overlap, the
# data-parallel all-reduce optimisation, async all-gather / collective-permute, all-gather pipelining in
# the backward pass; megacore fusion may not take all-gathers (v5p recipe).
# shellcheck disable=SC2034
MAXTEXT_LIBTPU_INIT_ARGS="--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true --xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true --xla_enable_async_collective_permute=true \
--xla_tpu_enable_ag_backward_pipelining=true --xla_tpu_megacore_fusion_allow_ags=false"
# v6e recipes also raise the scoped VMEM limit (Trillium has more VMEM per core).
# shellcheck disable=SC2034
MAXTEXT_V6E_LIBTPU_INIT_ARGS="--xla_tpu_scoped_vmem_limit_kib=98304"
