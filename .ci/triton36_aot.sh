#!/usr/bin/env bash
# The GPU machine runs triton 3.6: compile every Triton kernel specialization for sm_90
# under triton 3.6.0 too (no GPU needed), in a small venv of its own.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${SELHN_TRITON36_VENV:-/tmp/selhn-triton36-venv}
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 triton==3.6.0 numpy
"$VENV/bin/python" -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__"
cd "$ROOT"
env -u TRITON_INTERPRET PYTHONPATH="$ROOT" "$VENV/bin/python" tests/triton_aot.py
echo "triton 3.6 ahead-of-time compile: ok in $(( $(date +%s) - start )) s"
