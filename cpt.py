"""
Continued pretraining (CPT): keep training a pretrained model on a new domain, and watch
what it learns there and what it forgets of the old one.

    python cpt.py --init out/cpu/ckpt.pt --data pydoc               # rewarm + re-decay the LR
    python cpt.py --init out/cpu/ckpt.pt --data pydoc --replay 0.05 # 5 % of rows from the old corpus
    python cpt.py --schedule infinite                                # warmup, cooldown, constant, anneal
    python cpt.py --resume --out_dir out/cpt                         # continue an interrupted run exactly
    python cpt.py --compare                                          # the README experiment -> bench/cpt*

The questions the papers ask, and this file lets you measure on a laptop:
- Rewarm? A pretrained model ends at a small learning rate. Staying there (--schedule
  constant) changes the model slowly; warming back up to the original peak and decaying
  again adapts much better, but the jump first *raises* the loss (Gupta et al. 2023,
  "Continual Pre-Training of Large Language Models: How to (re)warm your model?"). A
  temporary drop of performance at the start of CPT followed by a recovery is the
  "stability gap" (Guo et al. 2024, "Efficient Continual Pre-training by Mitigating the
  Stability Gap").
- Replay: mixing a few percent of the old corpus into every batch (--replay) keeps most
  of what was learned; rewarm + re-decay + replay nearly matches retraining on the union
  (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train Large
  Language Models": ~5 % for a weak shift, ~25 % for a strong one).
- A schedule that never needs rewarming: the "infinite" schedule holds a constant LR and
  anneals only at the end (Ibrahim et al. 2024; Singh et al. 2025, "Beyond Cosine Decay").

Read top-down: run() turns a checkpoint and two corpora into the arguments of
pretrain.fit() (the same loop pretrain.py uses); mixed_batch() and replay_count() are the
replay; compare() is the experiment, with its plots at the bottom.
"""

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import time
from fractions import Fraction

import torch

import data
import pretrain
from model import GPT, GPTConfig, BadInput

DEFAULT_INIT = os.path.join("out", "cpu", "ckpt.pt")
SCHEDULES = ("rewarm-cosine", "constant", "infinite")
# What defines a CPT run's arithmetic: a resumed run must agree on all of these.
RUN_KEYS = ("init", "data", "old_data", "replay", "schedule", "max_lr", "min_lr", "warmup",
            "constant_lr", "cooldown", "anneal", "max_steps", "batch_size", "grad_accum", "seq_len",
            "packing", "weight_decay", "grad_clip", "keep_optimizer", "val_fraction", "seed")


# -----------------------------------------------------------------------------
# A CPT run

