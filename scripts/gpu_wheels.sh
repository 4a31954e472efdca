#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh needs on the GPU machine's image (Python 3.12, no package
# index there): the packages its image lacks that the `gpu` tests and
# benchmarks/gpu_throughput.py import, at the versions in constraints.txt, into .whl/
# (git-ignored). Run here, where pip reaches the index; then carry .whl to the machine.
#   bash scripts/gpu_wheels.sh
# First GPU run (2026-12-04): the image had torch, lightning, transformers, timm, pyarrow,
# pandas, huggingface-hub; it lacked these. wandb is left out on purpose: nothing in the
# check logs to W&B, and timm imports it only if it imports cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NEEDED="hydra-core omegaconf antlr4-python3-runtime mnist1d datasets dill multiprocess"
mkdir -p .whl
for name in $NEEDED; do
    pin=$(grep -i "^${name}==" constraints.txt) || { echo "no pin for $name in constraints.txt" >&2; exit 2; }
    # binary wheels for CPython 3.12 where they exist; a pure-Python sdist is built here
    if ! $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "$pin" 2>.whl/download.err; then
        echo "no CPython 3.12 binary wheel of $pin ($(tail -n 1 .whl/download.err)); building it here" >&2
        $PY -m pip wheel -q --no-deps -w .whl "$pin"
    fi
done
rm -f .whl/download.err
ls .whl
