#!/bin/bash
# round 11, call E (written in session 10, not yet run; carry [".whl", ".whl-pinned"]): one step's adapter gradients,
# fast path vs eager vs fp32, for LoRA and DoRA on the pinned stack (round 9's call G: LoRA passed; DoRA printed the
# same figures and then its pytest process ran out of time before the summary), in a pytest process of its own.
source benchmarks/device_env.sh .whl-pinned
timeout 400 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA \
  --durations=0 tests/gpu/test_fast_path_gpu.py -k test_one_step_adapter_gradients > $OUT/gpu_tests_grads.log 2>&1
echo "rc=$?" >> $OUT/gpu_tests_grads.log
grep -h "fp32\|PASSED\|FAILED\|passed\|failed\|rc=\|Error" $OUT/gpu_tests_grads.log | cut -c1-300
