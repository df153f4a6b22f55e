#!/bin/bash
# round 10, call A (written in session 9, run in session 10: its three A/B runs hit their 120 s limits while compiling
# cold, only the profile finished; benchmarks/RESULTS.md round 10): on the pinned stack (carry [".whl", ".whl-pinned"]),
# LoRA with checkpointing (round 9: 9.5-9.6k tok/s, 1.39x against transformers + peft's best run): the
# checkpointing flavour A/B (non-reentrant today; transformers' reentrant variant, whose first forward runs an
# inference graph) and combo_kernels, each in a fresh process; then the first profile of the LoRA ckpt step.
source benchmarks/device_env.sh .whl-pinned
print_checkpoint_layout > $OUT/ab.log 2>&1
time_only_ab lora_ckpt 120 "" "--reentrant-checkpointing" "--inductor-config combo_kernels=True"
timeout 140 python benchmarks/profile_step.py --cases lora_ckpt --models-dir /tmp/m --top 25 > $OUT/profile_lora_ckpt.txt 2>&1
echo "rc=$?" >> $OUT/profile_lora_ckpt.txt
grep -h "transformers\|###\|===\|rc=\|Error" $OUT/ab.log | cut -c1-300
grep -h "GPU kernels\|rc=" $OUT/profile_lora_ckpt.txt | cut -c1-300
