"""Fallback build of the compiled kernels with ``selhn_ext.build_extension`` (ninja).

Used by ``bench/gpu_check.sh`` when ``pip install --no-build-isolation .`` fails. The
library goes into the per-user cache keyed by the torch version, flags and sources
(``selhn_ext/build.py``), where later processes that import ``selhn_ext`` from the source
tree find it.

    python3 bench/jit_build.py [--cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="build the CUDA kernels too")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import selhn_ext

    library = selhn_ext.build_extension(cuda=args.cuda, verbose=True)
    print(f"built {library}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
