#!/bin/bash
# round 9, call B (written in session 8, not yet run): the GPU tests not yet run with the fast path's current kernel
# launcher choice (C++ where the checkpoint is not compiled with the layers): DoRA's and LoRA's loss curves, the dropout curve (decides whether
# train.kernels=fused can be the default), the QLoRA CLI (train, eval under no_grad, merge, DPO)
source benchmarks/device_env.sh
timeout 300 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA --durations=0 \
  "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[dora]" \
  "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[lora]" \
  tests/gpu/test_fast_path_gpu.py::test_fast_path_with_dropout_follows_the_eager_loss_curve > $OUT/gpu_tests_curves.log 2>&1
echo "rc=$?" >> $OUT/gpu_tests_curves.log
timeout 200 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA --durations=0 \
  tests/gpu/test_qlora_cli_gpu.py > $OUT/gpu_tests_cli.log 2>&1
echo "rc=$?" >> $OUT/gpu_tests_cli.log
grep -h "worst step\|PASSED\|FAILED\|passed\|failed\|rc=\|Error" $OUT/gpu_tests_curves.log $OUT/gpu_tests_cli.log | cut -c1-300
