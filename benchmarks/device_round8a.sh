#!/bin/bash
# round 8, call A (written in session 7, not yet run): A/Bs of Inductor options on the 8B QLoRA step (the
# GPU idles ~90 ms per step in the compiled layers' Python wrappers: ~7,000 launches, ~1,200 of them casts),
# each in a fresh process, then QLoRA side by side over 2 rounds (peft's QLoRA figure varies between calls)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
mkdir -p $OUT/results
for flags in "" "--inductor-config combo_kernels=True" "--inductor-config cpp_wrapper=True"; do
  echo "### flags: ${flags:-none}" >> $OUT/ab.log
  timeout 170 python benchmarks/profile_step.py --cases qlora --models-dir /tmp/m --time-only --timed-steps 8 $flags \
    2>&1 | grep -v "Loading weights\|Writing model" >> $OUT/ab.log
  echo "rc=${PIPESTATUS[0]}" >> $OUT/ab.log
done
timeout 200 python benchmarks/speed_round4.py --cases qlora --rounds 2 --budget-s 400 --models-dir /tmp/m \
  --out $OUT/results/round8_qlora_rounds.json > $OUT/qlora.log 2>&1
echo "rc=$?" >> $OUT/qlora.log
grep -h "###\|===\|rc=\|Error" $OUT/ab.log | cut -c1-300
grep -h "^|\|skipping\|rc=\|Error" $OUT/qlora.log
