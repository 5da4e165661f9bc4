"""
Pretrain a GPT from scratch.

    python pretrain.py                      # picks the device and a preset that fits it
    python pretrain.py --preset cpu --max_steps 50 --out_dir out/try
    python pretrain.py --resume --out_dir out/cpu   # continue an interrupted run exactly
    python pretrain.py --sample --init out/cpu/ckpt.pt --prompt "def "

Read top-down: main() -> train() builds the data, the model and the optimizer -> fit() is
the loop (train_step -> the model, evaluate_and_checkpoint) -> MeCo's batches, the
schedule, the optimizer. At the bottom: this script's settings and command line.
The run's machinery (devices, checkpoints, logs, plots) lives in harness.py; cpt.py
reuses fit(), the schedule and the optimizer.
"""

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

import data
import harness
from model import GPT, GPTConfig, BadInput

# Each preset is a model and a training budget sized for one kind of machine.
PRESETS = {
    # 2 CPU cores, under 10 minutes in all. Chosen by bench/cpu.py: of 13 models and schedules
    # trained for the same 120 s, this one (the old preset with a 60-step warmup) had the lowest
    # validation loss, beyond the seed spread of the old preset (within it of wsd).
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, seq_len=256, batch_size=8, grad_accum=1,
                max_steps=900, lr=3e-3, warmup=60, eval_interval=225, eval_batches=8,
                data="stdlib", compile=False, sample_tokens=100),
    # a laptop GPU with 6 GB: ~30M parameters, bf16 (fp16 before sm_80); 4 x 1024 tokens per micro-step.
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
                seed=1337, attn_backend="auto", dtype="auto", quiet=False)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.sample:
        seed = DEFAULTS["seed"] if args.seed is None else args.seed
        return harness.exit_with_one_line(lambda a: sample(a, a.sample_tokens or DEFAULTS["sample_tokens"], seed), args)
    harness.exit_with_one_line(train, args)


