#!/bin/bash
# round 12, call B (written in session 11, not yet run; carry [".whl", ".whl-pinned"]): acceptance 1's table again on
# the shipping defaults since round 11 (speed_round4 now passes train.kernels=auto, which includes the fused LoRA
# branch; byte-at-a-time dropout masks; the loss forward without a key/value cache, so the compiled layers share
# their graphs: round 10 spent 243 s compiling the 8B no-checkpointing shape cold). Side by side with transformers +
# peft, one round, order alternating case to case, QLoRA last (peft's QLoRA run leaves 3.4 GiB allocated). The
# timestamps show how long the first (cold) compile takes now.
source benchmarks/device_env.sh .whl-pinned
print_checkpoint_layout > $OUT/table.log 2>&1
timeout 555 python benchmarks/speed_round4.py --cases lora,dora,lora_1b,lora_ckpt,qlora --rounds 1 --budget-s 520 \
  --models-dir /tmp/m --out $OUT/results/round12_table.json 2>&1 | stamp >> $OUT/table.log
echo "rc=${PIPESTATUS[0]}" >> $OUT/table.log
grep -h "transformers \|^ *[0-9.]* |\|skipping\|rc=\|Error" $OUT/table.log | cut -c1-300
grep -ho '"fast_path": "[^"]*"\|"allocated_before_gib": [0-9.]*' $OUT/table.log | sort | uniq -c
