#!/usr/bin/env bash
# The GPU check of issue 16, in one script, for a machine with one CUDA GPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]            # on the GPU machine (OUT_DIR: default $OUT
#                                                     # or benchmarks/results/gpu_<date>)
#   bash benchmarks/gpu_check.sh --cpu [OUT_DIR]      # the same steps, shrunk, on a CPU (no CUDA):
#                                                     # checks the plumbing, records nothing useful
#   bash benchmarks/gpu_check.sh --dry-run            # print the GPU run's steps only
#
# Installs nothing from the network. Wheels carried in .whl/ (see the device tool's README) are
# installed with --no-index into /tmp/site first, if that folder exists. Steps, each under its
# own time limit (the whole run is sized for < 8 minutes on an H200):
#   1. environment: nvidia-smi, python, torch / triton / transformers versions
#   2. the Triton kernels' tests (tests/test_triton_moe.py) compiled: TRITON_INTERPRET unset,
#      not the interpreter
#   3. the layer benchmark in bf16 on CUDA: transformers' grouped_mm path (torch._grouped_mm)
#      and eager path, Inductor, capmoe off / score / expanded_drop, with measured mm peak and
#      copy bandwidth, Mixtral-like prefill and decode, fine E=64, Qwen3-like and DeepSeek-like
#      at T=2048, one run per shape -> moe_layer_cuda_bf16_<shape>.json
# Every step's output goes to OUT_DIR/gpu_check.log.
# Every step runs even if an earlier one failed; the exit status is the first failure's.
set -u
cd "$(dirname "$0")/.."

MODE=gpu
DRY=0
case "${1:-}" in
--cpu) MODE=cpu; shift ;;
--dry-run) DRY=1; shift ;;
esac
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu_$(date -u +%Y-%m-%d)}}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/capmoe_inductor_cache}"

if [ "$MODE" = gpu ]; then
    DEVICE=cuda
    SHAPES="prefill,decode,fine,qwen3,deepseek"
    REPS=10
    unset TRITON_INTERPRET # compiled kernels, not the interpreter
    # env 45 s + tests 100 s + 5 shapes x 65 s: 7.8 minutes at the very most
    ENV_LIMIT=45
    BENCH_LIMIT=65
    TEST_LIMIT=100
    OVERHEAD="--no-overhead" # one compile less per shape
else
    DEVICE=cpu
    SHAPES="qwen3"
    REPS=1
    export TRITON_INTERPRET=1 # no GPU: the interpreter, a smoke test of the plumbing only
    PYTEST_K="form_given_as_string or registered_op or supports or configs_table"
    ENV_LIMIT=180 # a loaded shared CPU: importing torch + transformers took > 20 s
    BENCH_LIMIT=900
    TEST_LIMIT=600
    OVERHEAD="" # the F=16 overhead rows too: their plumbing is what --cpu checks
fi

rc=0
LOG="$OUT_DIR/gpu_check.log" # every step's whole output, one file (the device tool brings
# back at most 8 files: this log and the benchmark's JSONs)
step() { # step NAME LIMIT_S CMD...: run, append to LOG, keep the first failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    [ $DRY = 1 ] && return 0
    local tmp
    tmp=$(mktemp)
    timeout "$limit" "$@" >"$tmp" 2>&1
    local r=$?
    { echo "== $name (limit ${limit}s): $*"; cat "$tmp"; echo "== $name: exit $r"; } >>"$LOG"
    tail -n 40 "$tmp"
    rm -f "$tmp"
    echo "== $name: exit $r"
    [ $r -ne 0 ] && [ $rc -eq 0 ] && rc=$r
    return 0
}

[ $DRY = 1 ] || mkdir -p "$OUT_DIR"
if [ -d .whl ] && [ $DRY = 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step env "$ENV_LIMIT" bash -c "date -u; uname -a; (nvidia-smi || echo 'no nvidia-smi'); $PY - <<'EOF'
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for m in ('triton', 'transformers'):
    try:
        print(m, __import__(m).__version__)
    except ImportError as e:
        print(m, 'missing', e)
EOF"

if [ "$MODE" = gpu ]; then
    step pytest_triton "$TEST_LIMIT" "$PY" -m pytest -q -x -p no:cacheprovider \
        tests/test_triton_moe.py
else
    step pytest_triton "$TEST_LIMIT" "$PY" -m pytest -q -x -p no:cacheprovider \
        tests/test_triton_moe.py -k "$PYTEST_K"
fi

QUICK=""
[ "$MODE" = cpu ] && QUICK="--quick"
# one invocation per shape, each with its own limit and JSON: a slow compile costs one shape
for shape in ${SHAPES//,/ }; do
    step moe_layer_"$DEVICE"_bf16_"$shape" "$BENCH_LIMIT" "$PY" -m benchmarks.moe_layer $QUICK \
        --device "$DEVICE" --dtypes bf16 --shapes "$shape" --reps "$REPS" $OVERHEAD \
        --out "$OUT_DIR/moe_layer_${DEVICE}_bf16_${shape}.json"
done

[ $DRY = 1 ] || ls -l "$OUT_DIR"
echo "gpu_check ($MODE, dry run $DRY): exit $rc"
exit $rc
