"""Continued pretraining: forgetting against adaptation, for the recipes the papers compare,
and the two controls they measure them against: 2 pretraining runs, 16 CPT runs and 2
union runs of the cpu model.

    python bench/cpt.py                  # -> bench/cpt.md, cpt.png, cpt_tradeoff.png

Pretraining: the cpu preset on stdlib for 200 steps, once with cosine and once with wsd.
Then --steps CPT steps on pydoc for every row below, two seeds each (the seed sets the
order of the CPT data). The union control trains from scratch on both corpora, with the
same tokens of each as pretraining + CPT."""

import argparse
import os

import numpy as np
import torch

from common import BENCH, ROOT, SEEDS, band, evals, hardware, save, spread, train
import pretrain
from model import GPT, GPTConfig

PEAK, STEPS = pretrain.PRESETS["cpu"]["lr"], 200  # pretraining: half the cpu preset, to fit the CPU budget
# label: (the pretrained model to start from, cpt.py flags)
ROWS = {
    "constant LR (no rewarm)": ("cosine", ["--schedule", "constant"]),
    "rewarm + cosine": ("cosine", ["--schedule", "rewarm-cosine"]),
    "rewarm + cosine, 5 % replay": ("cosine", ["--replay", 0.05]),
    "rewarm + cosine, 25 % replay": ("cosine", ["--replay", 0.25]),
    "infinite schedule": ("cosine", ["--schedule", "infinite"]),
    "same data: rewarm + cosine on stdlib": ("cosine", ["--data", "stdlib"]),
    "wsd, decayed, then rewarm + cosine": ("wsd", []),
    "wsd, stable phase, no rewarm, decay at the end": ("wsd-stable", ["--schedule", "infinite", "--warmup", 0,
                                                       "--cooldown", 0, "--constant_lr", PEAK]),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="CPT steps per run")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    seeds = SEEDS[:args.seeds]
    base = {kind: train("pretrain.py", f"out/cpt/pretrain{STEPS}_{kind}", ["--preset", "cpu", "--device", "cpu",
                                                                    "--schedule", kind, "--sample_tokens", 0], STEPS)
            for kind in ("cosine", "wsd")}
    stable = pretrain.decay_start(STEPS, pretrain.DEFAULTS["decay_frac"])
    inits = {"cosine": f"{base['cosine']}/ckpt.pt", "wsd": f"{base['wsd']}/ckpt.pt", "wsd-stable": f"{base['wsd']}/ckpt_{stable}.pt"}
    # Rewarming over 10 % of the CPT steps (the papers use ~1 % of far longer runs; 1 % of 50 steps is none).
    common = ["--device", "cpu", "--sample_tokens", 0, "--eval_batches", 4, "--eval_interval", max(1, args.steps // 5),
              "--warmup", max(1, args.steps // 10)]
    decay = ["--anneal", args.steps // 5]  # the stable-phase row decays over its last 20 %, as its pretraining would have
    runs = {label: [train("cpt.py", f"out/cpt/{i}@{seed}", ["--init", inits[start], "--seed", seed, *common, *flags,
                                                           *(decay if start == "wsd-stable" else [])],
                          args.steps) for seed in seeds] for i, (label, (start, flags)) in enumerate(ROWS.items())}
    # The union control: as many steps as both, 200 + 50, with 50 / 250 of every batch from pydoc.
    total = STEPS + args.steps
    union = [train("cpt.py", f"out/cpt/union@{seed}", ["--init", untrained(inits["cosine"], seed), "--seed", seed,
                                                       "--replay", 1 - args.steps / total, *common[:6],
                                                       "--eval_interval", total // 10, "--warmup", 20], total) for seed in seeds]

    lines = [f"# Continued pretraining, stdlib -> pydoc\n\nCommand: `python bench/cpt.py`: pretraining "
             f"{STEPS} steps of the cpu preset on stdlib (seed 1337), then {args.steps} CPT steps x 2,048 tokens "
             f"on pydoc per row, seeds {', '.join(map(str, seeds))} (mean ± sample standard deviation). "
             f"Hardware: {hardware()}.\n",
             "| run | old (stdlib) loss: before -> worst (step) -> after | forgetting | new (pydoc) loss: "
             "before -> after | adaptation |", "| --- | --- | --- | --- | --- |"]
    summary = {label: numbers(dirs) for label, dirs in runs.items()}
    for label, r in summary.items():
        same = label.startswith("same data")  # its "new" validation documents were pretrained on
        lines.append(f"| {label} | {r['old_before']:.3f} -> {spread(r['old_worst'])} ({r['worst_step']}) -> "
                     f"{spread(r['old_after'])} | {spread(r['forgetting'])} | "
                     + ("— (the same corpus) | — |" if same else
                        f"{r['new_before']:.3f} -> {spread(r['new_after'])} | {spread(r['adaptation'])} |"))
    u = numbers(union)
    lines.append(f"| union: from scratch on both, {total} steps | {spread(u['old_after'])} at the end | — | "
                 f"{spread(u['new_after'])} at the end | — |")
    plot_curves(runs, union, os.path.join(BENCH, "cpt.png"))
    plot_tradeoff(summary, u, os.path.join(BENCH, "cpt_tradeoff.png"))
    with open(os.path.join(BENCH, "cpt.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def untrained(like, seed):
    """A step-0 checkpoint with the config and recipe of the checkpoint `like`, for cpt.py to train from scratch."""
    path = os.path.join(ROOT, "out", "cpt", f"untrained@{seed}.pt")
    if not os.path.exists(path):
        ckpt = pretrain.load_checkpoint(like)
        torch.manual_seed(seed)
        model = GPT(GPTConfig(**ckpt["config"]))
        optimizer = pretrain.make_optimizer(model, PEAK, 0.1, "cpu")
        pretrain.save_checkpoint(path, model, optimizer, 0, {"args": ckpt["args"], "data": ckpt["data"]})
    return path


def numbers(dirs):
    """Per seed: old and new validation loss after, the worst old loss on the way (a rise
    above the start early on is the stability gap), and the differences; the losses before
    once (a row starts every seed from the same model)."""
    per_seed = []
    for d in dirs:
        log = evals(d, "val_loss_new")
        before = pretrain.load_checkpoint(f"{d}/ckpt.pt")["init_eval"]
        worst = max(log, key=lambda r: r["val_loss_old"])  # the first of the worst, if tied
        last = log[-1]
        per_seed.append(dict(old_worst=worst["val_loss_old"], steps=worst["step"], old_after=last["val_loss_old"],
                             new_after=last["val_loss_new"], forgetting=last["val_loss_old"] - before["old"],
                             adaptation=before["new"] - last["val_loss_new"]))
    out = {key: [seed[key] for seed in per_seed] for key in per_seed[0]}
    out.update(old_before=before["old"], new_before=before["new"], worst_step="/".join(map(str, out["steps"])))
    return out


def curves(dirs, domain):
    """(tokens, [losses per seed]) of a domain, from the pretrained model (0 tokens) on."""
    logs = [evals(d, "val_loss_new") for d in dirs]
    before = [pretrain.load_checkpoint(f"{d}/ckpt.pt")["init_eval"][domain] for d in dirs]
    return [0] + [r["tokens"] for r in logs[0]], [[b] + [r[f"val_loss_{domain}"] for r in log] for b, log in zip(before, logs)]


def plot_curves(runs, union, path):
    """Old (forgetting) and new domain (adaptation) against CPT tokens; the union's final loss dashed."""
    plt = pretrain.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, domain, title in zip(axes, ("old", "new"), ("old domain (stdlib): forgetting", "new domain (pydoc): adaptation")):
        for i, (label, dirs) in enumerate(runs.items()):
            if domain == "new" and label.startswith("same data"):  # its new domain is its old one
                continue
            band(ax, *curves(dirs, domain), label, marker="o", ms=3, color=f"C{i}")
        start = curves(next(iter(runs.values())), domain)[1][0][0]
        ax.axhline(start, ls=":", c="gray", lw=1)  # the pretrained model: above this = worse than before
        ax.axhline(np.mean(curves(union, domain)[1], axis=0)[-1], ls="--", c="black", lw=1,
                   label="union control (final, from scratch on both)")
        ax.set(title=title, xlabel="CPT tokens", ylabel="validation loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save(fig, path, dpi=120)


def plot_tradeoff(summary, union, path):
    """Where each run ends: forgetting against new-domain loss, mean ± sd over seeds."""
    plt = pretrain.pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, r) in enumerate(summary.items()):
        if label.startswith("same data"):
            continue
        ax.errorbar(np.mean(r["forgetting"]), np.mean(r["new_after"]), xerr=np.std(r["forgetting"], ddof=1),
                    yerr=np.std(r["new_after"], ddof=1), fmt="o", capsize=3)
        ax.annotate(label, (np.mean(r["forgetting"]), np.mean(r["new_after"])), fontsize=7,
                    xytext=(6, 6 if i % 2 else -12), textcoords="offset points")  # alternate: less overlap
    # The union did not start from the pretrained model: no forgetting to speak of, only its pydoc loss.
    ax.axhline(np.mean(union["new_after"]), ls="--", c="black", lw=1, label="union control's pydoc loss")
    ax.set(xlabel="forgetting: increase of stdlib validation loss (nats)", ylabel="pydoc validation loss after CPT",
           title="forgetting vs adaptation (lower left is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.margins(x=0.3, y=0.2)
    save(fig, path, dpi=120)


if __name__ == "__main__":
    main()
