#!/bin/bash
# round 12, call C (carry [".whl", ".whl-pinned"]): acceptance 3's loss-curve tests under pytest on the shipping
# defaults, three processes side by side (nothing here is timed). Call A gave the DoRA and dropout tests 250 s each:
# both were killed while compiling; the recompile log showed 5-6 graphs of the decoder layer per compiled run (round
# 11: 15) at 30-40 s each. Here each test gets the whole call, and the guard that forced each recompile is kept (cut
# to 200 characters). As run in round 12, `cut` block-buffers its output, so `stamp` gave all lines one time; the
# dynamo log lines carry their own timestamps.
source benchmarks/device_env.sh .whl-pinned
run_test() {  # run_test LOG TEST: one pytest process, its output timestamped into $OUT/LOG
  TORCH_LOGS=recompiles timeout 540 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging \
    -p no:cacheprovider -s -rA --durations=0 "tests/gpu/test_fast_path_gpu.py::$2" 2>&1 | cut -c1-200 \
    | stamp > "$OUT/$1"
  echo "rc=${PIPESTATUS[0]}" >> "$OUT/$1"
}
run_test curve_dora.log "test_fast_path_follows_the_eager_loss_curve[dora]" &
run_test curve_dropout.log test_fast_path_with_dropout_follows_the_eager_loss_curve &
run_test curve_lora.log "test_fast_path_follows_the_eager_loss_curve[lora]" &
wait
for log in curve_dora curve_dropout curve_lora; do
  echo "### $log: $(grep -c 'Recompiling function' $OUT/$log.log) recompiles"
  grep -h "worst\|deviation\|PASSED\|FAILED\|passed\|failed\|rc=\|Error\|slowest\|[0-9]s call" $OUT/$log.log | cut -c1-250
done
