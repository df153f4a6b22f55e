#!/bin/bash
# round 11, call G (carry [".whl", ".whl-pinned"]): after call F found that every training forward wrote a key/value
# cache, so the compiled decoder layers compiled one graph per layer (guards on each layer's cache slot and
# layer_idx; 16 graphs for the 4-layer test model, 252 s for a 50-step run), the loss forward now passes
# use_cache=False. First the 8B LoRA step without checkpointing, alone on the GPU (round 10: 243 s of cold
# compiling, step 0.150 s; now with the byte-draw dropout masks, the default from this round), every line timestamped; then the two curve tests that call A could not finish in 270 s.
source benchmarks/device_env.sh .whl-pinned
TORCH_LOGS=recompiles timeout 150 python benchmarks/profile_step.py --cases lora --models-dir /tmp/m --time-only \
  --timed-steps 8 --byte-masks 2>&1 | grep -v "Loading weights\|Writing model\|__recompiles\]     -" | stamp > $OUT/lora_no_ckpt.log
echo "rc=${PIPESTATUS[0]}" >> $OUT/lora_no_ckpt.log
timeout 170 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA \
  --durations=0 "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[dora]" \
  tests/gpu/test_fast_path_gpu.py::test_fast_path_with_dropout_follows_the_eager_loss_curve 2>&1 | stamp \
  > $OUT/gpu_tests_curves.log
cat $OUT/lora_no_ckpt.log | cut -c1-250
grep -h "worst step\|PASSED\|FAILED\|passed\|failed\|s call\|Error" $OUT/gpu_tests_curves.log | cut -c1-300
