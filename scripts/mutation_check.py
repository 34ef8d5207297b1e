#!/usr/bin/env python
"""Plant representative bugs one at a time in a scratch copy of this tree, run the tests
that should catch each, and report the ones that survive.

    .venv/bin/python scripts/mutation_check.py --list        # the mutants and their tests
    .venv/bin/python scripts/mutation_check.py               # all of them
    .venv/bin/python scripts/mutation_check.py nan-row-max-cpp hinge-at-zero-cpp

On 2 shared cores (load about 10) the 26 mutants took 55 min without the baseline: 4 to 7
min for each C++ mutant (mostly the rebuild), under a minute for most Python ones.

A mutant replaces one piece of code (the exact text must occur as often as the mutant
says, or it is reported STALE: the code moved, update the mutant). A mutant in csrc/
rebuilds the C++ extension in the copy (``setup.py build_ext --inplace``, CPU only);
afterwards the clean library is put back. Each mutant's test invocations run in order
with ``-x`` until one fails: KILLED names the first failing test, SURVIVED means every
invocation passed. Before the mutants, every invocation used runs once on the clean copy
(``--no-baseline`` skips that): a test that fails on clean code would kill every mutant.

Tests run as ``make test`` runs them (the Triton interpreter, one BLAS thread), with the
copy first on PYTHONPATH, so spawned ranks and child processes import the copy too. Not
part of CI: it is slow, and a surviving mutant is a finding to act on, not a flake.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[tuple[str, ...], ...]  # pytest invocations, most specific first
    bug: str
    count: int = 1  # how many times ``old`` occurs (every occurrence is replaced)
    needs_gpu: bool = False  # only a CUDA build and device run the code it changes


EXACT = "tests/test_backends_exact.py"
API = "tests/test_api.py"
REF = "tests/test_reference.py"
CPU = "tests/test_cpu_kernel.py"
DIST = "tests/test_distributed.py"
DET = "tests/test_determinism.py"
MEM = "tests/test_memory.py"
CUDA_TESTS = "tests/test_cuda_kernel.py"

# The tile fold's "candidate beats the lane's best" mask (csrc/selhn_fold_simd.h).
# The line after TILE_BETTER's update of ``best`` tells the row fold from the column fold.
ROW_BEST_POS = "      best_pos = F::iselect(better, F::iadd(F::iota(),"
COL_BEST_POS = "      best_pos = F::iselect(better, F::iset1(static_cast<int32_t>(i)), best_pos);"
TILE_BETTER = (
    "      const M better = F::and_(valid, F::or_(F::or_(F::negative(best_pos), "
    "F::gt(v, best)),\n"
    "                                             F::andnot(F::is_nan(v), F::is_nan(best))));\n"
)

MUTANTS = [
    # ------------------------------------------------------------- the C++ CPU kernel
    Mutant(
        "nan-row-max-cpp",
        "csrc/selhn_fold_simd.h",
        TILE_BETTER + "      best = F::select(better, v, best);\n" + ROW_BEST_POS,
        "      const M better = F::and_(valid, F::or_(F::negative(best_pos), F::gt(v, best)));\n"
        "      best = F::select(better, v, best);\n" + ROW_BEST_POS,
        ((EXACT, "-k", "cpu and nan"), (CPU, "-k", "nan"), (API, "-k", "nan and cpu")),
        "the row-direction tile max ignores a NaN met after a finite value",
    ),
    Mutant(
        "nan-col-max-cpp",
        "csrc/selhn_fold_simd.h",
        TILE_BETTER + "      best = F::select(better, v, best);\n" + COL_BEST_POS,
        "      const M better = F::and_(valid, F::or_(F::negative(best_pos), F::gt(v, best)));\n"
        "      best = F::select(better, v, best);\n" + COL_BEST_POS,
        ((EXACT, "-k", "cpu and nan"), (CPU, "-k", "nan")),
        "the column-direction tile max ignores a NaN met after a finite value",
    ),
    Mutant(
        "nan-key-cpp",
        "csrc/selhn_tile_math.h",
        "  if (is_nan(v)) return 0xFFFFFFFFu;",
        "  if (is_nan(v)) return 1u;",
        ((EXACT, "-k", "cpu and nan"), (CPU, "-k", "nan")),
        "the packed fp32 max key puts NaN below every number (lost when tiles are merged)",
    ),
    Mutant(
        "hinge-at-zero-forward-cpp",
        "csrc/selhn_fold_simd.h",
        "      const M positive = F::gt(arg, zero);",
        "      const M positive = F::or_(F::gt(arg, zero), F::andnot(valid, F::nonzero(arg)));",
        ((EXACT, "-k", "cpu and zero"), (CPU,)),
        "the forward counts a hinge at exactly zero as active (the diagonal's count)",
        count=2,
    ),
    Mutant(
        "hinge-at-zero-backward-cpp",
        "csrc/selhn_fold_simd.h",
        "const M row_active = F::and_(valid, F::gt(F::sub(base, d_row), zero));",
        "const M row_active = F::and_(valid, F::or_(F::gt(F::sub(base, d_row), zero), "
        "F::andnot(valid, F::nonzero(F::sub(base, d_row)))));",
        ((EXACT, "-k", "cpu and zero"), (CPU,)),
        "the gated backward weights a row hinge at exactly zero",
    ),
    Mutant(
        "hinge-at-zero-tile-math",
        "csrc/selhn_tile_math.h",
        "SELHN_HD bool hinge_active(T x) {\n  return x > T(0);",
        "SELHN_HD bool hinge_active(T x) {\n  return x >= T(0);",
        ((EXACT, "-k", "cuda and zero"), (CUDA_TESTS,)),
        "the CUDA kernel counts a hinge at exactly zero as active (>= in selhn_tile_math.h)",
        needs_gpu=True,
    ),
    Mutant(
        "zero-16bit-gated-grad-cpp",
        "csrc/selhn_cpu.cpp",
        "  if (!cols_in_order) grad_cols.index_copy_(0, col_order, grad_cols_p);\n"
        "  return {grad_rows, grad_cols};",
        "  if (!cols_in_order) grad_cols.index_copy_(0, col_order, grad_cols_p);\n"
        "  if (rows.scalar_type() == at::kHalf || rows.scalar_type() == at::kBFloat16) {\n"
        "    grad_rows.zero_();\n    grad_cols.zero_();\n  }\n  return {grad_rows, grad_cols};",
        ((EXACT, "-k", "cpu and gradients"), (API, "-k", "16bit and cpu"), (CPU,)),
        "the gated (dense) gradient is zero for 16-bit inputs",
    ),
    Mutant(
        "tie-rule-cpp",
        "csrc/selhn_tile_math.h",
        "  return i < best_i;",
        "  return i > best_i;",
        ((API, "-k", "tie and cpu"), (CPU, "-k", "tie")),
        "a tie between lanes (and in fp64 between tiles) goes to the larger index",
    ),
    Mutant(
        "ids-masking-cpp",
        "csrc/selhn_fold_simd.h",
        "  if (p.row_ids != nullptr) "
        "m = F::ids_differ(m, p.row_ids[t.r0 + i], p.col_ids + t.c0 + j);\n",
        "",
        ((EXACT, "-k", "cpu and zero"), (API, "-k", "cpu"), (CPU,)),
        "the tile kernels ignore ids (same-id pairs count as negatives)",
    ),
    Mutant(
        "row-offset-cpp",
        "csrc/selhn_cpu.cpp",
        "std::iota(diag.begin(), diag.end(), row_offset);",
        "std::iota(diag.begin(), diag.end(), 0);",
        ((DIST, "-k", "matches_single and cpu"), (CPU, "-k", "row_block")),
        "the forward drops the row offset (a rank's positives are misplaced)",
    ),
    Mutant(
        "determinism-cpp",
        "csrc/selhn_cpu.cpp",
        "bool deterministic, bool allow_tf32) {\n  (void)allow_tf32;",
        "bool deterministic_flag, bool allow_tf32) {\n"
        "  const bool deterministic = false && deterministic_flag;\n  (void)allow_tf32;",
        ((DET,), (CPU, "-k", "deterministic")),
        "the C++ kernels ignore deterministic=True (sums follow the thread split and order)",
        count=2,
    ),
    # ------------------------------------------------------ shared Python (every backend)
    Mutant(
        "negative-count",
        "selhn_ext/kernel_interface.py",
        "torch.full((batch,), batch - 1, dtype=torch.int64, device=device)",
        "torch.full((batch,), batch, dtype=torch.int64, device=device)",
        ((EXACT, "-k", "chunked and zero"), (API, "-k", "recipes")),
        "n_i counts the positive too",
    ),
    Mutant(
        "gate-comparison",
        "selhn_ext/kernel_interface.py",
        "near_tie = gap.abs() < torch.tensor(eps",
        "near_tie = gap.abs() <= torch.tensor(eps",
        ((API, "-k", "eps"),),
        "a gap exactly at eps is gated (<= instead of <)",
    ),
    Mutant(
        "hard-hinge-at-zero",
        "selhn_ext/kernel_interface.py",
        "hard_active = (~gated) & has_hardest & (hard_arg > 0)",
        "hard_active = (~gated) & has_hardest & (hard_arg >= 0)",
        ((EXACT, "-k", "chunked and zero"),),
        "the hardest hinge carries a gradient at exactly zero",
    ),
    Mutant(
        "nan-merge",
        "selhn_ext/kernel_interface.py",
        "b_wins = (b_nan & ~a_nan) | (~a_nan",
        "b_wins = (~a_nan",
        ((DIST, "-k", "matches_single and chunked"),),
        "merging partial statistics drops a NaN max from the later part",
    ),
    Mutant(
        "dropped-gradient-term",
        "selhn_ext/kernel_interface.py",
        "grad_cols += w_col_mine[:, None] * rows[q_local]",
        "grad_cols += 0 * w_col_mine[:, None] * rows[q_local]",
        ((EXACT, "-k", "chunked and zero"), (REF, "-k", "chunked")),
        "the hardest image of a caption anchor gets no gradient toward that caption",
    ),
    Mutant(
        "diagonal-column-term",
        "selhn_ext/kernel_interface.py",
        "g_diag = -(dense_r + w_row + (dense_c + w_col)[pos])",
        "g_diag = -(dense_r + w_row + dense_c[pos])",
        ((EXACT, "-k", "chunked and zero"), (REF, "-k", "chunked")),
        "the diagonal misses the hardest-negative term of caption anchors",
    ),
    Mutant(
        "diagonal-row-offset",
        "selhn_ext/kernel_interface.py",
        "    pos = row_offset + local\n",
        "    pos = local\n",
        ((DIST, "-k", "matches_single and chunked"),),
        "the diagonal gradient ignores the row offset (distributed)",
    ),
    Mutant(
        "gated-coefficient",
        "selhn_ext/kernel_interface.py",
        "self.col_upstream * self.col_dense_weight",
        "self.col_dense_weight",
        ((EXACT, "-k", "chunked and zero"), (REF, "-k", "chunked")),
        "the gated caption anchors' coefficient skips the upstream gradient",
    ),
    # ----------------------------------------------------------------------- reference
    Mutant(
        "reference-clamp-dense",
        "selhn_ext/reference.py",
        "torch.where(valid, torch.relu(margin + scores - d[:, None]), zero)",
        "torch.where(valid, (margin + scores - d[:, None]).clamp(min=0), zero)",
        ((EXACT, "-k", "reference and zero"), (REF,)),
        "the reference hinge is clamp(min=0): gradient 1 at exactly zero (dense hinges)",
    ),
    Mutant(
        "reference-clamp-hard",
        "selhn_ext/reference.py",
        "hard_hinge = torch.relu(margin + scores.gather(1, index.clamp(min=0)[:, None])[:, 0] - d)",
        "hard_hinge = (margin + scores.gather(1, index.clamp(min=0)[:, None])[:, 0] - d)"
        ".clamp(min=0)",
        ((EXACT, "-k", "reference and zero"), (REF,)),
        "the reference hardest hinge is clamp(min=0): gradient 1 at exactly zero",
    ),
    # ------------------------------------------------------------------------- Triton
    Mutant(
        "nan-key-triton",
        "selhn_ext/_triton/forward_kernels.py",
        'best = tl.where(has_nan, float("nan"), best)',
        "best = tl.where(has_nan, best, best)",
        ((EXACT, "-k", "triton and nan"),),
        "the forward's exact fix-up does not make NaN the max of an anchor with a NaN score",
    ),
    Mutant(
        "nan-hinge-triton",
        "selhn_ext/_triton/forward_kernels.py",
        "hinge_sum = tl.sum(tl.maximum(arg, 0.0, propagate_nan=tl.PropagateNan.ALL), axis=AXIS)",
        "hinge_sum = tl.sum(tl.where(arg > 0.0, arg, 0.0), axis=AXIS)",
        ((EXACT, "-k", "triton and nan"),),
        "the forward's fast epilogue drops a NaN hinge argument (NaN > 0 is false), so the "
        "anchor is not sent to the exact fix-up",
    ),
    Mutant(
        "hinge-at-zero-triton-backward",
        "selhn_ext/_triton/backward_kernels.py",
        "shifted - d_row[:, None] > 0.0,",
        "shifted - d_row[:, None] >= 0.0,",
        ((EXACT, "-k", "triton and zero"),),
        "the Triton backward recomputes a row hinge at exactly zero as active",
    ),
    # -------------------------------------------------------------------- distributed
    Mutant(
        "bool-buffer-distributed",
        "selhn_ext/pipeline.py",
        "        n_all = count_negatives(ids_all, exchange.total, img.device)\n",
        "        n_all = count_negatives(ids_all, exchange.total, img.device)\n"
        "        held = torch.ones(exchange.local, exchange.total, dtype=torch.bool)  # noqa\n",
        ((DIST, "-k", "batch_by_batch"),),
        "each rank holds a b x N bool buffer",
    ),
    Mutant(
        "determinism-pipeline",
        "selhn_ext/pipeline.py",
        "deterministic=settings.deterministic,",
        "deterministic=False,",
        ((DIST, "-k", "deterministic_bits"),),
        "the loss pipeline (one process or several) runs its kernels non-deterministically",
        count=3,
    ),
    Mutant(
        "rank-sum-backward",
        "selhn_ext/ops.py",
        "lambda ctx, grad: (grad, None)",
        "lambda ctx, grad: (grad * 2, None)",
        ((DIST, "-k", "matches_single and chunked"),),
        "the loss summed over ranks sends each rank a scaled upstream gradient",
    ),
    # -------------------------------------------------------------- single-process loss
    Mutant(
        "square-buffer-loss",
        "selhn_ext/ops.py",
        "    ctx.options = (margin, mode, backend, deterministic, allow_tf32, *rest)\n",
        "    ctx.options = (margin, mode, backend, deterministic, allow_tf32, *rest)\n"
        "    ctx.held = torch.ones(img.shape[0], img.shape[0], dtype=torch.bool)\n",
        ((MEM,),),
        "the loss keeps a B x B bool buffer until backward",
    ),
]


def tracked_files(root: Path) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=root, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return [name for name in out.stdout.split("\0") if name]


def copy_tree(root: Path, scratch: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored) and the built
    C++ library."""
    for name in tracked_files(root):
        src, dst = root / name, scratch / name
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for lib in (root / "selhn_ext").glob("_C*.so"):
        shutil.copy2(lib, scratch / "selhn_ext" / lib.name)


