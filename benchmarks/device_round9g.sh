#!/bin/bash
# round 9, call G (session 9): acceptance 3's GPU tests on the pinned stack (carry [".whl", ".whl-pinned"]:
# transformers 5.23), where the fast path now compiles each layer's own forward inside transformers' checkpoint
# (kernels/compile_layers.py; the QLoRA curve trains with checkpointing): the 50-step loss curves (QLoRA, LoRA) and
# one step's adapter gradients (LoRA, DoRA)
source benchmarks/device_env.sh .whl-pinned
print_checkpoint_layout > $OUT/gpu_tests.log 2>&1
timeout 130 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA --durations=0 \
  tests/gpu/test_fast_path_gpu.py::test_one_step_adapter_gradients_are_as_close_to_fp32_as_eager_bf16 >> $OUT/gpu_tests.log 2>&1
echo "rc=$?" >> $OUT/gpu_tests.log
timeout 420 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA --durations=0 \
  "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[qlora]" \
  "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[lora]" >> $OUT/gpu_tests.log 2>&1
echo "rc=$?" >> $OUT/gpu_tests.log
grep -h "^transformers\|worst\|PASSED\|FAILED\|passed\|failed\|rc=\|Error" $OUT/gpu_tests.log | cut -c1-300
