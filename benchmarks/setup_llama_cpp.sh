#!/usr/bin/env bash
# llama-cpp-python for benchmarks/local_decode.py's llama.cpp rows, built from its source package for this
# CPU (it has no binary wheel for most machines; about 15 minutes on 2 cores). Not part of the test extras.
# AMX is left out: on the 2-core Intel Xeon these benchmarks ran on, llama.cpp's AMX matmul segfaults on any
# batch of more than one token (0.3.36), and decoding does not use it.
set -euo pipefail
PYTHON="${PYTHON:-.venv/bin/python}"
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'}" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$PYTHON" -m pip install --no-cache-dir "llama-cpp-python>=0.3.16" "$@"
