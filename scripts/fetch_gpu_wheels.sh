#!/usr/bin/env bash
# Download the cp312 wheels the GPU machine lacks (pydantic and expecttest with their
# dependencies, and diffusers for the benchmark's group-offloading peer) into .whl/, which git
# ignores and `device run` carries (carry: [".whl"]).
# On the GPU machine, install them with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  "pydantic==2.13.4" "pydantic-core==2.46.4" "annotated-types==0.7.0" "typing-inspection==0.4.2" \
  "typing-extensions==4.15.0" "expecttest==0.3.0" \
  "diffusers==0.42.1" "importlib-metadata==10.2.0"  # peers for benchmarks/offload_bench.py
ls .whl
