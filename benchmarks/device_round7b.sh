#!/bin/bash
# round 7, call B: the one-call 8-bit optimizer and the compiled cross-entropy chunks on CUDA (tests), then
# QLoRA 8B and the 1B shape side by side with them
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
mkdir -p $OUT/results
timeout 170 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA --durations=0 \
  tests/gpu/test_optim_8bit_gpu.py "tests/gpu/test_chunked_ce_gpu.py::test_compiled_cross_entropy_chunks_equal_the_eager_ones" \
  tests/gpu/test_qlora_cli_gpu.py > $OUT/gpu_tests.log 2>&1
echo "rc=$?" >> $OUT/gpu_tests.log
timeout 230 python benchmarks/speed_round4.py --cases qlora --budget-s 400 --models-dir /tmp/m \
  --out $OUT/results/round7_qlora.json > $OUT/qlora.log 2>&1
echo "rc=$?" >> $OUT/qlora.log
timeout 120 python benchmarks/speed_round4.py --cases lora_1b --budget-s 400 --models-dir /tmp/m \
  --out $OUT/results/round7_1b.json > $OUT/lora_1b.log 2>&1
echo "rc=$?" >> $OUT/lora_1b.log
grep -h "PASSED\|FAILED\|passed\|failed\|rc=\|loss eager\|Error" $OUT/gpu_tests.log | cut -c1-300
grep -h "^|\|skipping\|rc=\|Error" $OUT/qlora.log $OUT/lora_1b.log
