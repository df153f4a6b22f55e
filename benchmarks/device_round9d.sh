#!/bin/bash
# round 9, call D (written in session 8, not yet run): are C++ kernel launchers on for the checkpointed QLoRA step on
# the device's transformers? The fast path keeps Python launchers where the layers' gradient checkpoint is traced
# into the compiled graph (transformers 5.2x checkpoints inside forward; on the CPU, torch 2.13's C++ launcher then
# fails on the checkpoint's RNG-state op). Round 8 measured 0.268 -> 0.225 s with the launcher on; this prints
# the default's fast-path note and step, then those with the gate off (does torch 2.11 on CUDA compile it?).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
python -c "import transformers.modeling_layers as m; print('transformers checkpoints', 'forward (inside a compiled call)' if '__init_subclass__' in vars(m.GradientCheckpointingLayer) else '__call__ (around a compiled call)')" > $OUT/ab.log 2>&1
for flags in "" "--cpp-launchers-always"; do
  echo "### flags: ${flags:-none}" >> $OUT/ab.log
  timeout 150 python benchmarks/profile_step.py --cases qlora --models-dir /tmp/m --time-only --timed-steps 8 $flags \
    2>&1 | grep -v "Loading weights\|Writing model" >> $OUT/ab.log
  echo "rc=${PIPESTATUS[0]}" >> $OUT/ab.log
done
grep -h "transformers\|###\|===\|rc=\|Error" $OUT/ab.log | cut -c1-400
