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
# --no-build-isolation: compile the C++ kernels against the torch installed above.
$PIP install --no-build-isolation -e ".[all]"
"$VENV/bin/python" -c "import selhn_ext, torch; print('selhn', selhn_ext.__version__, 'torch', torch.__version__); print(selhn_ext.backend_status(torch.zeros(2, 2), torch.zeros(2, 2)))"
