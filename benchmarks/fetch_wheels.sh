#!/usr/bin/env bash
# Run where there is network: fills wheelhouse/ with what benchmarks/gpu_check.sh installs on a
# GPU machine without it. The H100 we measured had torch, torchvision, rich and matplotlib but
# not these (shared/docs/gpu-h100-2026-11-28.md); all are pure Python. pytest (for the
# `pytest_gpu` part) and its own dependencies are installed only where the image lacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p wheelhouse
"$PY" -m pip download --quiet --no-deps -d wheelhouse hydra-core==1.3.2 omegaconf==2.3.0 \
  "pytest>=8,<9" "pluggy>=1.5,<2" "iniconfig>=2,<3" "packaging>=22" "pygments>=2.7.2"
# pytest's two extra dependencies on Python 3.10, as pure-Python wheels (tomli also ships
# compiled ones for the Python that runs this)
"$PY" -m pip download --quiet --no-deps -d wheelhouse --only-binary=:all: --platform any --python-version 3.10 \
  "exceptiongroup>=1" "tomli>=1"
"$PY" -m pip wheel --quiet --no-deps -w wheelhouse antlr4-python3-runtime==4.9.3  # PyPI has only its sdist
ls wheelhouse
