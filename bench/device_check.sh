#!/usr/bin/env bash
# The GPU check, made for ONE call of at most 5 minutes on a lent H100 or H200 (16 cores, no network,
# torch + Triton + nvcc there, the extension not built). Stages, most valuable first, each in its own
# time box (timeout) and each leaving its results in $OUT before the next one starts:
#
#   stage    box (s)  estimated on an H100         what
#   machine  20+20     ~5                         nvidia-smi; python, torch, Triton, CUDA versions -> check.log
#   build      100     ~30-60                     the CUDA extension, sm_90 only (H100 and H200) -> check.log
#   bench      150     ~70 (Triton JIT ~30 of it)  bench/gpu_bench.py: step times of torch fused AdamW and
#                                                 EPIAdamW cuda/triton (+ exp_avg_sq, + refresh steps, + global ones), fp32
#                                                 and bf16, 16M/256M, 1 and ~200 tensors; host time; the
#                                                 CUDA-graph check       -> bench.log, gpu_bench.json, gpu_bench.md
#   tests      100     ~60-90                     GPU tests: parity on CUDA tensors, tie cuts, capture -> tests.log
#   sanitizer   40     ~20-30                     compute-sanitizer memcheck of bench/cuda_sanitize.py -> sanitizer.log
#   memory      45     ~30                        peak memory of plain and refresh steps -> memory.log, memory.json
#
# The boxes add up to more than the call has: the whole script gets BUDGET seconds (default 270,
# leaving ~30 s of the 300 for starting the shell and copying $OUT back), and each stage gets its
# box or what is left of BUDGET, whichever is less (a stage whose minimum no longer fits is skipped
# and says so). gpu_bench.py itself starts no new case once its own budget (its box less 40 s, for
# the largest case and the graph check) is spent, and rewrites its JSON and markdown after every case,
# so even a stage that is killed leaves what it measured. At most 8 files go to $OUT (the 8 above).
# If the build fails, the benchmark still runs (triton and torch; cuda rows say "unavailable").
# The exit status is 1 if any stage failed, timed out or was skipped for lack of time.
#
#   OUT=/path/to/dir bash bench/device_check.sh      # on the GPU machine
#   DRY=1 OUT=/tmp/x bash bench/device_check.sh      # here, without a GPU: the same stages on CPU (Triton's
#                                                    # interpreter, the extension's host harness, toy sizes);
#                                                    # no build (that would replace this checkout's
#                                                    # extension), no sanitizer; boxes x3 (2 slow cores)
#
# That machine has no network: the package is used from this checkout (PYTHONPATH) and the
# extension is built in place with the machine's nvcc, CMake, ninja and pybind11 (nothing is
# installed). tests/backends/test_cuda_sass.py is not run here: it needs no GPU (CI runs it wherever
# the extension is built), expects the default sm_80 + sm_90 build, and its release-wheel cases
# build a wheel for minutes. The Triton compile checks (tests/backends/test_triton_compile.py) run
# in CI on CPU too.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/device}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
dry=${DRY:-0}
scale=1; [ "$dry" = 1 ] && scale=3  # the emulations on a 2-core CPU are slower than the GPU run
BUDGET=${BUDGET:-$((270 * scale))}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log=$OUT/check.log
status=0
: > "$log"

# box MAX MIN: the seconds the next stage may run: MAX, or what is left of BUDGET if less (less the
# 5 s that timeout -k gives a stage that ignores SIGTERM); nothing, and status 1, when under MIN.
box() {
  local left=$((BUDGET - SECONDS - 5)) max=$(($1 * scale)) min=$(($2 * scale))
  local t=$((max < left ? max : left))
  ((t >= min)) && echo "$t"
}

