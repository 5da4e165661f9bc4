"""
The run's machinery, shared by pretrain.py, cpt.py and bench/: processes and devices, the
command line, checkpoints and logs, plots, samples and the end-of-run summary.
Nothing here is needed to learn pretraining: pretrain.py and model.py teach that.
"""

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import sys
import textwrap
import threading
import time
import types
import zlib
from dataclasses import asdict

import torch
import torch.distributed as dist

import data
from model import (ATTN_BACKENDS, GPT, GPTConfig, BadInput, fallback_in_words, flex_problem, kernel_problem,
                   triton_problem)


class Interrupted(Exception):
    """(message, exit status): Ctrl-C or SIGTERM came, the step was finished and a checkpoint written."""


def exit_with_one_line(run, args):
    """run(args); bad input ends as one line and exit status 1, a stopped run as one line and its status."""
    try:
        run(args)
    except BadInput as e:
        sys.exit(f"error: {e}")
    except Interrupted as e:
        message, status = e.args
        print(message, file=sys.stderr)
        sys.exit(status)


def say(rank, message):
    if rank == 0:  # under torchrun, one process speaks
        print(message)


# -----------------------------------------------------------------------------
# Devices and processes

def pick_device(requested):
    if requested in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {requested} was asked for but no CUDA GPU is visible to PyTorch "
                       f"(torch {torch.__version__}); use --device cpu, or install a CUDA build of torch")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise BadInput("--device mps was asked for but MPS is not available; use --device cpu")
    if requested.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise BadInput(f"unknown device '{requested}'; choose auto, cpu, cuda, cuda:N or mps")
    return requested


def setup_distributed(device):
    """(rank, world, device). Under torchrun (RANK, LOCAL_RANK and WORLD_SIZE in the
    environment) join the process group: NCCL between GPUs, gloo between CPU processes;
    each process drives the GPU of its LOCAL_RANK. A plain run is rank 0 of 1."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device == "cpu":
        keep_freed_memory()
    return rank, world, device


def keep_freed_memory():
    """CPU training, faster. glibc gives big freed blocks straight back to the OS, so each
    step's big tensors (the loss's (rows, vocab) chunks, 26 MB each) come back as fresh pages
    the kernel must zero. Keeping freed memory for reuse made the cpu step 1.2x faster
    (bench/cpu.md). Linux with glibc only; elsewhere nothing changes."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    libc.mallopt(M_MMAP_MAX, 0)  # big blocks from the heap, not from their own mmap
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and never trim the heap back


def autocast_dtype(device, dtype="auto"):
    """--dtype -> what autocast runs the matmuls in (None: fp32). auto: what the hardware
    computes itself. bf16 on a GPU from sm_80 and on a CPU with avx512_bf16 or AMX (2.5-4.6x
    faster matmuls than fp32 on this repo's EPYC); fp16 on sm_70 to sm_75, whose tensor cores
    have no bf16 (torch.cuda.is_bf16_supported() says yes there: it counts emulation); fp32
    elsewhere, since emulated is slower, not faster. Weights, norms, softmax and loss stay fp32."""
    kind = device.split(":")[0]
    if dtype == "auto" and kind == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        dtype = "bf16" if major >= 8 else "fp16" if major >= 7 else "fp32"
    elif dtype == "auto":
        native = kind == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        dtype = "bf16" if native else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)


def autocast_for(device, dtype="auto"):
    amp = autocast_dtype(device, dtype)
    return torch.autocast(device.split(":")[0], dtype=amp) if amp else contextlib.nullcontext()


def grad_scaler(device, dtype="auto"):
    """Small fp16 gradients round to 0: the scaler multiplies the loss (so every gradient) by a
    large factor (2^16 to start) before backward, divides it out before the update, and skips
    a step whose gradients overflowed, halving the factor. Disabled for bf16 and fp32: every
    call then passes straight through."""
    kind = device.split(":")[0]
    return torch.amp.GradScaler(kind, enabled=autocast_dtype(device, dtype) == torch.float16)


def compile_here(wanted, device, rank=0):
    """--compile, unless this GPU cannot run torch.compile's code (Triton): then off, with one line."""
    why = triton_problem() if wanted and device.startswith("cuda") else None
    if why:
        say(rank, f"torch.compile off: {why}")
    return wanted and not why


