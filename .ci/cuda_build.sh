#!/usr/bin/env bash
# Proves that the CUDA kernels (csrc/*.cu) compile and link against a CUDA build of torch,
# with no GPU visible and no target architecture named, and that loading selhn_ext._C
# registers the CUDA kernels of torch.ops.selhn.*. Needs no GPU.
#
# Uses its own venv (SELHN_CUDA_VENV, default /tmp/selhn-cuda-venv) with the local CUDA
# build torch==2.14.1 (cu130, matching nvcc 13.0), and builds from a copy of the source
# tree, so the main venv and the checkout's build outputs are left alone.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${SELHN_CUDA_VENV:-/tmp/selhn-cuda-venv}
START=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q torch==2.14.1 numpy "setuptools>=77" wheel ninja filelock

SRC=$(mktemp -d /tmp/selhn-cuda-src.XXXXXX)
trap 'rm -rf "$SRC"' EXIT
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
  xargs -0 cp --parents -t "$SRC")

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# ATen's CUDA headers include headers that the pip CUDA runtime ships under nvidia/cu13
# (setup.py adds the same directory; CPATH covers the host compiler too).
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
export CUDA_HOME=/usr/local/cuda
# TORCH_CUDA_ARCH_LIST stays unset: with no GPU visible, setup.py chooses sm_80 and sm_90
# (selhn_ext/build.py) instead of letting torch probe for a device, which fails.
unset TORCH_CUDA_ARCH_LIST
export SELHN_CUDA=1
export MAX_JOBS=${MAX_JOBS:-2}
(cd "$SRC" && "$VENV/bin/pip" install -q --no-build-isolation --no-deps .)

cd /tmp  # import the installed package, not the source tree
"$VENV/bin/python" - <<'PY'
import torch

import selhn_ext
from selhn_ext import _cpp

print("torch", torch.__version__, "cuda", torch.version.cuda, "selhn_ext", selhn_ext.__file__)
for op, key in [
    ("partials", "CPU"),
    ("dense_backward", "CPU"),
    ("partials", "CUDA"),
    ("dense_backward", "CUDA"),
]:
    registered = torch._C._dispatch_has_kernel_for_dispatch_key(f"selhn::{op}", key)
    print(f"selhn::{op} [{key}]: {'registered' if registered else 'MISSING'}")
    assert registered, f"selhn::{op} has no {key} kernel"
assert _cpp.load_error("cpu") is None, _cpp.load_error("cpu")
cuda_error = _cpp.load_error("cuda")
print("load_error('cuda'):", cuda_error)
if torch.cuda.is_available():
    assert cuda_error is None, cuda_error
else:
    assert cuda_error == "the CUDA kernels are built but no CUDA device is available", cuda_error
# The CPU kernels of this build run here.
img = torch.nn.functional.normalize(torch.randn(33, 8, dtype=torch.float64), dim=1)
txt = torch.nn.functional.normalize(torch.randn(33, 8, dtype=torch.float64), dim=1)
fused = selhn_ext.selhn_loss(img, txt, backend="cpu")
reference = selhn_ext.selhn_loss(img, txt, backend="reference")
assert torch.allclose(fused, reference, rtol=1e-10, atol=1e-12), (fused, reference)
print("cpu backend of the CUDA build matches the reference:", float(fused))
PY
echo "cuda_build.sh: OK in $(($(date +%s) - START)) s"
