#!/bin/bash
# round 11, call D (written in session 10, not yet run; carry [".whl", ".whl-pinned"]): the byte-at-a-time dropout
# mask draw of the fused LoRA branch (session 10, kernels/lora_fused.py: DRAW_MASK_BYTES, off until this passes),
# never run on a GPU. First the CUDA unit test of the fused branch under both draws (the compiled branch keeps
# ~1 - p and its backward uses the forward's mask; the byte draw through Inductor's Triton randint + bucketize),
# then the LoRA-ckpt step A/B, today's per-element draw against --byte-masks, each in a fresh process with room
# for a cold compile.
# (round 11 made the byte draw the only one and removed --byte-masks: this script is the record of that A/B)
source benchmarks/device_env.sh .whl-pinned
timeout 150 python -m pytest -o addopts="" -m gpu -p no:logging -p no:cacheprovider -s -rA \
  "tests/gpu/test_fast_path_gpu.py::test_fused_lora_branch_on_cuda_matches_the_unfused_math_and_compiles_without_graph_breaks" \
  > $OUT/fused_branch_test.log 2>&1
echo "rc=$?" >> $OUT/fused_branch_test.log
time_only_ab lora_ckpt 200 "" "--byte-masks"
grep -h "PASSED\|FAILED\|passed\|failed\|rc=\|Error" $OUT/fused_branch_test.log | cut -c1-300
grep -h "###\|===\|rc=\|Error" $OUT/ab.log | cut -c1-300