def check_attention_backend(backend, device, dtype, head_size):
    """--attn_backend cuda or flex where it cannot run: one line with the reason and the fix,
    before the run starts, not a crash in step 0. On a CPU or a Mac, cuda would run the mirror,
    a Python loop over tiles, far slower than sdpa: refused, so that nobody waits for it by mistake."""
    if backend in ("cuda", "flex") and not device.startswith("cuda"):
        what = "kernels.cu" if backend == "cuda" else "FlexAttention (no backward on a CPU or a Mac)"
        raise BadInput(f"--attn_backend {backend} runs {what}, which needs a CUDA GPU; this run is on {device}: "
                       "use --attn_backend auto (sdpa here) or reference (kernels.cu's algorithm in PyTorch, slow)")
    q = torch.empty(1, 1, 1, head_size, dtype=autocast_dtype(device, dtype) or torch.float32, device="meta")
    problem = kernel_problem(q, q, q) if backend == "cuda" else flex_problem(head_size) if backend == "flex" else None
    if problem:
        raise BadInput(f"--attn_backend {backend} cannot run here: {problem}; or use --attn_backend auto, which "
                       f"runs {fallback_in_words(head_size)} here")


def load_corpus_once(source, rank, world, quiet=False):
    """Under torchrun, process 0 tokenizes and caches; the others wait, then read its cache."""
    if rank > 0:
        dist.barrier()
    corpus = data.load_corpus(source, quiet=quiet or rank > 0)
    if rank == 0 and world > 1:
        dist.barrier()
    return corpus


def claim_out_dir(out_dir, rank, resume=False, overwrite=False, init=None):
    """--out_dir must be a folder this process can write (it is made if missing), and only
    one run may write there: two would interleave their logs and overwrite each other's
    checkpoints. Process 0 takes a lock that belongs to the OS (fcntl): it goes away with
    the process, however it ends. Returns the open lock file: keep it. No run is lost: a
    new run refuses a folder holding a checkpoint unless told to start over (overwrite: the
    old run's checkpoints are deleted, so none is resumed by mistake), and cpt.py never
    writes where its --init checkpoint is."""
    if not out_dir or os.path.isfile(out_dir):
        raise BadInput(f"--out_dir {out_dir!r} is {'a file' if out_dir else 'empty'}; give a folder")
    if init and os.path.realpath(os.path.dirname(init)) == os.path.realpath(out_dir):  # real paths: links, ./, ../
        raise BadInput(f"--out_dir {out_dir} holds the --init checkpoint {init}, which this run would overwrite; "
                       "choose another --out_dir")
    if resume and overwrite:
        raise BadInput("--resume continues the run in --out_dir and --overwrite_out_dir deletes it; give one of them")
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, ".lock"), "a+")  # opened for writing: the folder can be written
    except OSError as e:
        raise BadInput(f"--out_dir {out_dir} cannot be written ({e.strerror}); choose another folder")
    if rank == 0 and sys.platform != "win32":  # Windows has no fcntl: no lock
        import fcntl
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise BadInput(f"another run is writing to {out_dir} right now; wait for it to end or use another --out_dir")
    ckpt = os.path.join(out_dir, "ckpt.pt")
    if not resume and not overwrite and os.path.exists(ckpt):
        lock.close()
        raise BadInput(f"--out_dir {out_dir} holds {what_run(ckpt)}; continue it with --resume, choose another "
                       "--out_dir, or pass --overwrite_out_dir to start over (it deletes that run's checkpoints)")
    if overwrite and rank == 0:
        for name in os.listdir(out_dir):
            if name.startswith("ckpt") and name.endswith(".pt"):  # ckpt.pt and the kept ckpt_<step>.pt
                os.remove(os.path.join(out_dir, name))
    return lock


