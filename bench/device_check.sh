#!/usr/bin/env bash
# The GPU check in one call on the lent GPU machine: GPU tests, then GPU benchmarks; everything it
# produces (machine description, test log + junit XML, benchmark log + JSON) goes to $OUT.
#
#   OUT=/path/to/dir bash bench/device_check.sh      # on the GPU machine (torch + Triton installed)
#   DRY=1 OUT=/tmp/x bash bench/device_check.sh      # here, without a GPU: checks the plumbing only
#
# That machine has no network: the package is used from this checkout (PYTHONPATH), nothing is
# installed. Each stage has its own time limit so that the whole call ends well inside 10 minutes.
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

echo "== GPU tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider -rs tests/test_triton.py -k "cuda" \
    --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log" || status=1

echo "== GPU benchmarks"
if [ "${DRY:-0}" = 1 ]; then bench=(--dry); else bench=(--backends triton,torch); fi
timeout 300 $PY bench/run.py "${bench[@]}" --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
