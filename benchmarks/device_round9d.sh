#!/bin/bash
# round 9, call D (written in session 8, not yet run): are C++ kernel launchers on for the checkpointed QLoRA step on
# the device's transformers? The fast path keeps Python launchers where the layers' gradient checkpoint is traced
# into the compiled graph (transformers 5.2x checkpoints inside forward; on the CPU, torch 2.13's C++ launcher then
# fails on the checkpoint's RNG-state op). Round 8 measured 0.268 -> 0.225 s with the launcher on; this prints
# the default's fast-path note and step, then those with the gate off (does torch 2.11 on CUDA compile it?).
source benchmarks/device_env.sh
print_checkpoint_layout > $OUT/ab.log 2>&1
time_only_ab qlora 150 "" "--cpp-launchers-always"
grep -h "transformers\|###\|===\|rc=\|Error" $OUT/ab.log | cut -c1-400
