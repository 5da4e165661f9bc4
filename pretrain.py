"""
Pretrain a GPT from scratch.

    python pretrain.py                      # picks the device and a preset that fits it
    python pretrain.py --preset cpu --max_steps 50 --out_dir out/try
    python pretrain.py --resume --out_dir out/cpu   # continue an interrupted run exactly
    python pretrain.py --sample --init out/cpu/ckpt.pt --prompt "def "

Read top-down: main() -> train() builds the data, the model and the optimizer -> fit() is
the loop (train_step, evaluate_and_checkpoint) -> the end: plots and samples. Below them:
MeCo's batches, the schedule, devices, checkpoints, plots, samples and the command line.
cpt.py reuses fit() and the helpers, always by explicit arguments.
"""

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import textwrap
import threading
import time
import types
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
from model import GPT, GPTConfig, BadInput

# Each preset is a model and a training budget sized for one kind of machine.
PRESETS = {
    # 2 CPU cores, under 10 minutes in all: ~1.9k tokens/s, so ~0.8M tokens of training.
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, seq_len=256, batch_size=8, grad_accum=1,
                max_steps=400, lr=3e-3, warmup=20, eval_interval=100, eval_batches=8,
                data="stdlib", compile=False, sample_tokens=100),
    # a laptop GPU with 6 GB: ~30M parameters, bf16; 4 x 1024 tokens per micro-step keeps
    # the (B, T, 50304) logits small.
    "laptop": dict(n_layer=6, n_head=6, n_embd=384, seq_len=1024, batch_size=4, grad_accum=8,
                   max_steps=5000, lr=1e-3, warmup=200, eval_interval=250, eval_batches=20,
                   data="stdlib+packages", compile=True),
    # GPT-2 small, 124M parameters: for a big GPU.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024, batch_size=16, grad_accum=4,
                 max_steps=10000, lr=6e-4, warmup=500, eval_interval=500, eval_batches=40,
                 data="stdlib+packages", compile=True),
}
# Settings no preset sets.
DEFAULTS = dict(packing="bestfit", meta="none", meta_cooldown=0.1, meta_drop=0.0, meta_loss=False,
                schedule="cosine", decay_frac=0.2,
                min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0, log_interval=10, sample_tokens=200,
                seed=1337, attn_backend="auto", quiet=False)
# Flags that say what to do now, not what the run is: never taken from a checkpoint.
NOT_SETTINGS = ("resume", "device", "out_dir", "sample", "init", "url", "prompt", "preset")


def main(argv=None):
    args = build_parser().parse_args(argv)
    exit_with_one_line(sample if args.sample else train, args)


def exit_with_one_line(run, args):
    """run(args); bad input, or a run stopped by Ctrl-C, ends as one line and exit status 1."""
    try:
        run(args)
    except BadInput as e:
        sys.exit(f"error: {e}")
    except Interrupted as e:
        sys.exit(str(e))


