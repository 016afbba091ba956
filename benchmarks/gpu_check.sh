#!/usr/bin/env bash
# One short GPU check (meant to finish in under 6 minutes) for a machine with one NVIDIA GPU and no internet:
# rollouts against HF generate, log-prob peak memory, SFT MFU (plain PyTorch and DeepSpeed), an RL step split.
# It needs the wheels the GPU image lacks, carried in wheels/ (make them on a machine with PyPI):
#   pip wheel --no-deps deepspeed==0.19.8 -w wheels
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --implementation cp pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection hjson -d wheels
# Results: printed, docs/gpu_check_<gpu>.json, and ${OUT:-outputs}/gpu_check.json
# On a CPU machine, `python benchmarks/gpu_check.py --smoke` runs every code path on a tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index wheels/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
timeout 420 python3 benchmarks/gpu_check.py --out "${OUT:-outputs}/gpu_check.json" "$@"
