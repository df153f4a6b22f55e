#!/bin/bash
# round 11, call A (written in session 10, not yet run; carry [".whl", ".whl-pinned"]): round 10's call C again,
# one test per pytest process with room for cold compiles (call C gave its two pytest runs 300 s and 200 s; both
# were killed with their output still buffered, so nothing is known; device_env.sh now sets PYTHONUNBUFFERED).
# DoRA's 50-step loss curve (acceptance 3; round 9's DoRA gradient test printed a pass and then ran out of time)
# and the dropout curve (whether train.kernels=fused can join auto).
source benchmarks/device_env.sh .whl-pinned
for test in "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[dora]" \
  tests/gpu/test_fast_path_gpu.py::test_fast_path_with_dropout_follows_the_eager_loss_curve; do
  timeout 270 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA \
    --durations=0 "$test" >> $OUT/gpu_tests_curves.log 2>&1
  echo "rc=$? $test" >> $OUT/gpu_tests_curves.log
done
grep -h "worst step\|PASSED\|FAILED\|passed\|failed\|rc=\|Error" $OUT/gpu_tests_curves.log | cut -c1-300
