#!/usr/bin/env bash
# One-shot GPU run for a fresh machine with PyTorch and Triton installed and no network:
# install fastguide from this checkout, build the CUDA extension when csrc/ has sources
# (for this GPU's architecture alone), then, in priority order, the self-check, the
# GPU-marked tests, the benchmark suite a module at a time (the kernels' device times,
# attention's target rows and end to end first), the eager loops' profile and host path,
# the backend-parametrised op tests and the full attention sweep, writing every result
# under OUT. On an H200 on 2026-12-04 the install and CUDA build (two architectures then)
# took 1 min, the GPU tests 4.2 min in one process, the guided_step and layer_norm
# benchmarks 2 min together, group_norm over 2 min, sample and end to end 3 min; the
# attention sweep (every SDPA backend, forward and backward, up to L = 16384) longer than
# any other step. So each step has a cap of its own (below), and one call of the device
# tool reaches the first steps of each kind; later calls can pick what is left
# (GPU_SH_MODULES, GPU_SH_SKIP_TESTS).
#
#   benchmarks/gpu.sh OUT            the run
#   benchmarks/gpu.sh OUT --dry-run  print the steps and check that every test and benchmark
#                                    is collected (works on a machine without a GPU)
#
# The device tool returns at most 8 files and kills a command at its limit: give the run
# its time (GPU_SH_TIME seconds from the start of gpu.sh: every step ends in time, so
# nothing is left running on the GPU once it returns; an outer `timeout` would kill
# gpu.sh but not the step it waits on) and a file to pack OUT into after every step
# (GPU_SH_PACK), so that a run cut short still returns what it finished, e.g.
#   GPU_SH_PACK=$OUT/gpu-results.tgz GPU_SH_TIME=540 bash benchmarks/gpu.sh /tmp/fg
# Other settings: GPU_SH_MODULES (the benchmark modules to run, in order; default below),
# GPU_SH_SKIP_TESTS=1 (no test steps: a later call's), GPU_SH_TEST_WORKERS (8; 0 for one
# process), GPU_SH_STEP_LIMIT (the cap of any one step, 420 s).
set -euo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT [--dry-run]}
mode=${2:-run}
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
# The tests narrow attention's autotuning themselves (tests/conftest.py); benchmarks refuse it.
unset FASTGUIDE_AUTOTUNE
cd "$root"
mkdir -p "$out"
# The benchmark modules in the order they run: the targets of issues 21 and 22 first (the
# guided step's and LayerNorm's device times, attention's target rows, end to end at real
# size), then GroupNorm, the sampling loop and the UNet; the full attention sweep last of
# all. attention_targets is bench_attention's target rows (forward: fastguide by TMA and by
# pointers against the SDPA kernels).
default_modules="bench_guided_step bench_layer_norm attention_targets bench_end_to_end bench_group_norm bench_sample bench_unet bench_attention"
read -r -a modules <<< "${GPU_SH_MODULES:-$default_modules}"
# Each step stops after its cap (a module's, below; STEP_LIMIT seconds at most,
# GPU_SH_STEP_LIMIT), so that a kernel that hangs costs its own step, not the run's
# later ones: killing the process ends its kernels. With GPU_SH_TIME, no step runs past
# that many seconds from the start of gpu.sh (15 s kept for the packing after), and a
# step with under 20 s left does not start.
step_limit=${GPU_SH_STEP_LIMIT:-420}
# The diagnostics (self-check, loop profile, host path) take a minute or less each; a hang
# in one of them costs at most this, not step_limit, of the run.
quick_limit=${GPU_SH_QUICK_LIMIT:-90}
# The GPU tests' cap: with 8 workers they should end well inside it (one process took
# 4.2 min on the H200); those not reached are the backend tests' and a later call's.
test_limit=${GPU_SH_TEST_LIMIT:-150}
# Each module's cap in seconds, so that one call reaches the kernels' device times, the
# attention targets and end to end before any one of them takes the call: a module cut
# by its cap still reports the cases it finished (the first of each kind come first).
module_cap() {
    case "$1" in
        bench_guided_step | bench_group_norm) echo 70 ;;
        bench_layer_norm | attention_targets) echo 50 ;;
        bench_end_to_end) echo 120 ;;
        *) echo "$step_limit" ;;
    esac
}
# End to end and the UNet without their max-autotune rows (each compile tunes for minutes):
# run those in a call of their own, fastguide bench -k "max-autotune".
selection() {
    case "$1" in
        bench_end_to_end) echo "bench_end_to_end and not max-autotune" ;;
        bench_unet) echo "bench_unet and not max-autotune" ;;
        attention_targets) echo "bench_attention and targets" ;;
        bench_attention) echo "bench_attention and not targets" ;;
        *) echo "$1" ;;
    esac
}

