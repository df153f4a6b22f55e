#!/bin/bash
# round 13, call D (carry [".whl", ".whl-pinned"]): the single-GPU tests under pytest after session 12's change to the
# fused LoRA branch's mask unpacking (kernels/lora_fused.py: unpack_mask_by_shifts), which no GPU test had run: the
# dropout loss-curve test in one process, the fast path's other tests in a second, the remaining single-GPU files in
# a third (nothing here is timed; the three share the GPU).
source benchmarks/device_env.sh .whl-pinned
run_pytest() {  # run_pytest LOG ARGS...: one pytest process, its output timestamped into $OUT/LOG
  local log=$1
  shift
  timeout 500 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA \
    --durations=0 "$@" 2>&1 | stamp > "$OUT/$log"
  echo "rc=${PIPESTATUS[0]}" >> "$OUT/$log"
}
run_pytest curve_dropout.log tests/gpu/test_fast_path_gpu.py::test_fast_path_with_dropout_follows_the_eager_loss_curve &
run_pytest fast_path_rest.log tests/gpu/test_fast_path_gpu.py -k "not loss_curve" &
run_pytest other_files.log tests/gpu/test_qlora_gpu.py tests/gpu/test_nf4_gpu.py tests/gpu/test_bench_gpu.py \
  tests/gpu/test_chunked_ce_gpu.py tests/gpu/test_every_adapter_gpu.py tests/gpu/test_optim_8bit_gpu.py &
wait
for log in curve_dropout fast_path_rest other_files; do
  echo "### $log"
  grep -h "worst\|deviation\|PASSED\|FAILED\|SKIPPED\|ERROR\|passed\|failed\|rc=\|Error" "$OUT/$log.log" | cut -c1-250
done