def train(args):
    """pretrain.py's whole run: settings, data, model, optimizer, the loop, the end."""
    # --- settings: the flags, else the checkpoint's (--resume), else the preset's
    started = time.time()
    rank, world, device = setup_distributed(pick_device(args.device))
    run, ckpt = settings(args, device, rank)
    if device == "cpu":
        keep_freed_memory()
    lock = lock_out_dir(run.out_dir) if rank == 0 else None  # noqa: F841 (held until train() ends)
    torch.manual_seed(run.seed)

    # --- data: documents -> packed rows -> batches, each a pure function of its index
    corpus = load_corpus_once(run.data, rank, world)
    train_docs, val_docs = data.split_documents(corpus)
    next_batch, stats = training_batches(corpus, train_docs, run, rank, world)
    eval_sets = validation_sets(corpus, val_docs, run.data, run.seq_len, run.batch_size, run.eval_batches, run.meta)
    baseline = data.unigram_loss(corpus, train_docs, val_docs)
    say(rank, f"data {run.data}: {len(corpus):,} documents, {corpus.info['tokens']:,} tokens; unigram baseline "
              f"{baseline:.3f} nats\nsplit: {data.split_summary(corpus, train_docs, val_docs)}")
    say(rank, f"packing {run.packing}: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()))

    # --- model and optimizer (from the checkpoint when resuming)
    config = GPTConfig(block_size=run.seq_len, n_layer=run.n_layer, n_head=run.n_head, n_embd=run.n_embd)
    model = GPT(config).to(device)
    model.attn_backend = run.attn_backend
    optimizer = make_optimizer(model, run.lr, run.weight_decay, device)
    start_step = restore(ckpt, model, optimizer, corpus, world) if ckpt else 0
    say(rank, f"model: {model.num_params() / 1e6:.1f}M parameters; writing to {run.out_dir}"
              + (f"; {world} processes" if world > 1 else ""))

    # --- the loop
    lr_at = schedule(run)
    record = {"args": {**vars(run), "world": world}, "data": corpus.info, "packing_stats": stats,
              "unigram_loss": baseline}
    loop = Loop.of(run, device, rank, world, keep=kept_steps(run))
    fit(model, optimizer, next_batch, lr_at, eval_sets, loop, start_step, record)

    # --- the end: plots, samples and a summary, from process 0
    if rank == 0:
        plot_losses(run.out_dir, baseline)
        plot_lr(run.out_dir, lr_at, run.max_steps)
        write_samples(model, run.out_dir, device, sample_prompts(corpus, val_docs, run.meta), run.sample_tokens, run.seed)
        summarize(run.out_dir, baseline, time.time() - started)


def summarize(out_dir, baseline, seconds):
    """The end of a run in four lines: time and tokens, the loss against the unigram
    baseline in plain words, the files written, and the next command to try."""
    last = [r for r in read_log(os.path.join(out_dir, "log.jsonl")) if "val_loss" in r][-1]
    verdict = ("below it: the model uses context" if last["val_loss"] < baseline - 0.05 else
               "not yet below it: the model has not learned to use context; train longer (--max_steps) or tune --lr")
    print(f"done in {seconds / 60:.1f} min: {last['step']} steps, {last['tokens']:,} tokens; validation loss "
          f"{last['val_loss']:.3f}, unigram baseline {baseline:.3f}, {verdict}")
    files = sorted(f for f in os.listdir(out_dir) if not f.startswith("."))
    sizes = [os.path.getsize(os.path.join(out_dir, f)) for f in files]
    print(f"files in {out_dir}: " + ", ".join(f"{f} ({n / 2**20:.1f} MB)" if n > 2**20 else f"{f} ({n // 1024 + 1} kB)"
                                              for f, n in zip(files, sizes)))
    print(f"next: python pretrain.py --sample --init {os.path.join(out_dir, 'ckpt.pt')} --prompt \"...\"")


def lock_out_dir(out_dir):
    """Two runs writing one out_dir would interleave their logs and overwrite each other's
    checkpoints, so the second one stops here. The lock belongs to the OS (fcntl): it goes
    away with this process, however it ends. Returns the open lock file; keep it."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        return None
    lock = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise BadInput(f"another run is writing to {out_dir} right now; wait for it to end or use another --out_dir")
    return lock


def load_corpus_once(source, rank, world):
    """Under torchrun, process 0 tokenizes and caches; the others wait, then read its cache."""
    if rank > 0:
        dist.barrier()
    corpus = data.load_corpus(source, quiet=rank > 0)
    if rank == 0 and world > 1:
        dist.barrier()
    return corpus


def validation_sets(corpus, val_docs, name, seq_len, batch_size, n_batches, meta="none"):
    """What every evaluation scores (cpt.py's too): {name: batches}, best-fit rows of the
    held-out documents, the same rows every time, documents masked apart so each is scored
    as if alone. A MeCo run also scores the same documents with their metadata ({name_url})."""
    sets = {name: validation_batches(corpus, val_docs, seq_len, batch_size, n_batches)}
    if meta != "none":
        sets[f"{name}_{meta}"] = validation_batches(data.with_metadata(corpus, meta), val_docs, seq_len,
                                                    batch_size, n_batches)
    return sets


def validation_batches(corpus, docs, seq_len, batch_size, n_batches):
    rows = data.pack_split(corpus, docs, seq_len, "bestfit")
    return [data.get_batch(corpus, rows, seq_len, i, batch_size, seed=0) for i in range(n_batches)]


# -----------------------------------------------------------------------------
# The training loop (cpt.py calls it too)

@dataclass
class Loop:
    """Everything fit() needs besides the model, the batches and the schedule."""
    out_dir: str
    max_steps: int
    grad_accum: int = 1
    grad_clip: float = 1.0
    eval_interval: int = 100
    log_interval: int = 10
    device: str = "cpu"
    rank: int = 0             # this process, under torchrun
    world: int = 1            # how many processes
    compile: bool = False
    quiet: bool = False       # no progress bar
    keep: tuple = ()          # steps whose checkpoint is also kept, as ckpt_<step>.pt

    @classmethod
    def of(cls, run, device, rank, world, keep=()):
        """The Loop of a run's settings (pretrain.py's and cpt.py's have the same names)."""
        return cls(out_dir=run.out_dir, max_steps=run.max_steps, grad_accum=run.grad_accum, grad_clip=run.grad_clip,
                   eval_interval=run.eval_interval, log_interval=run.log_interval, device=device, rank=rank,
                   world=world, compile=run.compile, quiet=run.quiet, keep=keep)


class Interrupted(Exception):
    """Ctrl-C: the step was finished and a checkpoint written. main() prints it and exits 1."""


def fit(model, optimizer, next_batch, lr_at, eval_sets, loop, start_step=0, record=None):
    """Train from start_step to loop.max_steps.

    next_batch(index) -> batch dict, a pure function of index, so resuming is exact.
    lr_at(step) -> learning rate. eval_sets: {name: [batches]}, scored every
    loop.eval_interval steps and at the end. record: what run.json and the checkpoint
    record besides the weights, the optimizer, the step and the RNG. Under torchrun every
    process runs this loop on its own slice of each batch; DistributedDataParallel averages
    the gradients; process 0 writes."""
    net = torch.compile(model) if loop.compile else model
    if loop.world > 1:
        net = DistributedDataParallel(net, device_ids=[torch.device(loop.device).index] if loop.device.startswith("cuda") else None)
    log_path = os.path.join(loop.out_dir, "log.jsonl")
    if loop.rank == 0:
        trim_log(log_path, start_step)  # a resumed run rewrites what came after its checkpoint
        with open(os.path.join(loop.out_dir, "run.json"), "w") as f:  # what this run was, for comparisons
            json.dump({**(record or {}), "parameters": model.num_params()}, f, indent=1)
    from tqdm import tqdm
    bar = tqdm(range(start_step, loop.max_steps), initial=start_step, total=loop.max_steps, desc="train",
               dynamic_ncols=True, disable=loop.quiet or loop.rank > 0)
    speed = Speedometer(model, loop)
    model.train()
    with ctrl_c_finishes_the_step() as stop:
        for step in bar:
            # one optimizer step: the LR for this step, micro-steps, clip, update
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, tokens = train_step(net, model, optimizer, next_batch, step, loop)
            done = step + 1
            stopping = everyone_agrees_to_stop(stop.requested, loop)
            speed.tokens += tokens

            # log: reading the loss makes the CPU wait for the GPU, so not every step
            if done % loop.log_interval == 0 or done == loop.max_steps:
                loss_value = mean_over_processes(loss, loop)
                if not math.isfinite(loss_value):
                    raise BadInput(f"loss became {loss_value} at step {done}; the last good checkpoint "
                                   f"is kept in {loop.out_dir} (try a lower --lr)")
                tok_s, postfix = speed.read()
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", **postfix)
                if loop.rank == 0:
                    append_log(log_path, {"step": done, "tokens": done * tokens, "lr": lr, "loss": loss_value,
                                          "tok_s": round(tok_s)})

            # evaluate and checkpoint: at every eval_interval, at the end, at a kept step, on Ctrl-C
            if done % loop.eval_interval == 0 or done == loop.max_steps or stopping or done in loop.keep:
                evaluate_and_checkpoint(model, optimizer, eval_sets, loop, done, done * tokens, lr, record or {}, bar)
            if stopping:
                bar.close()
                raise Interrupted(f"interrupted: checkpoint saved at step {done}; continue with "
                                  f"python {os.path.basename(sys.argv[0])} --resume --out_dir {loop.out_dir}")
    bar.close()
    if loop.world > 1:
        dist.barrier()  # nobody leaves before process 0 has written the last checkpoint
        dist.destroy_process_group()


def train_step(net, model, optimizer, next_batch, step, loop):
    """grad_accum micro-steps, then clip and update. Returns the last micro-step's loss
    and the tokens (padding included) this step read across all processes."""
    for micro in range(loop.grad_accum):
        batch = {k: v.to(loop.device, non_blocking=True) for k, v in next_batch(step * loop.grad_accum + micro).items()}
        # DDP averages gradients across processes inside backward(); between micro-steps
        # there is nothing worth averaging yet, so skip it until the last.
        last = micro == loop.grad_accum - 1
        with contextlib.nullcontext() if last or loop.world == 1 else net.no_sync():
            with autocast_for(loop.device):
                _, loss = net(batch["x"], batch["y"], batch.get("doc_ids"), batch["pos_ids"])
            (loss / loop.grad_accum).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, batch["x"].numel() * loop.grad_accum * loop.world


def evaluate_and_checkpoint(model, optimizer, eval_sets, loop, step, tokens, lr, record, bar):
    """Score every validation set, log it, and write ckpt.pt (and ckpt_<step>.pt for a kept step)."""
    losses = {name: evaluate(model, batches, loop.device) for name, batches in eval_sets.items()}
    if not all(map(math.isfinite, losses.values())):
        raise BadInput(f"validation loss is not finite at step {step}; the last good "
                       f"checkpoint is kept in {loop.out_dir} (try a lower --lr)")
    if loop.rank > 0:
        return
    bar.write(f"step {step}: " + ", ".join(f"val {k} {v:.3f}" for k, v in losses.items()))
    append_log(os.path.join(loop.out_dir, "log.jsonl"), {
        "step": step, "tokens": tokens, "lr": lr, "val_loss": next(iter(losses.values())),
        **{f"val_loss_{name}": value for name, value in losses.items()}})
    save_checkpoint(os.path.join(loop.out_dir, "ckpt.pt"), model, optimizer, step, record)
    if step in loop.keep:
        save_checkpoint(os.path.join(loop.out_dir, f"ckpt_{step}.pt"), model, optimizer, step, record)


@torch.no_grad()
def evaluate(model, batches, device):
    """Mean loss per target token over fixed validation batches."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_for(device):
            _, loss = model(batch["x"], batch["y"], batch.get("doc_ids"), batch["pos_ids"])
        n = int((batch["y"] != -1).sum())
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / count


class Speedometer:
    """Tokens per second since the last read, and MFU on a GPU whose peak we know."""

    PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12,
                 "RTX 3090": 71e12, "A10G": 70e12, "L4": 121e12}  # dense tensor-core FLOP/s, datasheets

    def __init__(self, model, loop):
        self.model, self.world, self.t, self.tokens = model, loop.world, time.time(), 0
        name = torch.cuda.get_device_name(loop.device) if loop.device.startswith("cuda") else ""
        self.peak = next((flops for key, flops in self.PEAK_BF16.items() if key in name), None)

    def read(self):
        tok_s = self.tokens / (time.time() - self.t)
        self.t, self.tokens = time.time(), 0
        postfix = {"tok/s": f"{tok_s:,.0f}"}
        if self.peak:
            flops = self.model.flops_per_token(self.model.config.block_size) * tok_s / self.world
            postfix["mfu"] = f"{100 * flops / self.peak:.0f}%"
        return tok_s, postfix


def mean_over_processes(loss, loop):
    """The loss averaged over all processes (each only saw its slice of the batch)."""
    if loop.world == 1:
        return loss.item()
    loss = loss.detach().float().clone()
    dist.all_reduce(loss)
    return loss.item() / loop.world


def everyone_agrees_to_stop(requested, loop):
    """Ctrl-C may reach the processes at different steps; they must stop at the same one."""
    if loop.world == 1:
        return requested
    flag = torch.tensor([float(requested)], device=loop.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@contextlib.contextmanager
def ctrl_c_finishes_the_step():
    """Ctrl-C sets a flag instead of raising mid-step, so the loop can finish the step,
    save a checkpoint and exit cleanly. A second Ctrl-C stops at once."""
    stop = types.SimpleNamespace(requested=False)
    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        print("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to quit now)")
    if threading.current_thread() is not threading.main_thread():  # signals only work there
        yield stop
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


# -----------------------------------------------------------------------------
# Batches, and MeCo: metadata conditioning, then a cooldown without it

def training_batches(corpus, docs, run, rank=0, world=1):
    """(next_batch, packing stats): next_batch(index) -> this process's slice of batch
    `index`. With --meta, batches come from URL-prefixed rows until the cooldown begins."""
    docmask = data.masks_documents(run.packing)
    plain = data.pack_split(corpus, docs, run.seq_len, run.packing)
    if run.meta == "none":
        return (lambda index: data.get_batch(corpus, plain, run.seq_len, index, run.batch_size, run.seed,
                                             docmask, rank, world)), data.packing_stats(plain, run.seq_len)
    meta_corpus = data.with_metadata(corpus, run.meta, run.meta_drop, run.meta_loss)
    if meta_corpus.prefix_lengths.max() + 1 >= run.seq_len:
        raise BadInput(f"--seq_len {run.seq_len} leaves no room for text after URL prefixes of up to "
                       f"{meta_corpus.prefix_lengths.max()} tokens; use a longer --seq_len or --meta none")
    meta_rows = data.pack_split(meta_corpus, docs, run.seq_len, run.packing)
    def next_batch(index):
        if uses_metadata(index // run.grad_accum, run.max_steps, run.meta_cooldown):
            return data.get_batch(meta_corpus, meta_rows, run.seq_len, index, run.batch_size, run.seed, docmask, rank, world)
        return data.get_batch(corpus, plain, run.seq_len, index, run.batch_size, run.seed, docmask, rank, world)
    return next_batch, data.packing_stats(meta_rows, run.seq_len)


def uses_metadata(step, max_steps, meta_cooldown):
    """MeCo ("Metadata Conditioning Accelerates Language Model Pre-training", Gao et al.
    2025) in two phases: URL prefixes for the first (1 - meta_cooldown) of the steps, then
    a cooldown on plain documents, so the model also works without metadata. Notice that
    the LR schedule and the optimizer simply continue, and that the phase is a pure
    function of the step, so a resumed run switches at the same step."""
    return step < cooldown_start(max_steps, meta_cooldown)


def cooldown_start(max_steps, meta_cooldown):
    return round((1 - meta_cooldown) * max_steps)


def kept_steps(run):
    """Checkpoints kept beside the last one: MeCo's at the start of its cooldown (to compare
    the two phases), wsd's at the start of its decay (to extend the run from)."""
    keep = (cooldown_start(run.max_steps, run.meta_cooldown),) if run.meta != "none" else ()
    return keep + ((decay_start(run.max_steps, run.decay_frac),) if run.schedule == "wsd" else ())


def sample_prompts(corpus, docs, meta):
    """The end-of-run samples: a plain start and the first words of three held-out
    documents; a MeCo run adds two URLs (steering: the same start, two different sources)."""
    encoder = data.get_tokenizer()
    starts = [corpus.tokens[corpus.offsets[d] + 1:corpus.offsets[d] + 5] for d in docs[:3]]
    prompts = [""] + [encoder.decode(start.tolist()) for start in starts]
    if meta == "url":
        known = sorted(set(corpus.urls) - {""})
        wanted = ["docs.python.org/3/library/asyncio.tasks", "docs.python.org/3/library/unittest.mock"]
        prompts += [f"URL: {url}\n\n" for url in (wanted if set(wanted) <= set(known) else known[:2])]
    return prompts


# -----------------------------------------------------------------------------
# The learning-rate schedule (cpt.py's schedules call it too)

def schedule(run):
    """step -> learning rate for a pretrain.py run: --schedule cosine, or wsd
    (warmup-stable-decay: the peak LR until the last --decay_frac of the steps, then an
    exponential decay to the final LR; see learning_rate's "infinite")."""
    min_lr = run.lr * run.min_lr_ratio
    if run.schedule == "wsd":
        return lambda step: learning_rate(step, run.lr, min_lr, run.warmup, run.max_steps, kind="infinite",
                                          anneal=run.max_steps - decay_start(run.max_steps, run.decay_frac))
    return lambda step: learning_rate(step, run.lr, min_lr, run.warmup, run.max_steps)


def decay_start(max_steps, decay_frac):
    """The first step of a wsd run's decay. Its checkpoint is kept: an extended run
    continues from it, still in the stable phase."""
    return max_steps - round(decay_frac * max_steps)


def learning_rate(step, max_lr, min_lr, warmup, total, start_lr=0.0, kind="cosine",
                  constant_lr=None, cooldown=0, anneal=0):
    """The learning rate at `step` (counted from 0). Every kind starts with a linear warmup
    from start_lr to max_lr over `warmup` steps. Warmup matters because Adam's second-moment
    estimates are noise for the first steps; starting small keeps those early updates from
    throwing the weights far away. (cpt.py "rewarms" a trained model with start_lr = the
    LR it ended with.) Then:

      cosine    cosine decay to min_lr at step `total`, then min_lr. pretrain.py's schedule.
                (Cosine decay to 10 %: Chinchilla, Hoffmann et al. 2022.)
      constant  max_lr for ever, no decay.
      infinite  the "infinite" schedule of Ibrahim et al. 2024 and Singh et al. 2025
                ("Beyond Cosine Decay"): a cosine cooldown from max_lr to constant_lr over
                `cooldown` steps, constant_lr until step total - anneal, then an exponential
                anneal to min_lr at step `total`. With constant_lr None (= max_lr) and no
                cooldown it is warmup-stable-decay. Notice that only the short anneal needs
                to know when training ends: the constant phase can go on while new data
                keeps coming, and training resumes from it without rewarming."""
    if step < warmup:
        return start_lr + (max_lr - start_lr) * (step + 1) / warmup
    if kind == "constant":
        return max_lr
    if step >= total:
        return min_lr
    if kind == "cosine":
        progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1
        return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)
    if kind != "infinite":
        raise ValueError(f"unknown schedule kind {kind!r}")
    constant_lr = max_lr if constant_lr is None else constant_lr
    if step < warmup + cooldown:
        progress = (step - warmup) / cooldown  # 0 -> 1
        return constant_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - constant_lr)
    if step < total - anneal:
        return constant_lr
    progress = (step - (total - anneal)) / anneal  # 0 -> 1
    return constant_lr * (min_lr / constant_lr) ** progress