def run(args):
    """cpt.py's whole run: checkpoint -> model, both corpora -> mixed batches and two
    validation sets, schedule -> pretrain.fit(), then plots and samples."""
    args, ckpt, resumed = resolve_args(args)
    torch.manual_seed(args.seed)

    # The new domain. pydoc has only 79 documents: the usual 5 % validation split would be
    # ~3 documents (4k tokens), too few to tell runs apart, so CPT holds out --val_fraction
    # (20 %: ~13 documents, ~25k tokens) of the new corpus.
    new = data.load_corpus(args.data, quiet=args.quiet)
    new_train, new_val = data.split_documents(new, args.val_fraction)
    new_rows = data.pack_split(new, new_train, args.seq_len, args.packing)
    if same_corpus(new.info, ckpt["data"]):
        print(f"warning: --data {args.data} is the corpus {args.init} was pretrained on; "
              "this is more pretraining, not a new domain")
    # The old domain, for replay and to measure forgetting. Its validation documents are
    # the ones pretrain.py held out (the same default split), so they were never trained on.
    old = load_old_corpus(args, ckpt)
    old_rows = None  # replayed rows: the old corpus's training documents, packed like the new ones
    if old is not None:
        old_train, old_val = data.split_documents(old)
        if args.replay > 0:
            old_rows = data.pack_split(old, old_train, args.seq_len, args.packing)

    config = GPTConfig(**ckpt["config"])
    model = GPT(config).to(args.device)
    model.load_state_dict(ckpt["model"])
    # Fresh AdamW moments by default, as in the papers: the old ones describe gradients of
    # the old data at a tiny LR. --keep_optimizer carries them over instead.
    optimizer = pretrain.make_optimizer(model, argparse.Namespace(lr=args.max_lr, weight_decay=args.weight_decay),
                                        args.device)
    if args.keep_optimizer:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError) as e:
            raise BadInput(f"--keep_optimizer: {args.init} has no usable optimizer state ({e}); drop --keep_optimizer")

    # Validation: pretrain.py's own held-out rows, so "old, before CPT" is exactly the loss
    # pretraining ended with. "new" first: fit() also logs the first set as plain val_loss,
    # and the new domain is what we train on.
    eval_sets = pretrain.validation_sets(new, new_val, args, "new")
    if old is not None:
        eval_sets.update(pretrain.validation_sets(old, old_val, args, "old"))
    start_step = 0
    if resumed:
        start_step = pretrain.resume(os.path.join(args.out_dir, "ckpt.pt"), model, optimizer, args, new, keys=RUN_KEYS)
        init_eval = resumed["init_eval"]
    else:
        # Step 0 = the pretrained model, where every curve starts (fit() evaluates only after steps).
        init_eval = {name: pretrain.evaluate(model, batches, args) for name, batches in eval_sets.items()}
    print(f"before CPT (step {ckpt['step']} of {args.init}): "
          + ", ".join(f"val {k} {v:.3f}" for k, v in init_eval.items()))
    os.makedirs(args.out_dir, exist_ok=True)

    docmask = args.packing != "concat"
    def next_batch(index):
        return mixed_batch(index, new, new_rows, old, old_rows, args, docmask)
    lr_at = lr_schedule(args)
    print(f"CPT on {args.data}: {len(new_train)} train / {len(new_val)} val documents, {len(new_rows)} rows; "
          f"schedule {args.schedule}, lr {lr_at(0):.2e} -> {max(map(lr_at, range(args.max_steps))):.2e} -> "
          f"{lr_at(args.max_steps - 1):.2e}; replay {args.replay:.0%} of rows from {args.old_data}; "
          f"{args.max_steps} steps of {args.batch_size * args.seq_len * args.grad_accum:,} tokens")

    extra = {"data": new.info, "old_data": old.info if old is not None else None,
             "init": {"path": args.init, "step": ckpt["step"], "data": ckpt["data"]["source"]},
             "init_eval": init_eval}
    if args.rank == 0:
        with open(os.path.join(args.out_dir, "run.json"), "w") as f:
            json.dump({"args": vars(args), **extra}, f, indent=1)
    pretrain.fit(model, optimizer, args, next_batch, eval_sets, lr_at, start_step, extra)
    if args.rank > 0:
        return None  # plots and samples come from process 0
    pretrain.plot_losses(args.out_dir)
    pretrain.plot_lr(args.out_dir, lr_at, args.max_steps, title=f"--schedule {args.schedule}")
    result = {"label": os.path.basename(os.path.normpath(args.out_dir)), "init_eval": init_eval,
              "log": pretrain.read_log(os.path.join(args.out_dir, "log.jsonl"))}
    plot_curves([result], os.path.join(args.out_dir, "domains.png"), args.data, args.old_data)
    pretrain.write_samples(model, args, ["", "The ", "def "])
    return result


