#!/usr/bin/env bash
# One-shot check on a GPU machine without network: build, test, benchmark, profile.
#
#   bash bench/gpu_check.sh [--budget SECONDS] [--stages 0,1,2,3,4,5,6] [--dry-run]
#
# Sized for the lent device: one call of about 8 minutes (start-up of 1-2 minutes plus the
# default budget of 420 s), which leaves about 5 of the 15 device minutes for a fresh
# start (one needs 4) and a short second call, e.g. --stages 3,6 --budget 120. At most 8
# files come back from $OUT, so it holds only summary.txt, the CSV (gpu.csv),
# model_calibration.csv and logs.tar.gz, an archive of every log rewritten after every
# stage (and every 30 s).
#
# Stages, each with a time limit in seconds (the selected limits must sum to no more than
# the budget; time a stage leaves unused goes to the elastic stages 3 and 4):
#   0 env       10  versions, GPU, compilers
#   1 build    270  pip install with the CUDA kernels (145 with its backend report: the
#                   CUDA file alone takes about 100 s of one core); if that fails, the JIT
#                   build (its own 125)
#   2 tests     55  pytest -m gpu: the kernels against the reference on the GPU (stopped
#                   with SIGINT at the limit, so pytest still prints what passed)
#   3 headline  40+ B = 16384, D = 1024, bf16, gate mixes none, 1 %, 10 %, half, all;
#                   forward, backward, forward + backward. First each Triton backward
#                   variant (triton:<variant> rows), then triton, cuda, the authors' loss
#                   (eager and torch.compile), chunked, torch.mm; then the static model's
#                   other cases (Triton, B = 16384, D = 256 and 1024, bf16 and fp16, gated
#                   0, 1, 10 and 100 %). The Triton and inductor compile caches are warmed
#                   in parallel at the start, before any timing; the GPU clocks are warmed
#                   before the first torch.mm. Last (15 s of the stage kept for it),
#                   bench/calibrate_model.py joins the rows with the model
#                   (bench/results/model_sm90.csv): model over measured per case, written
#                   to model_calibration.csv; a case the run did not reach reads missing.
#   4 sweep     10+ B = 4096 * 2^k up to 262144, D in {256, 1024}, bf16 then fp32, as far
#                   as the time allows
#   5 ncu       25  ncu --clock-control none (the card's clocks stay as they are) on the
#                   forward kernel partials_kernel, selected by name, Triton then CUDA
#   6 mm_end    10  torch.mm at the headline shape again: the clocks at the end of the run
# --stages runs the chosen stages only (stage 1's result is remembered in $WORK). Every
# selected stage runs: none is dropped because time is short.
# --dry-run runs every stage on CPU at tiny sizes (Triton through its interpreter) with
# no time limits, so its outcome does not depend on the machine's speed; $OUT and $WORK
# then default to new temporary folders.
# Variables: PYTHON (default python3), OUT, WORK (default /tmp/selhn_gpu_check),
# TRITON_BACKWARDS (the variants to time; default: what the backend offers),
# NCU_KERNEL (default partials_kernel). Installs nothing from the network.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUDGET=420
STAGES="0,1,2,3,4,5,6"
DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) BUDGET=$2; shift 2 ;;
        --budget=*) BUDGET=${1#*=}; shift ;;
        --stages) STAGES=$2; shift 2 ;;
        --stages=*) STAGES=${1#*=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "--budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

STAGE_NAMES=(env build tests headline sweep ncu mm_end)
STAGE_LIMITS=(10 270 55 40 10 25 10)
STAGE_ELASTIC=(0 0 0 1 1 0 0)
PIP_LIMIT=145  # of stage 1's 270, with the backend report; the JIT build gets the other 125
CALIBRATE_LIMIT=15  # of stage 3, kept for bench/calibrate_model.py after the timings
for stage in ${STAGES//,/ }; do
    case "$stage" in [0-6]) ;; *) echo "unknown stage '$stage' (0 to 6)" >&2; exit 2 ;; esac
