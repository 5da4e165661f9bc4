"""What each packing strategy costs and buys, on a CPU: 15 training runs of the cpu preset,
150-176 steps each.

    python bench/packing.py              # -> bench/packing.md, packing.png, packing_loss.png

1. Statistics of the four packings of the stdlib corpus at 256 and 1024 tokens per row.
2. A picture of packed rows, coloured by document, and one row's attention mask.
3. The cpu preset trained for --steps steps with each packing, three seeds each, and `pad`
   once more for as many *real* (non-padding) tokens as best-fit sees, which separates
   the cost of padding from the cost of attending across documents.
4. The cross-document effect: a document's loss alone and after an unrelated one."""

import argparse
import os

import numpy as np
import torch

from common import BENCH, OLD_CPU, RECIPE, SEEDS, band, evals, final, hardware, save, spread, train, write
import data
import harness
from model import document_causal_mask


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="training steps per run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per packing")
    args = parser.parse_args()
    corpus = data.load_corpus("stdlib")
    train_docs, val_docs = data.split_documents(corpus)
    lines = [f"# Packing\n\nCorpus `stdlib`: {len(train_docs):,} training documents, "
             f"{int(corpus.lengths[train_docs].sum()):,} tokens. Command: `python bench/packing.py`. "
             f"Hardware: {hardware()}.\n",
             "| row length | packing | rows | padding % | documents split % | documents per row | cross-document pairs % |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    packed, stats = {}, {}
    for seq_len in (256, 1024):
        for strategy in data.PACKINGS:
            rows = packed[seq_len, strategy] = data.pack_split(corpus, train_docs, seq_len, strategy)
            s = stats[seq_len, strategy] = data.packing_stats(rows, seq_len)
            lines.append(f"| {seq_len} | {strategy} | {s['rows']:,} | {s['padding_pct']:.2f} | "
                         f"{s['split_docs_pct']:.1f} | {s['docs_per_row']:.2f} | {s['cross_doc_pairs_pct']:.1f} |")
    draw_packings(corpus, packed, stats, 1024, os.path.join(BENCH, "packing.png"))

    # Training: the same model, seeds and row tokens for every packing; pad-equal gets more steps.
    seq_len = OLD_CPU["seq_len"]
    real = {s: 1 - stats[seq_len, s]["padding_pct"] / 100 for s in data.PACKINGS}
    plans = {s: (s, args.steps) for s in data.PACKINGS}
    plans["pad, equal real tokens"] = ("pad", round(args.steps * real["bestfit"] / real["pad"]))
    lines += ["", "Training: `pretrain.py` with the cpu preset as it was (`bench/common.py:OLD_CPU`) for "
              f"{args.steps} steps ({args.steps * 8 * seq_len:,} row "
              f"tokens) with each packing, seeds {', '.join(map(str, SEEDS[:args.seeds]))}; validation: the same "
              "held-out documents for every run, each scored alone. Mean ± sample standard deviation over seeds.\n",
              "| packing | steps | real tokens | final validation loss |", "| --- | --- | --- | --- |"]
    runs = {}
    for label, (strategy, steps) in plans.items():
        runs[label] = [train("pretrain.py", f"out/packing/{strategy}{'' if steps == args.steps else f'-{steps}'}@{seed}",
                             [*RECIPE, "--data", "stdlib", "--packing", strategy,
                              "--seed", seed, "--eval_interval", steps // 5, "--eval_batches", 16, "--sample_tokens", 0],
                             steps) for seed in SEEDS[:args.seeds]]
        lines.append(f"| {label} | {steps} | {round(steps * 8 * seq_len * real[strategy]):,} | "
                     f"{spread([final(d) for d in runs[label]])} |")
    plot_runs(runs, plans, real, os.path.join(BENCH, "packing_loss.png"))

    lines += ["", "Loss on a validation document's first 128 tokens, alone and right after 128 tokens of an unrelated "
              f"document with plain causal attention; one seed ({SEEDS[0]}), so no spread to tell rows apart:\n",
              "| trained with | alone (masked) | after an unrelated document (plain causal) |", "| --- | --- | --- |"]
    for strategy in ("concat", "concat-docmask"):
        alone, after = cross_document_loss(corpus, val_docs, runs[strategy][0])
        lines.append(f"| {strategy} | {alone:.3f} | {after:.3f} |")
    write(os.path.join(BENCH, "packing.md"), lines)


def draw_packings(corpus, packed, stats, seq_len, path, n_rows=10):
    """packing.png: rows of each packing coloured by document, and a best-fit row's attention mask."""
    plt = harness.pyplot()
    fig = plt.figure(figsize=(12, 7))
    grid = fig.add_gridspec(4, 2, width_ratios=(2.2, 1))
    colours = plt.get_cmap("tab20").colors
    for i, strategy in enumerate(data.PACKINGS):
        rows, s = packed[seq_len, strategy], stats[seq_len, strategy]
        ax = fig.add_subplot(grid[i, 0])
        if strategy.startswith("concat"):  # consecutive rows: documents flow from row to row
            shown = rows[len(rows) // 2:len(rows) // 2 + n_rows]
        else:  # rows are in packing order (longest pieces first): show a fixed random sample
            shown = [rows[k] for k in sorted(np.random.default_rng(0).choice(len(rows), n_rows, replace=False))]
        for r, row in enumerate(shown):
            t = 0
            for d, start, stop in row:
                ax.barh(r, stop - start, left=t, color=colours[d % 20], edgecolor="black", linewidth=0.3)
                t += stop - start
        ax.set(xlim=(0, seq_len), yticks=[])
        ax.invert_yaxis()
        same = " (the same rows as concat, documents masked apart)" if strategy == "concat-docmask" else ""
        ax.set_title(f"{strategy}{same}: padding {s['padding_pct']:.1f} %, documents split "
                     f"{s['split_docs_pct']:.0f} %, {s['docs_per_row']:.2f} documents/row", fontsize=9)
    ax.set_xlabel("position in the row (tokens)")
    rows = packed[seq_len, "bestfit"]
    row = sorted(rows, key=len)[len(rows) * 9 // 10]  # a row with more documents than most
    mask = document_causal_mask(data.rows_to_batch(corpus, [row], seq_len)["doc_ids"])[0, 0]
    ax = fig.add_subplot(grid[:, 1])
    ax.imshow(mask, cmap="Greys", interpolation="nearest")
    ax.set(title=f"attention mask of a best-fit row\n({len(row)} documents; black = may attend)",
           xlabel="key position", ylabel="query position")
    save(fig, path)


def plot_runs(runs, plans, real, path):
    """Validation loss against real (non-padding) tokens: the mean and range over seeds."""
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, dirs in runs.items():
        logs = [evals(d) for d in dirs]
        share = real[plans[label][0]]  # the non-padding share of its packing's rows
        band(ax, [r["tokens"] * share for r in logs[0]], [[r["val_loss"] for r in log] for log in logs],
             f"{label} ({len(dirs)} seeds)", marker="o", ms=3, ls="--" if "equal" in label else "-")
    ax.set(xlabel="real (non-padding) tokens seen", ylabel="validation loss, one document at a time")
    ax.set_ylim(top=ax.get_ylim()[0] + 1.2)  # the first evaluation is far above the rest
    ax.legend()
    save(fig, path)


@torch.no_grad()
def cross_document_loss(corpus, docs, out_dir, n=128, pairs=64):
    """Mean loss on the first n tokens of validation documents, (1) alone and (2) right
    after n tokens of an unrelated document with plain causal attention, as concat
    training sees them. Pairs are fixed: document i follows document i + 1."""
    model = harness.load_model(f"{out_dir}/ckpt.pt")
    long_docs = [int(d) for d in docs if corpus.lengths[d] >= n][:pairs + 1]
    rows = [[(long_docs[i + 1], 0, n), (long_docs[i], 0, n)] for i in range(len(long_docs) - 1)]
    losses = []
    for docmask in (True, False):
        batch = data.rows_to_batch(corpus, rows, 2 * n, docmask)
        batch["y"][:, :n] = -1  # score only the second document
        _, loss = model(batch["x"], batch["y"], batch.get("doc_ids"), batch["pos_ids"])
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    main()
