#!/bin/bash
# round 9, call C (written in session 8, not yet run): LoRA with checkpointing is 1.47x (target 1.5x; round 8).
# A/B of the checkpointing flavour on the compiled 8B step: non-reentrant (today: the first forward runs the
# compiled training graph and the checkpoint drops what it saves) vs transformers' reentrant variant (the first
# forward runs under no_grad: an inference graph); combo_kernels on LoRA. Each in a fresh process. Then the
# first profile of the LoRA ckpt step (where its ~0.215 s go).
source benchmarks/device_env.sh
print_checkpoint_layout > $OUT/ab.log 2>&1
time_only_ab lora_ckpt 120 "" "--reentrant-checkpointing" "--inductor-config combo_kernels=True"
timeout 140 python benchmarks/profile_step.py --cases lora_ckpt --models-dir /tmp/m --top 25 > $OUT/profile_lora_ckpt.txt 2>&1
echo "rc=$?" >> $OUT/profile_lora_ckpt.txt
grep -h "transformers\|###\|===\|rc=\|Error" $OUT/ab.log | cut -c1-300
grep -h "GPU kernels\|rc=" $OUT/profile_lora_ckpt.txt | cut -c1-300
