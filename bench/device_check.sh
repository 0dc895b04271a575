#!/usr/bin/env bash
# The GPU check in one call on the lent GPU machine: build the CUDA extension, GPU tests,
# compute-sanitizer on a small run, then the GPU benchmarks of both kernel backends; everything it
# produces (machine description, build log, test log + junit XML, sanitizer logs, benchmark log +
# JSON) goes to $OUT.
#
#   OUT=/path/to/dir bash bench/device_check.sh      # on the GPU machine (torch + Triton installed)
#   DRY=1 OUT=/tmp/x bash bench/device_check.sh      # here, without a GPU: checks the plumbing only
#
# That machine has no network: the package is used from this checkout (PYTHONPATH) and the
# extension is built in place with the machine's nvcc, CMake, ninja and pybind11 (nothing is
# installed). Each stage has its own time limit so that the whole call ends well inside 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/device}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{ date -u; nvidia-smi 2>&1 | head -15
  $PY -c "import platform, torch, triton; print('python', platform.python_version(), 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "== build the CUDA extension (sm_90 only: this machine's GPU)"
EPI_BUILD_CUDA=1 EPI_CUDA_ARCHS=${EPI_CUDA_ARCHS:-90} timeout 300 $PY setup.py -q build_ext --inplace \
    > "$OUT/build.log" 2>&1 || { status=1; tail -30 "$OUT/build.log"; }
$PY -c "import epi_kernels._C as C; print('epi_kernels._C', C.__file__)" 2>&1 | tee -a "$OUT/build.log"

echo "== compile checks: every Triton variant for sm_80/sm_90 (this machine's Triton), the extension's SASS"
timeout 240 $PY -m pytest -q -p no:cacheprovider -rs tests/test_triton_compile.py tests/test_cuda_sass.py 2>&1 \
    | tee -a "$OUT/build.log" | tail -3 || status=1

echo "== GPU tests"
timeout 300 $PY -m pytest -q -p no:cacheprovider -rs tests/test_fused_backends.py tests/test_cuda_extension.py tests/test_triton_large_counts.py tests/test_capturable.py tests/test_amp.py tests/test_compile.py \
    -k "cuda" --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log" || status=1

echo "== compute-sanitizer (memcheck, racecheck) on a small backend=cuda run"
if [ "${DRY:-0}" = 1 ] || ! command -v compute-sanitizer > /dev/null; then
  echo "skipped: DRY=1 or no compute-sanitizer" | tee "$OUT/sanitizer.log"
  [ "${DRY:-0}" = 1 ] && EPI_CUDA_HOST=1 $PY bench/cuda_sanitize.py cpu 2>&1 | tee -a "$OUT/sanitizer.log"
else
  for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool $tool --error-exitcode 1 $PY bench/cuda_sanitize.py \
        > "$OUT/sanitizer-$tool.log" 2>&1 || status=1
    tail -5 "$OUT/sanitizer-$tool.log"
  done
fi

echo "== GPU benchmarks"
if [ "${DRY:-0}" = 1 ]; then bench=(--dry); else bench=(--backends cuda,triton,torch --reps 5); fi
timeout 300 $PY bench/run.py "${bench[@]}" --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
