"""
Continued pretraining (CPT): keep training a pretrained model on a new domain, and watch
what it learns there and what it forgets of the old one.

    python cpt.py --init out/cpu/ckpt.pt --data pydoc               # rewarm + re-decay the LR
    python cpt.py --init out/cpu/ckpt.pt --data pydoc --replay 0.05 # 5 % of rows from the old corpus
    python cpt.py --schedule infinite                                # warmup, cooldown, constant, anneal
    python cpt.py --resume --out_dir out/cpt                         # continue an interrupted run exactly

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

Read top-down: run() feeds pretrain.fit(), the loop pretrain.py uses; settings() inherits
the pretrained recipe; lr_schedule(); the replay. Experiment: bench/cpt.py; machinery: harness.py.
"""

import argparse
import math
import os
from fractions import Fraction

import torch

import data
import harness
import pretrain
from model import BadInput

DEFAULT_INIT = os.path.join("out", "cpu", "ckpt.pt")
SCHEDULES = ("rewarm-cosine", "constant", "infinite")
# Settings that do not come from the pretrained checkpoint (the others do, see settings()).
DEFAULTS = dict(data="pydoc", replay=0.0, schedule="rewarm-cosine", keep_optimizer=False, val_fraction=0.2,
                log_interval=10, sample_tokens=200, quiet=False)


def main(argv=None):
    harness.exit_with_one_line(run, build_parser().parse_args(argv))


def run(args):
    """Checkpoint -> model, both corpora -> mixed batches and two validation sets -> pretrain.fit()."""
    rank, world, device = harness.setup_distributed(harness.pick_device(args.device))
    run, init, model, resumed = settings(args, device)
    lock = harness.claim_out_dir(run.out_dir, rank, run.resume, run.overwrite_out_dir, run.init)  # noqa: F841 (held)
    torch.manual_seed(run.seed)

    # The new domain. pydoc has 79 documents: a 5 % split would hold out ~3 (4k tokens), too
    # few to tell runs apart, so CPT holds out --val_fraction (20 %: ~13, ~25k tokens) of it.
    new = harness.load_corpus_once(run.data, rank, world, run.quiet)
    new_train, new_val = data.split_documents(new, run.val_fraction)
    new_rows = data.pack_split(new, new_train, run.seq_len, run.packing)
    if harness.same_corpus(new.info, init["data"]):
        print(f"warning: --data {run.data} is the corpus {run.init} was pretrained on; "
              "this is more pretraining, not a new domain")
    # Validation: pretrain.py's own held-out rows, so "old, before CPT" is exactly the loss
    # pretraining ended with. "new" first: fit() also logs the first set as plain val_loss.
    eval_sets = pretrain.validation_sets({"new": new}, new_val, run.seq_len, run.batch_size, run.eval_batches)
    # The old domain, to replay and to measure forgetting on. Replayed rows are its training
    # documents, packed like the new ones; its validation documents are pretrain.py's.
    old, old_rows = load_old_corpus(run, init), None
    if old is not None:
        old_train, old_val = data.split_documents(old)
        eval_sets.update(pretrain.validation_sets({"old": old}, old_val, run.seq_len, run.batch_size, run.eval_batches))
        if run.replay > 0:
            old_rows = data.pack_split(old, old_train, run.seq_len, run.packing)

    model.attn_backend = run.attn_backend
    # Fresh AdamW moments by default, as in the papers: the old ones describe gradients of
    # the old data at a tiny LR. --keep_optimizer carries them over instead.
    optimizer = pretrain.make_optimizer(model, run.max_lr, run.weight_decay, device)
    if run.keep_optimizer:
        try:
            optimizer.load_state_dict(init["optimizer"])
        except (KeyError, ValueError) as e:
            raise BadInput(f"--keep_optimizer: {run.init} has no usable optimizer state ({e}); drop --keep_optimizer")
    loop = pretrain.Loop.of(run, device, rank, world)
    if resumed:
        start_step = harness.restore(resumed, model, optimizer, new, world, loop.scaler)
        init_eval = resumed["init_eval"]
    else:  # step 0 = the pretrained model, where every curve starts
        start_step = 0
        init_eval = {name: pretrain.evaluate(model, batches, device, run.dtype) for name, batches in eval_sets.items()}
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
    pretrain.fit(model, optimizer, next_batch, lr_at, eval_sets, loop, start_step, record)
    if rank == 0:
        harness.plot_losses(run.out_dir)
        harness.plot_lr(run.out_dir, lr_at, run.max_steps, title=f"--schedule {run.schedule}")
        harness.write_samples(model, run.out_dir, device, ["", "The ", "def "], run.sample_tokens, run.seed)


