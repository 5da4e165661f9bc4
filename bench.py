"""
Measurements behind the README. Each subcommand is one experiment; each writes its plots
and a markdown table into bench/ and names the hardware it ran on.

    python bench.py packing     # CPU: the four packings compared (stats, picture, training)
    python bench.py meco        # CPU: baseline vs metadata conditioning, loss by position
    python bench.py meco --data grammars   # the same on a controlled corpus, plus steering
"""

import argparse
import os
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F

import data
import pretrain


# -----------------------------------------------------------------------------
# python bench.py packing: what each packing strategy costs and buys (runs on a CPU)

def bench_packing(args):
    """Statistics and a picture of the four packings, then the same model trained on the
    same number of row tokens with each, then the cross-document effect."""
    import matplotlib
    matplotlib.use("Agg")
    corpus = data.load_corpus(args.data)
    train_docs, val_docs = data.split_documents(corpus)
    os.makedirs("bench", exist_ok=True)
    lines = [f"# Packing\n\nCorpus `{args.data}`: {len(train_docs):,} training documents, "
             f"{int(corpus.lengths[train_docs].sum()):,} tokens. Command: `python bench.py packing`.\n",
             "| row length | packing | rows | padding % | documents split % | documents per row | cross-document pairs % |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for seq_len in (256, 1024):
        for strategy in data.PACKINGS:
            s = data.packing_stats(data.pack_split(corpus, train_docs, seq_len, strategy), seq_len)
            lines.append(f"| {seq_len} | {strategy} | {s['rows']:,} | {s['padding_pct']:.2f} | "
                         f"{s['split_docs_pct']:.1f} | {s['docs_per_row']:.2f} | {s['cross_doc_pairs_pct']:.1f} |")
    draw_packings(corpus, train_docs, 1024, "bench/packing.png")

    runs = train_each_packing(args)
    lines += ["", f"Training: `pretrain.py --preset cpu --max_steps {args.steps}` with each packing "
              f"(same model, same seed, same number of row tokens; validation documents scored one "
              f"at a time). Hardware: {cpu_name()}.\n",
              "| packing | seed | final val loss | tokens/s (median) |", "| --- | --- | --- | --- |"]
    for name, log in runs.items():
        val = [r["val_loss"] for r in log if "val_loss" in r][-1]
        speeds = sorted(r["tok_s"] for r in log if "tok_s" in r)
        lines.append(f"| {name.split('@')[0]} | {name.split('@')[1]} | {val:.3f} | {speeds[len(speeds) // 2]:,} |")
    plot_packing_runs(runs, "bench/packing_loss.png")

    lines += ["", "Loss on a validation document preceded by an unrelated one (its first 128 tokens, "
              "after 128 tokens of another module), with and without the document mask:\n",
              "| trained with | alone (masked) | after an unrelated document (plain causal) |",
              "| --- | --- | --- |"]
    for strategy in ("concat", "concat-docmask"):
        alone, after = cross_document_loss(corpus, val_docs, f"out/packing/{strategy}@{args.seed}", args)
        lines.append(f"| {strategy} | {alone:.3f} | {after:.3f} |")
    with open("bench/packing.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def draw_packings(corpus, docs, seq_len, path, n_rows=10):
    """packing.png: a few rows of each packing as bars coloured by document (padding
    white), and the attention mask of one best-fit row."""
    import matplotlib.pyplot as plt
    from model import document_causal_mask
    fig = plt.figure(figsize=(12, 7))
    grid = fig.add_gridspec(4, 2, width_ratios=(2.2, 1))
    colours = plt.get_cmap("tab20").colors
    for i, strategy in enumerate(data.PACKINGS):
        rows = data.pack_split(corpus, docs, seq_len, strategy)
        stats = data.packing_stats(rows, seq_len)
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
        ax.set_xlim(0, seq_len)
        ax.set_yticks([])
        ax.invert_yaxis()
        same = " (the same rows as concat, documents masked apart)" if strategy == "concat-docmask" else ""
        ax.set_title(f"{strategy}{same}: padding {stats['padding_pct']:.1f} %, documents split "
                     f"{stats['split_docs_pct']:.0f} %, {stats['docs_per_row']:.2f} documents/row", fontsize=9)
    ax.set_xlabel("position in the row (tokens)")
    rows = data.pack_split(corpus, docs, seq_len, "bestfit")
    row = sorted(rows, key=len)[len(rows) * 9 // 10]  # a row with more documents than most
    batch = data.rows_to_batch(corpus, [row], seq_len)
    mask = document_causal_mask(batch["doc_ids"])[0, 0]
    ax = fig.add_subplot(grid[:, 1])
    ax.imshow(mask, cmap="Greys", interpolation="nearest")
    ax.set_title(f"attention mask of a best-fit row\n({len(row)} documents; black = may attend)", fontsize=9)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_each_packing(args):
    """One pretrain.py run per packing. A run that already finished in out/packing is reused
    (delete the folder to train it again)."""
    runs = {}
    for strategy, seed in [(s, args.seed) for s in data.PACKINGS]:
        out_dir = f"out/packing/{strategy}@{seed}"
        log = pretrain.read_log(os.path.join(out_dir, "log.jsonl"))
        if any(r["step"] == args.steps and "val_loss" in r for r in log):
            runs[f"{strategy}@{seed}"] = log
            continue
        command = [sys.executable, "pretrain.py", "--preset", "cpu", "--device", "cpu", "--data", args.data,
                   "--packing", strategy, "--seed", str(seed), "--max_steps", str(args.steps),
                   "--eval_interval", str(max(1, args.steps // 5)), "--eval_batches", "16",
                   "--out_dir", out_dir, "--sample_tokens", "0", "--quiet"]
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
        runs[f"{strategy}@{seed}"] = pretrain.read_log(os.path.join(out_dir, "log.jsonl"))
    return runs


def plot_packing_runs(runs, path):
    import matplotlib.pyplot as plt
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": (2, 1)})
    for name, log in runs.items():
        val = [r for r in log if "val_loss" in r]
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label=name.replace("@", ", seed "))
    ax.set_xlabel("row tokens seen (padding included)")
    ax.set_ylabel("validation loss, one document at a time")
    ax.legend()
    names = list(runs)
    speeds = [sorted(r["tok_s"] for r in runs[n] if "tok_s" in r) for n in names]
    bars.barh(range(len(names)), [s[len(s) // 2] for s in speeds])
    bars.set_yticks(range(len(names)), [n.replace("@", ", seed ") for n in names], fontsize=8)
    bars.set_xlabel("row tokens / s (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def cross_document_loss(corpus, docs, out_dir, args, n=128, pairs=64):
    """Mean loss on the first n tokens of validation documents, (1) alone and (2) right
    after n tokens of an unrelated document with plain causal attention, as concat
    training sees them. Pairs are fixed: document i follows document i + 1."""
    model = pretrain.load_model(os.path.join(out_dir, "ckpt.pt"))
    long_docs = [int(d) for d in docs if corpus.lengths[d] >= n][:pairs + 1]
    rows = [[(long_docs[i + 1], 0, n), (long_docs[i], 0, n)] for i in range(len(long_docs) - 1)]
    losses = []
    for docmask in (True, False):
        batch = data.rows_to_batch(corpus, rows, 2 * n, docmask)
        batch["y"][:, :n] = -1  # score only the second document
        _, loss = model(batch["x"], batch["y"], batch["doc_ids"] if docmask else None, batch["pos_ids"])
        losses.append(loss.item())
    return losses


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n > 1 else ''} of {model}"


# -----------------------------------------------------------------------------
# python bench.py meco: metadata conditioning vs the baseline (runs on a CPU)

def bench_meco(args):
    """Baseline and MeCo on the same corpus, model, seed and number of steps; then the
    loss by position in the document for the baseline, for MeCo without the URL and for
    MeCo with it, all on exactly the same validation text. On a corpus with a few sources
    (--data grammars) it also measures steering: do samples follow the URL they were given?"""
    import matplotlib
    matplotlib.use("Agg")
    name = "" if args.data == "stdlib" else "_" + "".join(c if c.isalnum() else "_" for c in args.data)
    runs = {meta: train_meco_run(args, meta, f"out/meco{name}/{meta}") for meta in ("none", "url")}

    corpus = data.load_corpus(args.data)
    train_docs, val_docs = data.split_documents(corpus)
    meco = data.with_metadata(corpus, "url")
    seq_len = pretrain.PRESETS["cpu"]["seq_len"]
    starts = [[(int(d), 0, int(min(meco.lengths[d], seq_len)))] for d in val_docs]  # one document start per row
    cooldown = pretrain.cooldown_start(args.steps, 0.1)  # the step where URLs stop (default --meta_cooldown)
    baseline = pretrain.load_model(os.path.join(runs["none"], "ckpt.pt"))
    before = pretrain.load_model(os.path.join(runs["url"], f"ckpt_{cooldown}.pt"))  # the end of the URL phase
    model = pretrain.load_model(os.path.join(runs["url"], "ckpt.pt"))
    plain = data.without_prefixes(starts, meco)  # the same rows, URLs left out
    curves = {"baseline": loss_by_position(baseline, corpus, plain, seq_len),
              f"MeCo at step {cooldown}, no URL": loss_by_position(before, corpus, plain, seq_len),
              f"MeCo at step {cooldown}, with URL": loss_by_position(before, meco, starts, seq_len),
              "MeCo after cooldown, no URL": loss_by_position(model, corpus, plain, seq_len),
              "MeCo after cooldown, with URL": loss_by_position(model, meco, starts, seq_len)}
    plot_meco({m: pretrain.read_log(os.path.join(d, "log.jsonl")) for m, d in runs.items()}, curves,
              cooldown * pretrain.PRESETS["cpu"]["batch_size"] * seq_len, f"bench/meco{name}.png")

    final = {m: [r for r in pretrain.read_log(os.path.join(d, "log.jsonl")) if "val_loss" in r][-1] for m, d in runs.items()}
    command = "python bench.py meco" + ("" if args.data == "stdlib" else f" --data {args.data}")
    lines = [f"# MeCo on `{args.data}`\n\nCommand: `{command}` ({args.steps} steps of the cpu preset, "
             f"seed {args.seed}; URLs for the first {cooldown} steps, then the cooldown). "
             f"Hardware: {cpu_name()}.\n",
             f"Final validation loss ({pretrain.PRESETS['cpu']['batch_size'] * 16} rows of held-out documents, the same "
             f"text in all three): baseline {final['none']['val_loss']:.3f}, MeCo without URLs "
             f"{final['url']['val_loss']:.3f}, MeCo with URLs {final['url'][f'val_loss_{args.data}_url']:.3f}.\n",
             f"Loss by position, on the first {seq_len - int(meco.prefix_lengths.max())} text tokens of "
             f"{len(val_docs)} validation documents:\n",
             "| model | tokens 1-4 | 5-16 | 17-64 | 65+ | all |", "| --- | --- | --- | --- | --- | --- |"]
    for label, (sums, counts) in curves.items():
        cells = [sums[a:b].sum() / counts[a:b].sum() for a, b in ((0, 4), (4, 16), (16, 64), (64, seq_len))]
        lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {sums.sum() / counts.sum():.3f} |")
    sources = sorted(set(corpus.urls) - {""})
    if len(sources) <= 16:
        lines += ["", *steering_table(corpus, train_docs, sources, {"baseline": baseline, "MeCo after cooldown": model})]
    samples = open(os.path.join(runs["url"], "samples.txt")).read().split("=== prompt ")
    lines += ["", "Samples from the MeCo model steered by a URL (temperature 0.8):", ""]
    for sample in samples:
        if sample.startswith("'URL:"):
            lines += ["```", sample.split("\n", 1)[1].strip()[:600], "```"]
    with open(f"bench/meco{name}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def train_meco_run(args, meta, out_dir):
    """One pretrain.py run; one that already finished in out_dir is reused (delete it to retrain)."""
    finished = any(r["step"] == args.steps and "val_loss" in r for r in pretrain.read_log(os.path.join(out_dir, "log.jsonl")))
    if finished and (meta == "none" or os.path.exists(os.path.join(out_dir, f"ckpt_{pretrain.cooldown_start(args.steps, 0.1)}.pt"))):
        return out_dir
    command = [sys.executable, "pretrain.py", "--preset", "cpu", "--device", "cpu", "--data", args.data,
               "--meta", meta, "--seed", str(args.seed), "--max_steps", str(args.steps),
               "--eval_interval", str(max(1, args.steps // 10)), "--eval_batches", "16",
               "--out_dir", out_dir, "--quiet"]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    return out_dir


def steering_table(corpus, train_docs, sources, models, per_source=16, length=64):
    """Steering, measured: each model writes per_source documents after "URL: <source>",
    and a token-frequency classifier (naive Bayes, fit on the training documents of each
    source) says which source each one reads like. MeCo should follow the URL; the
    baseline never saw one, so it should be right about 1 time in len(sources)."""
    log_p = []
    for source in sources:
        docs = [d for d in train_docs if corpus.urls[d] == source]
        tokens = np.concatenate([corpus.tokens[corpus.offsets[d] + 1:corpus.offsets[d + 1]] for d in docs])
        counts = np.bincount(tokens, minlength=data.EOT + 1) + 1.0
        log_p.append(np.log(counts / counts.sum()))
    log_p = np.stack(log_p)  # (sources, vocab)
    encoder = data.get_tokenizer()
    lines = [f"Steering: {per_source} samples of {length} tokens per URL; the share a token-frequency "
             f"classifier assigns to the URL's own source (chance: {1 / len(sources):.0%}):", "",
             "| model | " + " | ".join(sources) + " | all |", "| --- |" + " --- |" * (len(sources) + 1)]
    for label, model in models.items():
        torch.manual_seed(0)
        hits = []
        for k, source in enumerate(sources):
            prompt = [data.EOT] + encoder.encode_ordinary(f"URL: {source}\n\n")
            out = model.generate(torch.tensor([prompt] * per_source), length, temperature=0.8, top_k=200)
            for row in out[:, len(prompt):].tolist():
                text = row[:row.index(data.EOT)] if data.EOT in row else row  # this document only
                hits.append(bool(text) and int(log_p[:, text].sum(axis=1).argmax()) == k)
        shares = np.array(hits).reshape(len(sources), per_source).mean(axis=1)
        lines.append(f"| {label} | " + " | ".join(f"{s:.0%}" for s in shares) + f" | {np.mean(hits):.0%} |")
    return lines


@torch.no_grad()
def loss_by_position(model, corpus, rows, seq_len, batch_size=8):
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


def plot_meco(logs, curves, cooldown_tokens, path):
    import matplotlib.pyplot as plt
    fig, (ax, pos) = plt.subplots(1, 2, figsize=(12, 4.2))
    for meta, log in logs.items():
        val = [r for r in log if "val_loss" in r]
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, c="C0" if meta == "none" else "C1",
                label="baseline" if meta == "none" else "MeCo (validation without URLs)")
        with_url = [(r["tokens"], v) for r in val for k, v in r.items() if k.endswith("_url")]
        if with_url:
            ax.plot(*zip(*with_url), "o--", ms=3, c="C2", label="MeCo (validation with URLs)")
    ax.axvline(cooldown_tokens, ls="--", c="gray", lw=1)
    ax.text(cooldown_tokens, ax.get_ylim()[1], "cooldown: no URLs ", ha="right", va="top", fontsize=8, color="gray")
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss")
    ax.legend()
    edges = np.unique(np.geomspace(1, len(next(iter(curves.values()))[0]), 12).astype(int))
    for name, (sums, counts) in curves.items():
        means = [sums[a - 1:b - 1].sum() / max(1, counts[a - 1:b - 1].sum()) for a, b in zip(edges, edges[1:])]
        color = "C0" if name == "baseline" else "C1" if "no URL" in name else "C2"
        pos.plot(edges[:-1], means, "o" + (":" if "at step" in name else "-"), c=color, ms=3, label=name)
        if name == "baseline":
            pos.set_ylim(0.9 * min(means), 1.5 * max(means))  # a curve far above the baseline runs off the top
    pos.set_xscale("log")
    pos.set_xlabel("position of the token in its document (text tokens after the URL)")
    pos.set_ylabel("mean loss")
    pos.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, steps in (("packing", 150), ("meco", 400)):
        sub = commands.add_parser(name)
        sub.add_argument("--data", default="stdlib")
        sub.add_argument("--steps", type=int, default=steps, help="training steps per run")
        sub.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    {"packing": bench_packing, "meco": bench_meco}[args.command](args)


if __name__ == "__main__":
    main()
