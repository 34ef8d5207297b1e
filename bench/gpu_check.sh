#!/usr/bin/env bash
# One-shot check on a GPU machine without network: build, test, benchmark, profile.
#
#   bash bench/gpu_check.sh [--budget SECONDS] [--stages 0,1,2,3,4,5] [--dry-run]
#
# Stages (each with a deadline; CSV rows and logs land in $OUT as they are produced, so a
# timeout still returns data; a short table is printed last):
#   0 environment report (10 s)
#   1 build with the CUDA kernels: pip install --no-build-isolation --no-deps .; on failure
#     a JIT build with torch.utils.cpp_extension.load (90 s)
#   2 correctness: pytest -m gpu (120 s)
#   3 headline: B = 16384, D = 1024, bf16, three gate mixes: triton, cuda, the authors'
#     loss (eager and torch.compile), chunked, torch.mm; then triton with
#     SELHN_TRITON_BACKWARD=panel into triton_panel.csv (120 s)
#   4 sweep while time remains: B = 4096 * 2^k up to 262144, D in {256, 1024}, bf16 then
#     fp32 (keeps 65 s for stage 5 when it is selected)
#   5 ncu on the forward kernels if 60 s remain
# The whole run stays within --budget seconds (default 300). --stages reruns chosen stages
# (stage 1's result is remembered in $OUT). --dry-run runs every stage on CPU at tiny sizes
# (Triton through its interpreter); $OUT then defaults to a new temporary folder.
# Uses python3 from PATH (or $PYTHON) and installs nothing from the network.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUDGET=300
STAGES="0,1,2,3,4,5"
DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) BUDGET=$2; shift 2 ;;
        --budget=*) BUDGET=${1#*=}; shift ;;
        --stages) STAGES=$2; shift 2 ;;
        --stages=*) STAGES=${1#*=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "--budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

PY=${PYTHON:-python3}
if [ "$DRY_RUN" = 1 ]; then
    OUT=${OUT:-$(mktemp -d -t gpu_check_dry.XXXXXX)}
    # Triton runs on CPU tensors only through its interpreter, chosen before it is imported.
    export TRITON_INTERPRET=1
    DEVICE=cpu
    CSV="$OUT/dry_run.csv"
else
    OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
    DEVICE=cuda
    CSV="$OUT/gpu.csv"
fi
mkdir -p "$OUT/run"
SUMMARY="$OUT/summary.txt"
START=$(date +%s)
END=$((START + BUDGET))
export PYTHONUNBUFFERED=1

note() { echo "$*" | tee -a "$SUMMARY"; }
now() { date +%s; }
selected() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# The installed package is imported from a neutral folder ($OUT/run), never from the
# source tree (which has no compiled kernels on a fresh machine), unless stage 1 had to
# fall back to a JIT build: then the source tree is on PYTHONPATH.
PYTHONPATH_FOR_RUNS=""
[ -f "$OUT/build_mode" ] && [ "$(cat "$OUT/build_mode")" = jit ] && PYTHONPATH_FOR_RUNS=$REPO
if ! selected 1 && [ ! -f "$OUT/build_mode" ] &&
    ! (cd "$OUT/run" && timeout 30 "$PY" -c "import selhn_ext" 2>/dev/null); then
    # A rerun without stage 1 after a JIT build: the package lives in the source tree only.
    PYTHONPATH_FOR_RUNS=$REPO
fi
pyrun() {  # pyrun SECONDS args...: python3 from the neutral folder, bounded in time
    local seconds=$1; shift
    (cd "$OUT/run" && PYTHONPATH=$PYTHONPATH_FOR_RUNS timeout -k 5 "$seconds" "$PY" "$@")
}
stage_left() {  # seconds left in this stage, less $1 kept back, at least 5
    local left=$((STAGE_END - $(now) - ${1:-0}))
    echo $((left < 5 ? 5 : left))
}

run_stage() {  # run_stage NUMBER NAME LIMIT RESERVE FUNCTION
    local number=$1 name=$2 limit=$3 reserve=$4 fn=$5
    selected "$number" || return 0
    local left=$((END - $(now) - reserve))
    local seconds=$((limit < left ? limit : left))
    if [ "$seconds" -lt 3 ]; then
        note "stage $number $name: skipped (budget spent)"
        return 0
    fi
    STAGE_END=$(($(now) + seconds))
    local log="$OUT/stage${number}_${name}.log" begin rc
    begin=$(now)
    "$fn" >"$log" 2>&1
    rc=$?
    note "stage $number $name: exit $rc in $(($(now) - begin)) s (limit $seconds s), log $log"
    tail -n 3 "$log" | sed 's/^/    /' | cut -c1-200
}

stage_env() {
    echo "date: $(date -u +%FT%TZ)  dry run: $DRY_RUN  budget: $BUDGET s  out: $OUT"
    echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "python: $(command -v "$PY") $("$PY" --version 2>&1)"
    echo "cpus: $(nproc)  memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
    command -v nvidia-smi >/dev/null && timeout 5 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: absent"
    command -v ncu >/dev/null && echo "ncu: $(ncu --version | tail -n 1)" || echo "ncu: absent"
    pyrun 8 -c "
import importlib, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ('triton', 'setuptools', 'ninja', 'pybind11', 'pytest', 'numpy', 'selhn_ext'):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, '__version__', 'present'))
    except Exception as error:
        print(name, 'absent:', type(error).__name__, error)
