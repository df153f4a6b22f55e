#!/bin/bash
# round 7, call C: the 1B shape side by side (compiled cross-entropy chunks), QLoRA 8B side by side again
# (a second transformers + peft baseline: it measured 4,206 and 2,733 tok/s in two calls), the QLoRA CLI tests
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
mkdir -p $OUT/results
timeout 200 python benchmarks/speed_round4.py --cases lora_1b --budget-s 400 --models-dir /tmp/m \
  --out $OUT/results/round7_1b.json > $OUT/lora_1b.log 2>&1
echo "rc=$?" >> $OUT/lora_1b.log
timeout 150 python benchmarks/speed_round4.py --cases qlora --budget-s 400 --models-dir /tmp/m \
  --out $OUT/results/round7_qlora_2.json > $OUT/qlora.log 2>&1
echo "rc=$?" >> $OUT/qlora.log
timeout 190 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA --durations=0 \
  tests/gpu/test_qlora_cli_gpu.py > $OUT/gpu_tests.log 2>&1
echo "rc=$?" >> $OUT/gpu_tests.log
grep -h "^|\|skipping\|rc=\|Error" $OUT/lora_1b.log $OUT/qlora.log
grep -h "PASSED\|FAILED\|passed\|failed\|rc=\|Error" $OUT/gpu_tests.log | cut -c1-300