step() {
    echo "+ $*"
    if [ "$mode" != "--dry-run" ]; then "$@"; fi
}

collected() {  # the number of items pytest collects for "$@" (0 when it cannot collect)
    { "$py" -m pytest "$@" --collect-only -q -p no:cacheprovider 2>/dev/null || true; } \
        | sed -n 's/^\([0-9][0-9]*\)\/[0-9]* tests collected.*/\1/p; s/^\([0-9][0-9]*\) tests\{0,1\} collected.*/\1/p' | tail -n 1
}

# pyproject.toml's license is an SPDX string, which setuptools reads from 77 on; the build
# runs without isolation, on this interpreter's setuptools (a newer one can be carried as
# a wheel on PYTHONPATH, as diffusers' is).
if [ "$mode" != "--dry-run" ] && ! "$py" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)'; then
    echo "gpu.sh: building fastguide needs setuptools 77 or newer here, found" \
        "$("$py" -c 'import setuptools; print(setuptools.__version__)' 2>&1); carry its wheel" >&2
    exit 1
fi
step "$py" -m pip install --no-deps --no-build-isolation -q -e .
if compgen -G "csrc/*.cu" >/dev/null || compgen -G "csrc/*.cpp" >/dev/null; then
    # A failed build (no toolkit, a CUDA version that does not match torch's) must not stop
    # the run: the log says why, and the cuda backend's tests and benchmarks then skip.
    # Built for this GPU's architecture alone (setup.py's default builds two: twice the nvcc work).
    if [ "$mode" = "--dry-run" ]; then
        echo "+ FASTGUIDE_BUILD_CUDA=1 FASTGUIDE_CUDA_ARCHS=<this GPU's> $py -m pip install --no-deps --no-build-isolation -e . > $out/cuda-build.log"
    else
        archs=${FASTGUIDE_CUDA_ARCHS:-$("$py" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())' 2>/dev/null)}
        archs=${archs:-80;90}  # (setup.py's default, where the GPU could not be asked)
        if ! env FASTGUIDE_BUILD_CUDA=1 FASTGUIDE_CUDA_ARCHS="$archs" "$py" -m pip install --no-deps --no-build-isolation -e . \
            > "$out/cuda-build.log" 2>&1; then
            echo "gpu.sh: the CUDA extension did not build (see cuda-build.log); going on without it" | tee -a "$out/cuda-build.log"
        fi
    fi
fi

# The tests run in parallel workers (pytest-xdist, which the GPU image has): they check
# results, never times. On the H200 (2026-12-04) the GPU tests took 4.2 of the call's 9
# minutes in one process, and the group_norm benchmarks after them were cut; how much of
# that was host work (Triton and inductor compile a kernel at a time on one of 16 cores)
# the log did not say, so the gain is a GPU run's to show (gpu-tests.log's durations). Each worker takes its share of the cores (tests/conftest.py) and its own
# CUDA context (about 0.5 GB); the largest test holds about 5 GB. GPU_SH_TEST_WORKERS=0
# runs them in one process.
test_options=()
if [ "${GPU_SH_TEST_WORKERS:-8}" != 0 ] && "$py" -c "import xdist" 2>/dev/null; then
    test_options=(-n "${GPU_SH_TEST_WORKERS:-8}")
fi
# A test that hangs (a kernel that spins on device atomics, say) fails alone after 120 s
# (pytest-timeout, in the GPU image: its thread method ends the worker, whose kernels end
# with it, and xdist starts another) rather than taking the step's whole time limit.
if "$py" -c "import pytest_timeout" 2>/dev/null; then
    test_options+=(--timeout=120 --timeout-method=thread)
fi

if [ "$mode" = "--dry-run" ]; then
    tests=$(collected tests)
    gpu_tests=$(collected tests -m gpu)
    benchmarks=$(collected benchmarks)
    for path in benchmarks/*/bench_*.py; do  # every benchmark module is in the run's list
        name=$(basename "$path" .py)
        [[ " $default_modules " == *" $name "* ]] || { echo "gpu.sh: $path is not in default_modules" >&2; exit 1; }
    done
    echo "collected: ${tests:-0} tests, ${gpu_tests:-0} of them GPU-marked, ${benchmarks:-0} benchmarks"
    if [ "${tests:-0}" -eq 0 ] || [ "${gpu_tests:-0}" -eq 0 ] || [ "${benchmarks:-0}" -eq 0 ]; then
        echo "gpu.sh: collection came up empty ($py cannot import pytest or the suite is broken)" >&2
        exit 1
    fi
    echo "+ $py -m fastguide selfcheck --device cuda > $out/selfcheck.txt (and with FASTGUIDE_BACKEND=cuda)"
    [ "${GPU_SH_SKIP_TESTS:-0}" = 1 ] ||
        echo "+ $py -m pytest tests -m gpu -v --durations=15 ${test_options[*]} > $out/gpu-tests.log"
    for module in "${modules[@]}"; do
        [ "$module" != bench_attention ] || continue
        echo "+ $py -m fastguide bench -k \"$(selection "$module")\" --out $out/bench/$module  (at most $(module_cap "$module") s)"
    done
    echo "+ $py -m benchmarks.sampling.loop_profile --out $out > $out/loop_profile.log"
    echo "+ $py benchmarks/ops/host_path.py --device cuda --rounds 5 > $out/host_path.md"
    [ "${GPU_SH_SKIP_TESTS:-0}" = 1 ] ||
        echo "+ $py -m pytest tests/ops/test_guided_step.py tests/ops/test_group_norm.py tests/ops/test_attention.py tests/ops/test_compile.py -q ${test_options[*]} > $out/backend-tests.log"
    [[ " ${modules[*]} " != *" bench_attention "* ]] ||
        echo "+ $py -m fastguide bench -k \"$(selection bench_attention)\" --out $out/bench/bench_attention"
    echo "+ tar czf ${GPU_SH_PACK:-(GPU_SH_PACK)} -C $(dirname "$out") $(basename "$out"), after every step"
    exit 0
fi

export PYTHONUNBUFFERED=1
"$py" -c "import torch; assert torch.cuda.is_available(), 'gpu.sh needs a CUDA device'"
nvidia-smi > "$out/device.txt" 2>&1 || true
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" >> "$out/device.txt"
"$py" -c "import fastguide; print('backends', fastguide.available_backends())" >> "$out/device.txt"
# The peers the comparisons need (the GPU image has none: carry their wheels and put them on
# PYTHONPATH, as the device tool's README says); without one its rows skip or fail, and
# device.txt says which were missing.
# (k_diffusion's package __init__ imports what its samplers do not need: its samplers are
# what the comparisons use.)
for peer in diffusers k_diffusion.sampling liger_kernel; do
    "$py" -c "import $peer as p; print('$peer', getattr(p, '__version__', ''))" >> "$out/device.txt" 2>/dev/null ||
        echo "$peer: not importable (its rows skip or fail)" >> "$out/device.txt"
done
# End to end at real size builds every row beside diffusers' models (SD's UNet is diffusers'
# own): without diffusers all its cases skip, fastguide's included.
"$py" -c "import diffusers" 2>/dev/null ||
    echo "gpu.sh: diffusers is not importable: every end-to-end case will skip (carry its wheel)" | tee -a "$out/device.txt"
# From here every step runs whatever the one before it did, and the exit status is the
# first failure's: a failed step must not cost the results of the later ones.
set +e
status=0
keep() { [ "$status" -ne 0 ] || status=$1; }
# (540 s: the device tool's 600 s a call, less the machine's start; SECONDS counts from the
# start of gpu.sh, so the install and the build are inside it)
deadline=$((${GPU_SH_TIME:-540} - 15))
pack() {  # OUT packed into GPU_SH_PACK (when set), replaced whole: a run cut short keeps the last
    [ -n "${GPU_SH_PACK:-}" ] || return 0
    tar czf "$GPU_SH_PACK.part" -C "$(dirname "$out")" "$(basename "$out")" 2>/dev/null &&
        mv -f "$GPU_SH_PACK.part" "$GPU_SH_PACK"
}
bounded() {  # bounded CMD...: CMD under the time left and the step's cap (STEP_CAP or step_limit)
    local limit=$((deadline - SECONDS)) cap=${STEP_CAP:-$step_limit}
    if [ "$limit" -lt 20 ]; then
        echo "gpu.sh: no time left (GPU_SH_TIME): skipped $*" >&2
        return 124
    fi
    [ "$limit" -le "$cap" ] || limit=$cap
    timeout -k 5 "$limit" "$@"
    local rc=$?
    [ "$rc" -ne 124 ] || echo "gpu.sh: stopped after ${limit} s: $*" >&2
    return "$rc"
}
bench_module() {  # one benchmark module: results.json, table.md and its log under bench/
    local module=$1
    echo "+ $py -m fastguide bench -k \"$(selection "$module")\" --out $out/bench/$module  ($(date +%T), $SECONDS s)"
    STEP_CAP=$(module_cap "$module") bounded "$py" -m fastguide bench -k "$(selection "$module")" \
        --out "$out/bench/$module" --no-plots 2>&1 | tee "$out/bench/$module.log" | tail -n 3
    keep "${PIPESTATUS[0]}"
    pack
}
pack
# In priority order. The self-check first (seconds): do the ops agree with their formulas
# on this GPU, on auto's backends and on the cuda backend's?
STEP_CAP=$quick_limit bounded "$py" -m fastguide selfcheck --device cuda 2>&1 | tee "$out/selfcheck.txt"
keep "${PIPESTATUS[0]}"
FASTGUIDE_BACKEND=cuda STEP_CAP=$quick_limit bounded "$py" -m fastguide selfcheck --device cuda 2>&1 \
    | tee -a "$out/selfcheck.txt"
keep "${PIPESTATUS[0]}"
pack
# The GPU tests (-v: each result is logged as it ends, so a cut step still says which failed).
if [ "${GPU_SH_SKIP_TESTS:-0}" != 1 ]; then
    STEP_CAP=$test_limit bounded "$py" -m pytest tests -m gpu -v -p no:cacheprovider --durations=15 \
        ${test_options[@]+"${test_options[@]}"} 2>&1 | tee "$out/gpu-tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -n 40
    keep "${PIPESTATUS[0]}"
    pack
fi
mkdir -p "$out/bench"
for module in "${modules[@]}"; do  # the full attention sweep last of all, below
    [ "$module" = bench_attention ] || bench_module "$module"
done
# Where the eager loops' time goes (a minute): fastguide's loop against the diffusers-style
# one, launches and host waits per step and the operators with the most host time.
STEP_CAP=$quick_limit bounded "$py" -m benchmarks.sampling.loop_profile --out "$out" > "$out/loop_profile.log" 2>&1
keep "$?"
tail -n 8 "$out/loop_profile.log"
# Each op's call split into fastguide's part and its backend's (seconds): where a call's
# host time beyond the kernel goes.
STEP_CAP=$quick_limit bounded "$py" benchmarks/ops/host_path.py --device cuda --rounds 5 2>&1 | tee "$out/host_path.md"
keep "${PIPESTATUS[0]}"
pack
# The op tests parametrised over backends (every option, odd shapes) run on the CUDA
# device here, with every backend that can run: triton and, when it built, cuda; the
# attention tests' odd shapes and packed views reach the TMA forward on real hardware.
if [ "${GPU_SH_SKIP_TESTS:-0}" != 1 ]; then
    bounded "$py" -m pytest tests/ops/test_guided_step.py tests/ops/test_group_norm.py tests/ops/test_attention.py \
        tests/ops/test_compile.py -q -p no:cacheprovider ${test_options[@]+"${test_options[@]}"} 2>&1 | tee "$out/backend-tests.log"
    keep "${PIPESTATUS[0]}"
    pack
fi
[[ " ${modules[*]} " != *" bench_attention "* ]] || bench_module bench_attention
exit "$status"
