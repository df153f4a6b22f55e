#!/bin/bash
# round 11, call F (carry [".whl", ".whl-pinned"]): call A (device_round11a.sh) ran the DoRA loss-curve test and the
# dropout loss-curve test for 270 s each and both were killed with nothing printed (the test's train() output
# goes to capsys). Here the same runs go through `python -m peftctl train` (what the tests call), every output line
# timestamped, with TORCH_LOGS=recompiles, and a Python stack dump of every thread (faulthandler, SIGABRT from
# `timeout`) if a run outlives its limit: slow or stuck, and where. The curves' deviations are then computed as the
# tests compute them (benchmarks/curve_check.py). Alongside, in parallel (the tiny runs leave the GPU mostly idle;
# nothing here is timed against anything): the QLoRA CLI GPU tests and the one-step adapter-gradient tests.
source benchmarks/device_env.sh .whl-pinned
export PYTHONFAULTHANDLER=1
ARCH="model.arch.hidden_size=512 model.arch.intermediate_size=1536 model.arch.num_hidden_layers=4
  model.arch.num_attention_heads=8 model.arch.num_key_value_heads=4"
SCHEDULE="train.max_steps=50 train.batch_size=8 train.log_every=1 train.save_every=0 train.eval_every=0
  train.device=cuda dataset.max_samples=400 train.lr=2e-4 train.precision=bf16"
FP32="model.dtype=float32 train.precision=fp32 train.kernels=off"
# run NAME LIMIT_S OVERRIDES...: one training run, its log in $OUT/NAME.log, its metrics in $OUT/runs/NAME
run() {
  local name=$1 limit=$2
  shift 2
  TORCH_LOGS=recompiles,graph_breaks timeout -s ABRT "$limit" python -m peftctl train recipe=tiny_lora $ARCH \
    $SCHEDULE "$@" output_dir=/tmp/runs/$name 2>&1 | stamp > $OUT/$name.log
  mkdir -p $OUT/runs/$name && cp /tmp/runs/$name/metrics.jsonl $OUT/runs/$name/ 2>/dev/null
}
(
  run dora_fp32 100 adapter.use_dora=true adapter.lora_dropout=0 $FP32
  run dora_off 100 adapter.use_dora=true adapter.lora_dropout=0 model.dtype=bfloat16 train.kernels=off
  run dora_auto 300 adapter.use_dora=true adapter.lora_dropout=0 model.dtype=bfloat16 train.kernels=auto
) &
(
  run dropout_off 100 adapter.lora_dropout=0.05 model.dtype=bfloat16 train.kernels=off
  run dropout_fused 300 adapter.lora_dropout=0.05 model.dtype=bfloat16 train.kernels=fused
) &
(timeout -s ABRT 420 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s \
  -rA --durations=0 tests/gpu/test_qlora_cli_gpu.py > $OUT/gpu_tests_cli.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests_cli.log) &
(timeout -s ABRT 420 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s \
  -rA --durations=0 tests/gpu/test_fast_path_gpu.py -k test_one_step_adapter_gradients > $OUT/gpu_tests_grads.log 2>&1
  echo "rc=$?" >> $OUT/gpu_tests_grads.log) &
wait
python benchmarks/curve_check.py $OUT/runs | tee $OUT/curve_check.log
for f in $OUT/dora_auto.log $OUT/dropout_fused.log; do
  echo "== $f"; grep -v "^ *[0-9.]* *step\b" $f | head -40 | cut -c1-250; tail -3 $f | cut -c1-250
done
grep -h "fp32\|PASSED\|FAILED\|passed\|failed\|rc=\|Error" $OUT/gpu_tests_cli.log $OUT/gpu_tests_grads.log | cut -c1-250
