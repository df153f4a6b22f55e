#!/bin/bash
# round 12, call D (carry [".whl", ".whl-pinned"]): acceptance 1's no-checkpointing cases after the fix of the fused
# LoRA branch's mask unpacking (kernels/lora_fused.py: unpack_mask_by_shifts). Call B's no-checkpointing cases peaked
# 6.5-6.8 GiB higher than round 10 (8B LoRA 28.53 vs 22.06 GiB, 1B shape 17.12 vs 10.30): forward and backward
# unpacked the byte-drawn mask through the same ops, which the compiler merged into one node whose bool output it
# kept, with every projection's dropped-out copy of x (reproduced on the CPU: tests/unit/test_lora_fused.py). What
# the device budget left allows: the 8B LoRA pair, then the 1B shape's if time remains.
source benchmarks/device_env.sh .whl-pinned
print_checkpoint_layout > $OUT/table.log 2>&1
timeout 150 python benchmarks/speed_round4.py --cases lora,lora_1b --rounds 1 --budget-s 140 \
  --models-dir /tmp/m --out $OUT/results/round12d_table.json 2>&1 | stamp >> $OUT/table.log
echo "rc=${PIPESTATUS[0]}" >> $OUT/table.log
grep -h "transformers \|^ *[0-9.]* |\|skipping\|rc=\|Error" $OUT/table.log | cut -c1-300
grep -ho '"peak_memory_gib": [0-9.]*\|"stack": "[a-z]*", "case": "[a-z_0-9]*"' $OUT/table.log
