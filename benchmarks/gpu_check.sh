#!/usr/bin/env bash
# The first GPU hour in one command, on a bare GPU machine (no network, the working tree copied over):
#   1. offline install of dar-fast against the machine's own torch, the C++/CUDA sampler built for this GPU's
#      compute capability (skipped when this checkout's extension already loads with CUDA: a second run);
#   2. checks that dar_fast._C loaded with CUDA (a failure is reported and the checks still run: the hour is
#      not wasted, the run exits non-zero);
#   3. python benchmarks/gpu_check.py with a budget that keeps the whole command under ~560 s.
#
#   bash benchmarks/gpu_check.sh [DIR] [gpu_check.py options, e.g. --sections kernels,decode_step]
#
# DIR defaults to $OUT/gpu_check when $OUT is set (the device tool's folder that comes back), else
# benchmarks/results/<UTC date>-<gpu>. GPU_CHECK_BUDGET_S overrides the budget. Results: DIR/gpu_check.json
# (read benchmarks/results/README.md), DIR/gpu_check.log, DIR/install.log, DIR/pytest_gpu.xml, DIR/bench_*.json.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
T0=$(date +%s)

GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
if [ -z "$GPU" ]; then
  echo "gpu_check.sh: $PY cannot import torch; nothing to check" >&2
  exit 2
fi
SLUG=$(echo "$GPU" | sed -e 's/NVIDIA //' -e 's/[^A-Za-z0-9]\+/_/g' -e 's/^_//' -e 's/_$//')
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then
  DIR=$1; shift
elif [ -n "${OUT:-}" ]; then
  DIR=$OUT/gpu_check
else
  DIR=benchmarks/results/$(date -u +%Y-%m-%d)-$SLUG
fi
mkdir -p "$DIR"
echo "gpu_check.sh: $GPU, torch $($PY -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'), results in $DIR"

ext_ok() {
  # the extension this checkout built, loaded with CUDA (not another install's)
  $PY - <<'EOF'
import os, sys
import dar_fast
from dar_fast.kernels.sample_tokens import extension_status
here = os.path.abspath("dar_fast")
s = extension_status()
ok = s["built"] and s["cuda"] and os.path.dirname(os.path.abspath(dar_fast.__file__)) == here
print(f"dar_fast from {os.path.dirname(dar_fast.__file__)}; extension {s}")
sys.exit(0 if ok else 1)
EOF
}

EXT=0
SMOKE=()
if [ "$GPU" = "cpu" ]; then
  # no GPU here: never reinstall a working CPU environment; rehearse the CPU variants instead
  echo "gpu_check.sh: torch sees no CUDA device: no install, running the --smoke rehearsal"
  SMOKE=(--smoke)
elif [ "${GPU_CHECK_SKIP_INSTALL:-0}" = "1" ] || ext_ok >/dev/null 2>&1; then
  echo "gpu_check.sh: no reinstall (dar-fast from this checkout already loads its CUDA sampler, or GPU_CHECK_SKIP_INSTALL=1)"
else
  CC=$($PY -c "import torch; a, b = torch.cuda.get_device_capability(0); print(f'{a}.{b}')")
  export TORCH_CUDA_ARCH_LIST="$CC"                   # e.g. 9.0: machine code for this GPU, not PTX JIT at load
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  echo "gpu_check.sh: installing (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, log in $DIR/install.log)"
  T1=$(date +%s)
  $PY -m pip install --no-deps --no-build-isolation --no-index -e . >"$DIR/install.log" 2>&1
  echo "gpu_check.sh: pip exited $? after $(( $(date +%s) - T1 ))s"
  grep -i "warn\|error" "$DIR/install.log" | tail -n 5
fi
if [ "$GPU" != "cpu" ]; then
  if ext_ok; then
    echo "gpu_check.sh: OK dar_fast._C loaded with CUDA"
  else
    EXT=1
    echo "gpu_check.sh: FAILED dar_fast._C did not load with CUDA (see $DIR/install.log); the checks run anyway" >&2
  fi
fi

USED=$(( $(date +%s) - T0 ))
BUDGET=${GPU_CHECK_BUDGET_S:-$(( 560 - USED < 480 ? 560 - USED : 480 ))}
echo "gpu_check.sh: budget ${BUDGET}s for the checks (${USED}s spent on setup)"
$PY benchmarks/gpu_check.py --out "$DIR" --budget-s "$BUDGET" ${SMOKE[@]+"${SMOKE[@]}"} "$@"
RC=$?
echo "gpu_check.sh: results in $DIR/gpu_check.json (log $DIR/gpu_check.log); total $(( $(date +%s) - T0 ))s"
[ $EXT -eq 0 ] || exit 1
exit $RC
