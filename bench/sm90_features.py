"""Can plain Triton cut the forward's L2 operand traffic or overlap its epilogue with the
MMA inside one CTA on sm_90? Compile-only evidence (no GPU).

    python bench/sm90_features.py [--also /path/to/other/venv/bin/python] [--no-write]
    python bench/sm90_features.py --what-if   # what the features would buy: MODEL only

The forward's K loop is bound, in the roofline model (bench/static_model.py), by the L2
traffic of its 128 x 128 operand tiles; a 256 x 128 tile cuts that traffic by a quarter
but holds one CTA per SM, where the epilogue no longer hides under another CTA's MMA.
Two compiler features could change that, and each candidate below is compiled ahead of
time for sm_90 (``GPUTarget("cuda", 90, 32)``, cold cache, one subprocess each so that a
compiler crash is a row, not the end of the run):

- a CTA cluster (``num_ctas=2``, the only cluster option triton's CUDA backend takes)
  whose CTAs share an operand tile through TMA multicast: the row records whether PTX
  or SASS holds a multicast load;
- automatic warp specialization (``tl.range(..., warp_specialize=True)``, Hopper's
  producer/consumer partitions with ``setmaxnreg``): the row records whether TTGIR holds
  a ``ttg.warp_specialize`` op and PTX ``setmaxnreg``.

Kernels: ``partials_kernel`` itself (the headline specialisation of tests/triton_aot.py:
bf16, no ids, not deterministic, tensor descriptors), and for warp specialization a copy
of it whose loops carry the option (``ws_copy``: a textual edit of forward_kernels.py
and tile.py into a temporary folder; the library's source is not changed); and a minimal
persistent TMA-descriptor matmul (``probe_kernel``: the same loads and K loop, an
epilogue that either stores the tile or merges its row maxima with an atomic max, as the
forward's epilogue does), to tell the forward's structure apart from the feature; and a
trivial Gluon kernel (``gluon_probe_kernel``) with explicit warp specialization and worker
register counts, the route that remains (its row: does Hopper lower it, with setmaxnreg).

Rows go to bench/results/features_sm90.csv. No row is a time: the script decides nothing,
it records what the compilers did. ``--what-if`` prints, from the roofline model of
bench/static_model.py (MODEL PREDICTIONS, never measurements), what either feature would
buy if a kernel had it: 256 x 128 at 8 warps with its epilogue hidden under its own K loop
(the larger of the two per tile instead of their sum), and the kept tile in a 2-CTA
cluster multicasting its column tile (24 of its 32 KB per K step from L2).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests"), str(REPO)]

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402

FEATURES_CSV = REPO / "bench" / "results" / "features_sm90.csv"
HEADLINE_FORWARD = "partials torch.bfloat16 ieee ids=False deterministic=False tma=True"
REGISTERS_PER_SM, SHARED_PER_SM, WARPS_PER_SM = 65536, 228 * 1024, 64


@triton.jit
def probe_kernel(a_ptr, b_ptr, out_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, WS_K: tl.constexpr, WS_TILES: tl.constexpr,
                 ROW_MAX: tl.constexpr):  # fmt: skip
    """Persistent grid over (M / BM) x (N / BN) tiles of A @ B.T read through tensor
    descriptors. ROW_MAX: merge each tile's row maxima with an atomic max (a reducing
    epilogue, as the forward's); otherwise store the tile."""
    a = tl.make_tensor_descriptor(a_ptr, [M, K], [K, 1], [BM, BK])
    b = tl.make_tensor_descriptor(b_ptr, [N, K], [K, 1], [BN, BK])
    col_blocks = tl.cdiv(N, BN)
    tiles = tl.cdiv(M, BM) * col_blocks
    for t in tl.range(tl.program_id(0), tiles, tl.num_programs(0), warp_specialize=WS_TILES,
                      flatten=WS_TILES):  # fmt: skip
        row0 = (t // col_blocks) * BM
        col0 = (t % col_blocks) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in tl.range(0, K, BK, warp_specialize=WS_K):
            acc = tl.dot(a.load([row0, k0]), tl.trans(b.load([col0, k0])), acc)
        rows = row0 + tl.arange(0, BM)
        if ROW_MAX:
            tl.atomic_max(out_ptr + rows, tl.max(acc, axis=1))
        else:
            cols = col0 + tl.arange(0, BN)
            tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc)


