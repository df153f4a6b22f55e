#!/bin/bash
# round 9, call E (written in session 8, not yet run): the fast path on the *pinned* transformers (constraints.txt:
# 5.23.0; the device image has 5.17, on which rounds 1-8 ran). Carry [".whl", ".whl-pinned"]; .whl-pinned holds
# transformers 5.23.0, huggingface_hub 1.33.0, tokenizers 0.23.3 (`pip download --no-deps` of the pinned versions).
# 5.2x checkpoints inside forward, so the compiled layers trace the checkpoint: the QLoRA step's fast-path note,
# its time, and QLoRA side by side on this stack.
source benchmarks/device_env.sh .whl-pinned
print_checkpoint_layout > $OUT/ab.log 2>&1
time_only_ab qlora 150 ""
timeout 300 python benchmarks/speed_round4.py --cases qlora --rounds 2 --budget-s 400 --models-dir /tmp/m \
  --out $OUT/results/round9_qlora_pinned_transformers.json > $OUT/qlora.log 2>&1
echo "rc=$?" >> $OUT/qlora.log
grep -h "transformers\|===\|rc=\|Error" $OUT/ab.log | cut -c1-400
grep -h "^|\|skipping\|rc=\|Error" $OUT/qlora.log
