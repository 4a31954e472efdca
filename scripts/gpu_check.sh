#!/usr/bin/env bash
# The accelerator check: on a machine with one CUDA GPU, every test marked `gpu` plus a
# short throughput benchmark (benchmarks/gpu_throughput.py: MNIST-1D KD, a ViT attention
# run, text_lm_kd dense and fused). On one H200 (2026-12-04) the device tool timed the whole
# script at 75-130 s (four runs; its benchmark part 49-83 s in gpu_check*.json). Prints
# what it measured and writes it to $OUT (the device tool's output folder) or to
# benchmarks/results/.
#
# Runs from a checkout without installing it (PYTHONPATH=src). Packages the machine's
# image lacks travel as wheels in .whl/ (hydra-core, omegaconf, antlr4-python3-runtime,
# mnist1d, datasets, ...: `bash scripts/gpu_wheels.sh` downloads them) and are installed to
# /tmp/site.
#   CPU check here: GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh   (no gpu tests run)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$RESULTS"
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD/tests:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
status=0
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$RESULTS/gpu_env.txt"
    timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider -o addopts="--strict-markers -ra" tests \
        2>&1 | tee "$RESULTS/gpu_tests.log" || status=1
    timeout 300 $PY benchmarks/gpu_throughput.py --device cuda --out "$RESULTS/gpu_check.md" || status=1
else
    timeout 600 $PY benchmarks/gpu_throughput.py --device cpu --steps 2 4 --small \
        --out "$RESULTS/gpu_check_cpu.md" || status=1
fi
echo "gpu_check: exit $status; results in $RESULTS"
exit $status