done
selected() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
reserve_after() {  # the summed limits of the selected stages after stage $1
    local total=0 i
    for ((i = $1 + 1; i < ${#STAGE_NAMES[@]}; i++)); do
        selected "$i" && total=$((total + STAGE_LIMITS[i]))
    done
    echo "$total"
}
NEEDED=$(reserve_after -1)
if [ "$NEEDED" -gt "$BUDGET" ]; then
    echo "the selected stages' limits sum to $NEEDED s, more than --budget $BUDGET s" \
        "(limits: ${STAGE_LIMITS[*]} for stages 0-6); select fewer stages" >&2
    exit 2
fi

PY=${PYTHON:-python3}
if [ "$DRY_RUN" = 1 ]; then
    OUT=${OUT:-$(mktemp -d -t gpu_check_dry.XXXXXX)}
    WORK=${WORK:-$(mktemp -d -t gpu_check_work.XXXXXX)}
    # Triton runs on CPU tensors only through its interpreter, chosen before it is imported.
    export TRITON_INTERPRET=1
    DEVICE=cpu
    CSV="$OUT/dry_run.csv"
    HEAD=(64 32 bf16)  # bench/cases.py DRY_RUN_SHAPE
    PRESET_PREFIX=dry-run
    # The interpreter's cost grows with the batch and the calls, and it compiles nothing:
    # warm with one gate mix at the tiny batch, only to run the same steps.
    WARM=(--batch 64 --gate-mixes half)
    SWEEP_DIMS=16
else
    OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
    WORK=${WORK:-/tmp/selhn_gpu_check}
    DEVICE=cuda
    CSV="$OUT/gpu.csv"
    HEAD=(16384 1024 bf16)
    PRESET_PREFIX=gpu
    WARM=(--batch 512)  # compiles the kernels B = 16384 uses (see bench/warm_cache.py)
    SWEEP_DIMS=256,1024
fi
LOGS="$WORK/logs"
rm -rf "$LOGS"
mkdir -p "$OUT" "$WORK/run" "$LOGS"
SUMMARY="$OUT/summary.txt"
START=$(date +%s)
END=$((START + BUDGET))
export PYTHONUNBUFFERED=1

note() { echo "$*" | tee -a "$SUMMARY"; }
now() { date +%s; }
archive() {  # every log in one file; written beside and renamed, so it is never half written
    local part="$OUT/logs.tar.gz.$BASHPID.part"
    tar czf "$part" -C "$WORK" logs 2>/dev/null && mv -f "$part" "$OUT/logs.tar.gz"
    rm -f "$part"
}
(while sleep 30; do archive; done) &
ARCHIVER=$!
trap 'kill "$ARCHIVER" 2>/dev/null' EXIT

# The installed package is imported from a neutral folder ($WORK/run), never from the
# source tree (which has no compiled kernels on a fresh machine), unless stage 1 had to
# fall back to a JIT build: then the source tree is on PYTHONPATH.
PYTHONPATH_FOR_RUNS=""
[ -f "$WORK/build_mode" ] && [ "$(cat "$WORK/build_mode")" = jit ] && PYTHONPATH_FOR_RUNS=$REPO
if ! selected 1 && [ ! -f "$WORK/build_mode" ] &&
    ! (cd "$WORK/run" && timeout 30 "$PY" -c "import selhn_ext" 2>/dev/null); then
    PYTHONPATH_FOR_RUNS=$REPO  # a rerun without stage 1: the package is the source tree
fi
pyrun() {  # pyrun SECONDS args...: python from the neutral folder, bounded in time
    local seconds=$1; shift
    (cd "$WORK/run" && PYTHONPATH=$PYTHONPATH_FOR_RUNS timeout -k 3 "$seconds" "$PY" "$@")
}
stage_left() {  # seconds left in this stage, less $1 kept back, at least 5
    local left=$((STAGE_END - $(now) - ${1:-0}))
    echo $((left < 5 ? 5 : left))
}

run_stage() {  # run_stage NUMBER FUNCTION
    local number=$1 fn=$2 name=${STAGE_NAMES[$1]} limit=${STAGE_LIMITS[$1]}
    selected "$number" || return 0
    local last_end=$((END - $(reserve_after "$number"))) begin rc
    begin=$(now)
    if [ "$DRY_RUN" = 1 ]; then
        STAGE_END=$((begin + 1000000))  # no time limit: the dry run checks the plumbing
    elif [ "${STAGE_ELASTIC[$number]}" = 1 ]; then
        STAGE_END=$last_end
    else
        STAGE_END=$((begin + limit < last_end ? begin + limit : last_end))
    fi
    local log="$LOGS/stage${number}_${name}.log"
    "$fn" >"$log" 2>&1
    rc=$?
    note "stage $number $name: exit $rc in $(($(now) - begin)) s (limit $limit s), log logs/$(basename "$log")"
    tail -n 3 "$log" | sed 's/^/    /' | cut -c1-200
    archive
}

stage_env() {
    echo "date: $(date -u +%FT%TZ)  dry run: $DRY_RUN  budget: $BUDGET s  out: $OUT  work: $WORK"
    echo "stages: $STAGES  limits: ${STAGE_LIMITS[*]}  selected sum: $NEEDED s"
    echo "commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "python: $(command -v "$PY") $("$PY" --version 2>&1)"
    echo "cpus: $(nproc)  memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
    command -v nvidia-smi >/dev/null && timeout 5 nvidia-smi \
        --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: absent"
    command -v ncu >/dev/null && echo "ncu: $(ncu --version | tail -n 1)" || echo "ncu: absent"
    pyrun "$(stage_left)" -c "
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
    local pip_seconds=$(($(stage_left) - (STAGE_LIMITS[1] - PIP_LIMIT) - 15))
    echo "pip install (CUDA_HOME=${CUDA_HOME:-unset}, limit ${pip_seconds} s)"
    # PIP_BREAK_SYSTEM_PACKAGES: the machine's python3 may be marked externally managed.
    (cd "$REPO" && TORCH_CUDA_ARCH_LIST=9.0 SELHN_CUDA=1 MAX_JOBS=$(nproc) \
        PIP_BREAK_SYSTEM_PACKAGES=1 timeout -k 3 "$pip_seconds" "$PY" -m pip install \
        --no-build-isolation --no-deps --no-index --disable-pip-version-check .)
    local rc=$?
    if [ $rc -eq 0 ] && backend_report 15 | tee /dev/stderr | grep -Eq "^ +cuda +available"; then
        echo pip >"$WORK/build_mode"
        return 0
    fi
    echo "pip install failed or left the CUDA backend unavailable (exit $rc): JIT build" \
        "(limit $(stage_left 10) s)"
    echo jit >"$WORK/build_mode"
    PYTHONPATH_FOR_RUNS=$REPO
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) pyrun "$(stage_left 10)" \
        "$REPO/bench/jit_build.py" --cuda
    backend_report 10
}

stage_tests() {
    # From the neutral folder, so the tests import the installed package. At the limit
    # pytest gets SIGINT and still reports what ran; one test per line, so a cut log shows.
    (cd "$WORK/run" && PYTHONPATH=$PYTHONPATH_FOR_RUNS timeout -s INT -k 5 "$(stage_left 5)" \
        "$PY" -m pytest -m gpu -v -p no:cacheprovider --rootdir "$REPO" \
        -c "$REPO/pyproject.toml" "$REPO/tests")
    local rc=$?
    [ $rc -eq 5 ] && { echo "no test carries the gpu marker"; return 0; }
    return $rc
}

bench() {  # bench NAME args...: bench/run.py, rerun without a backend that kills the GPU context
    local name=$1; shift
    local excluded="" attempt rc
    local progress="$WORK/$name.progress" fatal="$WORK/$name.fatal"
    rm -f "$progress" "$fatal"  # they serve the reruns below; a new stage measures afresh
    local common=(--csv "$CSV" --log "$LOGS/bench.log" --progress "$progress"
                  --fatal-file "$fatal" --device "$DEVICE")
    [ "$DRY_RUN" = 1 ] && common+=(--no-isolate --min-time 0 --max-reps 1 --warmup 1)
    for attempt in 1 2 3; do
        pyrun "$(stage_left)" "$REPO/bench/run.py" "${common[@]}" "$@" \
            --deadline $((STAGE_END - 3)) --exclude "$excluded"
        rc=$?
        [ $rc -eq 3 ] || return $rc
        excluded="$excluded,$(cat "$fatal")"
        echo "rerunning without backends: $excluded"
    done
    return $rc
}

triton_backwards() {  # the variants to time: $TRITON_BACKWARDS, else what the backend offers
    if [ -n "${TRITON_BACKWARDS:-}" ]; then echo "$TRITON_BACKWARDS"; return; fi
    pyrun "$(stage_left)" -c "import sys; sys.path.insert(0, '$REPO/bench'); import cases
print(' '.join(cases.triton_backward_variants()))"
}

warm_caches() {  # warm_caches NAME:ARGS...: warm_cache.py processes at once, then wait
    local spec pids=() seconds
    seconds=$(stage_left)
    # On the GPU at most 2 minutes, and 30 s of the stage kept for the benchmark itself.
    [ "$DRY_RUN" = 0 ] && seconds=$(($(stage_left 30) < 120 ? $(stage_left 30) : 120))
    for spec in "$@"; do
        # shellcheck disable=SC2086
        pyrun "$seconds" "$REPO/bench/warm_cache.py" --device "$DEVICE" ${spec#*:} \
            >"$LOGS/warm_${spec%%:*}.log" 2>&1 &
        pids+=($!)
    done
    local pid status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    echo "compile caches warmed in parallel ($# processes, last failure status $status):"
    cat "$LOGS"/warm_*.log | grep -E "^warmed|Error" | head -n 20
}

stage_headline() {
    local variants variant
    variants=$(triton_backwards)
    echo "Triton backward variants: ${variants:-none offered}"
    local warm=("authors_compiled:--backend authors_compiled --batch ${HEAD[0]} --dims ${HEAD[1]} --dtypes ${HEAD[2]}")
    for variant in $variants; do
        warm+=("triton_$variant:--backend triton --triton-backward $variant ${WARM[*]} --dims ${HEAD[1]} --dtypes ${HEAD[2]}")
    done
    [ -z "$variants" ] && warm+=("triton:--backend triton ${WARM[*]} --dims ${HEAD[1]} --dtypes ${HEAD[2]}")
    warm+=("triton_fp16:--backend triton ${WARM[*]} --dims ${HEAD[1]} --dtypes fp16")
    STAGE_END=$((STAGE_END - CALIBRATE_LIMIT))  # kept back for the calibration below
    warm_caches "${warm[@]}"
    local status=0  # the stage's exit status: the first failing benchmark's
    for variant in $variants; do  # the open question first
        bench "triton_$variant" --preset "$PRESET_PREFIX-triton-variant" \
            --triton-backward "$variant" || status=$((status ? status : $?))
    done
    bench headline --preset "$PRESET_PREFIX-headline" || status=$((status ? status : $?))
    bench model_cases --preset "$PRESET_PREFIX-model-cases" || status=$((status ? status : $?))
    STAGE_END=$((STAGE_END + CALIBRATE_LIMIT))
    calibrate
    return "$status"
}

calibrate() {  # model over measured, per model case; missing rows never fail the stage
    pyrun "$(stage_left)" "$REPO/bench/calibrate_model.py" "$CSV" \
        --model "$REPO/bench/results/model_sm90.csv" --out "$OUT/model_calibration.csv" ||
        echo "bench/calibrate_model.py exited $?: no calibration this run"
}

stage_sweep() {
    warm_caches "sweep_bf16:--backend triton ${WARM[*]} --dims $SWEEP_DIMS --dtypes bf16" \
        "sweep_fp32:--backend triton ${WARM[*]} --dims $SWEEP_DIMS --dtypes fp32"
    bench sweep --preset "$PRESET_PREFIX-sweep"
}

stage_ncu() {
    local kernel=${NCU_KERNEL:-partials_kernel} backend
    for backend in triton cuda; do
        local report="$LOGS/ncu_forward_$backend"
        local command=(ncu --clock-control none --nvtx --nvtx-include "selhn_forward/"
                       --kernel-name "regex:$kernel" --launch-count 1
                       --set basic --section ComputeWorkloadAnalysis --section WarpStateStats
                       --section InstructionStats --export "$report" --force-overwrite
                       "$PY" "$REPO/bench/ncu_forward.py" --backend "$backend"
                       --batch "${HEAD[0]}" --dim "${HEAD[1]}" --dtype "${HEAD[2]}")
        if [ "$DRY_RUN" = 1 ] || ! command -v ncu >/dev/null; then
            echo "ncu is absent$([ "$DRY_RUN" = 1 ] && echo ' (dry run on CPU)'): no kernel profile; the command would be:"
            echo "  ${command[*]}"
            continue
        fi
        [ "$(stage_left)" -lt 10 ] && { echo "no time left to profile $backend"; break; }
        echo "== ${command[*]}"
        (cd "$WORK/run" && PYTHONPATH=$PYTHONPATH_FOR_RUNS timeout -k 3 "$(stage_left 2)" \
            "${command[@]}" >"$report.txt" 2>&1)
        grep -E "^  [A-Za-z_].*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers|Issued Ipc" \
            "$report.txt" | head -n 24
    done
}

stage_mm_end() {
    bench mm_end --backends torch_mm --sizes "${HEAD[0]}" --dims "${HEAD[1]}" --dtypes "${HEAD[2]}"
    echo "torch.mm at the headline shape, first to last in this run:"
    pyrun "$(stage_left)" "$REPO/bench/table.py" "$CSV" --batch "${HEAD[0]}" --dim "${HEAD[1]}" \
        --dtype "${HEAD[2]}" --backend torch_mm --all-rows
}

note "gpu_check: out $OUT, work $WORK, budget $BUDGET s, stages $STAGES (limits sum to $NEEDED s)$([ "$DRY_RUN" = 1 ] && echo ', dry run: no time limits')"
run_stage 0 stage_env
run_stage 1 stage_build
[ -f "$WORK/build_mode" ] && [ "$(cat "$WORK/build_mode")" = jit ] && PYTHONPATH_FOR_RUNS=$REPO
run_stage 2 stage_tests
run_stage 3 stage_headline
run_stage 4 stage_sweep
run_stage 5 stage_ncu
run_stage 6 stage_mm_end

{
    echo
    echo "== results in $OUT ($(($(now) - START)) s of $BUDGET s)"
    if [ -f "$CSV" ]; then
        shape=(--batch "${HEAD[0]}" --dim "${HEAD[1]}" --dtype "${HEAD[2]}")
        (cd "$WORK/run" && "$PY" "$REPO/bench/table.py" "$CSV" "${shape[@]}" --by-gate-mix)
        echo
        (cd "$WORK/run" && "$PY" "$REPO/bench/table.py" "$CSV" --pivot --pass forward_backward)
    else
        echo "no CSV rows were written"
    fi
} 2>&1 | tee -a "$SUMMARY"
archive
echo "files in $OUT: $(find "$OUT" -type f | wc -l) (the device returns at most 8)"