def train(args):
    """pretrain.py's whole run: settings, data, model, optimizer, the loop, the end."""
    # --- settings: the flags, else the checkpoint's (--resume), else the preset's
    started = time.time()
    rank, world, device = harness.setup_distributed(harness.pick_device(args.device))
    run, ckpt = settings(args, device, rank)
    lock = harness.claim_out_dir(run.out_dir, rank, run.resume, run.overwrite_out_dir)  # noqa: F841 (held till the end)
    torch.manual_seed(run.seed)

    # --- data: documents -> packed rows -> batches, each a pure function of its index
    corpus = harness.load_corpus_once(run.data, rank, world)
    train_docs, val_docs = data.split_documents(corpus)
    with_urls = data.with_metadata(corpus, run.meta)  # MeCo: "URL: ..." before each document; none: corpus
    next_batch, stats = training_batches(corpus, with_urls, train_docs, run, rank, world)
    scored = {run.data: corpus} if run.meta == "none" else {run.data: corpus, f"{run.data}_{run.meta}": with_urls}
    eval_sets = validation_sets(scored, val_docs, run.seq_len, run.batch_size, run.eval_batches)
    baseline = data.unigram_loss(corpus, train_docs, val_docs)
    harness.say(rank, f"data {run.data}: {len(corpus):,} documents, {corpus.info['tokens']:,} tokens; unigram "
                      f"baseline {baseline:.3f} nats\nsplit: {data.split_summary(corpus, train_docs, val_docs)}")
    harness.say(rank, f"packing {run.packing}: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()))

    # --- model and optimizer (from the checkpoint when resuming)
    config = GPTConfig(block_size=run.seq_len, n_layer=run.n_layer, n_head=run.n_head, n_embd=run.n_embd)
    model = GPT(config).to(device)
    model.attn_backend = run.attn_backend
    optimizer = make_optimizer(model, run.lr, run.weight_decay, device)
    loop = Loop.of(run, device, rank, world, keep=kept_steps(run))
    start_step = harness.restore(ckpt, model, optimizer, corpus, world, loop.scaler) if ckpt else 0
    harness.say(rank, f"model: {model.num_params() / 1e6:.1f}M parameters; writing to {run.out_dir}"
                      + (f"; {world} processes" if world > 1 else ""))

    # --- the loop
    lr_at = schedule(run)
    record = {"args": {**vars(run), "world": world}, "data": corpus.info, "packing_stats": stats,
              "unigram_loss": baseline}
    fit(model, optimizer, next_batch, lr_at, eval_sets, loop, start_step, record)

    # --- the end: plots, samples and a summary, from process 0
    if rank == 0:
        harness.plot_losses(run.out_dir, baseline)
        harness.plot_lr(run.out_dir, lr_at, run.max_steps)
        prompts = sample_prompts(corpus, val_docs, run.meta)
        harness.write_samples(model, run.out_dir, device, prompts, run.sample_tokens, run.seed)
        summarize(run.out_dir, baseline, time.time() - started)


def validation_sets(corpora, docs, seq_len, batch_size, n_batches):
    """What every evaluation scores (cpt.py's too): {name: batches} for each {name: corpus},
    best-fit rows of the held-out documents, the same rows every time, documents masked
    apart so each is scored as if alone. A MeCo run scores the same documents twice: plain
    and with their URLs."""
    sets = {}
    for name, corpus in corpora.items():
        rows = data.pack_split(corpus, docs, seq_len, "bestfit")
        sets[name] = [data.get_batch(corpus, rows, seq_len, i, batch_size, seed=0) for i in range(n_batches)]
    return sets


# -----------------------------------------------------------------------------
# The training loop (cpt.py calls it too)

@dataclass
class Loop:
    """Everything fit() needs besides the model, the batches and the schedule."""
    out_dir: str
    max_steps: int
    grad_accum: int
    grad_clip: float
    eval_interval: int
    log_interval: int
    compile: bool
    quiet: bool
    dtype: str  # --dtype: auto, fp32, bf16 or fp16 (harness.autocast_for)
    device: str
    rank: int   # this process, under torchrun
    world: int  # how many processes
    keep: tuple  # steps whose checkpoint is also kept, as ckpt_<step>.pt
    scaler: torch.amp.GradScaler  # fp16's loss scaling; a pass-through for bf16 and fp32

    @classmethod
    def of(cls, run, device, rank, world, keep=()):
        """The Loop of a run's settings (pretrain.py's and cpt.py's have the same names)."""
        names = "out_dir max_steps grad_accum grad_clip eval_interval log_interval compile quiet dtype".split()
        return cls(**{name: getattr(run, name) for name in names}, device=device, rank=rank, world=world, keep=keep,
                   scaler=harness.grad_scaler(device, run.dtype))


def fit(model, optimizer, next_batch, lr_at, eval_sets, loop, start_step=0, record=None):
    """Train from start_step to loop.max_steps.

    next_batch(index) -> batch dict, a pure function of index, so resuming is exact.
    lr_at(step) -> learning rate. eval_sets: {name: [batches]}, scored every
    loop.eval_interval steps and at the end. record: what run.json and the checkpoint
    record besides the weights, the optimizer, the step and the RNG. Under torchrun every
    process runs this loop on its own slice of each batch; DistributedDataParallel averages
    the gradients; process 0 writes."""
    net = torch.compile(model) if harness.compile_here(loop.compile, loop.device, loop.rank) else model
    if loop.world > 1:
        net = DistributedDataParallel(net, device_ids=[torch.device(loop.device).index] if loop.device.startswith("cuda") else None)
    record = {**(record or {}), "parameters": model.num_params()}
    log_path = os.path.join(loop.out_dir, "log.jsonl")
    if loop.rank == 0:
        harness.start_log(loop.out_dir, start_step, record)  # a resumed run rewrites what came after its checkpoint
    from tqdm import tqdm
    bar = tqdm(range(start_step, loop.max_steps), initial=start_step, total=loop.max_steps, desc="train",
               dynamic_ncols=True, disable=loop.quiet or loop.rank > 0)
    speed, started, stopping = harness.Speedometer(model, loop), time.time(), 0
    model.train()
    with harness.signals_finish_the_step() as stop:
        for step in bar:
            # one optimizer step: the LR for this step, micro-steps, clip, update
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, tokens = train_step(net, model, optimizer, next_batch, step, loop)
            done = step + 1
            stopping = int(harness.across_processes(stop.signal, loop, "max"))  # the signal a process got, or 0
            speed.tokens += tokens

            # log: reading the loss makes the CPU wait for the GPU, so not every step
            if done % loop.log_interval == 0 or done == loop.max_steps:
                loss_value = harness.across_processes(loss.detach(), loop, "mean")
                if not math.isfinite(loss_value):
                    raise BadInput(f"loss became {loss_value} at step {done}; the last good checkpoint "
                                   f"is kept in {loop.out_dir} (try a lower --lr)")
                tok_s, postfix = speed.read()
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", **postfix)
                if loop.rank == 0:
                    harness.append_log(log_path, {"step": done, "tokens": done * tokens, "lr": lr, "loss": loss_value,
                                                  "tok_s": round(tok_s), "seconds": round(time.time() - started, 2)})

            # evaluate and checkpoint: at every eval_interval, at the end, at a kept step, on a signal
            if done % loop.eval_interval == 0 or done == loop.max_steps or stopping or done in loop.keep:
                evaluate_and_checkpoint(model, optimizer, eval_sets, loop, done, done * tokens, lr, record, bar)
            if stopping:
                break
        bar.close()
        if loop.world > 1:  # (still inside: a second SIGTERM while waiting here is ignored too)
            torch.distributed.barrier()  # nobody leaves before process 0 has written the last checkpoint
            torch.distributed.destroy_process_group()
    if stopping:
        name, status = harness.STOP_SIGNALS[stopping]
        raise harness.Interrupted(f"interrupted by {name}: checkpoint saved at step {done}; continue with "
                                  f"python {os.path.basename(sys.argv[0])} --resume --out_dir {loop.out_dir}", status)


def train_step(net, model, optimizer, next_batch, step, loop):
    """grad_accum micro-steps, then clip and update. Returns the last micro-step's loss
    and the tokens (padding included) this step read across all processes."""
    for micro in range(loop.grad_accum):
        batch = {k: v.to(loop.device, non_blocking=True) for k, v in next_batch(step * loop.grad_accum + micro).items()}
        # DDP averages gradients across processes inside backward(); between micro-steps
        # there is nothing worth averaging yet, so skip it until the last.
        last = micro == loop.grad_accum - 1
        with contextlib.nullcontext() if last or loop.world == 1 else net.no_sync():
            with harness.autocast_for(loop.device, loop.dtype):
                _, loss = net(batch["x"], batch["y"], batch.get("doc_ids"), batch["pos_ids"])
            loop.scaler.scale(loss / loop.grad_accum).backward()
    loop.scaler.unscale_(optimizer)  # clip the true gradients
    torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
    loop.scaler.step(optimizer)  # optimizer.step(), unless an fp16 gradient overflowed
    loop.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, batch["x"].numel() * loop.grad_accum * loop.world


def evaluate_and_checkpoint(model, optimizer, eval_sets, loop, step, tokens, lr, record, bar):
    """Score every validation set, log it, and write ckpt.pt (and ckpt_<step>.pt for a kept step)."""
    losses = {name: evaluate(model, batches, loop.device, loop.dtype) for name, batches in eval_sets.items()}
    if not all(map(math.isfinite, losses.values())):
        raise BadInput(f"validation loss is not finite at step {step}; the last good "
                       f"checkpoint is kept in {loop.out_dir} (try a lower --lr)")
    if loop.rank > 0:
        return
    bar.write(f"step {step}: " + ", ".join(f"val {k} {v:.3f}" for k, v in losses.items()))
    harness.append_log(os.path.join(loop.out_dir, "log.jsonl"), {
        "step": step, "tokens": tokens, "lr": lr, "val_loss": next(iter(losses.values())),
        **{f"val_loss_{name}": value for name, value in losses.items()}, "peak_memory_gb": harness.peak_memory_gb(loop.device)})
    for name in ("ckpt.pt",) + ((f"ckpt_{step}.pt",) if step in loop.keep else ()):
        harness.save_checkpoint(os.path.join(loop.out_dir, name), model, optimizer, step, record, loop.scaler)


@torch.no_grad()
def evaluate(model, batches, device, dtype="auto"):
    """Mean loss per target token over fixed validation batches."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with harness.autocast_for(device, dtype):
            _, loss = model(batch["x"], batch["y"], batch.get("doc_ids"), batch["pos_ids"])
        n = int((batch["y"] != -1).sum())
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / count


# -----------------------------------------------------------------------------
# Batches, and MeCo: metadata conditioning, then a cooldown without it

def training_batches(corpus, with_urls, docs, run, rank=0, world=1):
    """(next_batch, packing stats): next_batch(index) -> this process's slice of batch
    `index`. With --meta, batches come from URL-prefixed rows until the cooldown begins."""
    docmask = data.masks_documents(run.packing)
    plain = data.pack_split(corpus, docs, run.seq_len, run.packing)
    if run.meta == "none":
        return (lambda index: data.get_batch(corpus, plain, run.seq_len, index, run.batch_size, run.seed,
                                             docmask, rank, world)), data.packing_stats(plain, run.seq_len)
    if run.meta_drop or run.meta_loss:  # MeCo's ablations train on other prefixes than validation scores
        with_urls = data.with_metadata(corpus, run.meta, run.meta_drop, run.meta_loss)
    if with_urls.prefix_lengths.max() + 1 >= run.seq_len:
        raise BadInput(f"--seq_len {run.seq_len} leaves no room for text after URL prefixes of up to "
                       f"{with_urls.prefix_lengths.max()} tokens; use a longer --seq_len or --meta none")
    meta_rows = data.pack_split(with_urls, docs, run.seq_len, run.packing)
    def next_batch(index):
        if uses_metadata(index // run.grad_accum, run.max_steps, run.meta_cooldown):
            return data.get_batch(with_urls, meta_rows, run.seq_len, index, run.batch_size, run.seed, docmask, rank, world)
        return data.get_batch(corpus, plain, run.seq_len, index, run.batch_size, run.seed, docmask, rank, world)
    return next_batch, data.packing_stats(meta_rows, run.seq_len)


def uses_metadata(step, max_steps, meta_cooldown):
    """MeCo ("Metadata Conditioning Accelerates Language Model Pre-training", Gao et al.
    2025) in two phases: URL prefixes for the first (1 - meta_cooldown) of the steps, then
    a cooldown on plain documents, so the model also works without metadata. Notice that
    the LR schedule and the optimizer simply continue, and that the phase is a pure
    function of the step, so a resumed run switches at the same step."""
    # exercise 7 begins: the MeCo cooldown
    return step < cooldown_start(max_steps, meta_cooldown)
    # exercise 7 ends


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
    # exercise 9 begins: rewarming, the warmup
    if step < warmup:
        return start_lr + (max_lr - start_lr) * (step + 1) / warmup
    # exercise 9 ends
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
# This script's settings and command line (machinery: nothing below teaches pretraining)

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
        harness.fill_unset(run, DEFAULTS)  # settings that older checkpoints do not have
        check_settings(run, device)
        return run, ckpt
    why = None
    if args.preset == "auto":
        run.preset, why = pick_preset(device)
    harness.fill_unset(run, {**DEFAULTS, **PRESETS[run.preset]})
    if args.warmup is None:  # the preset's warmup is for its own length; a short run warms up for half of it
        run.warmup = min(run.warmup, run.max_steps // 2)
    if why:
        harness.say(rank, f"device {device} ({why}) -> preset '{run.preset}': {run.n_layer} layers, {run.n_embd} "
                          f"wide, {run.seq_len} tokens per row, {run.max_steps} steps on {run.data}")
    if device == "cpu" and run.preset != "cpu":
        harness.say(rank, f"warning: the '{run.preset}' preset is sized for a GPU; on this CPU one step takes "
                          "minutes (the cpu preset finishes in under 10); use --preset cpu unless you mean it")
    check_settings(run, device)
    return run, None


def pick_preset(device):
    """(preset, why) for a device."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        gb = props.total_memory / 2**30
        return ("gpt2" if gb >= 40 else "laptop"), f"{props.name} with {gb:.0f} GB"
    if device == "mps":
        return "laptop", "Apple GPU (MPS)"
    return "cpu", f"no GPU; {torch.get_num_threads()} CPU threads"


def check_settings(run, device):
    """One line for the first setting that makes no sense together with another, naming
    the flags (each flag alone was checked as it was parsed)."""
    if run.n_embd % run.n_head or (run.n_embd // run.n_head) % 2:
        raise BadInput(f"--n_embd {run.n_embd} must split into --n_head {run.n_head} heads of an even size "
                       "(rotary embeddings rotate pairs); e.g. --n_head 4 with --n_embd 128")
    if run.warmup >= run.max_steps:
        raise BadInput(f"--warmup {run.warmup} must be less than --max_steps {run.max_steps}")
    harness.check_attention_backend(run.attn_backend, device, run.dtype, run.n_embd // run.n_head)
    check_memory(run, device)


def check_memory(run, device):
    """Refuse a step that cannot fit, by a rough upper bound of what one micro-step holds:
    per layer the activations kept for backward plus, unless the fused kernel runs, the
    (B, heads, T, T) attention weights; the loss holds only a chunk of logits at a time."""
    B, T, C = run.batch_size, run.seq_len, run.n_embd
    attention = 0 if device.startswith("cuda") else run.n_head * T * 3
    need, free = 4 * B * T * run.n_layer * (20 * C + attention), None
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(device)[0]
    elif os.path.exists("/proc/meminfo"):  # Linux: what can be had without swapping, page cache included
        with open("/proc/meminfo") as f:
            free = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    if free and need > free:
        raise BadInput(f"one step needs about {need / 2**30:.0f} GB of memory and {free / 2**30:.0f} GB are free; "
                       "lower --batch_size (and raise --grad_accum) or --seq_len")


def resume_settings(run, max_steps):
    """--resume: fill `run` from its checkpoint and return the checkpoint to continue from.
    A wsd run given a larger --max_steps is extended: it continues from the checkpoint kept
    where its decay began (still at the peak LR) and decays at the new end instead."""
    path = os.path.join(run.out_dir, "ckpt.pt")
    ckpt = harness.load_checkpoint(path)
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
        ckpt = harness.load_checkpoint(path)
        saved = {**ckpt["args"], "max_steps": max_steps}
    # Flags that say what to do now, not what the run is, are never taken from a checkpoint.
    harness.inherit(run, saved, path, skip=("resume", "overwrite_out_dir", "device", "out_dir", "sample", "init", "url",
                                            "prompt", "preset"))
    return ckpt


def sample(args, tokens, seed):
    """python pretrain.py --sample --init out/meco/ckpt.pt --url docs.python.org/3/library/json
    The document starts the way MeCo trained it, [EOT] "URL: <url>\n\n", then the prompt;
    the URL may be real or made up. Without --url it is a plain continuation."""
    if not args.init:
        raise BadInput("--sample needs --init PATH/ckpt.pt, the checkpoint to generate from")
    device = harness.pick_device(args.device)
    model = harness.load_model(args.init, device)
    start = (f"URL: {args.url}\n\n" if args.url else "") + args.prompt
    print(harness.generate_text(model, device, start, tokens, seed))


def summarize(out_dir, baseline, seconds):
    """The end of a run in four lines: time and tokens, the loss against the unigram
    baseline in plain words, the files written, and the next command to try."""
    last = [r for r in harness.read_log(os.path.join(out_dir, "log.jsonl")) if "val_loss" in r][-1]
    verdict = ("below it: the model uses context" if last["val_loss"] < baseline - 0.05 else
               "not yet below it: the model has not learned to use context; train longer (--max_steps) or tune --lr")
    print(f"done in {seconds / 60:.1f} min: {last['step']} steps, {last['tokens']:,} tokens, peak memory "
          f"{last.get('peak_memory_gb')} GB; validation loss {last['val_loss']:.3f}, unigram baseline "
          f"{baseline:.3f}, {verdict}")
    files = sorted(f for f in os.listdir(out_dir) if not f.startswith("."))
    sizes = [os.path.getsize(os.path.join(out_dir, f)) for f in files]
    print(f"files in {out_dir}: " + ", ".join(f"{f} ({n / 2**20:.1f} MB)" if n > 2**20 else f"{f} ({n // 1024 + 1} kB)"
                                              for f, n in zip(files, sizes)))
    print(f"next: python pretrain.py --sample --init {os.path.join(out_dir, 'ckpt.pt')} --prompt \"...\"")


def build_parser():
    presets = "\n".join(f"  {name:7} " + " ".join(f"{k}={v}" for k, v in preset.items() if k in (
        "n_layer", "n_head", "n_embd", "seq_len", "batch_size", "grad_accum", "max_steps", "lr", "data"))
        for name, preset in PRESETS.items())
    p = harness.Parser(description="Pretrain a GPT. Flags left unset come from the preset (with --resume: from "
                       "the run's checkpoint), then from the defaults shown.", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=f"presets (auto picks cpu without a GPU, laptop for a GPU under 40 GB, else gpt2):\n{presets}")
    p.add_argument("--preset", default="auto", choices=("auto", *PRESETS), help="the machine to size the run for "
                   "(default auto: from the device)")
    harness.add_flags(p, harness.SHARED_FLAGS + [
        ("meta", data.METAS, "MeCo: prefix each document with its URL (url), a hash of it (hash), or nothing"),
        ("meta_cooldown", harness.SHARE, "MeCo: last fraction of steps without metadata"),
        ("meta_drop", harness.SHARE, "MeCo ablation: share of documents never given metadata"),
        ("meta_loss", "store_true", "MeCo ablation: train on the metadata tokens too (default: no loss on them)"),
        ("schedule", ("cosine", "wsd"), "after warmup: cosine decay, or warmup-stable-decay (extendable)"),
        ("decay_frac", harness.OPEN_SHARE, "wsd: the last fraction of steps that decays"),
        ("n_layer", harness.AT_LEAST_1, "transformer blocks"),
        ("n_head", harness.AT_LEAST_1, "attention heads per block"),
        ("n_embd", harness.AT_LEAST_1, "width of the residual stream"),
        ("seq_len", harness.AT_LEAST_1, "tokens per row, also the model's block size"),
        ("lr", harness.POSITIVE, "peak learning rate"),
        ("min_lr_ratio", harness.number(float, lambda v: 0 <= v <= 1, "in [0, 1]"), "final learning rate / peak"),
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
