"""The forward's tile shape on sm_90: each candidate compiled, profiled and modelled (no GPU).

    python bench/tile_sweep.py [--also /path/to/other/venv/bin/python] [--no-write]

Each candidate below (tile BM x BN x BK, warps, pipeline stages, register cap) replaces
the kept configuration (``CONFIGS`` in selhn_ext/_triton/config.py) in the headline
forward specialisation, ``partials_kernel`` in bf16 without ids, not deterministic, with
tensor descriptors; it is compiled ahead of time for sm_90 and profiled as
bench/static_profile.py does, and the roofline model of bench/static_model.py predicts
its time, with the backward at the kept configuration. The backward's S-tile kernel
(``weights_kernel``, bf16, no ids) is swept too, at the candidates its panels allow
(BM and BN dividing PANEL_UNIT in selhn_ext/_triton/backward.py: 256-row tiles do not),
and modelled with the kept forward.

Rows go to bench/results/tiles_sm90.csv: one per kernel, candidate, triton version and
modelled card, with the static facts at D = 1024 and the model's ratios to one torch.mm
at B = 16384, D = 1024 (columns ``model_*``: MODEL PREDICTIONS, never measurements).

The rule that picks the kept shape: no spill and no stack (a hard requirement), then the
lowest modelled forward kernel time. The sweep reports the candidate the rule prefers;
config.py keeps it (tests/test_static_profile.py checks that they agree).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests"), str(REPO)]

from static_model import BACKWARD_MODEL_LABEL, FORWARD_MODEL_LABELS, model_rows  # noqa: E402
from static_profile import (  # noqa: E402
    RESULTS,
    Profile,
    jit_function_lines,
    profile_one,
    resident_ctas,
    static_rows,
    write_csv,
)

TILES_CSV = RESULTS / "tiles_sm90.csv"
HEADLINE_FORWARD = "partials torch.bfloat16 ieee ids=False deterministic=False tma=True"
HEADLINE_BACKWARD = BACKWARD_MODEL_LABEL.format(dtype="bfloat16")


@dataclass(frozen=True)
class Candidate:
    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # ptxas register cap per thread (None: the compiler's choice)

    @property
    def name(self) -> str:
        cap = f" maxnreg={self.maxnreg}" if self.maxnreg else ""
        return f"{self.BM}x{self.BN}x{self.BK} w{self.num_warps} s{self.num_stages}{cap}"


# 128 x 128 at 8 warps (one CTA per SM) first. 128 x 256 and 256 x 128 double the
# accumulator per thread at 8 warps; 4 warps, or a cap of 128 registers at 8 warps, let
# two CTAs share an SM (65536 registers), so that one's epilogue runs under the other's
# MMA; 128 x 64 at 4 warps has the accumulator per thread of 128 x 128 at 8 warps.
CANDIDATES = (
    Candidate(128, 128, 64, 8, 3),
    Candidate(128, 256, 64, 8, 3),
    Candidate(256, 128, 64, 8, 3),
    Candidate(128, 128, 64, 4, 3),
    Candidate(128, 128, 64, 4, 2),
    Candidate(128, 128, 64, 8, 2, maxnreg=128),
    Candidate(128, 64, 64, 4, 3),
)


def kept_candidate() -> Candidate:
    """The configuration the forward launches with now (bf16)."""
    import torch

    from selhn_ext._triton.config import CONFIGS

    cfg = CONFIGS[torch.bfloat16]
    return Candidate(cfg.BM, cfg.BN, cfg.BK, cfg.forward_warps, cfg.num_stages)


def kept_backward_candidate() -> Candidate:
    """The configuration the backward's S recompute launches with now (bf16, no ids: the
    warps the launcher gives weights_kernel without ids)."""
    import torch

    from selhn_ext._triton.config import CONFIGS

    cfg = CONFIGS[torch.bfloat16]
    return Candidate(cfg.BM, cfg.BN, cfg.BK, cfg.backward_warps(False), cfg.num_stages)


def backward_candidates(candidates, kept: Candidate) -> list[Candidate]:
    """The candidates the backward's panels allow (BM and BN divide PANEL_UNIT), kept first."""
    from selhn_ext._triton.backward import PANEL_UNIT

    fits = [c for c in candidates if PANEL_UNIT % c.BM == 0 and PANEL_UNIT % c.BN == 0]
    return [kept] + [c for c in fits if c != kept]


