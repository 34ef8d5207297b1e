"""Static sm_90 profile of every Triton kernel, and a roofline model of its time (no GPU).

Usage:
    python bench/static_profile.py                    # every kernel, this triton
    python bench/static_profile.py --also PYTHON      # and again under another venv's triton
    python bench/static_profile.py --kernels partials --dtypes bf16,fp16 --check-no-spill

Each kernel specialisation the dispatch can launch (the one list in tests/triton_aot.py,
so a kernel added there is profiled here too) is compiled ahead of time for
``GPUTarget("cuda", 90, 32)``. From the cubin, with the cuobjdump and nvdisasm that ship
inside the triton wheel, and ptxas's own report, each row gives: registers, stack and
spill bytes, shared memory, whether wgmma (HGMMA) and TMA (UTMALDG) instructions are
used, and SASS instruction counts by pipe class, per S element, in the main loop (the
S product's K loop) and in the epilogue (the rest of the per-tile loop).

How instructions are attributed (documented, because every count depends on it):
- ptxas maps every SASS instruction to a PTX line (``nvdisasm -gp``) and the PTX ``.loc``
  comments carry the full inlining chain, so each instruction is attributed to the
  @triton.jit functions it came from.
- Loops are the SASS backward branches. A K loop is the innermost loop holding a
  multiply (MMA, or FFMA for fp32) of the S product (``MAIN_LOOP_FUNCTIONS``); its tile
  loop is the innermost loop strictly around it (the K loop itself when the compiler
  flattened the two). Other loops inside a tile loop (the backward's gradient loop) run
  D / BD times per tile.
- Epilogue = instructions of the tile loop outside its K loop and inner loops. A kernel
  with several tile loops (the forward: one for interior tiles, one for masked tiles)
  reports each as a *path* (``PATH_MARKERS``). A tile loop may also hold several K loops,
  one per path, each tile running one of them (the backward's parts A and B): a path's
  region then counts its own K loop and the instructions of the tile loop that are its
  own or shared, never another path's (told apart by the marker functions).
- Per S element = per-warp static count x 32 lanes x warps / (BM x BN): thread
  instructions per element when every instruction of the tile loop runs once per tile
  (branches inside it are counted as taken). The K loop's count per iteration is
  multiplied by D / BK.
- Instructions predicated on the constant false predicate (``@!PT``) are not counted.

The roofline model and its constants are in bench/static_model.py.
Everything it prints is a model prediction, never a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests"), str(REPO)]

from static_model import DIMS, model_rows, resident_ctas  # noqa: E402

RESULTS = REPO / "bench" / "results"
STATIC_CSV = RESULTS / "static_sm90.csv"
MODEL_CSV = RESULTS / "model_sm90.csv"

# SASS opcode -> pipe class on sm_90 (NVIDIA's descriptions of the Volta-Hopper pipes: the
# FMA pipe runs FP32 arithmetic and IMAD, the ALU pipe integer, logic, compare, min/max,
# select and data movement; MUFU and conversions run on the XU). Opcodes not listed fall
# in "other" (S2R). VIADD, MOV and CS2R (a register pair zeroed) are counted on the ALU,
# the conservative choice.
PIPES = {
    "tensor": "HGMMA HMMA IMMA QGMMA IGMMA",
    "fma": "FFMA FADD FMUL FFMA32I FADD32I FMUL32I IMAD IMUL IMUL32I IDP HFMA2 HADD2 HMUL2",
    "alu": "IADD3 IADD IADD32I LOP3 LOP LOP32I SHF SHL SHR ISETP ICMP SEL FSEL FSETP FMNMX "
    "FMNMX3 IMNMX VIMNMX VIMNMX3 VIADDMNMX VIADD IABS PRMT LEA ISCADD MOV MOV32I PLOP3 P2R "
    "R2P POPC FLO BREV BMSK SGXT F2FP I2FP FCHK VOTE HSETP2 HMNMX2 HSET2 FSET CSET CSETP "
    "CS2R",
    "xu": "MUFU F2F F2I I2F FRND F2IP I2IP I2I",
    "shfl": "SHFL",
    "local": "LDL STL",
    "mem": "LDG STG LDS STS LD ST LDSM STSM ATOM ATOMG ATOMS RED REDG LDGSTS LDC MATCH "
    "REDUX UTMALDG UTMASTG UTMAPF UBLKCP SYNCS LDGDEPBAR ARRIVES",
    "sync": "BAR BRA BRX BRXU EXIT BSSY BSYNC WARPSYNC NOP YIELD DEPBAR WARPGROUP MEMBAR "
    "FENCE ERRBAR CCTL CALL RET ELECT BREAK ACQBULK CGAERRBAR NANOSLEEP KILL BPT",
}
OPCODE_PIPE = {op: pipe for pipe, ops in PIPES.items() for op in ops.split()}
PIPE_NAMES = (*PIPES, "uniform", "other")
MMA_OPCODES = frozenset(PIPES["tensor"].split())
TMA_LOAD_OPCODES = frozenset(("UTMALDG", "UBLKCP"))
ATOMIC_OPCODES = frozenset(("ATOM", "ATOMG", "RED", "REDG"))

# A kernel's tile loops (or K loops) are told apart by a jit function only one of them
# calls: path name -> that function (for the forward: the tiles with invalid pairs; for
# the backward: its parts). A loop with none is "interior" in such a kernel, "all" in the
# others; further loops get a number.
PATH_MARKERS = {
    "partials_kernel": {"masked": "masked_scores"},
    "weights_kernel": {"part_a": "_part_a_tile", "part_b": "_part_b_tile"},
}
# The S product: instructions from these functions form the main loop.
MAIN_LOOP_FUNCTIONS = frozenset(("score_tile", "score_tile_at", "load_k_step"))


def pipe_of(opcode: str) -> str:
    base = opcode.split(".")[0]
    if base in OPCODE_PIPE:
        return OPCODE_PIPE[base]
    if base.startswith("U") or base in ("R2UR", "S2UR", "CS2UR"):
        return "uniform"
    return "other"


@dataclass
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. HGMMA.64x128x16.F32.BF16
    text: str
    ptx_line: int
    label: str | None = None  # label defined right before this instruction
    target: str | None = None  # branch target label
    functions: tuple[str, ...] = ()  # jit functions, innermost first
    never: bool = False  # predicated on !PT: never executes


INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
PTX_LINE = re.compile(r'//## File "\.nv_debug_ptx_txt", line (\d+)')
LABEL = re.compile(r"^(\.L_x_\d+):")
TARGET = re.compile(r"`\((\.L_x_\d+)\)")
LOC = re.compile(r"^\s*\.loc\s+\d+\s+\d+\s+\d+\s*//\s*(.*)$")
FRAME = re.compile(r"([\w./-]+\.py):(\d+)(?::\d+)?")


def disassemble(cubin: bytes, nvdisasm: str) -> list[Instruction]:
    """The SASS of a cubin, each instruction with the PTX line it came from."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run(
            [nvdisasm, "-c", "-gp", handle.name], capture_output=True, text=True, check=True
        ).stdout
    out, ptx_line, label = [], 0, None
    for line in text.splitlines():
        if m := PTX_LINE.search(line):
            ptx_line = int(m.group(1))
        elif m := LABEL.match(line):
            label = m.group(1)
        elif m := INSTRUCTION.match(line):
            body = m.group(2)
            never = body.startswith("@!PT ")
            words = body.split()
            opcode = words[1] if words[0].startswith("@") else words[0]
            target = TARGET.search(body)
            out.append(
                Instruction(
                    int(m.group(1), 16), opcode, body, ptx_line, label,
                    target.group(1) if target else None, never=never,
                )
            )  # fmt: skip
            label = None
    return out


