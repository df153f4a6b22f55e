#!/bin/bash
# round 9, call C (written in session 8, not yet run): LoRA with checkpointing is 1.47x (target 1.5x; round 8).
# A/B of the checkpointing flavour on the compiled 8B step: non-reentrant (today: the first forward runs the
# compiled training graph and the checkpoint drops what it saves) vs transformers' reentrant variant (the first
# forward runs under no_grad: an inference graph); combo_kernels on LoRA. Each in a fresh process. Then the
# first profile of the LoRA ckpt step (where its ~0.215 s go).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
python -c "import transformers.modeling_layers as m; print('transformers checkpoints', 'forward (inside a compiled call)' if '__init_subclass__' in vars(m.GradientCheckpointingLayer) else '__call__ (around a compiled call)')" > $OUT/ab.log 2>&1
for flags in "" "--reentrant-checkpointing" "--inductor-config combo_kernels=True"; do
  echo "### flags: ${flags:-none}" >> $OUT/ab.log
  timeout 120 python benchmarks/profile_step.py --cases lora_ckpt --models-dir /tmp/m --time-only --timed-steps 8 $flags \
    2>&1 | grep -v "Loading weights\|Writing model" >> $OUT/ab.log
  echo "rc=${PIPESTATUS[0]}" >> $OUT/ab.log
done
timeout 140 python benchmarks/profile_step.py --cases lora_ckpt --models-dir /tmp/m --top 25 > $OUT/profile_lora_ckpt.txt 2>&1
echo "rc=$?" >> $OUT/profile_lora_ckpt.txt
grep -h "transformers\|###\|===\|rc=\|Error" $OUT/ab.log | cut -c1-300
grep -h "GPU kernels\|rc=" $OUT/profile_lora_ckpt.txt | cut -c1-300