def what_run(path):
    """'a pretrain.py run (step 450 of 900)', read without loading the tensors (mmap)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        script = "cpt.py" if "init_eval" in ckpt else "pretrain.py"
        return f"a {script} run (step {ckpt['step']} of {ckpt['args']['max_steps']})"
    except Exception:  # damaged, or not ours: still something a new run must not write over
        return "a ckpt.pt that cannot be read"


def peak_memory_gb(device):
    """The most memory this process has held so far: on a GPU what PyTorch allocated, else
    the peak resident set (ru_maxrss: kB on Linux, bytes on macOS; no resource on Windows)."""
    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if sys.platform == "win32":
        return None
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 2**30, 2)


STOP_SIGNALS = {signal.SIGINT: ("Ctrl-C", 1), signal.SIGTERM: ("SIGTERM", 128 + signal.SIGTERM)}  # name, exit status


@contextlib.contextmanager
def signals_finish_the_step():
    """Ctrl-C, and SIGTERM (what Slurm, Kubernetes, systemd and `timeout` send before they
    kill), set stop.signal instead of raising mid-step, so the loop can finish the step,
    save a checkpoint and exit: status 1 after Ctrl-C, 143 (128 + 15: "terminated") after
    SIGTERM. A second Ctrl-C stops at once (a checkpoint half written is dropped, the last
    stays); a second SIGTERM is ignored: under torchrun a worker may get one from the
    scheduler and one from torchrun, and the grace period ends in SIGKILL anyway."""
    stop = types.SimpleNamespace(signal=0)
    def handler(signum, frame):
        if stop.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not stop.signal:
            stop.signal = signum
            # os.write, not print: a print here, while the step is inside one, would raise "reentrant call"
            os.write(1, f"\n{STOP_SIGNALS[signum][0]}: finishing this step and saving a checkpoint "
                        "(Ctrl-C to quit now)\n".encode())
    if threading.current_thread() is not threading.main_thread():  # signals only work there
        yield stop
        return
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


def across_processes(value, loop, op):
    """A number reduced over all processes under torchrun: op "mean" (each saw only its
    slice of the batch) or "max" (a signal may reach them at different steps; all must stop
    at the same one)."""
    if loop.world == 1:
        return float(value)
    value = torch.tensor([float(value)], device=loop.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return value.item() / (loop.world if op == "mean" else 1)


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12,
             "RTX 3090": 71e12, "A10G": 70e12, "L4": 121e12}  # dense tensor-core FLOP/s, datasheets


class Speedometer:
    """Tokens per second since the last read, and MFU on a GPU whose peak we know."""

    def __init__(self, model, loop):
        self.model, self.world, self.t, self.tokens = model, loop.world, time.time(), 0
        name = torch.cuda.get_device_name(loop.device) if loop.device.startswith("cuda") else ""
        self.peak = next((flops for key, flops in PEAK_BF16.items() if key in name), None)

    def read(self):
        tok_s, self.t, self.tokens = self.tokens / (time.time() - self.t), time.time(), 0
        flops = self.model.flops_per_token(self.model.config.block_size) * tok_s / self.world
        return tok_s, {"tok/s": f"{tok_s:,.0f}", **({"mfu": f"{100 * flops / self.peak:.0f}%"} if self.peak else {})}


# -----------------------------------------------------------------------------
# The command line: flags checked as they are parsed, one line for each refusal

class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit status 1, like every other error here."""

    def error(self, message):
        sys.exit(f"error: {message} (see --help)")


