#!/usr/bin/env bash
# One prepared run for a lent GPU machine: the GPU correctness tests first, then every kernel benchmark with its JSON
# and a short trainer run.
#
#   bash bench/gpu_session.sh OUTDIR            # from the repository root, on the GPU machine
#
# Writes OUTDIR/summary.txt (pass/fail per step and per GPU test, the failed tests by name), OUTDIR/log.txt (everything
# printed, TRITON_PRINT_AUTOTUNING's choices included, each step's exit status and seconds, the training run's
# metrics) and the benchmarks' files: attention.json, attention.png, attention-d96.json, norm.json, embedding.json,
# train-s-32.json (8 files: the device tool returns at most 8). Copy the JSONs and the plot to bench/results/<device>/.
# Each step runs under its own time limit, so one stuck step cannot spend the whole lease; a failed step is logged
# and the others still run. The exit status is the first failed step's (0 when all passed).
# Needs only what the GPU image has ($PYTHON, default python3, with torch, triton, pytest, transformers and
# matplotlib): nothing is installed; igpt and igpt_kernels go on PYTHONPATH.
# All steps share a budget of BUDGET seconds (570), under the device tool's 600 s per command. The GPU tests come
# first (bugs before speed) and run the default selection; RUNSLOW=1 adds the rest of the grid (a second call with
# SKIP_BENCH=1 RUNSLOW=1, within the machine's 30 s warm period, keeps the compiled kernels). SKIP_TESTS=1 leaves the
# GPU tests out; QUICK=1 passes --quick to every benchmark (tiny sizes: how tests/test_bench_smoke.py runs this
# script on a CPU, where the GPU tests skip themselves) and triples each step's limit (LIMIT_SCALE sets the factor).
# The device tool may copy the working tree without .git: name the commit so that the JSONs carry it,
#   run(command="IGPT_GIT_SHA=<git rev-parse HEAD here> bash bench/gpu_session.sh $OUT", timeout_s=600)
set -u
out=${1:?usage: bash bench/gpu_session.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/log.txt"
: >"$log"
cd "$(dirname "$0")/.."

site=$(mktemp -d)
ln -s "$PWD/igpt" "$site/igpt"
ln -s "$PWD/igpt_kernels" "$site/igpt_kernels"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

python=${PYTHON:-python3}
quick=""
train_size=(--preset s --resolution 32)
run_size=(--preset tiny --resolution 32 --batch-size 32 --ckpt-every 20 --ac every-2)
steps=(40 60)  # the run stops after the first count of steps, then resumes from its checkpoint to the second
limit_scale=${LIMIT_SCALE:-1}  # each step's limit is sized for the GPU; a CPU dry run scales them
if [ "${QUICK:-0}" = 1 ]; then
    quick=--quick train_size=() run_size=(--preset tiny --resolution 8 --batch-size 4 --ckpt-every 2) steps=(2 4)
    limit_scale=${LIMIT_SCALE:-3}  # cold torch.compile on a shared 2-core CPU: only the budget should stop it
fi
budget=${BUDGET:-570}  # seconds for all steps: the device tool stops a command at 600 s
status=0
summary="$out/summary.txt"
: >"$summary"
step() {  # step LIMIT_SECONDS NAME COMMAND...  (the limit is cut to what is left of the budget)
    local limit=$(($1 * limit_scale)) name=$2
    shift 2
    local left=$((budget - SECONDS))
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt 10 ]; then
        echo "=== $name: SKIPPED, the ${budget} s budget is spent" | tee -a "$log"
        echo "SKIPPED  $name (budget spent)" >>"$summary"
        if [ "$status" -eq 0 ]; then status=124; fi
        return
    fi
    echo "=== $name (limit ${limit} s): $*" | tee -a "$log"
    local start=$SECONDS rc=0
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1 || rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    local verdict=PASS
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict=TIMEOUT; elif [ "$rc" -ne 0 ]; then verdict=FAIL; fi
    echo "$verdict  $name (exit $rc, $((SECONDS - start)) s)" >>"$summary"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    git rev-parse HEAD 2>/dev/null || echo "no .git here; IGPT_GIT_SHA=${IGPT_GIT_SHA:-(not set)}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$python" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
                '| triton', triton.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
} >>"$log" 2>&1

# Correctness first: bf16 numerics (which the interpreter cannot check), the multi-config autotuner with its prune and
# reset, 10x bit-identity of the deterministic backward, FusedDecoder vs Decoder in bf16, split-KV decoding. -v puts
# one line per test in the log, so the summary names what ran even when the step is cut short.
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    tests_log=$(mktemp)
    slow=(); if [ "${RUNSLOW:-0}" = 1 ]; then slow=(--runslow); fi
    TRITON_PRINT_AUTOTUNING=1 step 270 "GPU tests" \
        bash -c 'set -o pipefail; "$@" 2>&1 | tee "'"$tests_log"'"' _ \
        "$python" -m pytest -v -m gpu -p no:cacheprovider ${slow[@]+"${slow[@]}"} tests
    {
        grep -cE ' PASSED' "$tests_log" | sed 's/^/GPU tests passed: /'
        grep -cE ' (FAILED|ERROR)' "$tests_log" | sed 's/^/GPU tests failed: /'
        grep -cE ' SKIPPED' "$tests_log" | sed 's/^/GPU tests skipped: /'
        grep -E '^tests/.* (FAILED|ERROR)' "$tests_log" | sed 's/^/  /'
    } >>"$summary"
fi

# Then the benchmarks (what bench/results/<device>/ needs), the most wanted first: each checks its outputs against
# the reference before timing. A cold Triton cache compiles every autotune config in the first call of each kernel.
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    step 150 "attention D 64" "$python" bench/attention.py $quick --json "$out/attention.json" \
        --plot "$out/attention.png"
    step 45 "norm" "$python" bench/norm.py $quick --json "$out/norm.json"
    step 45 "embedding" "$python" bench/embedding.py $quick --json "$out/embedding.json"
    step 120 "train S 32x32" "$python" bench/train.py $quick "${train_size[@]}" --json "$out/train-s-32.json"
    step 90 "attention D 96" "$python" bench/attention.py $quick --hdim 96 --json "$out/attention-d96.json"
fi
# igpt/train.py end to end: nccl and FSDP2 on a GPU, bf16 where supported, a checkpoint, then a resume from it
run_dir=$(mktemp -d)/run
train=("$python" -m torch.distributed.run --standalone --nproc_per_node=1 igpt/train.py "${run_size[@]}"
       --out "$run_dir")
step 50 "igpt/train.py" "${train[@]}" --steps "${steps[0]}"
step 40 "igpt/train.py --resume" "${train[@]}" --steps "${steps[1]}" --resume
{ echo "=== igpt/train.py metrics.jsonl"; cat "$run_dir/metrics.jsonl"; } >>"$log" 2>&1
last_step=$(grep -o '"step": [0-9]*' "$run_dir/metrics.jsonl" 2>/dev/null | tail -1 | grep -o '[0-9]*$')
echo "igpt/train.py: last logged step ${last_step:-none} (runs to ${steps[0]}, resumes to ${steps[1]})" >>"$summary"
echo "=== done after $SECONDS s, exit $status" | tee -a "$log"
echo "exit $status after $SECONDS s" >>"$summary"
exit "$status"