def jit_function_lines() -> dict[tuple[str, int], str]:
    """(file name, line) -> name of the @triton.jit function of selhn_ext._triton there."""
    import triton

    from selhn_ext import _triton

    lines = {}
    package = Path(_triton.__file__).parent
    for path in sorted(package.glob("*.py")):
        module = __import__(f"selhn_ext._triton.{path.stem}", fromlist=["_"])
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.jit.JITFunction):
                source, first = inspect.getsourcelines(obj.fn)
                for offset in range(len(source)):
                    lines[(path.name, first + offset)] = name
    return lines


def attribute(instructions: list[Instruction], ptx: str, lines: dict) -> None:
    """Give every instruction the chain of jit functions its PTX line was inlined from."""
    chains, current = {}, ()
    for number, line in enumerate(ptx.splitlines(), start=1):
        if m := LOC.match(line):
            frames = FRAME.findall(m.group(1))
            names = []
            for file, lineno in frames:
                name = lines.get((Path(file).name, int(lineno)))
                if name and (not names or names[-1] != name):
                    names.append(name)
            current = tuple(names)
        chains[number] = current
    for instruction in instructions:
        instruction.functions = chains.get(instruction.ptx_line, ())


def loops(instructions: list[Instruction]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every loop: a branch back to an earlier label."""
    where = {ins.label: i for i, ins in enumerate(instructions) if ins.label}
    found = []
    for i, ins in enumerate(instructions):
        if ins.target is not None and where.get(ins.target, i + 1) <= i:
            found.append((where[ins.target], i))
    return found


@dataclass
class Regions:
    """Instructions of one tile loop by how often they run per tile."""

    k_loop: list[int] = field(default_factory=list)  # once per K step
    inner: list[int] = field(default_factory=list)  # once per step of another inner loop
    epilogue: list[int] = field(default_factory=list)  # once per tile
    flattened: bool = False
    functions: frozenset[str] = frozenset()  # jit functions of the epilogue


def find_regions(instructions: list[Instruction]) -> list[Regions]:
    """One Regions per tile loop: K loops are the innermost loops with a multiply (MMA or
    FFMA) from the S product, each tile loop the innermost loop strictly around one."""

    def is_main(ins):
        return not MAIN_LOOP_FUNCTIONS.isdisjoint(ins.functions)

    spans = sorted(loops(instructions), key=lambda span: span[1] - span[0])
    products = [
        i for i, ins in enumerate(instructions)
        if is_main(ins) and ins.opcode.split(".")[0] in MMA_OPCODES | {"FFMA"}
    ]  # fmt: skip
    k_spans = []
    for i in products:
        span = next((s for s in spans if s[0] <= i <= s[1]), None)
        if span is not None and span not in k_spans:
            k_spans.append(span)
    found = []
    for k_span in sorted(k_spans):
        around = [s for s in spans if s[0] <= k_span[0] and k_span[1] <= s[1] and s != k_span]
        tile = around[0] if around else k_span
        # Another K loop in the same tile loop is another path's, not an inner loop.
        inner = [
            s for s in spans
            if tile[0] <= s[0] and s[1] <= tile[1] and s != tile and s not in k_spans
        ]  # fmt: skip
        regions = Regions(flattened=tile == k_span)
        for i in range(tile[0], tile[1] + 1):
            in_k = is_main(instructions[i]) if regions.flattened else k_span[0] <= i <= k_span[1]
            if not in_k and any(s[0] <= i <= s[1] for s in k_spans):
                continue  # another path's K loop
            if in_k:
                regions.k_loop.append(i)
            elif any(s[0] <= i <= s[1] for s in inner):
                regions.inner.append(i)
            else:
                regions.epilogue.append(i)
        regions.functions = frozenset(
            name for i in regions.epilogue for name in instructions[i].functions
        )
        found.append(regions)
    return found


MMA_SHAPE = re.compile(r"(\d+)x(\d+)x(\d+)")


def mma_fma(instructions: list[Instruction], indices, num_warps: int) -> int:
    """Multiply-adds of the MMA instructions, per CTA: HGMMA m x n x k per warpgroup (each of
    its 4 warps issues it), HMMA.16816 16 x 8 x 16 per warp."""
    total = 0
    for i in indices:
        ins = instructions[i]
        base = ins.opcode.split(".")[0]
        if ins.never or base not in MMA_OPCODES:
            continue
        m = MMA_SHAPE.search(ins.opcode)
        if base in ("HGMMA", "QGMMA", "IGMMA") and m:
            total += math.prod(map(int, m.groups())) * num_warps // 4
        elif m is None and ".16816" in ins.opcode:
            total += 16 * 8 * 16 * num_warps
        elif m is None and ".1688" in ins.opcode:
            total += 16 * 8 * 8 * num_warps
    return total


def count_pipes(instructions: list[Instruction], indices) -> dict[str, int]:
    """Instructions by pipe, and "atomic": how many of the "mem" ones are global atomics."""
    counts = dict.fromkeys((*PIPE_NAMES, "atomic"), 0)
    for i in indices:
        ins = instructions[i]
        if not ins.never:
            counts[pipe_of(ins.opcode)] += 1
            counts["atomic"] += ins.opcode.split(".")[0] in ATOMIC_OPCODES
    return counts


SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_with_report(fn, types, constexprs, num_warps, num_stages, **options):
    """(compiled kernel, ptxas report text). Needs a cold cache so that ptxas runs.
    ``options``: further compiler options (bench/tile_sweep.py's register caps)."""
    import triton
    from triton_aot import compile_one

    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = compile_one(fn, types, constexprs, num_warps, num_stages, 90, **options)
    return compiled, log.getvalue()


def resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run(
            [tool("cuobjdump"), "--dump-resource-usage", handle.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    m = RESOURCE.search(text)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{text}")
    return dict(zip(("regs", "stack", "static_shared", "local"), map(int, m.groups()), strict=True))


@dataclass
class Profile:
    """One compiled specialisation: static facts and per-warp instruction counts."""

    triton: str
    kernel: str
    label: str
    dtype: str
    num_warps: int
    num_stages: int
    BM: int
    BN: int
    BK: int
    BD: int
    regs: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    wgmma: bool
    tma_loads: bool
    flattened: bool
    k_loop: dict[str, int]  # per K step
    inner_loop: dict[str, int]  # per step of the tile's other loops (D / BD steps)
    epilogue: dict[str, dict[str, int]]  # path -> once per tile
    k_mma_fma: int  # multiply-adds per K step, per CTA
    inner_mma_fma: int

    def steps(self, dim: int) -> tuple[int, int]:
        """(K steps, inner-loop steps) of one tile for embedding size ``dim``."""
        return math.ceil(dim / self.BK) if self.BK else 0, math.ceil(
            dim / self.BD
        ) if self.BD else 1

    def per_element(self, counts: dict[str, float], repeat: int = 1) -> dict[str, float]:
        """Thread instructions per S element of per-warp counts run ``repeat`` times a tile."""
        if not self.BM or not self.BN:
            return {pipe: math.nan for pipe in counts}
        scale = repeat * 32 * self.num_warps / (self.BM * self.BN)
        return {pipe: n * scale for pipe, n in counts.items()}

    def tile_fma(self, dim: int) -> int:
        k_steps, inner_steps = self.steps(dim)
        return self.k_mma_fma * k_steps + self.inner_mma_fma * inner_steps


def profile_one(label, fn, types, constexprs, num_warps, num_stages, lines, **options) -> Profile:
    import triton

    compiled, log = compile_with_report(fn, types, constexprs, num_warps, num_stages, **options)
    cubin = compiled.asm["cubin"]
    usage = resource_usage(cubin)
    spills = SPILLS.search(log)
    if spills is None:
        raise RuntimeError(f"{label}: no ptxas report (was the kernel in the triton cache?)")
    instructions = disassemble(cubin, tool("nvdisasm"))
    attribute(instructions, compiled.asm["ptx"], lines)
    opcodes = {ins.opcode.split(".")[0] for ins in instructions if not ins.never}
    loops_by_path = {}
    markers = PATH_MARKERS.get(fn.__name__, {})
    for number, regions in enumerate(find_regions(instructions)):
        k_functions = {name for i in regions.k_loop for name in instructions[i].functions}
        path = next((name for name, f in markers.items() if f in k_functions), None)
        if path is None:
            path = next((name for name, f in markers.items() if f in regions.functions), None)
        if path is None:
            path = "interior" if markers else "all"
        if path in loops_by_path:
            path = f"{path}{number}"
        others = {f for name, f in markers.items() if name != path}
        regions.epilogue = [
            i for i in regions.epilogue if others.isdisjoint(instructions[i].functions)
        ]
        loops_by_path[path] = regions
    # The K loop and MMA work of the first path's loop (all loops run the same S product).
    main = next(iter(loops_by_path.values()), Regions())
    block = {name: int(constexprs.get(name, 0)) for name in ("BM", "BN", "BK", "BD")}
    return Profile(
        triton=triton.__version__, kernel=fn.__name__, label=label,
        dtype=label.split()[1].removeprefix("torch.") if "torch." in label else "",
        num_warps=num_warps, num_stages=num_stages, **block,
        regs=usage["regs"], stack_bytes=usage["stack"],
        spill_store_bytes=int(spills.group(1)), spill_load_bytes=int(spills.group(2)),
        shared_bytes=compiled.metadata.shared + usage["static_shared"],
        wgmma="HGMMA" in opcodes, tma_loads=bool(opcodes & TMA_LOAD_OPCODES),
        flattened=main.flattened,
        k_loop=count_pipes(instructions, main.k_loop),
        inner_loop=count_pipes(instructions, main.inner),
        epilogue={path: count_pipes(instructions, r.epilogue) for path, r in loops_by_path.items()},
        k_mma_fma=mma_fma(instructions, main.k_loop, num_warps),
        inner_mma_fma=mma_fma(instructions, main.inner, num_warps),
    )  # fmt: skip


def static_rows(profiles: list[Profile]) -> list[dict]:
    """One row per kernel specialisation, D and epilogue path (thread instructions per S
    element by pipe; 'main' = the K loop over D, 'epi' = the rest of the tile)."""
    rows = []
    for p in profiles:
        for dim in DIMS:
            k_steps, inner_steps = p.steps(dim)
            main = p.per_element(p.k_loop, k_steps)
            inner = p.per_element(p.inner_loop, inner_steps)
            for path, counts in p.epilogue.items() or {"none": {}}.items():
                epi = p.per_element(counts)
                row = {
                    "triton": p.triton, "kernel": p.kernel, "label": p.label, "dtype": p.dtype,
                    "D": dim, "path": path, "tile": f"{p.BM}x{p.BN}x{p.BK}",
                    "num_warps": p.num_warps, "num_stages": p.num_stages, "regs": p.regs,
                    "stack_bytes": p.stack_bytes, "spill_store_bytes": p.spill_store_bytes,
                    "spill_load_bytes": p.spill_load_bytes, "shared_bytes": p.shared_bytes,
                    "wgmma": p.wgmma, "tma_loads": p.tma_loads, "flattened": p.flattened,
                    "ctas_per_sm": resident_ctas(p),
                }  # fmt: skip
                for prefix, counts_per in (("main", main), ("inner", inner), ("epi", epi)):
                    for pipe in (*PIPE_NAMES, "atomic"):
                        row[f"{prefix}_{pipe}"] = round(counts_per.get(pipe, math.nan), 3)
                    row[f"{prefix}_total"] = round(
                        sum(v for k, v in counts_per.items() if k != "atomic"), 3
                    )
                rows.append(row)
    return rows


DTYPE_NAMES = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}


def selected(label: str, fn, args) -> bool:
    if args.kernels and fn.__name__ not in args.kernels.split(","):
        return False
    if args.dtypes and not any(
        f"{DTYPE_NAMES[d]} " in label for d in args.dtypes.split(",")
    ):  # fmt: skip
        return False
    return all(part in label for part in (args.select or "").split(",") if part)


def collect(args) -> list[Profile]:
    from triton_aot import specializations

    lines = jit_function_lines()
    profiles = []
    for label, fn, types, constexprs, num_warps, num_stages in specializations():
        if selected(label, fn, args):
            profiles.append(profile_one(label, fn, types, constexprs, num_warps, num_stages,
                                        lines))  # fmt: skip
            p = profiles[-1]
            spills = f"{p.spill_store_bytes}/{p.spill_load_bytes} B"
            print(f"  {p.triton} {label}: {p.regs} regs, stack {p.stack_bytes} B, spills {spills}",
                  file=sys.stderr, flush=True)  # fmt: skip
    return profiles


def from_other_python(python: str, argv: list[str]) -> list[Profile]:
    """Profiles made by this script under another interpreter (another triton)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profiles.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        subprocess.run([python, __file__, *argv, "--json-out", str(out)], check=True, env=env)
        return [Profile(**item) for item in json.loads(out.read_text())]


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def merged_rows(path: Path, rows: list[dict]) -> list[dict]:
    """``rows``, after the rows of ``path`` for the specialisations (triton version and
    label) that ``rows`` does not cover: profiling a few kernels keeps the others' rows."""
    if not path.exists():
        return rows
    new = {(row["triton"], row["label"]) for row in rows}
    with open(path, newline="") as handle:
        kept = [row for row in csv.DictReader(handle) if (row["triton"], row["label"]) not in new]
    if kept and list(kept[0]) != list(rows[0]):
        return rows  # an older column layout: start again
    return kept + rows


def print_summary(profiles: list[Profile], model: list[dict]) -> None:
    print("static sm_90 profile: thread instructions per S element (D = 1024)")
    print(
        f"{'triton':7} {'kernel specialisation':64} {'path':8} {'regs':>4} {'stack':>5} "
        f"{'spill':>5} {'wgmma':>5} {'tma':>3} {'main':>6} {'epi':>6} {'epi alu':>7}"
    )
    for row in static_rows(profiles):
        if row["D"] != 1024:
            continue
        print(f"{row['triton']:7} {row['label'][:64]:64} {row['path'][:8]:8} {row['regs']:4} "
              f"{row['stack_bytes']:5} {row['spill_store_bytes']:5} {row['wgmma']!s:>5} "
              f"{row['tma_loads']!s:>3} {row['main_total']:6.1f} {row['epi_total']:6.1f} "
              f"{row['epi_alu']:7.1f}")  # fmt: skip
    if model:
        print("MODEL (not a measurement): ratio of forward + backward to one torch.mm")
        for row in model:
            print(f"  {row['device']:18} triton {row['triton']} {row['dtype']:8} "
                  f"D={row['D']:<5} gated {row['gated_fraction']:>4.0%}: forward kernel "
                  f"{row['forward_kernel_ratio']:.2f}x, forward {row['forward_ratio']:.2f}x, "
                  f"forward+backward {row['forward_backward_ratio']:.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", help="kernel function names, comma-separated")
    parser.add_argument("--dtypes", help="bf16, fp16, fp32, comma-separated")
    parser.add_argument("--select", help="substrings the label must all hold, comma-separated")
    parser.add_argument("--also", action="append", default=[], metavar="PYTHON",
                        help="also profile under this interpreter (another triton)")  # fmt: skip
    parser.add_argument("--check-no-spill", action="store_true",
                        help="exit 1 if a profiled kernel spills or uses stack")  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="write no CSV")
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as cache:
        # A cold cache: ptxas must run for its spill report.
        os.environ["TRITON_CACHE_DIR"] = cache
        profiles = collect(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([asdict(p) for p in profiles]))
        return 0
    forwarded = [
        a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--also")
    ]
    for python in args.also:
        profiles += from_other_python(python, [a for a in forwarded if a != python])
    model = model_rows(profiles)
    print_summary(profiles, model)
    if not args.no_write and profiles:
        write_csv(STATIC_CSV, merged_rows(STATIC_CSV, static_rows(profiles)))
        if model:
            write_csv(MODEL_CSV, model)
    if args.check_no_spill:
        bad = [p for p in profiles if p.spill_store_bytes or p.spill_load_bytes or p.stack_bytes]
        for p in bad:
            print(f"SPILL {p.triton} {p.label}: stack {p.stack_bytes} B, spill stores "
                  f"{p.spill_store_bytes} B, loads {p.spill_load_bytes} B")  # fmt: skip
        if bad or not profiles:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
