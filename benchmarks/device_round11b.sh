#!/bin/bash
# round 11, call B (written in session 10, not yet run; carry [".whl", ".whl-pinned"]): the QLoRA CLI GPU tests
# (train, eval under no_grad, merge, DPO) on the pinned stack (round 10's call C gave them 200 s: killed, output
# buffered; on 5.17 they took 108 s with a warm machine), then one more LoRA-with-checkpointing pair (round 10's
# call D did not reach it; QLoRA has three pairs on this stack), each stack in its own process.
source benchmarks/device_env.sh .whl-pinned
timeout 300 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA \
  --durations=0 tests/gpu/test_qlora_cli_gpu.py > $OUT/gpu_tests_cli.log 2>&1
echo "rc=$?" >> $OUT/gpu_tests_cli.log
timeout 250 python benchmarks/speed_round4.py --cases lora_ckpt --rounds 1 --fresh-process --budget-s 240 \
  --models-dir /tmp/m --out $OUT/results/round11_pairs.json > $OUT/pairs.log 2>&1
echo "rc=$?" >> $OUT/pairs.log
grep -h "PASSED\|FAILED\|passed\|failed\|rc=\|Error" $OUT/gpu_tests_cli.log | cut -c1-300
grep -h "^|\|skipping\|rc=\|Error" $OUT/pairs.log | cut -c1-300
