#!/bin/bash
# round 6, call B: side-by-side table after the nf4 path, the sync-free 8-bit step and per-layer code objects;
# QLoRA profile + memory at the peak; the loss-curve test with eager rounding emulated
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
mkdir -p $OUT/results
timeout 320 python benchmarks/speed_round4.py --cases qlora,lora_1b,lora_ckpt --ckpt-layers 24 --budget-s 300 \
  --models-dir /tmp/m --out $OUT/results/round6_table.json > $OUT/table.log 2>&1
echo "rc=$?" >> $OUT/table.log
mkdir -p /tmp/p && ln -sfn /tmp/m/full/llama-3-8b-random /tmp/p/8b
timeout 130 python benchmarks/profile_step.py --cases qlora --memory --models-dir /tmp/p --top 30 > $OUT/profile_qlora.txt 2>&1
echo "rc=$?" >> $OUT/profile_qlora.txt
TORCHINDUCTOR_EMULATE_PRECISION_CASTS=1 timeout 125 python -m pytest -o addopts="" -m "gpu and not multigpu" -p no:logging -p no:cacheprovider -s -rA \
  "tests/gpu/test_fast_path_gpu.py::test_fast_path_follows_the_eager_loss_curve[lora]" > $OUT/curve_emulate_casts.log 2>&1
echo "rc=$?" >> $OUT/curve_emulate_casts.log
grep -h "^|\|skipping\|rc=" $OUT/table.log
grep -h "===\|peak\|GiB\|busy\|Cache Lookup\|Optimizer.step\|rc=" $OUT/profile_qlora.txt | cut -c1-160 | head -40
grep -h "worst step\|passed\|failed\|rc=" $OUT/curve_emulate_casts.log
