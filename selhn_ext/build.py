"""What the compiled kernels are made of, and the two ways they are built.

* At install: ``setup.py`` builds ``selhn_ext._C`` when torch is importable in the build
  environment (``pip install --no-build-isolation .``).
* On first use: otherwise (pip's default isolated build has no torch) the sources ship
  inside the package and :func:`build_extension` compiles them once into a per-user cache
  keyed by the torch version, the flags and the sources, under a file lock so that two
  processes never build at once. A torch upgrade selects a new key, so a library built
  for another torch is never loaded.

The sources are every ``*.cpp`` file of ``csrc/`` (the CPU kernels and the op schemas) and
every ``*.cu`` file (the CUDA kernels). ``setup.py`` reads this file without importing the
package (torch may be absent there), so only the functions that build import torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

# -ffp-contract=off: the CPU tile kernel fuses multiply-adds only where it says so, so
# every element of S is computed the same way (see csrc/).
CXX_FLAGS = ("-O3", "-fopenmp", "-g0", "-ffp-contract=off")
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-lineinfo")
LINK_FLAGS = ("-lgomp",)
# Target architectures when no GPU is visible to ask (torch's own probe then fails):
# A100 and H100/H200. TORCH_CUDA_ARCH_LIST, when set, wins.
CUDA_ARCHS = "8.0;9.0"
JIT_NAME = "selhn_ext_kernels"
HEADER_SUFFIXES = (".h", ".cuh")

PACKAGE_DIR = Path(__file__).resolve().parent


def source_dir() -> Path:
    """The C++/CUDA sources: shipped in the package, or csrc/ of a source checkout."""
    shipped = PACKAGE_DIR / "csrc"
    return shipped if shipped.is_dir() else PACKAGE_DIR.parent / "csrc"


def cpu_sources(root: Path | None = None) -> list[Path]:
    return sorted((root or source_dir()).glob("*.cpp"))


def cuda_sources(root: Path | None = None) -> list[Path]:
    return sorted((root or source_dir()).glob("*.cu"))


def source_files(root: Path | None = None) -> list[Path]:
    """Every file the build reads from the source directory (sources and headers)."""
    root = root or source_dir()
    headers = [p for p in root.iterdir() if p.suffix in HEADER_SUFFIXES] if root.is_dir() else []
    return sorted(cpu_sources(root) + cuda_sources(root) + headers)


def cuda_include_dirs() -> list[str]:
    """ATen's CUDA headers include headers the pip CUDA runtime ships under nvidia/cu13."""
    return [
        str(Path(entry, sub))
        for entry in sys.path
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include")
        if Path(entry, sub).is_dir()
    ]


def cuda_problems() -> list[str]:
    """Why the CUDA kernels cannot be built here (empty: they can)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None or not Path(CUDA_HOME, "bin", "nvcc").exists():
        problems.append(f"no CUDA toolkit found (CUDA_HOME={CUDA_HOME!r})")
    elif not Path(CUDA_HOME, "include", "cuda_runtime.h").exists():
        # torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper script
        problems.append(
            f"CUDA_HOME={CUDA_HOME!r} has nvcc but no include/cuda_runtime.h: set CUDA_HOME "
            "to the toolkit's folder (e.g. /usr/local/cuda)"
        )
    return problems


def cuda_arch_list() -> str | None:
    """TORCH_CUDA_ARCH_LIST if set; else None when a GPU is visible (torch then builds for
    it); else CUDA_ARCHS, since torch's own choice needs a visible GPU."""
    setting = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if setting:
        return setting
    import torch

    return None if torch.cuda.device_count() > 0 else CUDA_ARCHS


