"""Continued pretraining: forgetting against adaptation, for the recipes the papers compare,
and the two controls they measure them against: 2 pretraining runs, 16 CPT runs and 2
union runs of the cpu model.

    python bench/cpt.py                  # -> bench/cpt.md, bench/cpt.png

Pretraining: the cpu preset on stdlib for 200 steps, once with cosine and once with wsd.
Then --steps CPT steps on pydoc for every row below, two seeds each (the seed sets the
order of the CPT data). The union control trains from scratch on both corpora, with the
same tokens of each as pretraining + CPT."""

import argparse
import os

import numpy as np
import torch

from common import BENCH, OLD_CPU, RECIPE, ROOT, SEEDS, band, evals, hardware, save, spread, train, write
import harness
import pretrain
from model import GPT, GPTConfig

PEAK, STEPS = OLD_CPU["lr"], 200  # pretraining: half the cpu preset, to fit the CPU budget
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
    base = {kind: train("pretrain.py", f"out/cpt/pretrain{STEPS}_{kind}", [*RECIPE, "--schedule", kind,
                                                                    "--sample_tokens", 0], STEPS)
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
             f"on pydoc per row, seeds {', '.join(map(str, seeds))} (mean ± sample standard deviation). A CPT row's "
             "seeds start from the same pretrained model and differ only in the order of the CPT data; the union's "
             f"seeds also differ in initialisation, so its spread holds more. Hardware: {hardware()}.\n",
             "| run | stdlib loss before | worst | at step | after | forgetting | pydoc loss before | after |",
             "|" + " --- |" * 8]
    summary = {label: numbers(dirs) for label, dirs in runs.items()}
    for label, r in summary.items():  # the same-data row has no new domain: its pydoc would be stdlib
        new = "— | —" if label.startswith("same data") else f"{r['new_before']:.3f} | {spread(r['new_after'])}"
        lines.append(f"| {label} | {r['old_before']:.3f} | {spread(r['old_worst'])} | {r['worst_step']} | "
                     f"{spread(r['old_after'])} | {spread(r['forgetting'])} | {new} |")
    u = numbers(union)
    lines.append(f"| union: from scratch on both, {total} steps | — | — | — | {spread(u['old_after'])} | — | — | "
                 f"{spread(u['new_after'])} |")
    plot_curves(runs, union, os.path.join(BENCH, "cpt.png"))
    write(os.path.join(BENCH, "cpt.md"), lines)


def untrained(like, seed):
    """A step-0 checkpoint with the config and recipe of the checkpoint `like`, for cpt.py to train from scratch."""
    path = os.path.join(ROOT, "out", "cpt", f"untrained@{seed}.pt")
    if not os.path.exists(path):
        ckpt = harness.load_checkpoint(like)
        torch.manual_seed(seed)
        model = GPT(GPTConfig(**ckpt["config"]))
        optimizer = pretrain.make_optimizer(model, PEAK, 0.1, "cpu")
        harness.save_checkpoint(path, model, optimizer, 0, {"args": ckpt["args"], "data": ckpt["data"]})
    return path


def numbers(dirs):
    """Per seed: old and new validation loss after, the worst old loss on the way (a rise above
    the start early on is the stability gap) and its step, and the forgetting; the losses
    before once (every seed of a CPT row starts from the same model)."""
    logs = [evals(d, "val_loss_new") for d in dirs]
    before = harness.load_checkpoint(f"{dirs[0]}/ckpt.pt")["init_eval"]
    worst = [max(log, key=lambda r: r["val_loss_old"]) for log in logs]  # the first of the worst, if tied
    return dict(old_before=before["old"], new_before=before["new"], old_worst=[r["val_loss_old"] for r in worst],
                worst_step="/".join(str(r["step"]) for r in worst), old_after=[log[-1]["val_loss_old"] for log in logs],
                new_after=[log[-1]["val_loss_new"] for log in logs],
                forgetting=[log[-1]["val_loss_old"] - before["old"] for log in logs])


def curves(dirs, domain):
    """(tokens, [losses per seed]) of a domain, from the pretrained model (0 tokens) on."""
    logs = [evals(d, "val_loss_new") for d in dirs]
    before = [harness.load_checkpoint(f"{d}/ckpt.pt")["init_eval"][domain] for d in dirs]
    return [0] + [r["tokens"] for r in logs[0]], [[b] + [r[f"val_loss_{domain}"] for r in log] for b, log in zip(before, logs)]


def plot_curves(runs, union, path):
    """Old (forgetting) and new domain (adaptation) against CPT tokens; the union's final loss dashed."""
    plt = harness.pyplot()
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


if __name__ == "__main__":
    main()