def profile_candidates(candidates, kept_backward: Candidate) -> list[dict]:
    """[{"candidate": fields, "profile": Profile fields}]: the forward at every candidate,
    the backward (weights_kernel, its S-tile part) at those its panels allow."""
    from triton_aot import specializations

    specs = {label: rest for label, *rest in specializations()}
    lines = jit_function_lines()
    out = []
    jobs = [(HEADLINE_FORWARD, c) for c in candidates]
    jobs += [(HEADLINE_BACKWARD, c) for c in backward_candidates(candidates, kept_backward)]
    for label, candidate in jobs:
        fn, types, constexprs, _, _ = specs[label]
        constexprs = dict(constexprs, BM=candidate.BM, BN=candidate.BN, BK=candidate.BK)
        options = {"maxnreg": candidate.maxnreg} if candidate.maxnreg else {}
        p = profile_one(label, fn, types, constexprs, candidate.num_warps,
                        candidate.num_stages, lines, **options)  # fmt: skip
        spilled = f"{p.spill_store_bytes}/{p.spill_load_bytes} B"
        print(f"  {p.triton} {p.kernel} {candidate.name}: {p.regs} regs, stack "
              f"{p.stack_bytes} B, spills {spilled}", file=sys.stderr, flush=True)  # fmt: skip
        out.append({"candidate": dataclasses.asdict(candidate), "profile": dataclasses.asdict(p)})
    return out


def static_columns(p: Profile, candidate: Candidate, kept: Candidate) -> dict:
    """The static facts of one profile at D = 1024 (epilogue: the forward's interior and
    masked paths; the backward's one tile loop under both names)."""
    static = {s["path"]: s for s in static_rows([p]) if s["D"] == 1024}
    interior = static.get("interior", next(iter(static.values())))
    masked = static.get("masked", interior)
    return {
        "triton": p.triton, "kernel": p.kernel, "label": p.label,
        "candidate": candidate.name, "kept": candidate == kept,
        "BM": p.BM, "BN": p.BN, "BK": p.BK, "num_warps": p.num_warps,
        "num_stages": p.num_stages, "maxnreg": candidate.maxnreg or "",
        "regs": p.regs, "stack_bytes": p.stack_bytes,
        "spill_store_bytes": p.spill_store_bytes, "spill_load_bytes": p.spill_load_bytes,
        "shared_bytes": p.shared_bytes, "ctas_per_sm": resident_ctas(p), "wgmma": p.wgmma,
        "tma_loads": p.tma_loads, "D": 1024, "main_total": interior["main_total"],
        "epi_interior_total": interior["epi_total"], "epi_interior_alu": interior["epi_alu"],
        "epi_masked_total": masked["epi_total"],
    }  # fmt: skip


