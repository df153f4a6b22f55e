#!/bin/bash
# round 6, call A: GPU tests after the offload fix and the nf4 path; QLoRA profile + memory at the peak
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.used --format=csv > $OUT/gpu.txt
timeout 330 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA --durations=0 \
  tests/gpu/test_nf4_gpu.py tests/gpu/test_chunked_ce_gpu.py tests/gpu/test_bench_gpu.py tests/gpu/test_qlora_cli_gpu.py \
  "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve" > $OUT/gpu_tests.log 2>&1
echo "gpu tests rc=$?" >> $OUT/gpu_tests.log
TORCHINDUCTOR_EMULATE_PRECISION_CASTS=1 timeout 150 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA \
  "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve" > $OUT/curve_emulate_casts.log 2>&1
echo "rc=$?" >> $OUT/curve_emulate_casts.log
timeout 300 python benchmarks/profile_step.py --cases qlora --memory --models-dir /tmp/m --top 30 > $OUT/profile_qlora_nf4.txt 2>&1
echo "rc=$?" >> $OUT/profile_qlora_nf4.txt
tail -c 3000 $OUT/gpu_tests.log
grep -h "worst step\|passed\|failed" $OUT/curve_emulate_casts.log
grep -h "===\|peak\|GiB\|busy" $OUT/profile_qlora_nf4.txt | head -40
