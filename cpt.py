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
pretrain.fit() (the same loop pretrain.py uses); settings() inherits the pretrained
recipe; the schedules; mixed_batch() and replay_count() are the replay; the command line.
The experiment that compares the recipes is bench/cpt.py.
"""

import argparse
import json
import math
import os
import sys
from fractions import Fraction

import torch

import data
import pretrain
from model import GPT, GPTConfig, BadInput

DEFAULT_INIT = os.path.join("out", "cpu", "ckpt.pt")
SCHEDULES = ("rewarm-cosine", "constant", "infinite")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except BadInput as e:
        sys.exit(f"error: {e}")
    except pretrain.Interrupted as e:
        sys.exit(str(e))


def run(args):
    """cpt.py's whole run: checkpoint -> model, both corpora -> mixed batches and two
    validation sets, schedule -> pretrain.fit(), then plots and samples. Returns the
    losses before CPT and the log, for bench/cpt.py."""
    rank, world, device = pretrain.setup_distributed(pretrain.pick_device(args.device))
    run, init, resumed = settings(args)
    if device == "cpu":
        pretrain.keep_freed_memory()
    lock = pretrain.lock_out_dir(run.out_dir) if rank == 0 else None  # noqa: F841 (held until run() ends)
    torch.manual_seed(run.seed)

    # The new domain. pydoc has only 79 documents: the usual 5 % validation split would be
    # ~3 documents (4k tokens), too few to tell runs apart, so CPT holds out --val_fraction
    # (20 %: ~13 documents, ~25k tokens) of the new corpus.
    new = data.load_corpus(run.data, quiet=run.quiet)
    new_train, new_val = data.split_documents(new, run.val_fraction)
    new_rows = data.pack_split(new, new_train, run.seq_len, run.packing)
    if same_corpus(new.info, init["data"]):
        print(f"warning: --data {run.data} is the corpus {run.init} was pretrained on; "
              "this is more pretraining, not a new domain")
    # The old domain, for replay and to measure forgetting. Its validation documents are
    # the ones pretrain.py held out (the same default split), so they were never trained on.
    old = load_old_corpus(run, init)
    old_rows = None  # replayed rows: the old corpus's training documents, packed like the new ones
    if old is not None:
        old_train, old_val = data.split_documents(old)
        if run.replay > 0:
            old_rows = data.pack_split(old, old_train, run.seq_len, run.packing)

    model = GPT(GPTConfig(**init["config"])).to(device)
    model.load_state_dict(init["model"])
    model.attn_backend = run.attn_backend
    # Fresh AdamW moments by default, as in the papers: the old ones describe gradients of
    # the old data at a tiny LR. --keep_optimizer carries them over instead.
    optimizer = pretrain.make_optimizer(model, run.max_lr, run.weight_decay, device)
    if run.keep_optimizer:
        try:
            optimizer.load_state_dict(init["optimizer"])
        except (KeyError, ValueError) as e:
            raise BadInput(f"--keep_optimizer: {run.init} has no usable optimizer state ({e}); drop --keep_optimizer")

    # Validation: pretrain.py's own held-out rows, so "old, before CPT" is exactly the loss
    # pretraining ended with. "new" first: fit() also logs the first set as plain val_loss.
    eval_sets = pretrain.validation_sets(new, new_val, "new", run.seq_len, run.batch_size, run.eval_batches)
    if old is not None:
        eval_sets.update(pretrain.validation_sets(old, old_val, "old", run.seq_len, run.batch_size, run.eval_batches))
    if resumed:
        start_step = pretrain.restore(resumed, model, optimizer, new, world)
        init_eval = resumed["init_eval"]
    else:  # step 0 = the pretrained model, where every curve starts
        start_step = 0
        init_eval = {name: pretrain.evaluate(model, batches, device) for name, batches in eval_sets.items()}
    print(f"before CPT (step {init['step']} of {run.init}): " + ", ".join(f"val {k} {v:.3f}" for k, v in init_eval.items()))

    docmask = data.masks_documents(run.packing)
    def next_batch(index):
        return mixed_batch(index, new, new_rows, old, old_rows, run.batch_size, run.replay, run.seq_len,
                           run.seed, docmask, rank, world)
    lr_at = lr_schedule(run.schedule, run.max_lr, run.min_lr, run.warmup, run.max_steps,
                        run.constant_lr, run.cooldown, run.anneal)
    print(f"CPT on {run.data}: {len(new_train)} train / {len(new_val)} val documents, {len(new_rows)} rows; "
          f"schedule {run.schedule}, lr {lr_at(0):.2e} -> {max(map(lr_at, range(run.max_steps))):.2e} -> "
          f"{lr_at(run.max_steps - 1):.2e}; replay {run.replay:.0%} of rows from {run.old_data}; "
          f"{run.max_steps} steps of {run.batch_size * run.seq_len * run.grad_accum:,} tokens")

    record = {"args": {**vars(run), "world": world}, "data": new.info, "old_data": old.info if old is not None else None,
              "init": {"path": run.init, "step": init["step"], "data": init["data"]["source"]}, "init_eval": init_eval}
    if rank == 0:
        with open(os.path.join(run.out_dir, "run.json"), "w") as f:
            json.dump(record, f, indent=1)
    loop = pretrain.Loop(out_dir=run.out_dir, max_steps=run.max_steps, grad_accum=run.grad_accum,
                         grad_clip=run.grad_clip, eval_interval=run.eval_interval, log_interval=run.log_interval,
                         device=device, rank=rank, world=world, compile=run.compile, quiet=run.quiet)
    pretrain.fit(model, optimizer, next_batch, lr_at, eval_sets, loop, start_step, record)
    if rank > 0:
        return None  # plots and samples come from process 0
    pretrain.plot_losses(run.out_dir)
    pretrain.plot_lr(run.out_dir, lr_at, run.max_steps, title=f"--schedule {run.schedule}")
    pretrain.write_samples(model, run.out_dir, device, ["", "The ", "def "], run.sample_tokens, run.seed)
    return {"init_eval": init_eval, "log": pretrain.read_log(os.path.join(run.out_dir, "log.jsonl"))}


def settings(args):
    """(run, the pretrained checkpoint, the CPT checkpoint to resume or None). On --resume
    the settings are this run's own checkpoint's, so `python cpt.py --resume --out_dir X`
    needs nothing else (flags you do pass must agree with it). Otherwise CPT continues the
    pretrained recipe (batch size, packing, peak and final LR, warmup), then the defaults."""
    run = argparse.Namespace(**vars(args))
    run.out_dir = args.out_dir or os.path.join("out", "cpt")
    resumed = None
    if args.resume:
        resumed = pretrain.load_checkpoint(os.path.join(run.out_dir, "ckpt.pt"))
        pretrain.inherit(run, resumed.get("args", {}), os.path.join(run.out_dir, "ckpt.pt"), skip=("resume", "device", "out_dir"))
    if run.replay is not None and not 0 <= run.replay < 1:  # before anything is loaded
        raise BadInput(f"--replay must be in [0, 1): the fraction of each batch's rows taken from the "
                       f"pretraining corpus (e.g. 0.05); got {run.replay}")
    run.init = os.path.normpath(run.init or DEFAULT_INIT)
    init = load_init(run.init)

    trained = init["args"]
    peak = trained.get("lr", trained.get("max_lr"))  # a pretrain.py or a cpt.py checkpoint
    final = peak * trained["min_lr_ratio"] if "min_lr_ratio" in trained else trained["min_lr"]
    defaults = dict(data="pydoc", old_data=init["data"]["source"], replay=0.0, schedule="rewarm-cosine",
                    keep_optimizer=False, max_lr=peak, min_lr=final, warmup=trained["warmup"],
                    max_steps=max(1, trained["max_steps"] // 4), batch_size=trained["batch_size"],
                    grad_accum=trained["grad_accum"], packing=trained["packing"],
                    weight_decay=trained.get("weight_decay", 0.1), grad_clip=trained.get("grad_clip", 1.0),
                    eval_batches=trained["eval_batches"], log_interval=10, sample_tokens=200,
                    compile=trained.get("compile", False), seed=trained["seed"], val_fraction=0.2,
                    attn_backend=trained.get("attn_backend", "auto"), quiet=False)
    for key, value in defaults.items():
        if getattr(run, key) is None:
            setattr(run, key, value)
    run.seq_len = init["config"]["block_size"]
    if run.eval_interval is None:
        run.eval_interval = max(1, run.max_steps // 10)  # dense: the stability gap is early
    # The infinite schedule's phases. The shape is Ibrahim et al.'s; the lengths and the
    # constant LR (half way between peak and final on a log scale) are our choice.
    if run.constant_lr is None:
        run.constant_lr = math.sqrt(run.max_lr * run.min_lr)
    if run.cooldown is None:
        run.cooldown = run.max_steps // 5
    if run.anneal is None:
        run.anneal = run.max_steps // 10
    check(run)
    pretrain.check_out_dir(run.out_dir)
    return run, init, resumed


def check(run):
    """One line for the first flag that makes no sense, naming it."""
    pretrain.check_rules(run)
    if run.max_steps < 1 or run.warmup < 0 or run.cooldown < 0 or run.anneal < 0:
        raise BadInput("--max_steps must be positive and --warmup, --cooldown, --anneal not negative")
    if min(run.max_lr, run.constant_lr) <= 0 or run.min_lr < 0:
        raise BadInput(f"learning rates must be positive, got --max_lr {run.max_lr:g}, --constant_lr "
                       f"{run.constant_lr:g}, --min_lr {run.min_lr:g} (only --min_lr may be 0)")
    if run.schedule == "infinite" and run.warmup + run.cooldown + run.anneal > run.max_steps:
        raise BadInput(f"--schedule infinite needs warmup + cooldown + anneal <= max_steps, got "
                       f"{run.warmup} + {run.cooldown} + {run.anneal} > {run.max_steps}; shorten them")
    if not 0 < run.val_fraction < 1:
        raise BadInput(f"--val_fraction must be in (0, 1), got {run.val_fraction}")


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


def load_old_corpus(run, ckpt):
    """The corpus the checkpoint was pretrained on (recorded in it; --old_data overrides
    where to find it). Needed for replay; without replay, a missing one only costs the
    old-domain evaluation."""
    try:
        old = data.load_corpus(run.old_data, quiet=run.quiet)
    except BadInput as e:
        if run.replay > 0:
            raise BadInput(f"--replay {run.replay} needs the pretraining corpus '{run.old_data}' of {run.init}, "
                           f"which cannot be read ({e}); pass --old_data with where it is now, or --replay 0")
        print(f"warning: the pretraining corpus '{run.old_data}' cannot be read, so forgetting is not measured ({e})")
        return None
    if run.old_data == ckpt["data"]["source"] and not same_corpus(old.info, ckpt["data"]):
        print(f"warning: the pretraining corpus '{run.old_data}' changed since {run.init} was trained "
              f"({ckpt['data']['tokens']:,} tokens then, {old.info['tokens']:,} now); old-domain losses use today's")
    return old


def same_corpus(a, b):
    """Do two corpus.info dicts describe the same tokens? (fingerprint: files, sizes, times)"""
    return (a["tokens"] == b["tokens"] and a.get("fingerprint") == b.get("fingerprint")
            and [p.get("fingerprint") for p in a.get("parts", [])] == [p.get("fingerprint") for p in b.get("parts", [])])


def lr_schedule(schedule, max_lr, min_lr, warmup, max_steps, constant_lr=None, cooldown=0, anneal=0):
    """step -> learning rate for --schedule, always through pretrain.learning_rate (one
    schedule function for both scripts):

      rewarm-cosine  linear warmup from the LR pretraining ended with (--min_lr) back to
                     its peak (--max_lr), then cosine re-decay to --min_lr (Ibrahim et al.)
      constant       no rewarming: stay at --min_lr, where pretraining left the model
      infinite       rewarm, cosine cooldown to --constant_lr, hold it, and anneal to
                     --min_lr over the last --anneal steps (warmup-stable-decay)"""
    if schedule == "constant":
        return lambda step: pretrain.learning_rate(step, min_lr, min_lr, 0, max_steps, kind="constant")
    kind = "cosine" if schedule == "rewarm-cosine" else "infinite"
    return lambda step: pretrain.learning_rate(step, max_lr, min_lr, warmup, max_steps, start_lr=min_lr, kind=kind,
                                               constant_lr=constant_lr, cooldown=cooldown, anneal=anneal)


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


def mixed_batch(index, new, new_rows, old, old_rows, batch_size, replay, seq_len, seed, docmask=True, rank=0, world=1):
    """Batch `index`: batch_size - k rows of the new corpus, then k rows of the old one
    (k = replay_count). Each corpus is read as its own endless stream of rows, shuffled
    afresh every epoch (data.batch_rows), and the batch takes the next rows of each stream:
    no row is skipped or repeated within an epoch. With --replay 0 this is exactly
    data.get_batch. Shapes: (B, T) tensors as in data.rows_to_batch."""
    B = batch_size * world  # under torchrun: the global batch, of which this process takes a slice
    k = replay_count(index, B, replay) if old_rows else 0
    old_before = sum_replayed(index, B, replay) if old_rows else 0  # old rows used by batches 0..index-1
    new_before = index * B - old_before
    first, last = rank * batch_size, (rank + 1) * batch_size  # my rows of the global batch
    n_new = max(0, min(last, B - k) - first)  # the global batch is B - k new rows, then k old ones
    parts = []
    if n_new:
        parts.append(data.rows_to_batch(new, stream_rows(new_rows, new_before + first, n_new, seed),
                                        seq_len, docmask))
    if n_new < batch_size:
        start = max(first, B - k) - (B - k)
        parts.append(data.rows_to_batch(old, stream_rows(old_rows, old_before + start, batch_size - n_new,
                                                         seed + 1), seq_len, docmask))
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}  # (batch_size, T)


def sum_replayed(index, batch_size, replay):
    """Old rows in batches 0..index-1: the sum of replay_count, in closed form."""
    r = Fraction(replay).limit_denominator(10_000)
    return (index * batch_size * r.numerator) // r.denominator


def stream_rows(rows, start, count, seed):
    """Rows start..start+count-1 of the endless stream that visits every row once per epoch."""
    return [rows[data.batch_rows(len(rows), position, 1, seed)[0]] for position in range(start, start + count)]


# -----------------------------------------------------------------------------
# Command line

def build_parser():
    p = pretrain.Parser(description="Continue pretraining a checkpoint on new data. "
                                "Flags left unset come from the checkpoint (or, with --resume, from the CPT run).")
    p.add_argument("--init", help=f"the pretrained checkpoint to start from (default {DEFAULT_INIT})")
    p.add_argument("--data", help=f"the new domain: {data.SOURCES_HELP} (default pydoc)")
    p.add_argument("--old_data", help="the pretraining corpus, for replay and forgetting (default: the source "
                   "recorded in the checkpoint)")
    p.add_argument("--out_dir", help="where checkpoints, logs and plots go (default out/cpt)")
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
    p.add_argument("--packing", choices=data.PACKINGS, help="how documents are laid into rows (default: pretraining's)")
    p.add_argument("--val_fraction", type=float, help="share of new-domain documents held out (default 0.2)")
    pretrain.add_shared_flags(p, lambda flag: {"eval_interval": "max_steps / 10", "log_interval": 10,
                                               "sample_tokens": 200}.get(flag, "pretraining's"))
    return p


if __name__ == "__main__":
    main()