# stage NAME LOGFILE MAX MIN COMMAND...: COMMAND under its box, output to LOGFILE, one summary line
# to check.log and stdout.
stage() {
  local name=$1 out=$2 t start rc
  shift 2
  if ! t=$(box "$1" "$2"); then
    echo "skipped: less than its minimum of $(($2 * scale)) s left of the ${BUDGET} s budget" >> "$out"
    echo "== $name: SKIPPED (less than its minimum of $(($2 * scale)) s left at $SECONDS s of $BUDGET)" | tee -a "$log"
    status=1
    return
  fi
  shift 2
  start=$SECONDS
  timeout -k 5 "$t" "$@" >> "$out" 2>&1
  rc=$?
  local verdict=ok
  ((rc == 124 || rc == 137)) && verdict="TIMED OUT"
  ((rc != 0 && rc != 124 && rc != 137)) && verdict="FAILED (exit $rc)"
  ((rc != 0)) && status=1
  echo "== $name: $verdict in $((SECONDS - start)) s (box $t s, at $SECONDS s of $BUDGET)" | tee -a "$log"
}

{ date -u; echo "DRY=$dry BUDGET=$BUDGET python=$PY"; } >> "$log"
[ "$dry" = 1 ] || stage machine "$log" 20 5 nvidia-smi
stage versions "$log" 20 5 $PY -c "import platform, torch, triton; print('python', platform.python_version(),
'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

if [ "$dry" = 1 ]; then
  echo "== build: skipped (DRY=1: it would replace this checkout's extension; the one built here is used)" | tee -a "$log"
else
  # sm_90 only: runs on H100 and H200, and compiles in about half the time of the default sm_80 + sm_90
  stage build "$log" 100 30 env EPI_BUILD_CUDA=1 EPI_CUDA_ARCHS=90 $PY setup.py -q build_ext --inplace
fi
$PY -c "import epi_kernels._C as C; print('epi_kernels._C', C.__file__)" >> "$log" 2>&1 \
    || echo "epi_kernels._C does not load: the benchmark runs without backend=cuda" | tee -a "$log"

# gpu_bench.py's own budget: its box less 40 s (the largest case, ~15 s, and the graph check)
if t=$(box 150 45); then bench_budget=$((t - 40 * scale)); else bench_budget=0; fi
if [ "$dry" = 1 ]; then bench=(--dry); else bench=(); fi
stage bench "$OUT/bench.log" 150 45 $PY bench/gpu_bench.py "${bench[@]}" --budget-s "$bench_budget" --out "$OUT"
rm -f "$OUT"/.gpu_bench.*.tmp  # a write cut short by the box

if [ "$dry" = 1 ]; then sel=(-k "host-harness and (tie_cut or window_answers)"); else sel=(-k "cuda and not host and not interpreter"); fi
stage tests "$OUT/tests.log" 100 30 $PY -m pytest -v -rfEs --durations=15 -p no:cacheprovider \
    tests/backends/test_capturable.py tests/backends/test_kernel_backends.py tests/backends/test_cuda_extension.py \
    tests/backends/test_triton_large_counts.py "${sel[@]}"
tail -3 "$OUT/tests.log"

if [ "$dry" = 1 ] || ! command -v compute-sanitizer > /dev/null; then
  echo "skipped: DRY=1 or no compute-sanitizer" > "$OUT/sanitizer.log"
  echo "== sanitizer: skipped (DRY=1 or no compute-sanitizer)" | tee -a "$log"
else
  stage sanitizer "$OUT/sanitizer.log" 40 20 compute-sanitizer --tool memcheck --error-exitcode 1 $PY bench/cuda_sanitize.py
  tail -3 "$OUT/sanitizer.log"
fi

if [ "$dry" = 1 ]; then mem=(--numel 100000 --configs adamw,torch); else mem=(--device cuda --configs adamw,cuda,triton,torch); fi
stage memory "$OUT/memory.log" 45 20 $PY bench/memory.py "${mem[@]}" --out "$OUT"

# last, so that the caller's view of the output's tail holds the numbers
echo; [ -f "$OUT/gpu_bench.md" ] && cat "$OUT/gpu_bench.md"
echo; tail -8 "$OUT/memory.log"
echo "== done in $SECONDS s, exit $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
