#!/bin/bash
# round 7, call A: where the QLoRA and 1B steps wait (idle-gap table), QLoRA memory at the peak, and the
# loss-curve tests for QLoRA (with the <=1536-token bitsandbytes dispatch) and DoRA, and nf4's short calls
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
timeout 130 python benchmarks/profile_step.py --cases lora_1b --models-dir /tmp/m --top 25 > $OUT/profile_1b.txt 2>&1
echo "rc=$?" >> $OUT/profile_1b.txt
timeout 200 python benchmarks/profile_step.py --cases qlora --memory --models-dir /tmp/m --top 25 > $OUT/profile_qlora.txt 2>&1
echo "rc=$?" >> $OUT/profile_qlora.txt
timeout 230 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA --durations=0 \
  tests/gpu/test_nf4_gpu.py \
  "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[qlora]" \
  "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[dora]" > $OUT/gpu_tests.log 2>&1
echo "rc=$?" >> $OUT/gpu_tests.log
grep -h "worst step\|passed\|failed\|rc=\|Error" $OUT/gpu_tests.log | cut -c1-300
tail -n 5 $OUT/profile_1b.txt $OUT/profile_qlora.txt
