#!/bin/bash
# round 11, call C (written in session 9 as round 10 call B; not yet run): LoRA with checkpointing, three rounds with each stack in its
# own process (--fresh-process), on the pinned stack (carry [".whl", ".whl-pinned"]); the peft rows now carry min /
# max step and the process's CPU seconds per step, every row the machine's load average (is its 0.30-0.48 s step
# host-bound, or is something else using the CPU?)
source benchmarks/device_env.sh .whl-pinned
timeout 560 python benchmarks/speed_round4.py --cases lora_ckpt --rounds 3 --fresh-process --budget-s 550 \
  --models-dir /tmp/m --out $OUT/results/round10_lora_ckpt_fresh.json > $OUT/fresh.log 2>&1
echo "rc=$?" >> $OUT/fresh.log
grep -h "^|\|skipping\|rc=\|Error" $OUT/fresh.log | cut -c1-300
grep -ho '"median_step_s": [0-9.]*, "min_step_s": [0-9.]*, "max_step_s": [0-9.]*\|"median_host_cpu_s": [0-9.]*\|"load_average_1min": [0-9.]*' $OUT/fresh.log
