#!/usr/bin/env bash
# Creates ./.venv with the pinned torch/triton wheels and installs selhn with every extra.
# Exact pins live here only; the package metadata keeps lower bounds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade "pip>=23" setuptools wheel
# torch 2.13.0 is a local CPU wheel here (seconds); an unpinned torch pulls a 5.5 GB CUDA build.
$PIP install "torch==2.13.0" "triton==3.7.1" "ruff==0.14.0"
# SIMDe's headers let a CPU without AVX-512 build and test the AVX-512 kernels
# (csrc/selhn_cpu_avx512_emulated.cpp); the test of every kernel path needs them.
if [ ! -f /usr/include/simde/x86/avx512.h ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q libsimde-dev >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libsimde-dev >/dev/null 2>&1; } ||
        echo "setup: could not install libsimde-dev; the AVX-512 kernels will not be tested here"
fi
# --no-build-isolation: compile the C++ kernels against the torch installed above.
$PIP install --no-build-isolation -e ".[all]"
"$VENV/bin/python" -c "import selhn_ext, torch; print('selhn', selhn_ext.__version__, 'torch', torch.__version__); print(selhn_ext.backend_status(torch.zeros(2, 2), torch.zeros(2, 2)))"
