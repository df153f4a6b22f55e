#!/bin/bash
# round 10, call D (session 10): acceptance 1's whole table in one run on the pinned stack (carry [".whl",
# ".whl-pinned"]): LoRA without and with checkpointing, DoRA, the 1B shape and QLoRA, side by side with
# transformers + peft, one round, order alternating case to case (LoRA without checkpointing, DoRA and 1B were last
# measured on transformers 5.17 in rounds 4-7). QLoRA last: transformers + peft's QLoRA run leaves 3.42 GiB allocated.
source benchmarks/device_env.sh .whl-pinned
print_checkpoint_layout > $OUT/table.log 2>&1
timeout 555 python benchmarks/speed_round4.py --cases lora,dora,lora_1b,lora_ckpt,qlora --rounds 1 --budget-s 520 \
  --models-dir /tmp/m --out $OUT/results/round10_table.json >> $OUT/table.log 2>&1
echo "rc=$?" >> $OUT/table.log
grep -h "^transformers\|^|\|skipping\|rc=\|Error" $OUT/table.log | cut -c1-300
grep -ho '"fast_path": "[^"]*"\|"allocated_before_gib": [0-9.]*' $OUT/table.log | sort | uniq -c
