"""
Pretrain a GPT from scratch.

    python pretrain.py                      # picks the device and a preset that fits it
    python pretrain.py --preset cpu --max_steps 50 --out_dir out/try
    python pretrain.py --resume --out_dir out/cpu   # continue an interrupted run exactly

Read top-down: presets -> train() builds the pieces -> fit() is the loop that cpt.py
reuses -> evaluation, checkpoints, plots and samples -> the command line at the bottom.
"""

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import types
from dataclasses import asdict

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
                data="stdlib", compile=False),
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
# What defines a run's arithmetic: a resumed run must agree on all of these.
RUN_KEYS = ("n_layer", "n_head", "n_embd", "seq_len", "batch_size", "grad_accum", "max_steps",
            "lr", "min_lr_ratio", "warmup", "weight_decay", "data", "packing", "seed", "meta", "meta_cooldown")
STEERING_URLS = ("docs.python.org/3/library/asyncio.tasks", "docs.python.org/3/library/unittest.mock")


# -----------------------------------------------------------------------------
# Learning-rate schedule (shared with cpt.py)

SCHEDULES = ("cosine", "constant", "infinite")


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
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {', '.join(SCHEDULES)}")
    constant_lr = max_lr if constant_lr is None else constant_lr
    if step < warmup + cooldown:
        progress = (step - warmup) / cooldown  # 0 -> 1
        return constant_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - constant_lr)
    if step < total - anneal:
        return constant_lr
    progress = (step - (total - anneal)) / anneal  # 0 -> 1
    return constant_lr * (min_lr / constant_lr) ** progress


# -----------------------------------------------------------------------------
# Building a run

def pick_device(requested):
    if requested == "auto":
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
        preset = "gpt2" if gb >= 40 else "laptop"
        return preset, f"{props.name} with {gb:.0f} GB"
    if device == "mps":
        return "laptop", "Apple GPU (MPS)"
    return "cpu", f"no GPU; {torch.get_num_threads()} CPU threads"


def setup_distributed(args):
    """Under torchrun (RANK, LOCAL_RANK and WORLD_SIZE in the environment) join the process
    group: NCCL between GPUs, gloo between CPU processes; each process drives the GPU of its
    LOCAL_RANK. Sets args.rank and args.world (0 and 1 for a plain run). Safe to call twice."""
    args.world = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank = int(os.environ.get("RANK", "0"))
    if args.world > 1 and not dist.is_initialized():
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")


def resolve_args(args):
    """Fill everything the user left unset from the preset for the chosen device."""
    args.device = pick_device(args.device)
    setup_distributed(args)
    why = None
    if args.preset == "auto":
        args.preset, why = pick_preset(args.device)
    if args.preset not in PRESETS:
        raise BadInput(f"unknown preset '{args.preset}'; choose auto or one of {', '.join(PRESETS)}")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out_dir is None:
        args.out_dir = os.path.join("out", args.preset)
    if why and args.rank == 0:
        print(f"device {args.device} ({why}) -> preset '{args.preset}': {args.n_layer} layers, "
              f"{args.n_embd} wide, {args.seq_len} tokens per row, {args.max_steps} steps on {args.data}")
    return args


def autocast_for(device):
    """bf16 autocast on a GPU that has it (half the memory traffic, tensor cores), else fp32."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model, args, device):
    """AdamW. Weight decay only on matrices (embeddings and linear weights), not on the
    norm gains: decaying a gain towards 0 would just fight the normalisation."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": args.weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.startswith("cuda"))


