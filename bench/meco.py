"""Metadata conditioning (MeCo) and the ablations that explain its recipe, on the grammar
corpus (eight probabilistic grammars; the URL says which one wrote a document): 14 short
runs of the cpu preset, then the analysis.

    python bench/meco.py                 # -> bench/meco.md, bench/meco.png

Every row: the cpu preset for --steps steps, two seeds, the same validation documents.
Then, for seed 1337: the loss at each position of a document, with and without its URL,
before and after the cooldown; and steering, measured by a classifier."""

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

from common import BENCH, OLD_CPU, RECIPE, SEEDS, final, hardware, save, spread, train, write
import data
import harness
import pretrain

# label: (run folder, flags, MeCo paper's 1.6B downstream average, arXiv 2501.01956 v3)
ROWS = {
    "baseline (no metadata)": ("baseline", ["--meta", "none"], "55.7 (Table 4)"),
    "MeCo: URLs, then 10 % cooldown": ("meco", ["--meta", "url"], "56.7 (Table 4)"),
    "URLs throughout, no cooldown": ("cooldown0", ["--meta", "url", "--meta_cooldown", 0], "50.3 (Table 4)"),
    "20 % cooldown": ("cooldown20", ["--meta", "url", "--meta_cooldown", 0.2], "56.8 (Table 14)"),
    "30 % cooldown": ("cooldown30", ["--meta", "url", "--meta_cooldown", 0.3], "56.2 (Table 14)"),
    "90/10 mix, no cooldown": ("mix90", ["--meta", "url", "--meta_drop", 0.1, "--meta_cooldown", 0], "56.4 (Table 4)"),
    "loss on the URL tokens too": ("urlloss", ["--meta", "url", "--meta_loss"], "not reported"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="grammars")
    parser.add_argument("--steps", type=int, default=100, help="training steps per run")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    seeds = SEEDS[:args.seeds]
    runs = {label: [train("pretrain.py", f"out/meco/{folder}@{seed}",
                          [*RECIPE, "--data", args.data, "--seed", seed, *flags,
                           "--eval_interval", args.steps // 2, "--eval_batches", 8], args.steps)
                    for seed in seeds] for label, (folder, flags, _) in ROWS.items()}

    corpus = data.load_corpus(args.data)
    train_docs, val_docs = data.split_documents(corpus)
    meco = data.with_metadata(corpus, "url")
    first = data.without_prefixes([[(int(d), 0, int(min(meco.lengths[d], 16)))] for d in val_docs], meco)
    lines = [f"# MeCo on `{args.data}`\n\nCommand: `python bench/meco.py` ({args.steps} steps of the cpu preset "
             f"per run, seeds {', '.join(map(str, seeds))}; mean ± sample standard deviation). Hardware: {hardware()}.\n",
             "Validation: the same held-out documents for every row, without metadata and with it. The paper's "
             "column is MeCo's own ablation (1.6B model, average of downstream tasks, higher is better), not a loss.\n",
             "| run | validation loss, no URL | with URL | tokens 1-4 of a document, no URL | paper: downstream avg |",
             "| --- | --- | --- | --- | --- |"]
    for label, (_, flags, paper) in ROWS.items():
        meta = flags[1]
        with_url = spread([final(d, f"val_loss_{args.data}_{meta}") for d in runs[label]]) if meta != "none" else "—"
        starts = [loss_by_position(harness.load_model(f"{d}/ckpt.pt"), corpus, first, 16) for d in runs[label]]
        lines.append(f"| {label} | {spread([final(d) for d in runs[label]])} | {with_url} | "
                     f"{spread([s[:4].sum() / c[:4].sum() for s, c in starts])} | {paper} |")

    # One seed, closer: loss by position before and after the cooldown, and steering.
    seq_len = OLD_CPU["seq_len"]
    rows = [[(int(d), 0, int(min(meco.lengths[d], seq_len)))] for d in val_docs]
    plain = data.without_prefixes(rows, meco)  # the same text, URLs left out
    base_dir, meco_dir = runs["baseline (no metadata)"][0], runs["MeCo: URLs, then 10 % cooldown"][0]
    switch = pretrain.cooldown_start(args.steps, 0.1)
    baseline, model = (harness.load_model(f"{d}/ckpt.pt") for d in (base_dir, meco_dir))
    before = harness.load_model(f"{meco_dir}/ckpt_{switch}.pt")
    curves = {"baseline": loss_by_position(baseline, corpus, plain, seq_len),
              f"MeCo at step {switch}, no URL": loss_by_position(before, corpus, plain, seq_len),
              f"MeCo at step {switch}, with URL": loss_by_position(before, meco, rows, seq_len),
              "MeCo after cooldown, no URL": loss_by_position(model, corpus, plain, seq_len),
              "MeCo after cooldown, with URL": loss_by_position(model, meco, rows, seq_len)}
    lines += ["", f"Loss by position, one seed ({seeds[0]}: no spread to tell rows apart), on the first "
              f"{seq_len - int(meco.prefix_lengths.max())} text tokens of {len(val_docs)} validation documents, "
              "identical text in every row:\n",
              "| model | tokens 1-4 | 5-16 | 17-64 | 65+ | all |", "| --- | --- | --- | --- | --- | --- |"]
    for label, (sums, counts) in curves.items():
        cells = [sums[a:b].sum() / counts[a:b].sum() for a, b in ((0, 4), (4, 16), (16, 64), (64, seq_len))]
        lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {sums.sum() / counts.sum():.3f} |")
    plot(runs, curves, args.data, os.path.join(BENCH, "meco.png"))
    sources = sorted(set(corpus.urls) - {""})
    if len(sources) <= 16:
        lines += ["", *steering_table(corpus, train_docs, sources, {"baseline": baseline, "MeCo after cooldown": model})]
    write(os.path.join(BENCH, "meco.md"), lines)


@torch.no_grad()
def loss_by_position(model, corpus, rows, seq_len, batch_size=64):
    """Summed loss and count at each text position k (k = 0: the first token after the
    document start, or after its URL) over rows that each hold one document's start."""
    sums, counts = np.zeros(seq_len), np.zeros(seq_len)
    for i in range(0, len(rows), batch_size):
        batch = data.rows_to_batch(corpus, rows[i:i + batch_size], seq_len)
        logits, _ = model(batch["x"], None, batch["doc_ids"], batch["pos_ids"])
        loss = F.cross_entropy(logits.transpose(1, 2), batch["y"].clamp(min=0), reduction="none")  # (B, T)
        scored = batch["y"] != -1
        position = scored.cumsum(dim=1) - 1  # the k-th scored token of a row is text position k
        np.add.at(sums, position[scored].numpy(), loss[scored].numpy())
        np.add.at(counts, position[scored].numpy(), 1)
    return sums, counts


def steering_table(corpus, train_docs, sources, models, per_source=16, length=64):
    """Steering, measured: each model writes per_source documents after "URL: <source>",
    and a token-frequency classifier (naive Bayes, fit on the training documents of each
    source) says which source each one reads like. MeCo should follow the URL; the
    baseline never saw one, so it should be right about 1 time in len(sources)."""
    log_p = []
    for source in sources:
        docs = [d for d in train_docs if corpus.urls[d] == source]
        tokens = np.concatenate([corpus.tokens[corpus.offsets[d] + 1:corpus.offsets[d + 1]] for d in docs])
        log_p.append(data.unigram_log_probs(tokens))
    log_p = np.stack(log_p)  # (sources, vocab)
    lines = [f"Steering, one seed of each model: {per_source} samples of {length} tokens per URL; the share a "
             f"token-frequency classifier assigns to the URL's own source (chance: {1 / len(sources):.0%}):", "",
             "| model | " + " | ".join(sources) + " | all |", "| --- |" + " --- |" * (len(sources) + 1)]
    for label, model in models.items():
        torch.manual_seed(0)
        hits = []
        for k, source in enumerate(sources):
            prompt = [data.EOT] + data.get_tokenizer().encode_ordinary(f"URL: {source}\n\n")
            out = model.generate(torch.tensor([prompt] * per_source), length, temperature=0.8, top_k=200)
            for row in out[:, len(prompt):].tolist():
                text = row[:row.index(data.EOT)] if data.EOT in row else row  # this document only
                hits.append(bool(text) and int(log_p[:, text].sum(axis=1).argmax()) == k)
        shares = np.array(hits).reshape(len(sources), per_source).mean(axis=1)
        lines.append(f"| {label} | " + " | ".join(f"{s:.0%}" for s in shares) + f" | {np.mean(hits):.0%} |")
    return lines


def plot(runs, curves, name, path):
    """Left: final validation loss of every row, without and with URLs, one dot per seed.
    Right: loss by position in the document, before and after the cooldown."""
    plt = harness.pyplot()
    fig, (ax, pos) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": (1, 1.2)})
    for i, (label, dirs) in enumerate(runs.items()):
        meta = ROWS[label][1][1]
        ax.scatter([final(d) for d in dirs], [i] * len(dirs), c="C0", label="no URL" if i == 0 else None)
        if meta != "none":
            ax.scatter([final(d, f"val_loss_{name}_{meta}") for d in dirs], [i] * len(dirs), c="C2", marker="s",
                       label="with URL" if i == 1 else None)
    ax.set_yticks(range(len(runs)), list(runs), fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="final validation loss (each dot a seed)", title="MeCo's ablations")
    ax.legend(fontsize=8)
    edges = np.unique(np.geomspace(1, len(next(iter(curves.values()))[0]), 12).astype(int))
    for label, (sums, counts) in curves.items():
        means = [sums[a - 1:b - 1].sum() / max(1, counts[a - 1:b - 1].sum()) for a, b in zip(edges, edges[1:])]
        color = "C0" if label == "baseline" else "C1" if "no URL" in label else "C2"
        pos.plot(edges[:-1], means, "o" + (":" if "at step" in label else "-"), c=color, ms=3, label=label)
        if label == "baseline":
            pos.set_ylim(0.9 * min(means), 1.6 * max(means))  # a curve far above the baseline runs off the top
    pos.set(xscale="log", xlabel="position of the token in its document (text tokens after the URL)",
            ylabel="mean loss", title="loss by position (one seed)")
    pos.legend(fontsize=8)
    save(fig, path)


if __name__ == "__main__":
    main()