def test_env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(scratch) + os.pathsep + env.get("PYTHONPATH", ""),
        TRITON_INTERPRET="1",
        OPENBLAS_NUM_THREADS="1",
        SELHN_CUDA="0",
        # A backend that fails to load must fail the tests, not skip them.
        SELHN_REQUIRE="reference,chunked,cpu,triton",
    )
    return env


def run_pytest(scratch: Path, args: tuple[str, ...], timeout: float) -> tuple[str, str]:
    """('pass' | 'fail' | 'error', the first failing test or the reason)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args]
    try:
        done = subprocess.run(
            cmd, cwd=scratch, env=test_env(scratch), capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "error", f"timed out after {timeout:.0f} s"
    if done.returncode == 0:
        return "pass", ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.MULTILINE)
    if done.returncode == 1 and failed:
        return "fail", failed[0]
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return "error", f"pytest exit {done.returncode}: " + " | ".join(tail)


def build_extension(scratch: Path) -> str | None:
    """Rebuild selhn_ext._C in place; None on success, else the compiler's last words."""
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=scratch, env=test_env(scratch), capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode == 0:
        return None
    return " | ".join((done.stdout + done.stderr).strip().splitlines()[-4:])


def has_cuda_device() -> bool:
    import torch

    return torch.cuda.is_available()


