#!/bin/bash
# round 8, call C: long context with the fixed offloader (round 5's figures had the sharing bug): 64k tokens
# with and without offloading, then the 256k `--max-context` trial under an 80 GiB cap
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
mkdir -p $OUT/results
timeout 220 python benchmarks/speed_round4.py --cases offload64k --models-dir /tmp/m \
  --out $OUT/results/round8_long.json > $OUT/long.log 2>&1
echo "rc=$?" >> $OUT/long.log
timeout 350 python benchmarks/speed_round4.py --cases maxctx --max-ctx-start 262144 --max-ctx-limit 262144 \
  --max-ctx-granularity 262144 --models-dir /tmp/m --out $OUT/results/round8_maxctx_256k.json > $OUT/maxctx.log 2>&1
echo "rc=$?" >> $OUT/maxctx.log
grep -h "^|\|skipping\|rc=\|Error\|fits\|GiB" $OUT/long.log $OUT/maxctx.log | cut -c1-300
