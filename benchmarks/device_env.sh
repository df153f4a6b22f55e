#!/bin/bash
# Sourced by the device_round9*.sh and later scripts (run from the repository root on the device, $OUT set):
# installs the carried wheels (.whl, plus the folders given as arguments) and sets the environment;
# defines the helpers those scripts share.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl $(for dir in "$@"; do echo "$dir"/*.whl; done) >/dev/null 2>&1
# unbuffered: a process that a `timeout` kills still leaves everything it printed in the log (round 10 lost two
# pytest runs' output that way)
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT/results"

# stamp: every line of standard input, prefixed with the seconds since it started
stamp() { python -u -c 'import sys, time
t = time.time()
for line in sys.stdin: print(f"{time.time() - t:7.1f} {line}", end="", flush=True)'; }

# transformers' version, and whether its GradientCheckpointingLayer checkpoints around __call__ (outside a compiled
# layer) or from inside forward (where peftctl.kernels.compile_layers compiles the forward it wraps instead)
print_checkpoint_layout() {
  python -c "import transformers, transformers.modeling_layers as m; print('transformers', transformers.__version__, \
'checkpoints', '__call__ (around a compiled layer)' if '__call__' in vars(m.GradientCheckpointingLayer) \
else 'inside forward (the fast path compiles the forward it wraps)')"
}

# time_only_ab CASE TIMEOUT_S FLAGS...: each FLAGS argument (split on spaces; "" for none) in a fresh process,
# `profile_step.py --time-only` (median of 8 unprofiled steps), appended to $OUT/ab.log
time_only_ab() {
  local case=$1 limit=$2
  shift 2
  for flags in "$@"; do
    echo "### $case, flags: ${flags:-none}" >> "$OUT/ab.log"
    timeout "$limit" python benchmarks/profile_step.py --cases "$case" --models-dir /tmp/m --time-only --timed-steps 8 \
      $flags 2>&1 | grep -v "Loading weights\|Writing model" >> "$OUT/ab.log"
    echo "rc=${PIPESTATUS[0]}" >> "$OUT/ab.log"
  done
}
