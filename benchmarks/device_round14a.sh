#!/bin/bash
# round 14, call A (written in session 13, not yet run; carry [".whl", ".whl-pinned"]): what the first layer's
# shared graph costs and saves. Since session 13 the fast path has the input embeddings' output require a gradient
# whenever gradients are on (models/modules.py: input_embeddings_require_grad): every decoder layer then runs one
# compiled graph in training and one under no_grad, where the first layer had one of its own in each mode (CPU count:
# tests/unit/test_fast_path_config.py). Predicted: 8B LoRA without checkpointing pays the first layer's input
# gradient, 5 of its 7 projections' input gradients, about 1% of the step (0.141 s -> ~0.142 s), and compiles one
# graph fewer (15-40 s of a cold start, by host); the checkpointed cases already paid it (transformers' checkpointing
# hook) and save one evaluation graph. 1) the 8B LoRA step with and without (--first-layer-graph: as before), each
# in a fresh process; 2) the LoRA loss-curve test with its recompiles logged (round 12c: 6 recompiles, 7 graphs;
# predicted now, with batches padded to a multiple of 8 and the length dynamic from the first compile as well: 1
# recompile, for the no-grad evaluation, 2 graphs; tests/unit/test_fast_path_config.py counts that on the CPU).
# Two parts, one device call each (a call may run 600 s): `bash benchmarks/device_round14a.sh ab`, then `... curve`.
source benchmarks/device_env.sh .whl-pinned  # the wheels: benchmarks/device_wheels.sh
if [ "${1:-}" = ab ]; then
  time_only_ab lora 270 "" "--first-layer-graph"
  grep -h "###\|median\|peak\|rc=" $OUT/ab.log | cut -c1-250
  exit 0
fi
TORCH_LOGS=recompiles timeout 540 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging \
  -p no:cacheprovider -s -rA "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[lora]" \
  2>&1 | stamp > $OUT/curve_lora.log
echo "rc=${PIPESTATUS[0]}" >> $OUT/curve_lora.log
echo "### curve_lora: $(grep -c 'Recompiling function forward' $OUT/curve_lora.log) recompiles of the decoder layer"
grep -h "worst\|PASSED\|FAILED\|passed\|failed\|rc=\|Error" $OUT/curve_lora.log | cut -c1-250