@gluon.jit
def gluon_fill(ptr, value, BLOCK: gl.constexpr, WARPS: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    offs = gl.arange(0, BLOCK, layout=layout)
    gl.store(ptr + offs, gl.full([BLOCK], value, gl.float32, layout))


@gluon.jit
def gluon_default_partition(ptr, BLOCK: gl.constexpr):
    gluon_fill(ptr, 1.0, BLOCK, 4)


@gluon.jit
def gluon_worker_partition(ptr, BLOCK: gl.constexpr):
    gluon_fill(ptr + BLOCK, 2.0, BLOCK, 1)


@gluon.jit
def gluon_probe_kernel(ptr, BLOCK: gl.constexpr):
    """Explicit warp specialization (the route left, see the README): a default
    partition of 4 warps and a 1-warp worker with 40 registers, each storing a block."""
    gl.warp_specialize([(gluon_default_partition, (ptr, BLOCK)),
                        (gluon_worker_partition, (ptr, BLOCK))], [1], [40])  # fmt: skip


# (kernel, variant, BM, BN, num_warps, compiler options, warp-specialized loops, epilogue)
CANDIDATES = (
    ("partials_kernel", "kept", 128, 128, 4, {}, "", ""),
    ("partials_kernel", "cluster", 128, 128, 4, {"num_ctas": 2}, "", ""),
    ("partials_kernel", "cluster", 128, 128, 8, {"num_ctas": 2}, "", ""),
    ("partials_kernel", "ws", 128, 128, 4, {}, "k", ""),
    ("partials_kernel", "ws", 256, 128, 4, {}, "k", ""),
    ("partials_kernel", "ws", 256, 128, 8, {}, "k", ""),
    ("partials_kernel", "ws", 128, 128, 4, {}, "tiles", ""),
    ("probe_kernel", "kept", 128, 128, 4, {}, "", "store"),
    ("probe_kernel", "cluster", 128, 128, 4, {"num_ctas": 2}, "", "store"),
    ("probe_kernel", "cluster", 256, 128, 8, {"num_ctas": 2}, "", "store"),
    ("probe_kernel", "ws", 128, 128, 4, {}, "k", "store"),
    ("probe_kernel", "ws", 256, 128, 4, {}, "k", "store"),
    ("probe_kernel", "ws", 256, 128, 8, {}, "k", "store"),
    ("probe_kernel", "ws", 128, 128, 4, {}, "tiles", "store"),
    ("probe_kernel", "kept", 128, 128, 4, {}, "", "row_max"),
    ("probe_kernel", "ws", 64, 128, 4, {}, "k", "row_max"),
    ("probe_kernel", "ws", 128, 128, 4, {}, "k", "row_max"),
    ("probe_kernel", "ws", 256, 128, 4, {}, "k", "row_max"),
    ("gluon_probe_kernel", "gluon ws", 128, 0, 4, {}, "explicit", "store"),
)

# The two loops of the forward that ws_copy marks: the K loop of every S tile, and the
# interior tiles' persistent loop.
K_LOOP = "for k0 in range(0, D, BK):"
TILE_LOOP = "for t in tl.range(pid, n_tiles, interior_programs):"


def ws_copy(folder: Path, loops: str):
    """partials_kernel from a copy of forward_kernels.py and tile.py in ``folder`` whose
    K loops (``loops`` == "k") or interior tile loop ("tiles") are warp-specialized."""
    source = REPO / "selhn_ext" / "_triton"
    tile_text = (source / "tile.py").read_text()
    forward_text = (source / "forward_kernels.py").read_text()
    for text, line in ((tile_text, K_LOOP), (forward_text, TILE_LOOP)):
        if line not in text:
            raise RuntimeError(f"ws_copy: the loop {line!r} is no longer in the source")
    if loops == "k":
        marked = K_LOOP.replace("range(0, D, BK)", "tl.range(0, D, BK, warp_specialize=True)")
        tile_text = tile_text.replace(K_LOOP, marked)
    else:
        marked = TILE_LOOP.replace("programs)", "programs, warp_specialize=True, flatten=True)")
        forward_text = forward_text.replace(TILE_LOOP, marked)
    forward_text = forward_text.replace("from .tile import", "from ws_tile import")
    (folder / "ws_tile.py").write_text(tile_text)
    (folder / "ws_forward_kernels.py").write_text(forward_text)
    sys.path.insert(0, str(folder))
    for name in ("ws_forward_kernels", "ws_tile"):  # a copy made earlier in this process
        sys.modules.pop(name, None)
    import ws_forward_kernels

    return ws_forward_kernels.partials_kernel


def compile_candidate(kernel, BM, BN, num_warps, options, loops, epilogue, folder: Path):
    """(compiled kernel, ptxas report) of one candidate."""
    from static_profile import compile_with_report
    from triton_aot import specializations

    if kernel == "partials_kernel":
        specs = {label: rest for label, *rest in specializations()}
        fn, types, constexprs, _, num_stages = specs[HEADLINE_FORWARD]
        if loops:
            fn = ws_copy(folder, loops)
        constexprs = dict(constexprs, BM=BM, BN=BN)
        return compile_with_report(fn, types, constexprs, num_warps, num_stages, **options)
    if kernel == "gluon_probe_kernel":
        return compile_gluon_probe(BM, num_warps)
    types = {"a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*fp32", "M": "i32", "N": "i32",
             "K": "i32"}  # fmt: skip
    constexprs = dict(BM=BM, BN=BN, BK=64, WS_K=loops == "k", WS_TILES=loops == "tiles",
                      ROW_MAX=epilogue == "row_max")  # fmt: skip
    assert set(inspect.signature(probe_kernel.fn).parameters) == {*types, *constexprs}
    from triton_aot import compile_one

    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = compile_one(probe_kernel, types, constexprs, num_warps, 3, 90, **options)
    return compiled, log.getvalue()


def compile_gluon_probe(block: int, num_warps: int):
    """(compiled gluon_probe_kernel, ptxas report) for sm_90."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    params = inspect.signature(GluonASTSource.__init__).parameters
    key = "constexprs" if "constexprs" in params else "constants"
    source = GluonASTSource(gluon_probe_kernel, {"ptr": "*fp32", "BLOCK": "constexpr"},
                            **{key: {"BLOCK": block}})  # fmt: skip
    target = GPUTarget("cuda", 90, 32)
    options = triton.compiler.make_backend(target).parse_options({"num_warps": num_warps})
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=target, options=options.__dict__)
    return compiled, log.getvalue()


def facts(compiled, log: str) -> dict:
    """Resources and the features' traces in TTGIR, PTX and SASS."""
    from static_profile import SPILLS, disassemble, resource_usage, tool

    usage = resource_usage(compiled.asm["cubin"])
    spills = SPILLS.search(log)
    instructions = disassemble(compiled.asm["cubin"], tool("nvdisasm"))
    opcodes = [i.opcode for i in instructions if not i.never]
    sass = collections.Counter(op.split(".")[0] for op in opcodes)
    multicast_sass = sum("MULTICAST" in op for op in opcodes)
    shapes = {op.split(".")[1] for op in opcodes if op.startswith("HGMMA.")}
    ptx = compiled.asm["ptx"]
    warps = compiled.metadata.num_warps  # every partition's warps, when warp-specialized
    shared = compiled.metadata.shared + usage["static_shared"]
    regs = -(-usage["regs"] // 8) * 8 * 32 * warps
    # 0: the CTA does not fit an SM (shared memory above its 228 KB).
    ctas = min(REGISTERS_PER_SM // regs, SHARED_PER_SM // max(shared, 1), WARPS_PER_SM // warps)
    cluster = re.search(r"\.reqnctapercluster (\d+)", ptx)
    return {
        "compiled": "yes", "error": "", "sass_instructions": len(opcodes),
        "regs": usage["regs"], "stack_bytes": usage["stack"],
        "spill_store_bytes": int(spills.group(1)) if spills else "",
        "spill_load_bytes": int(spills.group(2)) if spills else "",
        "shared_bytes": shared, "total_warps": warps, "ctas_per_sm": ctas,
        "cluster_ctas": int(cluster.group(1)) if cluster else 1, "hgmma": sass["HGMMA"],
        "hgmma_shapes": " ".join(sorted(shapes)),
        "tma_loads": sass["UTMALDG"], "multicast_sass": multicast_sass,
        "multicast_ptx": ptx.count(".multicast::cluster"),
        "warp_specialize_ttgir": compiled.asm["ttgir"].count("ttg.warp_specialize"),
        "setmaxnreg_ptx": len(re.findall(r"setmaxnreg\.", ptx)),
        "setmaxreg_sass": sass["USETMAXREG"],
        "atomics": sass["ATOMG"] + sass["REDG"] + sass["RED"] + sass["ATOM"],
    }  # fmt: skip


def run_one(candidate: list, out: Path) -> None:
    """Compile one candidate (called in its own process); write its row as JSON."""
    kernel, variant, BM, BN, num_warps, options, loops, epilogue = candidate
    row = {"triton": triton.__version__, "kernel": kernel, "variant": variant,
           "tile": f"{BM}x{BN}x64" if BN else f"block {BM}", "num_warps": num_warps,
           "options": " ".join(f"{k}={v}" for k, v in options.items()),
           "warp_specialized_loop": loops, "epilogue": epilogue or "forward"}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        os.environ["TRITON_CACHE_DIR"] = folder + "/cache"  # cold: ptxas reports spills
        try:
            compiled, log = compile_candidate(kernel, BM, BN, num_warps, options, loops,
                                              epilogue, Path(folder))  # fmt: skip
            row.update(facts(compiled, log))
        except Exception as exc:  # a compiler failure is a fact to record
            row.update({"compiled": "no", "error": f"{type(exc).__name__}: {exc}"[:200]})
    out.write_text(json.dumps(row))


def first_reason(stderr: str) -> str:
    """The compiler's own words for a failure (an assertion, UNREACHABLE, a pass)."""
    for pattern in (r"Assertion `[^']*' failed", r"UNREACHABLE[^\n]*", r"Pipeline failed while "
                    r"executing \[`\w+`"):  # fmt: skip
        m = re.search(pattern, stderr)
        if m:
            before = stderr[: m.start()].rstrip().splitlines()
            note = before[-1].strip() if before and pattern.startswith("UNREACH") else ""
            return f"{note} {m.group(0)}".strip()
    return ""


def run_all(python: str) -> list[dict]:
    rows = []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        for number, candidate in enumerate(CANDIDATES):
            out = Path(tmp) / f"{number}.json"
            done = subprocess.run([python, __file__, "--one", json.dumps(candidate), "--out",
                                   str(out)], env=env, capture_output=True, text=True)  # fmt: skip
            if out.exists():
                row = json.loads(out.read_text())
            else:
                row = {"kernel": candidate[0], "variant": candidate[1], "compiled": "no",
                       "error": f"process exited {done.returncode}"}  # fmt: skip
            if row["compiled"] == "no":
                row["error"] = (first_reason(done.stderr) or row["error"]).replace("\n", " ")
            print(summary(row), flush=True)
            rows.append(row)
    return rows


def summary(row: dict) -> str:
    head = (f"  {row.get('triton', '?'):6} {row['kernel'][:8]:8} {row['variant']:7} "
            f"{row.get('tile', ''):10} w{row.get('num_warps', '')} {row.get('options', ''):10} "
            f"ws:{row.get('warp_specialized_loop', '') or '-':5} "
            f"{row.get('epilogue', ''):8}")  # fmt: skip
    if row["compiled"] == "no":
        return f"{head} FAILED: {row['error']}"
    return (f"{head} SASS {row['sass_instructions']} regs {row['regs']} stack "
            f"{row['stack_bytes']} spill "
            f"{row['spill_store_bytes']}/{row['spill_load_bytes']} smem {row['shared_bytes']} "
            f"warps {row['total_warps']} CTAs/SM {row['ctas_per_sm']} cluster "
            f"{row['cluster_ctas']} HGMMA {row['hgmma']} {row['hgmma_shapes']} "
            f"UTMALDG {row['tma_loads']} multicast {row['multicast_sass']}/"
            f"{row['multicast_ptx']} ws-op {row['warp_specialize_ttgir']} setmaxnreg "
            f"{row['setmaxnreg_ptx']}/{row['setmaxreg_sass']} atomics "
            f"{row['atomics']}")  # fmt: skip


def what_if() -> None:
    """Print the model's forward and forward + backward ratios for the what-ifs (MODEL)."""
    import dataclasses

    import static_model
    import tile_sweep
    from static_profile import Profile

    kept, wide = tile_sweep.kept_candidate(), tile_sweep.Candidate(256, 128, 64, 8, 3)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        results = tile_sweep.profile_candidates([kept, wide], tile_sweep.kept_backward_candidate())
    profiles = [Profile(**r["profile"]) for r in results]
    kept_backward = tile_sweep.kept_backward_candidate()
    backward = next(
        p for p in profiles if p.kernel == "weights_kernel"
        and (p.BM, p.num_warps) == (kept_backward.BM, kept_backward.num_warps)
    )  # fmt: skip
    forward = {p.BM: p for p in profiles if p.kernel == "partials_kernel"}
    label = static_model.FORWARD_MODEL_LABELS[0].format(dtype="bfloat16")

    def show(name: str, forward: Profile) -> None:
        rows = static_model.model_rows([dataclasses.replace(forward, label=label), backward])
        rows = [r for r in rows if r["D"] == 1024 and r["device"] == rows[0]["device"]]
        ratios = ", ".join(f"{r['gated_fraction']:.0%} {r['forward_backward_ratio']:.2f}x"
                           for r in rows)  # fmt: skip
        print(
            f"  {name}: forward kernel {rows[0]['forward_kernel_ratio']:.2f}x; "
            f"forward + backward at {ratios} ({rows[0]['device']}, triton {forward.triton})"
        )

    print("MODEL what-ifs, B = N = 16384, D = 1024, bf16 (not measurements):")
    show(f"{kept.name} as compiled", forward[kept.BM])
    show(f"{wide.name} as compiled", forward[wide.BM])
    tile_seconds = static_model.tile_seconds

    def overlapped(p, path, dim, device):  # the forward's tiles only
        parts = tile_seconds(p, path, dim, device)
        if p.kernel == "partials_kernel":
            parts = dict(parts, tile=max(parts["main"], parts["epilogue"]))
        return parts

    def multicast(p, path, dim, device):  # the forward's operand bytes from L2: 24 of 32
        if p.kernel == "partials_kernel":
            device = dataclasses.replace(device, l2_bytes_per_s=device.l2_bytes_per_s * 32 / 24)
        return tile_seconds(p, path, dim, device)

    try:
        static_model.tile_seconds = overlapped
        show(f"{wide.name}, epilogue hidden under its K loop", forward[wide.BM])
        static_model.tile_seconds = multicast
        show(f"{kept.name}, column tile multicast to a 2-CTA cluster", forward[kept.BM])
    finally:
        static_model.tile_seconds = tile_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--also", action="append", default=[], metavar="PYTHON",
                        help="also compile under this interpreter (another triton)")  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="write no CSV")
    parser.add_argument("--what-if", action="store_true",
                        help="print the model's what-ifs (MODEL) instead of compiling")  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    if args.one:
        run_one(json.loads(args.one), Path(args.out))
        return 0
    if args.what_if:
        what_if()
        return 0
    print("sm_90 compiles of the cluster and warp-specialization candidates (no times)")
    rows = []
    for python in (sys.executable, *args.also):
        rows += run_all(python)
    if not args.no_write and rows:
        from static_profile import write_csv

        columns = list(dict.fromkeys(k for r in rows for k in r))
        write_csv(FEATURES_CSV, [{k: r.get(k, "") for k in columns} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
