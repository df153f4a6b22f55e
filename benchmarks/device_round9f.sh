#!/bin/bash
# round 9, call F (session 9): the pinned stack (constraints.txt: transformers 5.23.0; the image has 5.17) after
# kernels/compile_layers.py put the checkpoint back around each compiled layer on 5.2x. Carry
# [".whl", ".whl-pinned"]. QLoRA and LoRA-with-checkpointing side by side, 2 rounds each; every peftctl row's
# fast-path note says whether C++ launchers are on (no "kernels launched from Python").
source benchmarks/device_env.sh .whl-pinned
print_checkpoint_layout > $OUT/side.log 2>&1
timeout 540 python benchmarks/speed_round4.py --cases qlora,lora_ckpt --rounds 2 --budget-s 520 --models-dir /tmp/m \
  --out $OUT/results/round9_pinned_transformers.json >> $OUT/side.log 2>&1
echo "rc=$?" >> $OUT/side.log
grep -h "^transformers\|^|\|skipping\|rc=\|Error" $OUT/side.log | cut -c1-300
grep -ho '"fast_path": "[^"]*"' $OUT/side.log | sort | uniq -c
