#!/bin/bash
# round 12, call A (written in session 11, not yet run; carry [".whl", ".whl-pinned"]): acceptance 3's loss-curve
# tests under pytest, on the shipping defaults since round 11 (train.kernels=auto with the fused LoRA branch and
# its byte-at-a-time mask draw; the loss forward without a key/value cache). Round 11 found each compiled run of
# these tests recompiling the decoder layer 15 times (one graph per layer through the cache's guards) and ran the
# DoRA and dropout curves as CLI runs instead (benchmarks/device_round11f.sh). TORCH_LOGS=recompiles counts the
# graphs now (expected: a handful per run, whatever the depth); one pytest process per test, every line timestamped.
# (The LoRA curve passed in round 9; the two here are the ones never run under pytest on the current structure.)
source benchmarks/device_env.sh .whl-pinned
for test in "test_fast_path_follows_the_eager_loss_curve[dora]" test_fast_path_with_dropout_follows_the_eager_loss_curve; do
  echo "### $test" >> $OUT/gpu_tests_curves.log
  TORCH_LOGS=recompiles timeout 250 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging \
    -p no:cacheprovider -s -rA --durations=0 "tests/gpu/test_fast_path_gpu.py::$test" 2>&1 \
    | grep -v "__recompiles\]     -" | stamp >> $OUT/gpu_tests_curves.log
  echo "rc=${PIPESTATUS[0]}" >> $OUT/gpu_tests_curves.log
done
grep -h "###\|worst step\|PASSED\|FAILED\|passed\|failed\|rc=\|Error" $OUT/gpu_tests_curves.log | cut -c1-300
echo "recompiles logged: $(grep -c 'Recompiling function' $OUT/gpu_tests_curves.log)"