"
}

backend_report() {  # the dispatch's view of every backend on this device, in bf16
    pyrun "$1" -c "
import torch, selhn_ext
print('selhn_ext from', selhn_ext.__file__)
x = torch.zeros(2, 2, dtype=torch.bfloat16, device='$DEVICE')
for name, why in selhn_ext.backend_status(x, x).items():
    print(f'  {name:9s} {\"available\" if why is None else \"unavailable: \" + why}')
"
}

stage_build() {
    if [ "$DRY_RUN" = 1 ]; then
        echo "dry run: no build; the installed package and its backends:"
        backend_report "$(stage_left)"
        return
    fi
    [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
    echo "pip install (CUDA_HOME=${CUDA_HOME:-unset})"
    # PIP_BREAK_SYSTEM_PACKAGES: the machine's python3 may be marked externally managed.
    (cd "$REPO" && TORCH_CUDA_ARCH_LIST=9.0 SELHN_CUDA=1 MAX_JOBS=$(nproc) \
        PIP_BREAK_SYSTEM_PACKAGES=1 timeout -k 5 "$(stage_left 5)" "$PY" -m pip install \
        --no-build-isolation --no-deps --no-index --disable-pip-version-check .)
    local rc=$?
    if [ $rc -eq 0 ] && backend_report 15 | tee /dev/stderr | grep -Eq "^ +cuda +available"; then
        echo pip >"$OUT/build_mode"
        return 0
    fi
    echo "pip install failed or left the CUDA backend unavailable (exit $rc): JIT build"
    echo jit >"$OUT/build_mode"
    PYTHONPATH_FOR_RUNS=$REPO
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) pyrun "$(stage_left 10)" \
        "$REPO/bench/jit_build.py" --cuda
    backend_report 10
}

stage_tests() {
    # From the neutral folder, so the tests import the installed package.
    pyrun "$(stage_left)" -m pytest -m gpu -q -p no:cacheprovider --rootdir "$REPO" \
        -c "$REPO/pyproject.toml" "$REPO/tests"
    local rc=$?
    [ $rc -eq 5 ] && { echo "no test carries the gpu marker"; return 0; }
    return $rc
}

bench() {  # bench PROGRESS_NAME args...: bench/run.py, rerun without a backend that kills the GPU context
    local name=$1; shift
    local excluded="" attempt rc
    # The progress file only serves the reruns below; a new invocation measures afresh.
    rm -f "$OUT/$name.progress" "$OUT/$name.fatal"
    local common=(--csv "${BENCH_CSV:-$CSV}" --log "$OUT/bench.log" --progress "$OUT/$name.progress"
                  --fatal-file "$OUT/$name.fatal" --device "$DEVICE")
    if [ "$DRY_RUN" = 1 ]; then
        common+=(--no-isolate --min-time 0 --max-reps 1 --warmup 1)
    fi
    for attempt in 1 2 3; do
        pyrun "$(stage_left)" "$REPO/bench/run.py" "${common[@]}" "$@" \
            --deadline $((STAGE_END - 3)) --exclude "$excluded"
        rc=$?
        [ $rc -eq 3 ] || return $rc
        excluded="$excluded,$(cat "$OUT/$name.fatal")"
        echo "rerunning without backends: $excluded"
    done
    return $rc
}

