#!/usr/bin/env bash
# The GPU checks of issue 12 as one command: install what the machine lacks from wheels
# brought along (GPU machines may have no network), then run the default 10-epoch run,
# `pytest -m gpu` and the throughput and step-variant benchmarks, and write one JSON summary to
# $OUT/gpu-check.json (when OUT is set) and benchmarks/results/gpu-check-<date>.json.
# Under 7 minutes on an H100 (--budget, default 380 s, bounds the checks after the install).
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine
#   bash benchmarks/gpu_check.sh --data-root DIR      # Fashion-MNIST elsewhere than ./data
#   bash benchmarks/gpu_check.sh --cpu-smoke          # anywhere: every part, tiny, on the CPU
#
# Bring along (both git-ignored): wheelhouse/ from benchmarks/fetch_wheels.sh, and the
# Fashion-MNIST raw files as data/FashionMNIST/raw/*.gz. Torch is never installed or touched.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

smoke=0
for arg in "$@"; do
  if [ "$arg" = "--cpu-smoke" ]; then smoke=1; fi
done

pip_install() {  # a system Python may be "externally managed": then say so explicitly
  "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation "$@" 2>/dev/null ||
    "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation --break-system-packages "$@"
}

if [ "$smoke" = 0 ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    version=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || echo "not importable")
    echo "error: no CUDA device visible to torch ($version) with $PY; run this on a GPU machine, or pass --cpu-smoke" >&2
    exit 2
  fi
  # Only what is missing: a GPU image's own pytest (with its plugins) stays as it is; pytest's
  # own dependencies are looked at only where pytest itself is missing.
  shopt -s nullglob
  wheels=()
  needed="hydra:hydra_core omegaconf:omegaconf antlr4:antlr4_python3_runtime"
  if ! "$PY" -c "import pytest" 2>/dev/null; then
    needed="$needed pytest:pytest pluggy:pluggy iniconfig:iniconfig packaging:packaging pygments:pygments"
    if ! "$PY" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then
      needed="$needed exceptiongroup:exceptiongroup tomli:tomli"
    fi
  fi
  for pair in $needed; do
    if ! "$PY" -c "import ${pair%%:*}" 2>/dev/null; then
      found=(wheelhouse/"${pair#*:}"-*.whl)
      if [ ${#found[@]} -eq 0 ]; then
        echo "error: ${pair%%:*} is missing and wheelhouse/ has no wheel of it; run benchmarks/fetch_wheels.sh on a machine with network and bring wheelhouse/ along" >&2
        exit 2
      fi
      wheels+=("${found[@]}")
    fi
  done
  if [ ${#wheels[@]} -gt 0 ]; then pip_install "${wheels[@]}"; fi
  # The console scripts (the tests run resnet-eval); --no-deps leaves torch as it is.
  if ! pip_install .; then
    echo "warning: could not install the project; using PYTHONPATH and command shims" >&2
    shims=$(mktemp -d)
    for pair in resnet-train:train resnet-eval:evaluate; do
      printf '#!/bin/sh\nexec "%s" -m resnet_cli.%s "$@"\n' "$PY" "${pair#*:}" >"$shims/${pair%%:*}"
      chmod +x "$shims/${pair%%:*}"
    done
    export PATH="$shims:$PATH"
  fi
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
