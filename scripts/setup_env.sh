#!/usr/bin/env bash
# Creates ./.venv with the pinned torch/triton wheels and installs selhn with every extra.
# Exact pins live here only; the package metadata keeps lower bounds.
#
# Prints one line per step, each package pip collects and each file the compiler builds;
# pip's own output goes to a log, whose end is printed if a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
START=$(date +%s)
LOG=$(mktemp "${TMPDIR:-/tmp}/selhn-setup.XXXXXX.log")

say() { printf '[setup %4ss] %s\n' "$(($(date +%s) - START))" "$*"; }

fail() {
    say "failed: $*"
    tail -n 40 "$LOG"
    echo "(the whole log: $LOG)"
    exit 1
}

# Runs pip with its output in the log, printing what it collects and what ninja compiles.
pip_with_progress() {
    set +e
    "$VENV/bin/python" -m pip --disable-pip-version-check -v "$@" 2>&1 | tee -a "$LOG" | progress
    local status=${PIPESTATUS[0]}
    set -e
    [ "$status" -eq 0 ] || fail "pip $*"
}

progress() {
    local line step file status
    while true; do
        IFS= read -r -t 30 line && status=0 || status=$?
        if [ "$status" -gt 128 ]; then  # nothing for 30 s: pip unpacks or compiles
            say "  still working"
            continue
        fi
        [ "$status" -eq 0 ] || break  # end of pip's output
        line=${line#"${line%%[![:space:]]*}"}  # pip indents the build's output
        case "$line" in
            Collecting\ *) say "  collecting ${line#Collecting }" ;;
            Building\ editable\ for\ *started) say "  building selhn" ;;
            Installing\ collected\ packages:*) say "  installing what was collected" ;;
            \[[0-9]*/[0-9]*\]\ *)  # ninja: [done/total] command
                step=${line%%]*}
                file=$(sed -nE 's/.* -c ([^ ]+).*/\1/p' <<<"$line")
                if [ -n "$file" ]; then
                    say "  compiling ${step#[}: $(basename "$file")"
                else
                    say "  linking ${step#[}"
                fi
                ;;
        esac
    done
}

if [ ! -x "$VENV/bin/python" ]; then
    say "creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV" >>"$LOG" 2>&1 || fail "$PYTHON -m venv $VENV"
fi
say "upgrading pip, setuptools and wheel"
pip_with_progress install --upgrade "pip>=23" "setuptools>=77" wheel
# torch 2.13.0 is a local CPU wheel here (seconds); an unpinned torch pulls a 5.5 GB CUDA
# build. NumPy before the build, so that torch imports cleanly inside it.
say "installing torch 2.13.0 (CPU), triton 3.7.1, numpy, ninja and ruff"
pip_with_progress install "torch==2.13.0" "triton==3.7.1" "ruff==0.14.0" numpy ninja
# SIMDe's headers let a CPU without AVX-512 build and test the AVX-512 kernels
# (csrc/selhn_cpu_avx512_emulated.cpp); the test of every kernel path needs them.
if [ ! -f /usr/include/simde/x86/avx512.h ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "installing SIMDe's headers (libsimde-dev), to test the AVX-512 kernels here"
    apt-get install -y -q libsimde-dev >>"$LOG" 2>&1 ||
        { apt-get update -q >>"$LOG" 2>&1 && apt-get install -y -q libsimde-dev >>"$LOG" 2>&1; } ||
        say "could not install libsimde-dev; the AVX-512 kernels will not be tested here"
fi
# --no-build-isolation: compile the C++ kernels against the torch installed above.
say "installing selhn with every extra and compiling its C++ kernels (1 to 3 minutes)"
pip_with_progress install --no-build-isolation -e ".[all]"
say "done; the backends on this machine (log: $LOG):"
"$VENV/bin/python" -c "import selhn_ext, torch; print('selhn', selhn_ext.__version__, 'torch', torch.__version__); print(selhn_ext.backend_status(torch.zeros(2, 2), torch.zeros(2, 2)))"
