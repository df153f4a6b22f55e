#!/bin/bash
# round 15, call A (written in session 14, not yet run; carry [".whl", ".whl-pinned", ".whl-trl"]; timeout_s 590):
# the 8B QLoRA DPO memory since the preference log-probs are chunked. RESULTS.md "8B QLoRA DPO" measured peftctl at
# 1.46x TRL's tokens/s and 1.36x its peak (9.04 against 6.65 GiB) while peftctl still built both sequences' full fp32
# logits (2 x 1024 x 128256 x 4 bytes = 0.98 GiB) and as much again for their log-softmax. Predicted now: peftctl's
# peak down by about 2 GiB, to ~7 GiB (<= 1.1x TRL's), tokens/s unchanged within 5%. The smoke run (`--smoke`, CPU)
# passes with the pinned transformers 5.23 and trl 1.16 (session 14).
source benchmarks/device_env.sh .whl-pinned .whl-trl  # the wheels: benchmarks/device_wheels.sh
timeout 560 python benchmarks/dpo_qlora_8b.py --out $OUT/results/round15a_dpo.md --json $OUT/results/round15a_dpo.json \
  2>&1 | stamp > $OUT/dpo.log
echo "rc=${PIPESTATUS[0]}" >> $OUT/dpo.log
grep -h "^| \|sanity\|tokens/s\|rc=\|Error" $OUT/dpo.log | cut -c1-250