def settings(args, device):
    """(run, the pretrained checkpoint, its model, the CPT checkpoint to resume or None). On
    --resume the settings are this run's own checkpoint's, so `python cpt.py --resume
    --out_dir X` needs nothing else (flags you do pass must agree with it). Otherwise CPT
    continues the pretrained recipe (batch size, packing, peak and final LR, warmup)."""
    run = argparse.Namespace(**vars(args))
    run.out_dir = args.out_dir or os.path.join("out", "cpt")
    resumed = None
    if args.resume:
        resumed = harness.load_checkpoint(os.path.join(run.out_dir, "ckpt.pt"))
        harness.inherit(run, resumed.get("args", {}), os.path.join(run.out_dir, "ckpt.pt"),
                        skip=("resume", "overwrite_out_dir", "device", "out_dir"))
    run.init = os.path.normpath(run.init or DEFAULT_INIT)
    init, model = load_init(run.init, device)

    trained = init["args"]
    peak = trained.get("lr", trained.get("max_lr"))  # a pretrain.py or a cpt.py checkpoint
    final = peak * trained["min_lr_ratio"] if "min_lr_ratio" in trained else trained["min_lr"]
    # The pretrained recipe, where CPT does not change it (.get: settings older checkpoints lack)
    recipe = {key: trained[key] for key in ("warmup", "batch_size", "grad_accum", "packing", "eval_batches", "seed")}
    recipe.update(weight_decay=trained.get("weight_decay", 0.1), grad_clip=trained.get("grad_clip", 1.0),
                  compile=trained.get("compile", False), attn_backend=trained.get("attn_backend", "auto"),
                  dtype=trained.get("dtype", "auto"))
    harness.fill_unset(run, {**DEFAULTS, **recipe, "old_data": init["data"]["source"], "max_lr": peak,
                             "min_lr": final, "max_steps": max(1, trained["max_steps"] // 4)})
    run.seq_len = init["config"]["block_size"]
    # Evaluations are dense: the stability gap comes early. The infinite schedule's shape is
    # Ibrahim et al.'s; its lengths and constant LR (half way between peak and final on a log
    # scale) are our choice.
    harness.fill_unset(run, dict(eval_interval=max(1, run.max_steps // 10), cooldown=run.max_steps // 5,
                                 anneal=run.max_steps // 10, constant_lr=math.sqrt(run.max_lr * run.min_lr)))
    if run.schedule == "infinite" and run.warmup + run.cooldown + run.anneal > run.max_steps:
        raise BadInput(f"--schedule infinite needs warmup + cooldown + anneal <= max_steps, got "
                       f"{run.warmup} + {run.cooldown} + {run.anneal} > {run.max_steps}; shorten them")
    if run.schedule == "infinite" and run.constant_lr <= 0:
        raise BadInput("--schedule infinite needs a positive --constant_lr (sqrt(max_lr * min_lr) is 0 when "
                       "--min_lr is 0); pass --constant_lr")
    harness.check_attention_backend(run.attn_backend, device, run.dtype, model.config.n_embd // model.config.n_head)
    return run, init, model, resumed


def load_init(path, device):
    """(checkpoint, model): the pretrained checkpoint, checked, and its model."""
    if not os.path.exists(path):
        raise BadInput(f"no checkpoint at {path}; pass --init with the ckpt.pt of a pretrain.py run "
                       "(python pretrain.py --preset cpu --out_dir out/cpu writes out/cpu/ckpt.pt)")
    ckpt = harness.load_checkpoint(path)
    missing = [k for k in ("model", "config", "args", "data", "step") if k not in ckpt]
    missing += [f"args.{k}" for k in ("warmup", "max_steps", "batch_size", "grad_accum", "packing",
                                      "eval_batches", "seed") if k not in ckpt.get("args", {})]
    if missing:
        raise BadInput(f"{path} is not a pretrain.py checkpoint (no {', '.join(missing)}); "
                       "pass --init the ckpt.pt written by pretrain.py or cpt.py")
    model = harness.load_model(path, device, ckpt)
    if ckpt["step"] < ckpt["args"]["max_steps"]:
        print(f"note: {path} stopped at step {ckpt['step']} of {ckpt['args']['max_steps']}, before its LR "
              "had decayed; CPT starts from it anyway")
    return ckpt, model


def load_old_corpus(run, ckpt):
    """The corpus the checkpoint was pretrained on (--old_data: where it is now). Replay needs
    it; without replay, a missing one only costs the old-domain evaluation."""
    try:
        old = data.load_corpus(run.old_data, quiet=run.quiet)
    except BadInput as e:
        if run.replay > 0:
            raise BadInput(f"--replay {run.replay} needs the pretraining corpus '{run.old_data}' of {run.init}, "
                           f"which cannot be read ({e}); pass --old_data with where it is now, or --replay 0")
        print(f"warning: the pretraining corpus '{run.old_data}' cannot be read, so forgetting is not measured ({e})")
        return None
    if run.old_data == ckpt["data"]["source"] and not harness.same_corpus(old.info, ckpt["data"]):
        print(f"warning: the pretraining corpus '{run.old_data}' changed since {run.init} was trained "
              f"({ckpt['data']['tokens']:,} tokens then, {old.info['tokens']:,} now); old-domain losses use today's")
    return old


def lr_schedule(schedule, max_lr, min_lr, warmup, max_steps, constant_lr=None, cooldown=0, anneal=0):
    """step -> learning rate for --schedule, through pretrain.learning_rate like pretrain.py's:

      rewarm-cosine  linear warmup from the LR pretraining ended with (--min_lr) back to
                     its peak (--max_lr), then cosine re-decay to --min_lr (Ibrahim et al.)
      constant       no rewarming: stay at --min_lr, where pretraining left the model
      infinite       rewarm, cosine cooldown to --constant_lr, hold it, and anneal to
                     --min_lr over the last --anneal steps (warmup-stable-decay)"""
    # exercise 9 begins: rewarming, the schedule
    if schedule == "constant":
        return lambda step: pretrain.learning_rate(step, min_lr, min_lr, 0, max_steps, kind="constant")
    kind = "cosine" if schedule == "rewarm-cosine" else "infinite"
    return lambda step: pretrain.learning_rate(step, max_lr, min_lr, warmup, max_steps, start_lr=min_lr, kind=kind,
                                               constant_lr=constant_lr, cooldown=cooldown, anneal=anneal)
    # exercise 9 ends


# -----------------------------------------------------------------------------
# Replay: a fixed share of every batch's rows from the old corpus

def sum_replayed(index, batch_size, replay):
    """How many old rows batches 0..index-1 hold together: floor(index·B·r).

    With 8 rows and 5 % replay a batch "should" hold 0.4 old rows. Rounding per batch
    would give 0 every time; drawing each row at random is right only on average. Instead
    the fractional row is carried from batch to batch, like Bresenham's line algorithm:
    after N batches exactly floor(N·B·r) rows were replayed, never a whole row from N·B·r.
    It is a pure function of the index (r read as a fraction, so 0.05 is exactly 1/20),
    so a resumed run sees exactly the batches it would have seen."""
    # exercise 8 begins: how many rows to replay
    r = Fraction(replay).limit_denominator(10_000)
    return (index * batch_size * r.numerator) // r.denominator
    # exercise 8 ends


def replay_count(index, batch_size, replay):
    """How many of batch `index`'s rows come from the old corpus."""
    return sum_replayed(index + 1, batch_size, replay) - sum_replayed(index, batch_size, replay)


def mixed_batch(index, new, new_rows, old, old_rows, batch_size, replay, seq_len, seed, docmask=True, rank=0, world=1):
    """Batch `index`: batch_size - k rows of the new corpus, then k rows of the old one
    (k = replay_count), each the next rows of its corpus's own endless stream, shuffled
    afresh every epoch (data.batch_rows): no row is skipped or repeated within an epoch.
    With --replay 0 this is exactly data.get_batch. (B, T) tensors, as data.rows_to_batch."""
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


def stream_rows(rows, start, count, seed):
    """Rows start..start+count-1 of the endless stream that visits every row once per epoch."""
    return [rows[data.batch_rows(len(rows), position, 1, seed)[0]] for position in range(start, start + count)]


# -----------------------------------------------------------------------------
# Command line

def build_parser():
    p = harness.Parser(description="Continue pretraining a checkpoint on new data. "
                                "Flags left unset come from the checkpoint (or, with --resume, from the CPT run).")
    p.add_argument("--init", help=f"the pretrained checkpoint to start from (default {DEFAULT_INIT})")
    harness.add_flags(p, harness.SHARED_FLAGS + [
        ("old_data", str, "the pretraining corpus, for replay and forgetting"),
        ("replay", harness.SHARE, "fraction of each batch's rows from the pretraining corpus, in [0, 1)"),
        ("schedule", SCHEDULES, "learning-rate schedule"),
        ("keep_optimizer", "store_true", "reuse the checkpoint's AdamW moments (default: fresh ones)"),
        ("max_lr", harness.POSITIVE, "peak LR after rewarming"),
        ("min_lr", harness.NON_NEGATIVE, "LR to rewarm from and decay to"),
        ("constant_lr", harness.POSITIVE, "infinite schedule: the constant LR"),
        ("cooldown", harness.AT_LEAST_0, "infinite schedule: steps from max_lr to constant_lr"),
        ("anneal", harness.AT_LEAST_0, "infinite schedule: final steps from constant_lr to min_lr"),
        ("val_fraction", harness.OPEN_SHARE, "share of new-domain documents held out"),
    ], lambda flag: {**DEFAULTS, "out_dir": "out/cpt", "device": "auto", "max_steps": "a quarter of pretraining's",
                     "old_data": "the source recorded in the checkpoint", "constant_lr": "sqrt(max_lr * min_lr)",
                     "cooldown": "max_steps / 5", "anneal": "max_steps / 10", "eval_interval": "max_steps / 10"
                     }.get(flag, "pretraining's"))
    return p

if __name__ == "__main__":
    main()
