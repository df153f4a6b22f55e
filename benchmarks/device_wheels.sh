#!/bin/bash
# Fills .whl/ and .whl-pinned/ (both git-ignored) with the wheels the device scripts install (benchmarks/device_env.sh):
# the GPU machine's image has torch, transformers 5.17, peft, typer and rich, and no network. Run here, from the
# repository root, then pass carry [".whl", ".whl-pinned"] to the device. .whl-pinned holds the transformers this
# repository pins (constraints), which the device scripts install over the image's.
set -euo pipefail
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
download="pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms"
$download -d .whl bitsandbytes==0.50.2 hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19
$download -d .whl-pinned transformers==5.23.0 huggingface_hub==1.33.0 tokenizers==0.23.3
# TRL and accelerate, for benchmarks/dpo_qlora_8b.py only (carry .whl-trl where a script sources it)
$download -d .whl-trl trl==1.16.0 accelerate==1.15.0
pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist only: built here