def number(kind, fine, what):
    """An argparse type: the flag's text as int or float, refused unless finite and fine."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}")
        if not (math.isfinite(value) and fine(value)):
            raise argparse.ArgumentTypeError(f"{text} is not valid: it must be {what}")
        return value
    return parse


AT_LEAST_1 = number(int, lambda v: v >= 1, "at least 1")
AT_LEAST_0 = number(int, lambda v: v >= 0, "0 or more")
POSITIVE = number(float, lambda v: v > 0, "a positive number")
NON_NEGATIVE = number(float, lambda v: v >= 0, "0 or more")
SHARE = number(float, lambda v: 0 <= v < 1, "in [0, 1)")
OPEN_SHARE = number(float, lambda v: 0 < v < 1, "in (0, 1)")

# Flags that mean the same in pretrain.py and cpt.py: (flag, type, choices or action, help).
# A flag left unset is None, so a run can tell it from one given with its default value.
SHARED_FLAGS = [
    ("data", str, f"the text to train on: {data.SOURCES_HELP}"),
    ("out_dir", str, "where checkpoints, logs, plots and samples go"),
    ("device", str, "auto, cpu, cuda, cuda:N or mps"),
    ("resume", "store_true", "continue the run in --out_dir from its checkpoint, with its settings"),
    ("overwrite_out_dir", "store_true", "start over in an --out_dir that holds a run's checkpoint, deleting its "
     "checkpoints; without it such a folder is refused (the name of the Hugging Face Trainer's flag, "
     "overwrite_output_dir, for our --out_dir)"),
    ("max_steps", AT_LEAST_1, "optimizer steps"),
    ("warmup", AT_LEAST_0, "steps of linear warmup (cpt.py: of rewarming)"),
    ("packing", data.PACKINGS, "how documents are laid into rows"),
    ("batch_size", AT_LEAST_1, "rows per micro-step"),
    ("grad_accum", AT_LEAST_1, "micro-steps per optimizer step"),
    ("weight_decay", NON_NEGATIVE, "AdamW weight decay on matrices"),
    ("grad_clip", POSITIVE, "clip the gradient norm to this"),
    ("eval_interval", AT_LEAST_1, "steps between evaluations and checkpoints"),
    ("eval_batches", AT_LEAST_1, "validation batches per evaluation (per domain in cpt.py)"),
    ("log_interval", AT_LEAST_1, "steps between log lines"),
    ("seed", number(int, lambda v: 0 <= v < 2**32, "in [0, 2^32)"), "seeds the model's init and the data order"),
    ("sample_tokens", AT_LEAST_0, "tokens per sample at the end of training (0: none)"),
    ("compile", argparse.BooleanOptionalAction, "torch.compile the model"),
    ("dtype", ("auto", "fp32", "bf16", "fp16"), "matmuls in bf16 or fp16 (autocast) or fp32; auto: the hardware's"),
    ("attn_backend", ATTN_BACKENDS, "attention: sdpa, flex (FlexAttention), cuda (kernels.cu) or reference (its mirror)"),
    ("quiet", "store_true", "no progress bars"),
]


def add_flags(p, flags, default):
    """Add (flag, type, help) flags to a parser: the type is a function, a tuple of choices
    or an action. default(flag) says, in --help, where an unset one comes from."""
    for flag, kind, what in flags:
        how = ({"action": kind, "default": None} if kind in ("store_true", argparse.BooleanOptionalAction) else
               {"choices": kind} if isinstance(kind, tuple) else {"type": kind})
        p.add_argument(f"--{flag}", **how, help=what if kind == "store_true" else f"{what} (default: {default(flag)})")


def fill_unset(run, values):
    for key, value in values.items():
        if getattr(run, key) is None:
            setattr(run, key, value)


def inherit(run, saved, path, skip):
    """--resume: every setting from the checkpoint, unless the flag was given; a given flag
    must agree, so that a resumed run computes exactly what the original would have."""
    differ = []
    for key, value in saved.items():
        if key in skip or not hasattr(run, key):
            continue
        if getattr(run, key) is None:
            setattr(run, key, value)
        elif getattr(run, key) != value:
            differ.append(f"{key}={value!r} (now {getattr(run, key)!r})")
    if differ:
        raise BadInput(f"checkpoint {path} is from another configuration: {', '.join(differ)}; "
                       "leave those flags out to continue it as it was, or use a new --out_dir")


# -----------------------------------------------------------------------------
# Checkpoints and logs

def save_checkpoint(path, model, optimizer, step, record, scaler=None):
    """Everything a resumed run needs. Written to a temporary file, flushed to disk, then
    renamed over the old checkpoint: a crash at any moment leaves either the old or the
    new checkpoint, never half of one."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": asdict(model.config),
             "scaler": scaler.state_dict() if scaler else {}, "step": step, "rng": {"torch": torch.get_rng_state(),
                                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
             **record}
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise BadInput(f"no checkpoint at {path}; check --out_dir, or start a new run without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = textwrap.shorten(str(e), 120, placeholder=" ...")  # cut between words
        raise BadInput(f"cannot read checkpoint {path} ({type(e).__name__}: {reason}); "
                       "it is damaged or not a minipretrain checkpoint")


def load_model(path, device="cpu", ckpt=None):
    """The GPT of checkpoint `path` (ckpt: the checkpoint, if already loaded), its weights in
    place, in eval mode; one line if they do not fit its config."""
    ckpt = ckpt or load_checkpoint(path)
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except TypeError as e:
        raise BadInput(f"{path} has a model config this model.py does not know ({e}); "
                       "it was written by another version of minipretrain")
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise BadInput(f"{path}: the weights do not fit its model config {ckpt['config']} ({first[:150]}); "
                       "the checkpoint is damaged or was edited")
    return model.to(device).eval()


def same_corpus(a, b):
    """Do two corpus.info dicts describe the same tokens? (fingerprint: files, sizes, times)"""
    return (a["tokens"] == b["tokens"] and a.get("fingerprint") == b.get("fingerprint")
            and [p.get("fingerprint") for p in a.get("parts", [])] == [p.get("fingerprint") for p in b.get("parts", [])])


def restore(ckpt, model, optimizer, corpus, world, scaler=None):
    """Put a checkpoint's weights, optimizer and RNG back; check it was trained on these
    tokens. Returns the step to continue from."""
    if not same_corpus(ckpt["data"], corpus.info):
        raise BadInput(f"the checkpoint was trained on other data ({ckpt['data']['tokens']:,} tokens, "
                       f"now {corpus.info['tokens']:,}); the files behind --data {corpus.info['source']} changed")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler and ckpt.get("scaler"):  # fp16's loss scale, as it was (empty: not an fp16 run)
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    before = ckpt["args"].get("world", 1)
    if before != world:
        print(f"note: the checkpoint was written by {before} process(es), now there are {world}: the run "
              f"continues from step {ckpt['step']} with a {world}-process batch (not the data order it had)")
    print(f"resuming at step {ckpt['step']}")
    return ckpt["step"]


def start_log(out_dir, step, record):
    """A fresh log, or a resumed one cut back to its checkpoint's step; and run.json, what
    this run is (its settings, data, machine), for comparisons."""
    path = os.path.join(out_dir, "log.jsonl")
    kept = [r for r in read_log(path) if r["step"] <= step] if step else []
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    machine = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump({**record, "machine": machine}, f, indent=1)


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -----------------------------------------------------------------------------
# Plots, samples and the summary

def pyplot():
    """matplotlib's pyplot, drawing to files (no window needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_losses(out_dir, baseline=None):
    """loss.png: train loss and every validation set's loss (CPT: old and new domain; MeCo:
    with and without URLs) against tokens seen, the learning rate on the right."""
    plt = pyplot()
    log = read_log(os.path.join(out_dir, "log.jsonl"))
    train, val = [r for r in log if "loss" in r], [r for r in log if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.7, label="train")
    for key in (val[0] if val else {}):
        if key.startswith("val_loss_"):
            ax.plot([r["tokens"] for r in val], [r[key] for r in val], "o-", ms=4, label=f"validation {key[9:]}")
    if baseline:
        ax.axhline(baseline, ls="--", c="gray", lw=1, label=f"unigram baseline {baseline:.2f}")
    ax.set(xlabel="tokens", ylabel="loss (nats/token)")
    ax.legend(loc="upper right")
    lr_ax = ax.twinx()
    lr_ax.plot([r["tokens"] for r in train], [r["lr"] for r in train], c="tab:green", lw=1, alpha=0.5)
    lr_ax.set_ylabel("learning rate", color="tab:green")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=120)
    plt.close(fig)


def plot_lr(out_dir, lr_at, total, title=None):
    """lr.png: the schedule itself at every step (the log holds every log_interval-th step,
    which hides a short warmup)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(total), [lr_at(step) for step in range(total)], c="tab:green")
    ax.set(xlabel="step", ylabel="learning rate", title=title)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "lr.png"), dpi=120)
    plt.close(fig)


def generate_text(model, device, start, max_new_tokens, seed):
    """A continuation of `start`, as a fresh document ([EOT] first). Seeded: the same
    weights and start give the same text."""
    encoder = data.get_tokenizer()
    idx = torch.tensor([[data.EOT] + encoder.encode_ordinary(start)], device=device)
    torch.manual_seed(seed + zlib.crc32(start.encode()))  # another start, other random draws
    with autocast_for(device):
        out = model.generate(idx, max_new_tokens, temperature=0.8, top_k=200)
    return encoder.decode(out[0, 1:].tolist())


def write_samples(model, out_dir, device, prompts, max_new_tokens, seed):
    """samples.txt: one continuation per prompt."""
    if max_new_tokens <= 0:
        return
    print(f"generating {len(prompts)} samples of {max_new_tokens} tokens ...", flush=True)
    model.eval()
    texts = [generate_text(model, device, prompt, max_new_tokens, seed) for prompt in prompts]
    path = os.path.join(out_dir, "samples.txt")
    with open(path, "w") as f:
        f.writelines(f"=== prompt {prompt!r}\n{text}\n\n" for prompt, text in zip(prompts, texts))
    print(f"samples written to {path}; the first one:\n{texts[0][:400]}")