def resolve_args(args):
    """Fill the flags left unset, and check them. On --resume they come from this run's own
    checkpoint, so `python cpt.py --resume --out_dir X` needs nothing else (flags you do pass
    must agree with it). Otherwise from the pretrained checkpoint (CPT continues its recipe:
    batch size, packing, peak and final LR, warmup) and the defaults here.
    Returns (args, the pretrained checkpoint, the CPT checkpoint to resume or None)."""
    args.device = pretrain.pick_device(args.device)
    pretrain.setup_distributed(args)  # sets args.rank and args.world (torchrun)
    args.out_dir = args.out_dir or os.path.join("out", "cpt")
    if args.replay is not None and not 0 <= args.replay < 1:
        raise BadInput(f"--replay must be in [0, 1): the fraction of each batch's rows taken from the "
                       f"pretraining corpus (e.g. 0.05); got {args.replay}")
    resumed = pretrain.load_checkpoint(os.path.join(args.out_dir, "ckpt.pt")) if args.resume else None
    if resumed:
        for key, value in resumed.get("args", {}).items():
            if getattr(args, key, "not a flag") is None:
                setattr(args, key, value)
    args.init = os.path.normpath(args.init or DEFAULT_INIT)
    ckpt = load_init(args.init)

    trained = ckpt["args"]
    peak = trained.get("lr", trained.get("max_lr"))  # a pretrain.py or a cpt.py checkpoint
    final = peak * trained["min_lr_ratio"] if "min_lr_ratio" in trained else trained["min_lr"]
    defaults = dict(data="pydoc", old_data=ckpt["data"]["source"], replay=0.0, schedule="rewarm-cosine",
                    keep_optimizer=False, max_lr=peak, min_lr=final, warmup=trained["warmup"],
                    max_steps=max(1, trained["max_steps"] // 4), batch_size=trained["batch_size"],
                    grad_accum=trained["grad_accum"], packing=trained["packing"],
                    weight_decay=trained.get("weight_decay", 0.1), grad_clip=trained.get("grad_clip", 1.0),
                    eval_batches=trained["eval_batches"], log_interval=10, sample_tokens=200,
                    compile=trained.get("compile", False), seed=trained["seed"], val_fraction=0.2)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seq_len = ckpt["config"]["block_size"]
    args.eval_interval = args.eval_interval or max(1, args.max_steps // 10)  # dense: the stability gap is early
    # The infinite schedule's phases. The shape is Ibrahim et al.'s; the lengths and the
    # constant LR (half way between peak and final on a log scale) are our choice.
    if args.constant_lr is None:
        args.constant_lr = math.sqrt(args.max_lr * args.min_lr)
    if args.cooldown is None:
        args.cooldown = args.max_steps // 5
    if args.anneal is None:
        args.anneal = args.max_steps // 10

    if args.max_steps < 1 or args.warmup < 0 or args.cooldown < 0 or args.anneal < 0:
        raise BadInput("--max_steps must be positive and --warmup, --cooldown, --anneal not negative")
    if min(args.max_lr, args.constant_lr) <= 0 or args.min_lr < 0:
        raise BadInput(f"learning rates must be positive, got --max_lr {args.max_lr:g}, --constant_lr "
                       f"{args.constant_lr:g}, --min_lr {args.min_lr:g} (only --min_lr may be 0)")
    if args.schedule == "infinite" and args.warmup + args.cooldown + args.anneal > args.max_steps:
        raise BadInput(f"--schedule infinite needs warmup + cooldown + anneal <= max_steps, got "
                       f"{args.warmup} + {args.cooldown} + {args.anneal} > {args.max_steps}; shorten them")
    if not 0 < args.val_fraction < 1:
        raise BadInput(f"--val_fraction must be in (0, 1), got {args.val_fraction}")
    return args, ckpt, resumed


def load_init(path):
    """The pretrained checkpoint, checked: it exists, it is a minipretrain checkpoint, and
    its weights fit its own model config."""
    if not os.path.exists(path):
        raise BadInput(f"no checkpoint at {path}; pass --init with the ckpt.pt of a pretrain.py run "
                       "(python pretrain.py --preset cpu --out_dir out/cpu writes out/cpu/ckpt.pt)")
    ckpt = pretrain.load_checkpoint(path)
    needed = ["model", "config", "args", "data", "step"]
    missing = [k for k in needed if k not in ckpt]
    missing += [f"args.{k}" for k in ("warmup", "max_steps", "batch_size", "grad_accum", "packing",
                                      "eval_batches", "seed") if k not in ckpt.get("args", {})]
    if missing:
        raise BadInput(f"{path} is not a pretrain.py checkpoint (no {', '.join(missing)}); "
                       "pass --init the ckpt.pt written by pretrain.py or cpt.py")
    try:
        GPT(GPTConfig(**ckpt["config"])).load_state_dict(ckpt["model"])
    except TypeError as e:
        raise BadInput(f"{path} has a model config this model.py does not know ({e}); "
                       "it was written by another version of minipretrain")
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise BadInput(f"{path}: the weights do not fit its model config {ckpt['config']} ({first[:150]}); "
                       "the checkpoint is damaged or was edited")
    if ckpt["step"] < ckpt["args"]["max_steps"]:
        print(f"note: {path} stopped at step {ckpt['step']} of {ckpt['args']['max_steps']}, before its LR "
              "had decayed; CPT starts from it anyway")
    return ckpt


def load_old_corpus(args, ckpt):
    """The corpus the checkpoint was pretrained on (recorded in it; --old_data overrides
    where to find it). Needed for replay; without replay, a missing one only costs the
    old-domain evaluation."""
    try:
        old = data.load_corpus(args.old_data, quiet=args.quiet)
    except BadInput as e:
        if args.replay > 0:
            raise BadInput(f"--replay {args.replay} needs the pretraining corpus '{args.old_data}' of {args.init}, "
                           f"which cannot be read ({e}); pass --old_data with where it is now, or --replay 0")
        print(f"warning: the pretraining corpus '{args.old_data}' cannot be read, so forgetting is not measured ({e})")
        return None
    if args.old_data == ckpt["data"]["source"] and not same_corpus(old.info, ckpt["data"]):
        print(f"warning: the pretraining corpus '{args.old_data}' changed since {args.init} was trained "
              f"({ckpt['data']['tokens']:,} tokens then, {old.info['tokens']:,} now); old-domain losses use today's")
    return old


def same_corpus(a, b):
    """Do two corpus.info dicts describe the same tokens? (fingerprint: files, sizes, times)"""
    return (a["tokens"] == b["tokens"] and a.get("fingerprint") == b.get("fingerprint")
            and [p.get("fingerprint") for p in a.get("parts", [])] == [p.get("fingerprint") for p in b.get("parts", [])])


def lr_schedule(args):
    """step -> learning rate for --schedule, always through pretrain.learning_rate (one
    schedule function for both scripts):

      rewarm-cosine  linear warmup from the LR pretraining ended with (--min_lr) back to
                     its peak (--max_lr), then cosine re-decay to --min_lr (Ibrahim et al.)
      constant       no rewarming: stay at --min_lr, where pretraining left the model
      infinite       rewarm, cosine cooldown to --constant_lr, hold it, and anneal to
                     --min_lr over the last --anneal steps (warmup-stable-decay)"""
    if args.schedule == "constant":
        return lambda step: pretrain.learning_rate(step, args.min_lr, args.min_lr, 0, args.max_steps, kind="constant")
    kind = "cosine" if args.schedule == "rewarm-cosine" else "infinite"
    return lambda step: pretrain.learning_rate(step, args.max_lr, args.min_lr, args.warmup, args.max_steps,
                                               start_lr=args.min_lr, kind=kind, constant_lr=args.constant_lr,
                                               cooldown=args.cooldown, anneal=args.anneal)


# -----------------------------------------------------------------------------
# Replay: a fixed share of every batch's rows from the old corpus

def replay_count(index, batch_size, replay):
    """How many of batch `index`'s rows come from the old corpus.

    With 8 rows and 5 % replay a batch "should" hold 0.4 old rows. Rounding per batch
    would give 0 every time; drawing each row at random is right only on average. Instead
    the fractional row is carried over from batch to batch, like Bresenham's line
    algorithm: batch i gets floor((i+1)·B·r) - floor(i·B·r) rows, i.e. floor(B·r) or
    ceil(B·r), so batches 2 and 4 of every 5 get one old row here. After N batches exactly
    floor(N·B·r) rows have been replayed: never a whole row away from N·B·r. It is a pure
    function of the index (and r is read as the nearest fraction with a small
    denominator, so 0.05 is exactly 1/20 and no float rounding creeps in), which is what
    makes a resumed run see exactly the batches it would have seen."""
    r = Fraction(replay).limit_denominator(10_000)
    return ((index + 1) * batch_size * r.numerator) // r.denominator - (index * batch_size * r.numerator) // r.denominator


def mixed_batch(index, new, new_rows, old, old_rows, args, docmask=True):
    """Batch `index`: batch_size - k rows of the new corpus, then k rows of the old one
    (k = replay_count). Each corpus is read as its own endless stream of rows, shuffled
    afresh every epoch (data.batch_rows), and the batch takes the next rows of each stream:
    no row is skipped or repeated within an epoch. With --replay 0 this is exactly
    data.get_batch. Shapes: (B, T) tensors as in data.rows_to_batch."""
    B = args.batch_size * args.world  # under torchrun: the global batch, of which this process takes a slice
    k = replay_count(index, B, args.replay) if old_rows else 0
    old_before = sum_replayed(index, B, args.replay) if old_rows else 0  # old rows used by batches 0..index-1
    new_before = index * B - old_before
    first, last = args.rank * args.batch_size, (args.rank + 1) * args.batch_size  # my rows of the global batch
    n_new = max(0, min(last, B - k) - first)  # the global batch is B - k new rows, then k old ones
    parts = []
    if n_new:
        parts.append(data.rows_to_batch(new, stream_rows(new_rows, new_before + first, n_new, args.seed),
                                        args.seq_len, docmask))
    if n_new < args.batch_size:
        start = max(first, B - k) - (B - k)
        parts.append(data.rows_to_batch(old, stream_rows(old_rows, old_before + start, args.batch_size - n_new,
                                                         args.seed + 1), args.seq_len, docmask))
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}  # (batch_size, T)


def sum_replayed(index, batch_size, replay):
    """Old rows in batches 0..index-1: the sum of replay_count, in closed form."""
    r = Fraction(replay).limit_denominator(10_000)
    return (index * batch_size * r.numerator) // r.denominator


def stream_rows(rows, start, count, seed):
    """Rows start..start+count-1 of the endless stream that visits every row once per epoch."""
    return [rows[data.batch_rows(len(rows), position, 1, seed)[0]] for position in range(start, start + count)]


# -----------------------------------------------------------------------------
# The experiment: one checkpoint, five ways to continue it

COMPARE = [  # (folder, label, flags)
    ("constant", "constant LR (no rewarm)", dict(schedule="constant", replay=0.0)),
    ("rewarm", "rewarm + cosine", dict(schedule="rewarm-cosine", replay=0.0)),
    ("rewarm_replay5", "rewarm + cosine, 5 % replay", dict(schedule="rewarm-cosine", replay=0.05)),
    ("rewarm_replay25", "rewarm + cosine, 25 % replay", dict(schedule="rewarm-cosine", replay=0.25)),
    ("infinite", "infinite (WSD)", dict(schedule="infinite", replay=0.0)),
]


def compare(args, bench_dir="bench"):
    """Run the five CPT recipes from one checkpoint on the same new-domain tokens, then
    plot old- and new-domain validation loss against CPT tokens (bench/cpt.png), final
    forgetting against final new-domain loss (bench/cpt_tradeoff.png), and write the
    numbers (bench/cpt.json, bench/cpt.md). --resume picks up an interrupted comparison."""
    if args.schedule is not None or args.replay is not None:
        raise BadInput("--compare sets --schedule and --replay itself; leave them out")
    base = args.out_dir or os.path.join("out", "cpt_compare")
    if not args.resume and os.path.isdir(base):
        shutil.rmtree(base)  # every number in bench/ comes from this one command
    t0 = time.time()
    results = []
    for folder, label, flags in COMPARE:
        run_args = copy.copy(args)
        run_args.out_dir = os.path.join(base, folder)
        run_args.resume = args.resume and os.path.exists(os.path.join(run_args.out_dir, "ckpt.pt"))
        run_args.sample_tokens = 0
        vars(run_args).update(flags)
        print(f"\n=== {label}")
        t_run = time.time()
        result = run(run_args)
        result.update(label=label, folder=folder, seconds=round(time.time() - t_run), args=vars(run_args))
        results.append(result)

    os.makedirs(bench_dir, exist_ok=True)
    new_name, old_name = results[0]["args"]["data"], results[0]["args"]["old_data"]
    plot_curves(results, os.path.join(bench_dir, "cpt.png"), new_name, old_name)
    summary = [dict(label=r["label"], folder=r["folder"], seconds=r["seconds"], **final_numbers(r)) for r in results]
    plot_tradeoff(summary, os.path.join(bench_dir, "cpt_tradeoff.png"), new_name, old_name)
    first = results[0]["args"]
    report = {
        "command": "python " + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "hardware": f"{torch.get_num_threads()} CPU threads, {cpu_name()}" if first["device"] == "cpu" else first["device"],
        "torch": torch.__version__, "minutes": round((time.time() - t0) / 60, 1),
        "init": first["init"], "new_domain": new_name, "old_domain": old_name,
        "steps": first["max_steps"], "tokens_per_step": first["batch_size"] * first["seq_len"] * first["grad_accum"],
        "max_lr": first["max_lr"], "min_lr": first["min_lr"], "warmup": first["warmup"],
        "constant_lr": first["constant_lr"], "cooldown": first["cooldown"], "anneal": first["anneal"],
        "runs": summary,
    }
    with open(os.path.join(bench_dir, "cpt.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(bench_dir, "cpt.md"), "w") as f:
        f.write(markdown_table(report))
    print("\n" + markdown_table(report))
    print(f"plots: {bench_dir}/cpt.png, {bench_dir}/cpt_tradeoff.png; numbers: {bench_dir}/cpt.json, {bench_dir}/cpt.md")


def final_numbers(result):
    """Old/new validation loss before and after, and the worst point in between: a rise
    above the starting loss early on is the stability gap."""
    evals = [r for r in result["log"] if "val_loss_new" in r]
    out = {"tokens": evals[-1]["tokens"], "new_before": result["init_eval"]["new"], "new_after": evals[-1]["val_loss_new"],
           "new_peak": max(r["val_loss_new"] for r in evals)}
    out["adaptation"] = out["new_before"] - out["new_after"]
    if "old" in result["init_eval"]:
        old = [r["val_loss_old"] for r in evals]
        out.update(old_before=result["init_eval"]["old"], old_after=old[-1], old_peak=max(old),
                   old_peak_step=evals[old.index(max(old))]["step"])
        out["forgetting"] = out["old_after"] - out["old_before"]
    return out


def markdown_table(report):
    lines = [f"CPT from `{report['init']}` ({report['old_domain']}) to `{report['new_domain']}`: "
             f"{report['steps']} steps x {report['tokens_per_step']:,} tokens; {report['hardware']}, "
             f"torch {report['torch']}, {report['minutes']} min in all. Command: `{report['command']}`",
             "", "| run | old loss: before -> peak (step) -> after | forgetting | new loss: before -> after | "
             "adaptation | minutes |", "| --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        old = (f"{r['old_before']:.3f} -> {r['old_peak']:.3f} ({r['old_peak_step']}) -> {r['old_after']:.3f}"
               if "old_before" in r else "n/a")
        forgetting = f"{r['forgetting']:+.3f}" if "forgetting" in r else "n/a"
        lines.append(f"| {r['label']} | {old} | {forgetting} | {r['new_before']:.3f} -> {r['new_after']:.3f} | "
                     f"{r['adaptation']:.3f} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# -----------------------------------------------------------------------------
# Plots

def plot_curves(results, path, new_name, old_name):
    """Two panels, old domain (forgetting) and new domain (adaptation): validation loss
    against CPT tokens, one line per run, starting at the pretrained model (0 tokens)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for result in results:
        evals = [r for r in result["log"] if "val_loss_new" in r]
        for ax, domain in zip(axes, ("old", "new")):
            if domain not in result["init_eval"]:
                continue
            ax.plot([0] + [r["tokens"] for r in evals],
                    [result["init_eval"][domain]] + [r[f"val_loss_{domain}"] for r in evals],
                    "o-", ms=3, lw=1.5, label=result["label"])
    for ax, domain, title in zip(axes, ("old", "new"), (f"old domain ({old_name}): forgetting",
                                                      f"new domain ({new_name}): adaptation")):
        if domain in results[0]["init_eval"]:  # the pretrained model: above this line = worse than before
            ax.axhline(results[0]["init_eval"][domain], ls=":", c="gray", lw=1)
        ax.set_title(title)
        ax.set_xlabel("CPT tokens")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tradeoff(summary, path, new_name, old_name):
    """Where each run ends: forgetting (old-domain loss increase) against new-domain loss.
    Down and to the left is better on both."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(summary):
        if "forgetting" in r:
            ax.scatter(r["forgetting"], r["new_after"], s=40)
            ax.annotate(r["label"], (r["forgetting"], r["new_after"]), fontsize=8,
                        xytext=(6, 6 if i % 2 else -12), textcoords="offset points")  # alternate: less overlap
    ax.set_xlabel(f"forgetting: increase of {old_name} validation loss (nats)")
    ax.set_ylabel(f"{new_name} validation loss after CPT (nats)")
    ax.set_title("forgetting vs adaptation (lower left is better)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.35, y=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Command line

def build_parser():
    p = argparse.ArgumentParser(description="Continue pretraining a checkpoint on new data. "
                                "Flags left unset come from the checkpoint (or, with --resume, from the CPT run).")
    p.add_argument("--init", help=f"the pretrained checkpoint to start from (default {DEFAULT_INIT})")
    p.add_argument("--data", help=f"the new domain: {data.SOURCES_HELP} (default pydoc)")
    p.add_argument("--old_data", help="the pretraining corpus, for replay and forgetting (default: the source "
                   "recorded in the checkpoint)")
    p.add_argument("--out_dir", help="where checkpoints, logs and plots go (default out/cpt; out/cpt_compare with --compare)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--resume", action="store_true", help="continue the CPT run in --out_dir from its checkpoint")
    p.add_argument("--replay", type=float, help="fraction of each batch's rows from the pretraining corpus, in [0, 1) (default 0)")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule (default rewarm-cosine)")
    p.add_argument("--keep_optimizer", action="store_true", default=None,
                   help="reuse the checkpoint's AdamW moments (default: fresh ones)")
    p.add_argument("--max_lr", type=float, help="peak LR after rewarming (default: pretraining's peak)")
    p.add_argument("--min_lr", type=float, help="LR to rewarm from and decay to (default: pretraining's final LR)")
    p.add_argument("--warmup", type=int, help="rewarming steps (default: pretraining's warmup)")
    p.add_argument("--constant_lr", type=float, help="infinite schedule: the constant LR (default sqrt(max_lr * min_lr))")
    p.add_argument("--cooldown", type=int, help="infinite schedule: steps from max_lr to constant_lr (default max_steps / 5)")
    p.add_argument("--anneal", type=int, help="infinite schedule: final steps from constant_lr to min_lr (default max_steps / 10)")
    p.add_argument("--max_steps", type=int, help="CPT steps (default: a quarter of pretraining's)")
    p.add_argument("--batch_size", type=int, help="rows per micro-step (default: pretraining's)")
    p.add_argument("--grad_accum", type=int, help="micro-steps per optimizer step (default: pretraining's)")
    p.add_argument("--packing", choices=data.PACKINGS, help="how documents are laid into rows (default: pretraining's)")
    p.add_argument("--val_fraction", type=float, help="share of new-domain documents held out (default 0.2)")
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--grad_clip", type=float, help="(default: pretraining's)")
    p.add_argument("--eval_interval", type=int, help="steps between evaluations (default max_steps / 10)")
    p.add_argument("--eval_batches", type=int, help="validation batches per domain (default: pretraining's)")
    p.add_argument("--log_interval", type=int, help="steps between log lines (default 10)")
    p.add_argument("--compile", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
    p.add_argument("--sample_tokens", type=int, help="tokens per sample at the end (default 200; 0: none)")
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--compare", action="store_true",
                   help="run the README experiment: constant LR, rewarm, rewarm + 5 %% and 25 %% replay, infinite")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        compare(args) if args.compare else run(args)
    except BadInput as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