def check(mutant: Mutant, scratch: Path, clean_libs: dict[Path, bytes], timeout: float):
    if mutant.needs_gpu and not has_cuda_device():
        return "NEEDS GPU", "only a CUDA device runs this code; not checked here"
    target = scratch / mutant.path
    original = target.read_text()
    found = original.count(mutant.old)
    if found != mutant.count:
        return "STALE", f"expected {mutant.count} occurrence(s) of the code, found {found}"
    target.write_text(original.replace(mutant.old, mutant.new))
    try:
        if mutant.path.startswith("csrc/"):
            error = build_extension(scratch)
            if error is not None:
                return "BUILD FAILED", error
        for args in mutant.tests:
            outcome, detail = run_pytest(scratch, args, timeout)
            if outcome == "fail":
                return "KILLED", detail
            if outcome == "error":
                return "ERROR", f"{' '.join(args)}: {detail}"
        return "SURVIVED", "every invocation passed"
    finally:
        target.write_text(original)
        for lib, data in clean_libs.items():
            lib.write_bytes(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the clean run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per invocation")
    options = parser.parse_args()

    if options.list:
        for m in MUTANTS:
            print(f"{m.name:32} {m.path}: {m.bug}")
            for args in m.tests:
                print(f"{'':34}pytest {' '.join(args)}")
        return 0
    known = {m.name for m in MUTANTS}
    unknown = [name for name in options.names if name not in known]
    if unknown:
        parser.error(f"unknown mutant(s) {unknown}; see --list")
    chosen = [m for m in MUTANTS if not options.names or m.name in options.names]

    scratch = Path(tempfile.mkdtemp(prefix="selhn-mutants-"))
    print(f"scratch copy: {scratch}", flush=True)
    try:
        copy_tree(ROOT, scratch)
        clean_libs = {p: p.read_bytes() for p in (scratch / "selhn_ext").glob("_C*.so")}
        if not clean_libs:
            print("no built selhn_ext/_C*.so in the tree: run `make setup` first")
            return 2
        if not options.no_baseline:
            runnable = [m for m in chosen if not m.needs_gpu or has_cuda_device()]
            invocations = list(dict.fromkeys(args for m in runnable for args in m.tests))
            for args in invocations:
                start = time.monotonic()
                outcome, detail = run_pytest(scratch, args, options.timeout)
                took = time.monotonic() - start
                print(f"baseline {' '.join(args)}: {outcome} ({took:.0f} s) {detail}", flush=True)
                if outcome != "pass":
                    print("the clean tree fails these tests: fix that first")
                    return 2
        results = []
        for mutant in chosen:
            start = time.monotonic()
            verdict, detail = check(mutant, scratch, clean_libs, options.timeout)
            took = time.monotonic() - start
            results.append((mutant, verdict, detail))
            print(f"{verdict:12} {mutant.name} ({took:.0f} s): {detail}", flush=True)
    finally:
        if options.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    print("\nsummary")
    for mutant, verdict, _ in results:
        print(f"  {verdict:12} {mutant.name:32} {mutant.bug}")
    checked = [(m, verdict) for m, verdict, _ in results if verdict != "NEEDS GPU"]
    survived = [m.name for m, verdict in checked if verdict != "KILLED"]
    print(f"{len(checked) - len(survived)} of {len(checked)} checked mutants killed", end="")
    print(f"; not killed: {', '.join(survived)}" if survived else "")
    if len(checked) < len(results):
        print(f"{len(results) - len(checked)} need a GPU and were not checked")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
