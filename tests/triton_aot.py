"""Compile every Triton kernel specialization the dispatch can launch, for sm_90, on CPU.

Usage: python tests/triton_aot.py [--arch 90] [--list] [--quick]

No GPU is needed: triton lowers to PTX and runs its bundled ptxas for the target. This
catches what the interpreter accepts but the compiler rejects (a tl.dot dimension under
16, unsupported casts, constexpr misuse). Run it with TRITON_INTERPRET unset. Works with
triton 3.6 and 3.7 (the ASTSource(fn, signature, constexprs, attrs) form of both).

Exit status 0 when every specialization compiles; one line per kernel either way.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from itertools import product

if os.environ.get("TRITON_INTERPRET", "") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the compiler")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from selhn_ext._triton import backward_kernels, forward_kernels, glue_kernels  # noqa: E402
from selhn_ext._triton.backward import COMPACT_BLOCK, GEMM_CONFIGS  # noqa: E402
from selhn_ext._triton.config import CONFIGS, precision  # noqa: E402
from selhn_ext._triton.glue import FINALIZE_BLOCK, INIT_BLOCK, KEYS_BLOCK  # noqa: E402

POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
# Arguments that are 1 for contiguous inputs: triton turns such values into constants.
UNIT_STRIDES = ("stride_rk", "stride_ck", "stride_xk")
# Integer arguments that are multiples of 16 in the usual aligned call (D = 1024, ...).
ALIGNED_INTS = ("D", "stride_rm", "stride_cn", "stride_xn", "panel", "ld_a")


def _source(fn, types: dict[str, str], constexprs: dict[str, object]) -> ASTSource:
    """ASTSource with the launch-time specialization: pointers 16-byte aligned,
    unit strides constant, and the aligned integer arguments divisible by 16."""
    signature, attrs, constants = {}, {}, dict(constexprs)
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in UNIT_STRIDES:
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = types[name]
            if types[name].startswith("*") or name in ALIGNED_INTS:
                attrs[(index,)] = [["tt.divisibility", 16]]
    params = inspect.signature(ASTSource.__init__).parameters
    key = "constexprs" if "constexprs" in params else "constants"
    return ASTSource(fn, signature, **{key: constants}, attrs=attrs)


def _types(fn, pointers: dict[str, str], floats: tuple[str, ...]) -> dict[str, str]:
    """Every non-constexpr argument: pointers as given, floats fp32, the rest i32."""
    types = {}
    for name in fn.arg_names:
        if name in pointers:
            types[name] = pointers[name]
        elif name in floats:
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def specializations(quick: bool = False):
    """(label, fn, types, constexprs, num_warps, num_stages) for every launchable kernel."""
    precisions = [(torch.bfloat16, False), (torch.float16, False), (torch.float32, False),
                  (torch.float32, True)]  # fmt: skip
    if quick:
        precisions = precisions[:1]
    for dtype, tf32 in precisions:
        cfg = CONFIGS[dtype]
        data = POINTER_TYPES[dtype]
        prec = precision(dtype, tf32)
        blocks = dict(BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, PRECISION=prec, UPCAST=False)
        fn = forward_kernels.partials_kernel
        pointers = {
            "rows_ptr": data, "cols_ptr": data, "col_pos_ptr": "*fp32",
            "row_ids_ptr": "*i64", "col_ids_ptr": "*i64",
            "row_key_ptr": "*i64", "row_sum_ptr": "*fp32", "row_cnt_ptr": "*i32",
            "col_key_ptr": "*i64", "col_sum_ptr": "*fp32", "col_cnt_ptr": "*i32",
        }  # fmt: skip
        # Tensor descriptors (TMA) for tensor-core products only (config.tma_allowed).
        tma_modes = (False,) if prec == "ieee" and dtype == torch.float32 else (False, True)
        for has_ids, deterministic, tma in product((False, True), (False, True), tma_modes):
            label = f"partials {dtype} {prec} ids={has_ids} deterministic={deterministic} tma={tma}"
            constexprs = dict(
                blocks, HAS_IDS=has_ids, DETERMINISTIC=deterministic, REVERSE=False, USE_TMA=tma
            )
            yield label, fn, _types(fn, pointers, ("margin",)), constexprs, cfg.forward_warps, \
                cfg.num_stages  # fmt: skip
        fn = forward_kernels.exact_fixup_kernel
        for has_ids in (False, True):
            label = f"exact_fixup {dtype} {prec} ids={has_ids}"
            constexprs = dict(blocks, HAS_IDS=has_ids)
            yield label, fn, _types(fn, pointers, ("margin",)), constexprs, cfg.num_warps, \
                cfg.num_stages  # fmt: skip

        # The backward: W panels (S recompute) and the gradient products.
        gemm = GEMM_CONFIGS[dtype]
        fn = backward_kernels.weights_kernel
        pointers = {
            "rows_ptr": data, "cols_ptr": data, "col_pos_ptr": "*fp32",
            "row_ids_ptr": "*i64", "col_ids_ptr": "*i64", "row_weight_ptr": "*fp32",
            "col_weight_ptr": "*fp32", "row_order_ptr": "*i32",
            "col_order_ptr": "*i32", "state_ptr": "*i32", "w_a_ptr": data, "w_b_ptr": data,
            "ws_a_ptr": "*fp32", "ws_b_ptr": "*fp32", "grad_rows_ptr": "*fp32",
            "grad_cols_ptr": "*fp32", "tile_counter_ptr": "*i32",
        }  # fmt: skip
        for has_ids in (False, True):
            label = f"weights {dtype} {prec} ids={has_ids}"
            constexprs = dict(
                blocks, GM=gemm.GM, GD=gemm.GD, HAS_IDS=has_ids, COUNT_TILES=False,
                REVERSE=False,
            )  # fmt: skip
            yield label, fn, _types(fn, pointers, ("margin",)), constexprs, \
                cfg.backward_warps(has_ids), cfg.num_stages  # fmt: skip
        fn = backward_kernels.products_kernel
        pointers = {
            "rows_ptr": data, "cols_ptr": data, "row_order_ptr": "*i32", "col_order_ptr": "*i32",
            "state_ptr": "*i32", "w_a_ptr": data, "w_b_ptr": data, "ws_a_ptr": "*fp32",
            "ws_b_ptr": "*fp32", "grad_rows_ptr": "*fp32", "grad_cols_ptr": "*fp32",
        }  # fmt: skip
        constexprs = dict(GM=gemm.GM, GD=gemm.GD, GK=gemm.GK, PRECISION=prec, UPCAST=False,
                          REVERSE=False)  # fmt: skip
        yield f"products {dtype} {prec}", fn, _types(fn, pointers, ()), constexprs, \
            gemm.num_warps, gemm.num_stages  # fmt: skip

    pointers = {
        "row_flag_ptr": "*i8", "col_flag_ptr": "*i8", "row_coef_ptr": "*fp32",
        "col_coef_ptr": "*fp32", "row_factor_ptr": "*fp32", "col_factor_ptr": "*fp32",
        "row_order_ptr": "*i32", "col_order_ptr": "*i32",
        "row_weight_ptr": "*fp32", "col_weight_ptr": "*fp32", "state_ptr": "*i32",
        "blocks_ptr": "*i32",
    }  # fmt: skip
    for fn, factored in product((backward_kernels.count_kernel, backward_kernels.compact_kernel),
                                (False, True)):  # fmt: skip
        types = _types(fn, {k: v for k, v in pointers.items() if k in fn.arg_names}, ())
        yield f"{fn.__name__} factored={factored}", fn, types, \
            {"BLOCK": COMPACT_BLOCK, "FACTORED": factored}, 4, 1  # fmt: skip
    yield from glue_specializations()


def glue_specializations():
    """The fused glue (selhn_ext/_triton/glue_kernels.py): pointers named *_ptr are fp32
    unless listed, indices int64."""
    fns = glue_kernels

    def glue_types(fn, pointers, floats=()):
        default = {n: "*fp32" for n in fn.arg_names if n.endswith("_ptr")}
        return _types(fn, {**default, **pointers}, floats)

    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
        data = POINTER_TYPES[dtype]
        fn = fns.positive_kernel
        yield f"glue positive {name}", fn, glue_types(fn, {"img_ptr": data, "txt_ptr": data}), \
            dict(BLOCK_R=16, BLOCK_D=256), 4, 1  # fmt: skip
        fn = fns.gradients_kernel
        pointers = {
            "rows_ptr": data, "cols_ptr": data, "out_rows_ptr": data, "out_cols_ptr": data,
            "row_arg_ptr": "*i64", "col_arg_ptr": "*i64", "row_act_ptr": "*i32",
            "col_act_ptr": "*i32", "keys_ptr": "*i64", "sources_ptr": "*i64",
            "state_ptr": "*i32", "row_gated_ptr": "*i8", "col_gated_ptr": "*i8",
        }  # fmt: skip
        for has_dense, where_written in ((False, False), (True, False), (True, True)):
            constexprs = dict(HAS_DENSE=has_dense, WHERE_WRITTEN=where_written,
                              ROWS_BY_HAND=False, COLS_BY_HAND=False, BLOCK_D=1024)  # fmt: skip
            yield f"glue gradients {name} dense={has_dense} where_written={where_written}", \
                fn, glue_types(fn, pointers), constexprs, 4, 1  # fmt: skip
    ints = {"row_arg_ptr": "*i64", "col_arg_ptr": "*i64", "row_n_ptr": "*i64",
            "col_n_ptr": "*i64", "pair_arg_ptr": "*i64", "row_key_ptr": "*i64",
            "col_key_ptr": "*i64"}  # fmt: skip
    flags = {f"{side}_{what}_ptr": "*i1" for side in ("row", "col", "pair")
             for what in ("gated", "near")}  # fmt: skip
    fn = fns.finalize_kernel
    modes = ("selhn", "hardest", "all", "sum_hinges")
    for mode, has_n, packed in product(modes, (False, True), (False, True)):
        yield f"glue finalize {mode} n={has_n} packed={packed}", fn, \
            glue_types(fn, {**ints, **flags}, ("margin", "eps")), \
            dict(HAS_N=has_n, MODE=mode, PACKED=packed, BLOCK=FINALIZE_BLOCK), 4, 1  # fmt: skip
    fn = fns.hard_keys_kernel
    yield "glue hard_keys", fn, glue_types(fn, {"row_arg_ptr": "*i64", "col_arg_ptr": "*i64",
                                                "keys_ptr": "*i64"}), \
        dict(BLOCK=KEYS_BLOCK), 4, 1  # fmt: skip
    fn = fns.partials_init_kernel
    yield "glue partials_init", fn, glue_types(fn, {
        "row_key_ptr": "*i64", "col_key_ptr": "*i64", "row_cnt_ptr": "*i32",
        "col_cnt_ptr": "*i32"}), dict(BLOCK=INIT_BLOCK), 4, 1  # fmt: skip
    fn = fns.decode_keys_kernel
    yield "glue decode_keys", fn, glue_types(fn, {
        "row_key_ptr": "*i64", "col_key_ptr": "*i64", "row_arg_ptr": "*i64",
        "col_arg_ptr": "*i64"}), dict(BLOCK=INIT_BLOCK), 4, 1  # fmt: skip


def compile_one(fn, types, constexprs, num_warps, num_stages, arch: int, **options):
    """Compile for sm_``arch``; ``options``: further compiler options (e.g. maxnreg)."""
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages, **options})
    return triton.compile(_source(fn, types, constexprs), target=target, options=options.__dict__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10")
    parser.add_argument("--list", action="store_true", help="list the specializations only")
    parser.add_argument("--quick", action="store_true", help="bfloat16 kernels only")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_{args.arch}", flush=True)
    failures = 0
    total = 0
    for label, fn, types, constexprs, num_warps, num_stages in specializations(args.quick):
        total += 1
        if args.list:
            print(label)
            continue
        start = time.perf_counter()
        try:
            compiled = compile_one(fn, types, constexprs, num_warps, num_stages, args.arch)
        except Exception as error:  # report every failing specialization, then fail
            failures += 1
            first = str(error).strip().splitlines()[:6]
            print(f"FAIL {label}: {type(error).__name__}: " + " | ".join(first), flush=True)
            continue
        ptx = compiled.asm.get("ptx", "")
        mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "fma")
        loads = "tma" if "cp.async.bulk.tensor" in ptx else "no tma"
        seconds = time.perf_counter() - start
        print(f"ok   {label}: {seconds:.1f} s, {mma}, {loads}, shared "
              f"{compiled.metadata.shared} B", flush=True)  # fmt: skip
    print(f"{total - failures}/{total} specializations compiled", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
