#!/bin/bash
# round 9, call I (session 9): one LoRA-with-checkpointing pair with each stack in its own process
# (--fresh-process), on the pinned stack (carry [".whl", ".whl-pinned"]); the last ~5 device minutes of the session
source benchmarks/device_env.sh .whl-pinned
timeout 220 python benchmarks/speed_round4.py --cases lora_ckpt --rounds 1 --fresh-process --budget-s 210 \
  --models-dir /tmp/m --out $OUT/results/round9_lora_ckpt_fresh.json > $OUT/fresh.log 2>&1
echo "rc=$?" >> $OUT/fresh.log
grep -h "^|\|skipping\|rc=\|Error" $OUT/fresh.log | cut -c1-300