stage_headline() {
    if [ "$DRY_RUN" = 1 ]; then bench headline --preset dry-run-headline
    else bench headline --preset gpu-headline; fi
    # The Triton backend's opt-in panel backward (tensor-core GEMMs, no float atomics),
    # timed against the default tiles path above; its own CSV, since both are "triton".
    [ "$(stage_left)" -lt 20 ] && { echo "no time left for the panel backward"; return 0; }
    local size=(--sizes 16384 --dims 1024 --dtypes bf16)
    [ "$DRY_RUN" = 1 ] && size=(--sizes 64 --dims 32 --dtypes bf16)
    BENCH_CSV="$OUT/triton_panel.csv" SELHN_TRITON_BACKWARD=panel bench headline_panel \
        --backends triton "${size[@]}" --gate-mixes none,all --passes forward_backward
}

stage_sweep() {
    if [ "$DRY_RUN" = 1 ]; then bench sweep --preset dry-run-sweep
    else bench sweep --preset gpu-sweep; fi
}

stage_ncu() {
    if [ "$DRY_RUN" = 1 ] || ! command -v ncu >/dev/null; then
        echo "ncu is absent$([ "$DRY_RUN" = 1 ] && echo ' (dry run on CPU)'): no kernel profile"
        return 0
    fi
    local backend
    for backend in cuda triton; do
        [ "$(stage_left)" -lt 20 ] && break
        echo "== ncu: $backend forward, B = 16384, D = 1024, bf16"
        (cd "$OUT/run" && PYTHONPATH=$PYTHONPATH_FOR_RUNS timeout -k 5 "$(stage_left 2)" \
            ncu --nvtx --nvtx-include "selhn_forward/" --set basic --launch-count 8 \
            "$PY" "$REPO/bench/ncu_forward.py" --backend "$backend" \
            >"$OUT/ncu_forward_$backend.txt" 2>&1)
        grep -E "^  [A-Za-z_].*\(|Duration|Compute \(SM\) Throughput|Memory Throughput" \
            "$OUT/ncu_forward_$backend.txt" | head -n 24
    done
}

note "gpu_check: out $OUT, budget $BUDGET s, stages $STAGES$([ "$DRY_RUN" = 1 ] && echo ', dry run')"
SWEEP_RESERVE=5
selected 5 && [ "$DRY_RUN" = 0 ] && SWEEP_RESERVE=65
run_stage 0 env 10 0 stage_env
run_stage 1 build 90 0 stage_build
[ -f "$OUT/build_mode" ] && [ "$(cat "$OUT/build_mode")" = jit ] && PYTHONPATH_FOR_RUNS=$REPO
run_stage 2 tests 120 0 stage_tests
run_stage 3 headline 120 0 stage_headline
run_stage 4 sweep 100000 "$SWEEP_RESERVE" stage_sweep
if [ "$DRY_RUN" = 0 ] && selected 5 && [ $((END - $(now))) -lt 60 ]; then
    note "stage 5 ncu: skipped (under 60 s left)"
else
    run_stage 5 ncu 60 0 stage_ncu
fi

echo
echo "== results in $OUT ($(($(now) - START)) s of $BUDGET s)"
if [ -f "$CSV" ]; then
    if [ "$DRY_RUN" = 1 ]; then shape=(--batch 64 --dim 32 --dtype bf16); else shape=(--batch 16384 --dim 1024 --dtype bf16); fi
    (cd "$OUT/run" && "$PY" "$REPO/bench/table.py" "$CSV" "${shape[@]}" --pass forward_backward)
    echo
    (cd "$OUT/run" && "$PY" "$REPO/bench/table.py" "$CSV" --pivot --pass forward_backward)
else
    echo "no CSV rows were written"
fi
