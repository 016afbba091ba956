#!/usr/bin/env bash
# One short GPU check (under 6 minutes: the Python part stops starting sections after 330 s and is killed at 345 s)
# for a machine with one NVIDIA GPU and no internet: rollouts against HF generate, log-prob peak memory, SFT MFU
# (plain PyTorch and DeepSpeed), an RL step split, graphs vs no graphs, a LoRA rollout and an engine.compile step.
# It needs the wheels the GPU image lacks, carried in wheels/, made on a machine with PyPI for the device's Python
# (this script prints the recipe with the device's version when wheels/ is missing or does not fit):
#   pip wheel --no-deps deepspeed==0.19.8 -w wheels
#   pip download --no-deps --only-binary=:all: --python-version <device X.Y> --platform manylinux2014_x86_64 \
#       --implementation cp pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection hjson \
#       peft==0.21.2 accelerate==1.15.0 -d wheels
# Results: printed (one line per target at the end), docs/gpu_check_<gpu>.json and ${OUT:-outputs}/gpu_check.json,
# both rewritten after every section. Each run works in a fresh directory under --work (default /tmp/gpu_check).
# On a CPU machine, `python benchmarks/gpu_check.py --smoke` runs every code path on a tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=$(python3 -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
recipe() {
  echo "wheels/ for this device's Python $PYVER, made on a machine with PyPI:"
  echo "  pip wheel --no-deps deepspeed==0.19.8 -w wheels"
  echo "  pip download --no-deps --only-binary=:all: --python-version $PYVER --platform manylinux2014_x86_64" \
       "--implementation cp pydantic==2.13.4 pydantic-core==2.46.4 annotated-types typing-inspection hjson" \
       "peft==0.21.2 accelerate==1.15.0 -d wheels"
}
missing=""
for pkg in deepspeed pydantic pydantic-core annotated-types typing-inspection hjson peft accelerate; do
  # pip takes the wheel whose tags fit this Python, if wheels/ holds one
  python3 -m pip install -q --no-deps --no-index --find-links wheels "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "not installed from wheels/ (none fits Python $PYVER, or none there):$missing"
  recipe
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
timeout 345 python3 benchmarks/gpu_check.py --budget-s 330 --out "${OUT:-outputs}/gpu_check.json" "$@"