def make_optimizer(model, lr, weight_decay, device):
    """AdamW. Weight decay only on matrices (embeddings and linear weights), not on the
    norm gains: decaying a gain towards 0 would just fight the normalisation."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.startswith("cuda"))


# -----------------------------------------------------------------------------
# Settings, devices and processes

def settings(args, device, rank):
    """(run, checkpoint or None): a new Namespace with every setting filled in. With
    --resume the settings are the checkpoint's and a flag given again must agree with it;
    otherwise a flag left unset comes from the preset, then from DEFAULTS."""
    if args.init:
        raise BadInput("--init is for --sample (generate from a checkpoint); to continue training a checkpoint "
                       "use --resume --out_dir DIR, or cpt.py --init PATH for new data")
    run = argparse.Namespace(**vars(args))
    run.out_dir = args.out_dir if args.out_dir is not None else os.path.join(
        "out", args.preset if args.preset != "auto" else pick_preset(device)[0])
    if args.resume:
        ckpt = resume_settings(run, args.max_steps)
        fill_unset(run, DEFAULTS)  # settings that older checkpoints do not have
        check_settings(run, device)
        return run, ckpt
    why = None
    if args.preset == "auto":
        run.preset, why = pick_preset(device)
    if run.preset not in PRESETS:
        raise BadInput(f"unknown preset '{run.preset}'; choose auto or one of {', '.join(PRESETS)}")
    fill_unset(run, {**DEFAULTS, **PRESETS[run.preset]})
    if args.warmup is None:  # the preset's warmup is for its own length; a short run warms up for half of it
        run.warmup = min(run.warmup, run.max_steps // 2)
    if why:
        say(rank, f"device {device} ({why}) -> preset '{run.preset}': {run.n_layer} layers, {run.n_embd} wide, "
                  f"{run.seq_len} tokens per row, {run.max_steps} steps on {run.data}")
    if device == "cpu" and run.preset != "cpu":
        say(rank, f"warning: the '{run.preset}' preset is sized for a GPU; on this CPU one step takes minutes "
                  "(the cpu preset finishes in about 7); use --preset cpu unless you mean it")
    check_settings(run, device)
    return run, None


def fill_unset(run, values):
    """Set every setting still None (neither given nor inherited) from values."""
    for key, value in values.items():
        if getattr(run, key) is None:
            setattr(run, key, value)


# Every numeric setting: (flag, is it fine?, what it must be). Checked before any data is loaded.
RULES = [(flag, lambda v: v >= 1, "at least 1") for flag in (
    "max_steps", "n_layer", "n_head", "n_embd", "seq_len", "batch_size", "grad_accum", "eval_interval",
    "eval_batches", "log_interval")] + [
    ("lr", lambda v: math.isfinite(v) and v > 0, "a positive number"),
    ("min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]: the final learning rate as a share of the peak"),
    ("weight_decay", lambda v: math.isfinite(v) and v >= 0, "0 or more"),
    ("grad_clip", lambda v: math.isfinite(v) and v > 0, "a positive number: the largest gradient norm kept"),
    ("warmup", lambda v: v >= 0, "0 or more"),
    ("meta_cooldown", lambda v: 0 <= v < 1, "in [0, 1): the last share of steps without metadata"),
    ("meta_drop", lambda v: 0 <= v < 1, "in [0, 1): the share of documents without metadata"),
    ("decay_frac", lambda v: 0 < v < 1, "in (0, 1): the last share of steps that decays"),
    ("sample_tokens", lambda v: v >= 0, "0 or more"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2^32)"),
    ("attn_backend", lambda v: v in ("auto", "sdpa", "reference", "cuda"), "auto, sdpa, reference or cuda"),
    # cpt.py's own
    ("replay", lambda v: 0 <= v < 1, "in [0, 1): the share of each batch's rows from the pretraining corpus"),
    ("val_fraction", lambda v: 0 < v < 1, "in (0, 1): the share of new-domain documents held out"),
    ("max_lr", lambda v: math.isfinite(v) and v > 0, "a positive number"),
    ("min_lr", lambda v: math.isfinite(v) and v >= 0, "0 or more"),
    ("constant_lr", lambda v: math.isfinite(v) and v > 0, "a positive number (by default sqrt(max_lr * min_lr))"),
    ("cooldown", lambda v: v >= 0, "0 or more"),
    ("anneal", lambda v: v >= 0, "0 or more"),
]


def check_rules(run):
    """One line for the first setting RULES refuses, naming the flag (cpt.py's too)."""
    for flag, fine, what in RULES:
        value = getattr(run, flag, None)
        if value is not None and not fine(value):
            raise BadInput(f"--{flag} {value} is not valid: it must be {what}")


def check_settings(run, device):
    """One line for the first setting that makes no sense, naming the flag."""
    check_rules(run)
    if run.n_embd % run.n_head or (run.n_embd // run.n_head) % 2:
        raise BadInput(f"--n_embd {run.n_embd} must split into --n_head {run.n_head} heads of an even size "
                       "(rotary embeddings rotate pairs); e.g. --n_head 4 with --n_embd 128")
    if run.warmup >= run.max_steps:
        raise BadInput(f"--warmup {run.warmup} must be less than --max_steps {run.max_steps}")
    check_out_dir(run.out_dir)
    need, free = step_memory(run, device), free_memory(device)
    if free and need > free:
        raise BadInput(f"one step needs about {need / 2**30:.0f} GB of memory and {free / 2**30:.0f} GB are free; "
                       "lower --batch_size (and raise --grad_accum) or --seq_len")


def check_out_dir(out_dir):
    """--out_dir must be a folder this process can write; it is made if missing."""
    if not out_dir or os.path.isfile(out_dir):
        raise BadInput(f"--out_dir {out_dir!r} is {'a file' if out_dir else 'empty'}; give a folder")
    probe = os.path.join(out_dir, f".writable{os.getpid()}")  # one per process: torchrun starts several
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise BadInput(f"--out_dir {out_dir} cannot be written ({e.strerror}); choose another folder")


def step_memory(run, device):
    """A rough upper bound of what one micro-step holds, in bytes: the float32 logits and
    their gradients (B, T, vocab), and per layer the activations kept for backward plus,
    unless the fused kernel runs, the (B, heads, T, T) attention weights."""
    B, T, C, V = run.batch_size, run.seq_len, run.n_embd, GPTConfig.vocab_size
    attention = 0 if device.startswith("cuda") else run.n_head * T * 3
    return 4 * B * T * (3 * V + run.n_layer * (20 * C + attention))


def free_memory(device):
    """Bytes available where the step runs (None when unknown: then nothing is refused)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux: what can be had without swapping, page cache included
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def resume_settings(run, max_steps):
    """--resume: fill `run` from its checkpoint and return the checkpoint to continue from.
    A wsd run given a larger --max_steps is extended: it continues from the checkpoint kept
    where its decay began (still at the peak LR) and decays at the new end instead."""
    path = os.path.join(run.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path)
    if "init_eval" in ckpt:
        raise BadInput(f"{path} is a cpt.py run; continue it with: python cpt.py --resume --out_dir {run.out_dir}")
    saved = ckpt.get("args", {})
    if max_steps is not None and max_steps != saved.get("max_steps"):
        if saved.get("schedule") != "wsd":
            raise BadInput(f"--max_steps {max_steps}: {path} was trained for {saved.get('max_steps')} steps with "
                           "a cosine schedule, whose whole curve depends on the last step, so it cannot be "
                           "extended; train with --schedule wsd to extend later, or continue it with cpt.py")
        if max_steps < saved["max_steps"]:
            raise BadInput(f"--max_steps {max_steps} is shorter than the run's {saved['max_steps']}; a run can only be extended")
        path = os.path.join(run.out_dir, f"ckpt_{decay_start(saved['max_steps'], saved['decay_frac'])}.pt")
        print(f"extending the wsd run from {saved['max_steps']} to {max_steps} steps: continuing from {path}")
        ckpt = load_checkpoint(path)
        saved = {**ckpt["args"], "max_steps": max_steps}
    inherit(run, saved, path)
    return ckpt


def inherit(run, saved, path, skip=NOT_SETTINGS):
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


def pick_preset(device):
    """(preset, why) for a device."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        gb = props.total_memory / 2**30
        return ("gpt2" if gb >= 40 else "laptop"), f"{props.name} with {gb:.0f} GB"
    if device == "mps":
        return "laptop", "Apple GPU (MPS)"
    return "cpu", f"no GPU; {torch.get_num_threads()} CPU threads"


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
    return rank, world, device


def keep_freed_memory():
    """CPU training, faster. glibc gives every freed block over 32 MB straight back to the
    OS, so each step's (B, T, 50304) float32 logits and their gradient (400 MB each in the
    cpu preset) come back as fresh pages the kernel must zero: on a 2-core machine most of
    the time went there (66 % system time). Asking malloc to keep freed memory for reuse
    made cpu-preset steps 1.3-1.5x faster in a quick check on a loaded 2-core machine. Linux
    with glibc only; elsewhere nothing changes."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    libc.mallopt(M_MMAP_MAX, 0)  # big blocks from the heap, not from their own mmap
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and never trim the heap back


def autocast_for(device):
    """bf16 autocast on a GPU that has it (half the memory traffic, tensor cores), else fp32."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def say(rank, message):
    """print, from process 0 only."""
    if rank == 0:
        print(message)


# -----------------------------------------------------------------------------
# Checkpoints and logs

def save_checkpoint(path, model, optimizer, step, record):
    """Everything a resumed run needs. Written to a temporary file, flushed to disk, then
    renamed over the old checkpoint: a crash at any moment leaves either the old or the
    new checkpoint, never half of one."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": asdict(model.config),
             "step": step, "rng": {"torch": torch.get_rng_state(),
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


def restore(ckpt, model, optimizer, corpus, world):
    """Put a checkpoint's weights, optimizer and RNG back; check it was trained on these
    tokens. Returns the step to continue from."""
    if ckpt["data"].get("fingerprint") != corpus.info.get("fingerprint") or ckpt["data"]["tokens"] != corpus.info["tokens"]:
        raise BadInput(f"the checkpoint was trained on other data ({ckpt['data']['tokens']:,} tokens, "
                       f"now {corpus.info['tokens']:,}); the files behind --data {corpus.info['source']} changed")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    before = ckpt["args"].get("world", 1)
    if before != world:
        print(f"note: the checkpoint was written by {before} process(es), now there are {world}: the run "
              f"continues from step {ckpt['step']} with a {world}-process batch (not the data order it had)")
    print(f"resuming at step {ckpt['step']}")
    return ckpt["step"]


def load_model(path, device="cpu"):
    """A trained model from a checkpoint, ready for evaluation or generation."""
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trim_log(path, step):
    """Keep only the log lines up to `step` (all of them for a fresh run: none)."""
    kept = [r for r in read_log(path) if r["step"] <= step] if step else []
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)


# -----------------------------------------------------------------------------
# Plots and samples

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
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
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


def sample(args):
    """python pretrain.py --sample --init out/meco/ckpt.pt --url docs.python.org/3/library/json
    The document starts the way MeCo trained it, [EOT] "URL: <url>\n\n", then the prompt;
    the URL may be real or made up. Without --url it is a plain continuation."""
    if not args.init:
        raise BadInput("--sample needs --init PATH/ckpt.pt, the checkpoint to generate from")
    device = pick_device(args.device)
    model = load_model(args.init, device)
    start = (f"URL: {args.url}\n\n" if args.url else "") + args.prompt
    print(generate_text(model, device, start, args.sample_tokens or DEFAULTS["sample_tokens"],
                        DEFAULTS["seed"] if args.seed is None else args.seed))


# -----------------------------------------------------------------------------
# Command line

class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit status 1, like every other error here."""

    def error(self, message):
        sys.exit(f"error: {message} (see --help)")


def on_off(text):
    """--compile on|off (also true/false, yes/no, 1/0)."""
    if text.lower() in ("on", "true", "yes", "1"):
        return True
    if text.lower() in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def preset_table():
    keys = ("n_layer", "n_head", "n_embd", "seq_len", "batch_size", "grad_accum", "max_steps", "lr", "data")
    rows = [f"  {name:7} " + " ".join(f"{k}={v}" for k, v in preset.items() if k in keys) for name, preset in PRESETS.items()]
    return "presets (auto picks cpu without a GPU, laptop for a GPU under 40 GB, else gpt2):\n" + "\n".join(rows)


# Flags that mean the same in pretrain.py and cpt.py: (flag, type or choices, help). A flag
# left unset is None, so settings() can tell it from one given with its default value.
SHARED_FLAGS = [
    ("data", str, f"the text to train on: {data.SOURCES_HELP}"),
    ("out_dir", str, "where checkpoints, logs, plots and samples go"),
    ("device", str, "auto, cpu, cuda, cuda:N or mps"),
    ("resume", bool, "continue the run in --out_dir from its checkpoint, with its settings"),
    ("max_steps", int, "optimizer steps"),
    ("warmup", int, "steps of linear warmup (cpt.py: of rewarming)"),
    ("packing", data.PACKINGS, "how documents are laid into rows"),
    ("batch_size", int, "rows per micro-step"),
    ("grad_accum", int, "micro-steps per optimizer step"),
    ("weight_decay", float, "AdamW weight decay on matrices"),
    ("grad_clip", float, "clip the gradient norm to this"),
    ("eval_interval", int, "steps between evaluations and checkpoints"),
    ("eval_batches", int, "validation batches per evaluation (per domain in cpt.py)"),
    ("log_interval", int, "steps between log lines"),
    ("seed", int, "seeds the model's init and the data order"),
    ("sample_tokens", int, "tokens per sample at the end of training (0: none)"),
    ("compile", on_off, "torch.compile the model: on or off"),
    ("attn_backend", str, "attention: auto, sdpa, reference (the kernel's PyTorch mirror) or cuda (kernels.cu)"),
    ("quiet", bool, "no progress bars"),
]


def add_flags(p, flags, default):
    """Add (flag, type or choices, help) flags to a parser; default(flag) says where an
    unset one comes from."""
    for flag, kind, what in flags:
        if kind is bool:
            p.add_argument(f"--{flag}", action="store_true", default=None, help=what)
        elif isinstance(kind, tuple):
            p.add_argument(f"--{flag}", choices=kind, help=f"{what} (default: {default(flag)})")
        else:
            p.add_argument(f"--{flag}", type=kind, help=f"{what} (default: {default(flag)})")


def build_parser():
    p = Parser(description="Pretrain a GPT. Flags left unset come from the preset (with --resume: from the "
               "run's checkpoint), then from the defaults shown.", epilog=preset_table(),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="auto", help=f"auto (from the device) or one of {', '.join(PRESETS)} (default auto)")
    add_flags(p, SHARED_FLAGS + [
        ("meta", data.METAS, "MeCo: prefix each document with its URL (url), a hash of it (hash), or nothing"),
        ("meta_cooldown", float, "MeCo: last fraction of steps without metadata"),
        ("meta_drop", float, "MeCo ablation: share of documents never given metadata"),
        ("meta_loss", bool, "MeCo ablation: train on the metadata tokens too (default: no loss on them)"),
        ("schedule", ("cosine", "wsd"), "after warmup: cosine decay, or warmup-stable-decay (extendable)"),
        ("decay_frac", float, "wsd: the last fraction of steps that decays"),
        ("n_layer", int, "transformer blocks"),
        ("n_head", int, "attention heads per block"),
        ("n_embd", int, "width of the residual stream"),
        ("seq_len", int, "tokens per row, also the model's block size"),
        ("lr", float, "peak learning rate"),
        ("min_lr_ratio", float, "final learning rate / peak"),
    ], lambda flag: {"out_dir": "out/<preset>", "device": "auto", "warmup": "the preset's, at most half the steps",
                     **DEFAULTS}.get(flag, "the preset's"))
    g = p.add_argument_group("sampling only (no training)")
    g.add_argument("--sample", action="store_true", help="generate text from --init and exit")
    g.add_argument("--init", help="the checkpoint to generate from")
    g.add_argument("--url", default="", help="steer generation with this URL, as MeCo trains it")
    g.add_argument("--prompt", default="", help="the text to continue")
    return p

if __name__ == "__main__":
    main()
