#!/bin/bash
# round 9, call A (written in session 8, not yet run): the 256k `--max-context` trial alone (acceptance 2). Round 8's
# re-run hit the nf4 backward's double read of its saved tensors (fixed), then its 330 s limit on a fresh machine:
# writing the 8B model (~30 s), loading and quantizing it, compiling at 256k and one ~220 s step need the whole call.
source benchmarks/device_env.sh
timeout 570 python benchmarks/speed_round4.py --cases maxctx --max-ctx-start 262144 --max-ctx-limit 262144 \
  --max-ctx-granularity 262144 --models-dir /tmp/m --out $OUT/results/round9_maxctx_256k.json > $OUT/maxctx.log 2>&1
echo "rc=$?" >> $OUT/maxctx.log
grep -h "^|\|skipping\|rc=\|Error\|fits" $OUT/maxctx.log | cut -c1-300