def sweep_rows(results: list[dict], kept: Candidate, kept_backward: Candidate) -> list[dict]:
    """One row per kernel, candidate, triton and modelled card (D = 1024). A forward
    candidate is modelled with the kept backward, a backward candidate with the kept
    forward; the model_forward_* columns are the forward's, so blank on backward rows."""
    profiles = {
        (r["profile"]["kernel"], r["profile"]["triton"], Candidate(**r["candidate"])):
        Profile(**r["profile"]) for r in results
    }  # fmt: skip
    rows = []
    for (kernel, version, candidate), p in profiles.items():
        forward = profiles[("partials_kernel", version, kept)]
        backward = profiles[("weights_kernel", version, kept_backward)]
        if kernel == "partials_kernel":
            forward = p
        else:
            backward = p
        # The model reads the headline forward by its label.
        headline_label = FORWARD_MODEL_LABELS[0].format(dtype="bfloat16")
        headline = dataclasses.replace(forward, label=headline_label)
        by_device: dict[str, dict] = {}
        for model in model_rows([headline, backward]):
            if model["D"] != 1024:
                continue
            row = by_device.get(model["device"])
            if row is None:
                on_forward = kernel == "partials_kernel"
                row = by_device[model["device"]] = static_columns(
                    p, candidate, kept if on_forward else kept_backward
                )
                row["model_device"] = model["device"]
                for column, value in (
                    ("model_interior_tile_us",
                     model["interior_tile_main_us"] + model["interior_tile_epilogue_us"]),
                    ("model_forward_kernel_ms", model["forward_kernel_ms"]),
                    ("model_forward_kernel_ratio", model["forward_kernel_ratio"]),
                    ("model_forward_ratio", model["forward_ratio"]),
                ):  # fmt: skip
                    row[column] = value if on_forward else ""
            percent = round(model["gated_fraction"] * 100)
            row[f"model_forward_backward_ratio_{percent}pct"] = model["forward_backward_ratio"]
        rows += by_device.values()
    return rows


def preferred(rows: list[dict], triton_version: str) -> str | None:
    """The candidate the rule prefers under ``triton_version``: no spill, no stack, then
    the lowest modelled forward kernel time (on the first modelled card)."""
    ok = [
        r for r in rows if r["triton"] == triton_version and r["kernel"] == "partials_kernel"
        and not (
            int(r["stack_bytes"]) or int(r["spill_store_bytes"]) or int(r["spill_load_bytes"])
        )
    ]  # fmt: skip
    if not ok:
        return None
    device = ok[0]["model_device"]
    best = min((r for r in ok if r["model_device"] == device),
               key=lambda r: float(r["model_forward_kernel_ms"]))  # fmt: skip
    return best["candidate"]


def from_other_python(python: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sweep.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        subprocess.run([python, __file__, "--json-out", str(out)], check=True, env=env)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--also", action="append", default=[], metavar="PYTHON",
                        help="also sweep under this interpreter (another triton)")  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="write no CSV")
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a cold cache: ptxas reports spills
        results = profile_candidates(CANDIDATES, kept_backward_candidate())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results))
        return 0
    for python in args.also:
        results += from_other_python(python)
    kept, kept_backward = kept_candidate(), kept_backward_candidate()
    rows = sweep_rows(results, kept, kept_backward)
    print("tile sweep, bf16 headline kernels, D = 1024; ratios are MODEL PREDICTIONS")
    for r in rows:
        spill = f"{r['stack_bytes']}/{r['spill_store_bytes']}/{r['spill_load_bytes']}"
        fwd = r["model_forward_kernel_ratio"]
        fwd = f"{fwd:.2f}x" if fwd != "" else "-"
        print(f"  {r['triton']:6} {r['kernel'][:8]:8} {r['candidate']:28} "
              f"{r['model_device'][:8]:8} regs {r['regs']:3} stack/spill {spill:11} CTAs/SM "
              f"{r['ctas_per_sm']} epi {r['epi_interior_total']:6.1f} model: fwd kernel "
              f"{fwd}, fwd+bwd 0 % {r['model_forward_backward_ratio_0pct']:.2f}x, 10 % "
              f"{r['model_forward_backward_ratio_10pct']:.2f}x")  # fmt: skip
    for version in sorted({r["triton"] for r in rows}):
        print(f"preferred under triton {version}: {preferred(rows, version)} "
              f"(kept: {kept.name}; backward kept: {kept_backward.name})")  # fmt: skip
    if not args.no_write and rows:
        write_csv(TILES_CSV, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
