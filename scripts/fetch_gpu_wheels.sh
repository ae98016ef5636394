#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels a bare GPU host lacks to run
# scripts/bench.py (Python 3.12, x86_64 Linux, torch + transformers + accelerate already there):
# diffusers and what it needs beyond that host's packages, PyAV for the MP4 stage, ftfy for the
# pipeline's prompt cleaning. --no-deps on purpose: every dependency is named here, so nothing
# the host already has (torch, numpy, huggingface_hub, safetensors, ...) is fetched twice or
# shadowed by another version.
#
#   scripts/fetch_gpu_wheels.sh [WHEEL_DIR]     # default .whl (git-ignored)
#
# Then scripts/gpu_run.sh WHEEL_DIR on the GPU host. The versions are this repository's
# development ones (diffusers 0.42.1, av 18.1.0, ...).
set -euo pipefail

dir="${1:-.whl}"
mkdir -p "$dir"
# name==version; the last field says why it is needed
wheels=(
  "diffusers==0.42.1"        # WanVACEPipeline and the Wan models
  "importlib_metadata==10.2.0"  # diffusers' import-time version checks
  "lazy-importer==0.1.0"     # importlib_metadata's own dependency
  "zipp==4.1.2"              # importlib_metadata's own dependency
  "av==18.1.0"               # PyAV: the MP4 encode (pipelines/media.py)
  "ftfy==6.3.1"              # WanVACEPipeline's prompt cleaning raises without it
  "wcwidth==0.9.4"           # ftfy's dependency
)
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$dir" "${wheels[@]}"

ls -l "$dir"
# The device tool carries at most 64 MiB with the working tree: these are about 42 MiB.
du -ch "$dir"/*.whl | tail -1
