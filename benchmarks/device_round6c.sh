#!/bin/bash
# round 6, call C: QLoRA side by side (nf4 path, sync-free 8-bit step, per-layer code objects, eager rounding),
# the loss-curve test for QLoRA and DoRA with eager rounding on by default, then the 1B shape side by side
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
mkdir -p $OUT/results
timeout 250 python benchmarks/speed_round4.py --cases qlora --budget-s 400 --models-dir /tmp/m \
  --out $OUT/results/round6_qlora.json > $OUT/qlora.log 2>&1
echo "rc=$?" >> $OUT/qlora.log
timeout 190 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA \
  "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[qlora]" \
  "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[dora]" > $OUT/curve.log 2>&1
echo "rc=$?" >> $OUT/curve.log
timeout 100 python benchmarks/speed_round4.py --cases lora_1b --budget-s 400 --models-dir /tmp/m \
  --out $OUT/results/round6_1b.json > $OUT/lora_1b.log 2>&1
echo "rc=$?" >> $OUT/lora_1b.log
grep -h "^|\|skipping\|rc=" $OUT/qlora.log $OUT/lora_1b.log
grep -h "worst step\|passed\|failed\|rc=\|Error" $OUT/curve.log | cut -c1-400
