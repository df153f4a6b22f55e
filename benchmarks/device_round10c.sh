#!/bin/bash
# round 10, call C (session 8's 9b, moved to the pinned stack in session 9; run in session 10: both pytest processes
# were killed by their timeouts with their output buffered, results unknown; again as round 11 calls A and B; carry [".whl", ".whl-pinned"]):
# the GPU tests not yet run with the fast path's current structure: DoRA's loss curve, the dropout curve (decides
# whether train.kernels=fused can be the default), the QLoRA CLI (train, eval under no_grad, merge, DPO)
source benchmarks/device_env.sh .whl-pinned
timeout 300 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA --durations=0 \
  "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[dora]" \
  tests/gpu/test_fast_path_gpu.py::test_fast_path_with_dropout_follows_the_eager_loss_curve > $OUT/gpu_tests_curves.log 2>&1
echo "rc=$?" >> $OUT/gpu_tests_curves.log
timeout 200 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA --durations=0 \
  tests/gpu/test_qlora_cli_gpu.py > $OUT/gpu_tests_cli.log 2>&1
echo "rc=$?" >> $OUT/gpu_tests_cli.log
grep -h "worst step\|PASSED\|FAILED\|passed\|failed\|rc=\|Error" $OUT/gpu_tests_curves.log $OUT/gpu_tests_cli.log | cut -c1-300