def compiler_problem() -> str | None:
    """None if a C++ compiler and ninja are found, else what is missing."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return (
            f"no C++ compiler found ({compiler!r} is not on PATH): install one "
            "(e.g. `apt-get install g++`) or set CXX"
        )
    if _ninja_dir() is None:
        return "ninja is not installed (`pip install ninja`)"
    return None


def _ninja_dir() -> str | None:
    found = shutil.which("ninja")
    if found is not None:
        return str(Path(found).parent)
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR


# ---------------------------------------------------------------------------------------
# The cache of first-use builds


def cache_root() -> Path:
    """$SELHN_CACHE_DIR, else $XDG_CACHE_HOME/selhn_ext, else ~/.cache/selhn_ext."""
    explicit = os.environ.get("SELHN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "selhn_ext"


def cache_dir(cuda: bool) -> Path:
    """The folder of the build for this torch, these flags and these sources (CPU only, or
    with the CUDA kernels for the targets of the process that built it)."""
    import torch

    digest = hashlib.sha256()
    # Not the compiler nor the CUDA targets, which the environment may name differently
    # in the process that builds and in those that load.
    for part in (
        torch.__version__,
        str(torch.version.cuda),
        str(torch.compiled_with_cxx11_abi()),
        sys.implementation.cache_tag,
        " ".join(CXX_FLAGS + LINK_FLAGS),
        " ".join(NVCC_FLAGS) if cuda else "cpu only",
    ):
        digest.update(part.encode() + b"\0")
    for path in source_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    kind = "cuda" if cuda else "cpu"
    return cache_root() / f"torch-{torch.__version__}-{kind}-{digest.hexdigest()[:16]}"


def cached_library(cuda: bool) -> Path | None:
    """The finished first-use build for this torch, flags and sources, if there is one."""
    if not source_dir().is_dir():
        return None
    library = cache_dir(cuda) / f"{JIT_NAME}.so"
    return library if library.exists() else None


def build_extension(cuda: bool = False, verbose: bool = False) -> Path:
    """Compile the kernels into the cache (once), load them into this process, and return
    the library's path. ``cuda=True`` adds the CUDA kernels (needs nvcc and a CUDA torch).

    Another process building the same key is waited for; its library is then loaded.
    """
    import torch
    from filelock import FileLock
    from torch.utils import cpp_extension

    root = source_dir()
    if not cpu_sources(root):
        raise RuntimeError(
            f"the C++ sources are not part of this install (looked in {root}); reinstall "
            "selhn from its source tree or a wheel built from it"
        )
    problem = compiler_problem()
    if problem is not None:
        raise RuntimeError(f"cannot build the C++ kernels: {problem}")
    if cuda and cuda_problems():
        raise RuntimeError("cannot build the CUDA kernels: " + "; ".join(cuda_problems()))
    target = cache_dir(cuda)
    library = target / f"{JIT_NAME}.so"
    target.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not library.exists():
            print(
                f"selhn_ext: compiling the {'C++/CUDA' if cuda else 'C++'} kernels for torch "
                f"{torch.__version__} once, into {target} (a minute or more)",
                file=sys.stderr,
                flush=True,
            )
            built = _compile(cpp_extension, root, target / "build", cuda, verbose)
            partial = library.with_suffix(f".so.{os.getpid()}.tmp")
            shutil.copyfile(built, partial)
            os.replace(partial, library)  # later processes see the whole file or none
            return library
    torch.ops.load_library(str(library))
    return library


def _compile(cpp_extension, root: Path, build_dir: Path, cuda: bool, verbose: bool) -> Path:
    """Build with torch's JIT (ninja) in ``build_dir``; it also loads the library."""
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = cpu_sources(root) + (cuda_sources(root) if cuda else [])
    include_dirs = [str(root)] + (cuda_include_dirs() if cuda else [])
    saved = {key: os.environ.get(key) for key in ("PATH", "TORCH_CUDA_ARCH_LIST")}
    os.environ["PATH"] = _ninja_dir() + os.pathsep + os.environ.get("PATH", "")
    if cuda and cuda_arch_list() is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    try:
        cpp_extension.load(
            JIT_NAME, [str(s) for s in sources], extra_cflags=list(CXX_FLAGS),
            extra_cuda_cflags=list(NVCC_FLAGS), extra_ldflags=list(LINK_FLAGS),
            extra_include_paths=include_dirs, build_directory=str(build_dir),
            is_python_module=False, with_cuda=cuda, verbose=verbose,
        )  # fmt: skip
    except (RuntimeError, OSError) as error:
        raise RuntimeError(
            f"building the C++ kernels failed ({error}); rerun "
            "`selhn_ext.build_extension(verbose=True)` to see the compiler's output"
        ) from error
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return build_dir / f"{JIT_NAME}.so"
