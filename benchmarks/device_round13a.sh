#!/bin/bash
# round 13, call A (written in session 12, not yet run; carry [".whl", ".whl-pinned"]; run after device_round12d.sh):
# are round 12b's fast transformers + peft steps the host or the run? Round 12b measured peft's QLoRA step at 0.398 s
# and its LoRA-ckpt step at 0.298 s (rounds 8-9: 0.536-0.651 s and 0.299-0.484 s), which put QLoRA at 1.81x and
# LoRA ckpt at 1.45x. Two rounds of both cases, each stack in a fresh process, order alternating; every record now
# names the host CPU (speed_round4.py: environment()), so ratios can be read per host.
source benchmarks/device_env.sh .whl-pinned
grep -m1 "model name" /proc/cpuinfo > $OUT/pairs.log
timeout 540 python benchmarks/speed_round4.py --cases qlora,lora_ckpt --rounds 2 --fresh-process --budget-s 520 \
  --models-dir /tmp/m --out $OUT/results/round13a_pairs.json 2>&1 | stamp >> $OUT/pairs.log
echo "rc=${PIPESTATUS[0]}" >> $OUT/pairs.log
grep -h "model name\|^ *[0-9.]* |\|skipping\|rc=\|Error" $OUT/pairs.log | cut -c1-300