def train(args):
    """pretrain.py's whole run: data, model, optimizer, then fit(), plots and samples."""
    args = resolve_args(args)
    torch.manual_seed(args.seed)
    if args.rank > 0:
        dist.barrier()  # wait while process 0 tokenizes and caches, then read its cache
    corpus = data.load_corpus(args.data, quiet=args.rank > 0)
    if args.rank == 0 and args.world > 1:
        dist.barrier()
    train_docs, val_docs = data.split_documents(corpus)
    meta_corpus = data.with_metadata(corpus, args.meta)  # the same corpus when --meta none
    if meta_corpus.prefix_lengths.max() + 1 >= args.seq_len:
        raise BadInput(f"--seq_len {args.seq_len} leaves no room for text after URL prefixes of up to "
                       f"{meta_corpus.prefix_lengths.max()} tokens; use a longer --seq_len or --meta none")
    train_rows = data.pack_split(corpus, train_docs, args.seq_len, args.packing)
    meta_rows = data.pack_split(meta_corpus, train_docs, args.seq_len, args.packing) if args.meta != "none" else None
    stats = data.packing_stats(meta_rows or train_rows, args.seq_len)
    baseline = data.unigram_loss(corpus, train_docs, val_docs)
    say(args, f"data {args.data}: {len(corpus):,} documents, {corpus.info['tokens']:,} tokens "
              f"({len(train_docs):,} train / {len(val_docs):,} val documents); "
              f"unigram baseline {baseline:.3f} nats")
    say(args, f"packing {args.packing}: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()))

    config = GPTConfig(block_size=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).to(args.device)
    optimizer = make_optimizer(model, args, args.device)
    start_step = 0
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume:
        start_step = resume(ckpt_path, model, optimizer, args, corpus)
    os.makedirs(args.out_dir, exist_ok=True)
    say(args, f"model: {model.num_params() / 1e6:.1f}M parameters; writing to {args.out_dir}"
              + (f"; {args.world} processes" if args.world > 1 else ""))

    docmask = args.packing != "concat"
    def next_batch(index):
        if uses_metadata(index // args.grad_accum, args):
            return data.get_batch(meta_corpus, meta_rows, args.seq_len, index, args.batch_size, args.seed, docmask,
                                  args.rank, args.world)
        return data.get_batch(corpus, train_rows, args.seq_len, index, args.batch_size, args.seed, docmask,
                              args.rank, args.world)
    eval_sets = validation_sets(corpus, val_docs, args, args.data, args.meta)
    min_lr = args.lr * args.min_lr_ratio
    def lr_at(step):
        return learning_rate(step, args.lr, min_lr, args.warmup, args.max_steps)

    extra = {"data": corpus.info, "packing_stats": stats, "unigram_loss": baseline}
    if args.rank == 0:
        with open(os.path.join(args.out_dir, "run.json"), "w") as f:  # what this run was, for comparisons
            json.dump({"args": vars(args), "parameters": model.num_params(), **extra}, f, indent=1)
    # MeCo also keeps the model as it was when the cooldown began, to compare the two phases.
    keep = {cooldown_start(args.max_steps, args.meta_cooldown)} if args.meta != "none" else set()
    fit(model, optimizer, args, next_batch, eval_sets, lr_at, start_step, extra, keep)
    if args.rank > 0:
        return  # plots and samples come from process 0
    plot_losses(args.out_dir, baseline)
    plot_lr(args.out_dir, lr_at, args.max_steps)
    prompts = ["", "def ", "class ", "import "]
    if args.meta == "url":  # steering by metadata: the same start, two different sources
        known = set(corpus.urls) - {""}
        urls = STEERING_URLS if known.issuperset(STEERING_URLS) else sorted(known)[:2]
        prompts += [f"URL: {url}\n\n" for url in urls]
    write_samples(model, args, prompts)


def validation_sets(corpus, val_docs, args, name, meta="none"):
    """The held-out batches every evaluation scores (cpt.py's too): the same rows every
    time, documents masked apart, so each document is scored as if it were alone,
    whatever the training packing. {name: batches without metadata}, the number that
    matters, and for MeCo runs also {name_url: the same with URLs} (or name_hash).

    The rows are laid out with room for URL prefixes in every run: rendered with or
    without them they hold exactly the same text tokens, so the baseline and MeCo with
    and without URLs are all scored on identical text."""
    layout = data.with_metadata(corpus, "url") if any(corpus.urls) else corpus
    if layout.prefix_lengths.max() + 1 >= args.seq_len:  # rows too short to keep the room
        layout = corpus
    rows = data.pack_split(layout, val_docs, args.seq_len, "bestfit")
    def batches(corpus, rows):
        return [data.get_batch(corpus, rows, args.seq_len, i, args.batch_size, seed=0) for i in range(args.eval_batches)]
    sets = {name: batches(corpus, data.without_prefixes(rows, layout))}
    if meta == "url":
        sets[f"{name}_url"] = batches(layout, rows)
    elif meta == "hash":  # hashed prefixes have other lengths: their own rows
        hashed = data.with_metadata(corpus, "hash")
        sets[f"{name}_hash"] = batches(hashed, data.pack_split(hashed, val_docs, args.seq_len, "bestfit"))
    return sets


def uses_metadata(step, args):
    """MeCo's two phases: URL prefixes for the first (1 - meta_cooldown) of the steps, then
    a cooldown on plain documents, so the model also works without metadata. The learning
    rate schedule and the optimizer simply continue. A pure function of step: resumable."""
    return args.meta != "none" and step < cooldown_start(args.max_steps, args.meta_cooldown)


def cooldown_start(max_steps, meta_cooldown):
    return round((1 - meta_cooldown) * max_steps)


# -----------------------------------------------------------------------------
# The training loop (cpt.py calls this too)

def fit(model, optimizer, args, next_batch, eval_sets, lr_at, start_step, extra, keep=()):
    """Train from start_step to args.max_steps.

    next_batch(index) -> batch dict, a pure function of index, so resuming is exact.
    eval_sets: {name: [batches]}, scored every args.eval_interval steps and at the end.
    lr_at(step) -> learning rate. extra: what else to record in the checkpoint.
    keep: steps whose checkpoint is also kept, as ckpt_<step>.pt.
    Checkpoints are written at every evaluation; Ctrl-C finishes the current step,
    writes one and exits. Under torchrun every process runs this loop on its own slice of
    each batch; DistributedDataParallel averages the gradients; process 0 writes."""
    setup_distributed(args)
    device, main_process = args.device, args.rank == 0
    compiled = torch.compile(model) if args.compile else model
    if args.world > 1:
        compiled = DistributedDataParallel(compiled, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    autocast = autocast_for(device)
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if main_process:
        trim_log(log_path, start_step)  # a resumed run rewrites what came after its checkpoint
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * args.world
    flops_per_token = model.flops_per_token(args.seq_len)
    peak = peak_flops(device)
    use_doc_ids = args.packing != "concat"  # only plain concat attends across documents

    from tqdm import tqdm
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
               desc="train", dynamic_ncols=True, disable=args.quiet or not main_process)
    model.train()
    t_last, steps_since = time.time(), 0
    with ctrl_c_finishes_the_step() as stop:
        for step in bar:
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(args.grad_accum):
                batch = next_batch(step * args.grad_accum + micro)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                # DDP averages gradients across processes inside backward(); between
                # micro-steps there is nothing worth averaging yet, so skip it until the last.
                last = micro == args.grad_accum - 1
                with contextlib.nullcontext() if last or args.world == 1 else compiled.no_sync():
                    with autocast:
                        _, loss = compiled(batch["x"], batch["y"], batch["doc_ids"] if use_doc_ids else None,
                                           batch["pos_ids"])
                    (loss / args.grad_accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps_since += 1
            done = step + 1
            stopping = everyone_agrees_to_stop(stop.requested, args)

            # Reading the loss makes the CPU wait for the GPU, so it happens every
            # log_interval steps rather than every step.
            if done % args.log_interval == 0 or done == args.max_steps:
                loss_value = mean_over_processes(loss, args)
                if not math.isfinite(loss_value):
                    raise BadInput(f"loss became {loss_value} at step {done}; the last good checkpoint "
                                   f"is kept in {args.out_dir} (try a lower --lr)")
                tok_s = steps_since * tokens_per_step / (time.time() - t_last)
                t_last, steps_since = time.time(), 0
                postfix = {"loss": f"{loss_value:.3f}", "lr": f"{lr:.1e}", "tok/s": f"{tok_s:,.0f}"}
                if peak:
                    postfix["mfu"] = f"{100 * flops_per_token * tok_s / args.world / peak:.0f}%"
                bar.set_postfix(postfix)
                if main_process:
                    append_log(log_path, {"step": done, "tokens": done * tokens_per_step, "lr": lr,
                                          "loss": loss_value, "tok_s": round(tok_s)})

            if done % args.eval_interval == 0 or done == args.max_steps or stopping or done in keep:
                losses = {name: evaluate(model, batches, args) for name, batches in eval_sets.items()}
                if not all(map(math.isfinite, losses.values())):
                    raise BadInput(f"validation loss is not finite at step {done}; the last good "
                                   f"checkpoint is kept in {args.out_dir} (try a lower --lr)")
                if main_process:
                    bar.write(f"step {done}: " + ", ".join(f"val {k} {v:.3f}" for k, v in losses.items()))
                    append_log(log_path, {"step": done, "tokens": done * tokens_per_step, "lr": lr,
                                          "val_loss": next(iter(losses.values())),
                                          **{f"val_loss_{name}": value for name, value in losses.items()}})
                    save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), model, optimizer, args, done, extra)
                    if done in keep:
                        save_checkpoint(os.path.join(args.out_dir, f"ckpt_{done}.pt"), model, optimizer, args, done, extra)
            if stopping:
                bar.close()
                sys.exit(f"interrupted: checkpoint saved at step {done}; continue with "
                         f"python {os.path.basename(sys.argv[0])} --resume --out_dir {args.out_dir}")
    bar.close()
    if args.world > 1:
        dist.barrier()  # nobody leaves before process 0 has written the last checkpoint
        dist.destroy_process_group()


def mean_over_processes(loss, args):
    """The loss averaged over all processes (each only saw its slice of the batch)."""
    if args.world == 1:
        return loss.item()
    loss = loss.detach().float().clone()
    dist.all_reduce(loss)
    return loss.item() / args.world


def everyone_agrees_to_stop(requested, args):
    """Ctrl-C may reach the processes at different steps; they must stop at the same one."""
    if args.world == 1:
        return requested
    flag = torch.tensor([float(requested)], device=args.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@torch.no_grad()
def evaluate(model, batches, args):
    """Mean loss per target token over fixed validation batches."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(args.device) for k, v in batch.items()}
        with autocast_for(args.device):
            _, loss = model(batch["x"], batch["y"], batch["doc_ids"], batch["pos_ids"])
        n = int((batch["y"] != -1).sum())
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / count


def say(args, message):
    """print, from process 0 only."""
    if args.rank == 0:
        print(message)


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


def peak_flops(device):
    """Dense bf16 tensor-core peak of a few known GPUs (vendor datasheets), for MFU."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12,
             "RTX 3090": 71e12, "A10G": 70e12, "L4": 121e12}
    return next((flops for key, flops in table.items() if key in name), None)


# -----------------------------------------------------------------------------
# Checkpoints and logs

def save_checkpoint(path, model, optimizer, args, step, extra):
    """Everything a resumed run needs. Written to a temporary file, flushed to disk, then
    renamed over the old checkpoint: a crash at any moment leaves either the old or the
    new checkpoint, never half of one."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": asdict(model.config),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "step": step,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        **extra,
    }
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
        raise BadInput(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                       "it is damaged or not a minipretrain checkpoint")


def resume(path, model, optimizer, args, corpus, keys=RUN_KEYS):
    """Load a checkpoint into model and optimizer; check it belongs to this run (the
    flags named in `keys` agree; cpt.py passes its own)."""
    ckpt = load_checkpoint(path)
    differ = [f"{k}={ckpt['args'].get(k)!r} (now {getattr(args, k)!r})" for k in keys
              if ckpt["args"].get(k) != getattr(args, k)]
    if differ:
        raise BadInput(f"checkpoint {path} is from another configuration: {', '.join(differ)}; "
                       "pass the same flags as the original run, or use a new --out_dir")
    if ckpt["data"].get("fingerprint") != corpus.info.get("fingerprint") or ckpt["data"]["tokens"] != corpus.info["tokens"]:
        raise BadInput(f"checkpoint {path} was trained on other data ({ckpt['data']['tokens']:,} tokens, "
                       f"now {corpus.info['tokens']:,}); the files behind --data {args.data} changed")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    before = ckpt["args"].get("world", 1)
    if before != args.world:
        say(args, f"note: {path} was written by {before} process(es), now there are {args.world}: each step "
                  f"now reads {args.world} x {args.batch_size} rows instead of {before} x {args.batch_size}, and "
                  f"the run continues from step {ckpt['step']} with that batch (not the data order it had)")
    say(args, f"resuming from {path} at step {ckpt['step']}")
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

def plot_losses(out_dir, baseline=None):
    """loss.png: train and validation loss against tokens seen, learning rate on the right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    log = read_log(os.path.join(out_dir, "log.jsonl"))
    train = [r for r in log if "loss" in r]
    val = [r for r in log if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.7, label="train")
    ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
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
    """lr.png: the schedule itself, lr_at(step) at every step 0..total-1 (the log only
    holds every log_interval-th step, which hides a short warmup)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(total), [lr_at(step) for step in range(total)], c="tab:green")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_ylim(bottom=0)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "lr.png"), dpi=120)
    plt.close(fig)


def write_samples(model, args, prompts, max_new_tokens=None):
    """samples.txt: one continuation per prompt, each starting from a fresh document."""
    n = args.sample_tokens if max_new_tokens is None else max_new_tokens
    if n <= 0:
        return
    encoder = data.get_tokenizer()
    model.eval()
    torch.manual_seed(args.seed)  # the same samples from the same weights
    texts = []
    for prompt in prompts:
        idx = torch.tensor([[data.EOT] + encoder.encode_ordinary(prompt)], device=args.device)
        with autocast_for(args.device):
            out = model.generate(idx, n, temperature=0.8, top_k=200)
        texts.append(encoder.decode(out[0, 1:].tolist()))
    path = os.path.join(args.out_dir, "samples.txt")
    with open(path, "w") as f:
        for prompt, text in zip(prompts, texts):
            f.write(f"=== prompt {prompt!r}\n{text}\n\n")
    if not args.quiet:
        print(f"samples written to {path}; the first one:\n{texts[0][:400]}")


def sample(args):
    """python pretrain.py --sample --init out/meco/ckpt.pt --url docs.python.org/3/library/json
    The document starts the way MeCo trained it, [EOT] "URL: <url>\n\n", then the prompt;
    the URL may be real or made up. Without --url it is a plain continuation."""
    if not args.init:
        raise BadInput("--sample needs --init PATH/ckpt.pt, the checkpoint to generate from")
    args.device = pick_device(args.device)
    model = load_model(args.init, args.device)
    encoder = data.get_tokenizer()
    start = f"URL: {args.url}\n\n" if args.url else ""
    idx = torch.tensor([[data.EOT] + encoder.encode_ordinary(start + args.prompt)], device=args.device)
    torch.manual_seed(args.seed)
    with autocast_for(args.device):
        out = model.generate(idx, args.sample_tokens, temperature=0.8, top_k=200)
    print(encoder.decode(out[0, 1:].tolist()))


# -----------------------------------------------------------------------------
# Command line

def build_parser():
    p = argparse.ArgumentParser(description="Pretrain a GPT. Flags left unset come from the preset.")
    p.add_argument("--data", help=f"training text: {data.SOURCES_HELP} (default: the preset's)")
    p.add_argument("--out_dir", help="where checkpoints, logs, plots and samples go (default out/<preset>)")
    p.add_argument("--preset", default="auto", help=f"auto (from the device) or one of {', '.join(PRESETS)}")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its checkpoint")
    p.add_argument("--packing", default="bestfit", choices=data.PACKINGS, help="how documents are laid into rows")
    p.add_argument("--meta", default="none", choices=data.METAS,
                   help="MeCo: prefix each document with its URL (url), a hash of it (hash), or nothing")
    p.add_argument("--meta_cooldown", type=float, default=0.1, help="MeCo: last fraction of steps without metadata")
    p.add_argument("--max_steps", type=int)
    p.add_argument("--n_layer", type=int)
    p.add_argument("--n_head", type=int)
    p.add_argument("--n_embd", type=int)
    p.add_argument("--seq_len", type=int, help="tokens per row (also the model's block size)")
    p.add_argument("--batch_size", type=int, help="rows per micro-step")
    p.add_argument("--grad_accum", type=int, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="final learning rate / peak")
    p.add_argument("--warmup", type=int, help="warmup steps")
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--eval_interval", type=int)
    p.add_argument("--eval_batches", type=int, help="validation batches per evaluation")
    p.add_argument("--log_interval", type=int, default=10)
    p.add_argument("--compile", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                   help="torch.compile the model (default: on for GPU presets)")
    p.add_argument("--sample_tokens", type=int, default=200, help="tokens per sample at the end (0: none)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--sample", action="store_true", help="only generate text from --init (no training)")
    p.add_argument("--init", help="with --sample: the checkpoint to generate from")
    p.add_argument("--url", default="", help="with --sample: steer generation with this URL, as MeCo trains it")
    p.add_argument("--prompt", default="", help="with --sample: the text to continue")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        sample(args) if args.sample else train(args)
    except BadInput as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
