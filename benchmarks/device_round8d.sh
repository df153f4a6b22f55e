#!/bin/bash
# round 8, call D: the 256k `--max-context` trial again (call C found NF4Linear's backward reading
# ctx.saved_tensors twice, which non-reentrant checkpointing of the tiled MLP refuses; fixed), then the
# loss-curve tests with the compiled graphs' kernels launched from C++ (now the fast path's default)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
mkdir -p $OUT/results
timeout 330 python benchmarks/speed_round4.py --cases maxctx --max-ctx-start 262144 --max-ctx-limit 262144 \
  --max-ctx-granularity 262144 --models-dir /tmp/m --out $OUT/results/round8_maxctx_256k.json > $OUT/maxctx.log 2>&1
echo "rc=$?" >> $OUT/maxctx.log
timeout 230 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA --durations=0 \
  "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[qlora]" \
  "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[lora]" > $OUT/gpu_tests.log 2>&1
echo "rc=$?" >> $OUT/gpu_tests.log
grep -h "^|\|skipping\|rc=\|Error\|fits" $OUT/maxctx.log | cut -c1-300
grep -h "worst step\|PASSED\|FAILED\|passed\|failed\|rc=\|Error" $OUT/gpu_tests.log | cut -c1-300
