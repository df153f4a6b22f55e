#!/bin/bash
# round 9, call H (session 9): one more round of QLoRA and LoRA-with-checkpointing side by side on the pinned stack
# (carry [".whl", ".whl-pinned"]), now with each run's `allocated_before_gib` (what the run before it in the process
# left allocated, which counts in the next run's peak: round 9 call F's second runners peaked 2.5-3.4 GiB higher)
source benchmarks/device_env.sh .whl-pinned
timeout 250 python benchmarks/speed_round4.py --cases qlora,lora_ckpt --rounds 1 --budget-s 240 --models-dir /tmp/m \
  --out $OUT/results/round9_pinned_transformers_h.json > $OUT/side_h.log 2>&1
echo "rc=$?" >> $OUT/side_h.log
grep -h "^|\|skipping\|rc=\|Error" $OUT/side_h.log | cut -c1-300
grep -ho '"stack": "[a-z]*", "case": "[a-z_]*"\|"allocated_before_gib": [0-9.]*\|"peak_memory_gib": [0-9.]*' $OUT/side_h.log
