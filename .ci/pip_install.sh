#!/usr/bin/env bash
# A plain `pip install .` of a clean copy (pip's default build isolation: no torch in the
# build, so no compiled kernels in the wheel) into a fresh venv with torch 2.13.0, then a
# loss on the `cpu` backend: the C++ kernels compile on first use into the cache
# (SELHN_CACHE_DIR, here a folder of this run), and a second process loads them from it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/selhn-pip-install.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
PIP=("$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check)

python3 -m venv "$WORK/venv"
"${PIP[@]}" torch==2.13.0
mkdir "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
    xargs -0 cp --parents -t "$WORK/src")
"${PIP[@]}" "$WORK/src"
echo "pip install .: done in $(($(date +%s) - START)) s"

cd "$WORK"  # import the installed package, not a source tree
export SELHN_CACHE_DIR="$WORK/cache"
run_loss() {
    "$WORK/venv/bin/python" - <<'PY'
import importlib.util
import os

import torch

import selhn_ext

assert importlib.util.find_spec("selhn_ext._C") is None, "the isolated build compiled _C"
img = torch.nn.functional.normalize(torch.randn(33, 8, dtype=torch.float64), dim=1)
txt = torch.nn.functional.normalize(torch.randn(33, 8, dtype=torch.float64), dim=1)
status = selhn_ext.backend_status(img, txt)
assert status["cpu"] is None, status
fused = selhn_ext.selhn_loss(img, txt, backend="cpu")  # compiles on the first call
reference = selhn_ext.selhn_loss(img, txt, backend="reference")
assert torch.allclose(fused, reference, rtol=1e-10, atol=1e-12), (fused, reference)
library = selhn_ext.build_extension()  # the library already loaded: nothing is built
assert str(library).startswith(os.environ["SELHN_CACHE_DIR"]), library
print("cpu backend of a plain pip install matches the reference:", float(fused), library)
PY
}
run_loss 2>"$WORK/first.err" || { cat "$WORK/first.err"; exit 1; }
grep -q "compiling the C++ kernels" "$WORK/first.err" || {
    cat "$WORK/first.err"
    echo "the first process did not compile the kernels"
    exit 1
}
run_loss 2>"$WORK/second.err" || { cat "$WORK/second.err"; exit 1; }
if grep -q "compiling" "$WORK/second.err"; then
    cat "$WORK/second.err"
    echo "the second process compiled again instead of loading the cache"
    exit 1
fi
echo "pip_install.sh: OK in $(($(date +%s) - START)) s"
