#!/bin/bash
# round 8, call A: A/Bs of Inductor options on the 8B QLoRA step (the GPU idles ~90 ms per step in the
# compiled layers' Python wrappers: ~7,000 launches, ~1,200 of them casts), each in a fresh process; then the
# one-call 8-bit optimizer's GPU test after session 7's review refactor
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
mkdir -p $OUT/results
for flags in "" "--inductor-config combo_kernels=True" "--inductor-config cpp_wrapper=True"; do
  echo "### flags: ${flags:-none}" >> $OUT/ab.log
  timeout 150 python benchmarks/profile_step.py --cases qlora --models-dir /tmp/m --time-only --timed-steps 8 $flags \
    2>&1 | grep -v "Loading weights\|Writing model" >> $OUT/ab.log
  echo "rc=${PIPESTATUS[0]}" >> $OUT/ab.log
done
timeout 90 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA \
  tests/gpu/test_optim_8bit_gpu.py > $OUT/gpu_tests.log 2>&1
echo "rc=$?" >> $OUT/gpu_tests.log
grep -h "###\|===\|rc=\|Error" $OUT/ab.log | cut -c1-300
grep -h "PASSED\|FAILED\|passed\|failed\|rc=\|Error" $OUT/gpu_tests.log | cut -c1-300
