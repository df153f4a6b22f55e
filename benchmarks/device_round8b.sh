#!/bin/bash
# round 8, call B: acceptance 3's noise floor for QLoRA (eager vs eager under other valid bf16 roundings, next
# to fast vs eager), then QLoRA side by side over 2 rounds with Inductor cpp_wrapper (call A: step 0.268 -> 0.225 s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
mkdir -p $OUT/results
timeout 220 python benchmarks/curve_noise_floor.py --cases qlora --out $OUT/results/round8_curve_noise_floor.json \
  > $OUT/noise.log 2>&1
echo "rc=$?" >> $OUT/noise.log
timeout 330 python benchmarks/speed_round4.py --cases qlora --rounds 2 --budget-s 400 --models-dir /tmp/m --inductor-config cpp_wrapper=True \
  --out $OUT/results/round8_qlora_rounds.json > $OUT/qlora.log 2>&1
echo "rc=$?" >> $OUT/qlora.log
grep -h "vs\|rc=\|Error" $OUT/noise.log | cut -c1-300
grep -h "^|\|skipping\|rc=\|Error" $OUT/qlora.log
