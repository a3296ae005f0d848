#!/usr/bin/env bash
# Run HERE, on a machine where pip reaches a package registry, before a GPU run on a machine that has none:
# puts into DIR (default .whl/, git-ignored) the wheels of mmalign's pure-Python dependencies that the
# lent GPU image lacks (DeepSpeed for the trainer, TRL and datasets for the TRL comparison, open_clip for
# `mmalign hardness`, Liger-Kernel for its chunked DPO loss), for that image's Python (3.12, x86-64).
# benchmarks/gpu.sh installs them from there (--wheels=DIR, or .whl/ when it exists) into a private
# folder on PYTHONPATH; the image's own packages are not touched.
#
#   benchmarks/gpu_wheels.sh [DIR]        # then carry DIR with the run (about 10 MB)
#
# The versions are the ones the CPU suite passes with against torch 2.11 / transformers 5.17 (the image's).
# The GPU image already holds their other needs (accelerate, pyarrow, pandas, fsspec, xxhash, msgpack,
# psutil, py-cpuinfo, einops, ninja, regex, timm, huggingface-hub, ...): see the device's package list.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
PYVER=${MMALIGN_WHEELS_PYTHON:-3.12}
mkdir -p "$DIR"

# binary wheels for the GPU image's Python and platform
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
  hjson==3.1.0 pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0 liger-kernel==0.8.5 peft==0.21.2

# DeepSpeed is published as source only: build its pure-Python wheel (no prebuilt ops; they JIT-compile)
if ! ls "$DIR"/deepspeed-0.19.8-*.whl > /dev/null 2>&1; then
  DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" deepspeed==0.19.8
fi
du -sh "$DIR"
ls "$DIR"
