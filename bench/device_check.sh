#!/usr/bin/env bash
# The GPU check in one call on the lent GPU machine (about 6 minutes): build the CUDA extension,
# the GPU tests, the GPU benchmarks of both kernel backends, peak memory of plain and refresh
# steps, and (if time is left) compute-sanitizer memcheck on a small run. At most 8 files go to
# $OUT: build.log (machine + build), tests.log + tests.xml, bench.log + the benchmark JSON,
# memory.log + memory.json, sanitizer.log.
#
#   OUT=/path/to/dir bash bench/device_check.sh      # on the GPU machine (torch + Triton installed)
#   DRY=1 OUT=/tmp/x bash bench/device_check.sh      # here, without a GPU: checks the plumbing only
#
# That machine has no network: the package is used from this checkout (PYTHONPATH) and the
# extension is built in place with the machine's nvcc, CMake, ninja and pybind11 (nothing is
# installed). Each stage has its own time limit so that the whole call ends inside 7 minutes.
# The compile checks (tests/backends/test_triton_compile.py, under the GPU machine's Triton 3.6.0 too) run
# in CI on CPU and are not repeated here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/device}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
dry=${DRY:-0}

{ date -u; nvidia-smi 2>&1 | head -15
  $PY -c "import platform, torch, triton; print('python', platform.python_version(), 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; } > "$OUT/build.log" 2>&1
cat "$OUT/build.log"

echo "== build the CUDA extension (sm_80, sm_90)"
EPI_BUILD_CUDA=1 timeout 100 $PY setup.py -q build_ext --inplace >> "$OUT/build.log" 2>&1 \
    || { status=1; tail -30 "$OUT/build.log"; }
$PY -c "import epi_kernels._C as C; print('epi_kernels._C', C.__file__)" 2>&1 | tee -a "$OUT/build.log"

echo "== GPU tests (kernel backends on CUDA tensors: parity with mixed-magnitude gradients, tie cuts, capture)"
if [ "$dry" = 1 ]; then sel=(-k "host-harness and (ties or c5)"); else sel=(-k "cuda and not host and not interpreter"); fi
timeout 150 $PY -m pytest -q -p no:cacheprovider -rs tests/backends/test_cuda_extension.py tests/backends/test_kernel_backends.py \
    tests/backends/test_capturable.py tests/backends/test_cuda_sass.py tests/backends/test_triton_large_counts.py "${sel[@]}" \
    --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
tail -4 "$OUT/tests.log"

echo "== GPU benchmarks"
if [ "$dry" = 1 ]; then bench=(--dry); else bench=(--backends cuda,triton,torch --reps 3); fi
timeout 80 $PY bench/run.py "${bench[@]}" --out "$OUT" > "$OUT/bench.log" 2>&1 || status=1
tail -25 "$OUT/bench.log"

echo "== peak memory of plain and refresh steps"
if [ "$dry" = 1 ]; then mem=(--numel 100000 --configs adamw,torch); else mem=(--device cuda --configs adamw,cuda,triton,torch); fi
timeout 45 $PY bench/memory.py "${mem[@]}" --out "$OUT" > "$OUT/memory.log" 2>&1 || status=1
cat "$OUT/memory.log"

echo "== compute-sanitizer memcheck on a small backend=cuda run"
if [ "$dry" = 1 ] || ! command -v compute-sanitizer > /dev/null; then
  echo "skipped: DRY=1 or no compute-sanitizer" > "$OUT/sanitizer.log"
else
  timeout 30 compute-sanitizer --tool memcheck --error-exitcode 1 $PY bench/cuda_sanitize.py \
      > "$OUT/sanitizer.log" 2>&1 || status=1
fi
tail -5 "$OUT/sanitizer.log"
exit $status
