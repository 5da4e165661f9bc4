"""The cpu preset, chosen by measurement: what makes a CPU step fast, then which model and
schedule learn most in the same wall-clock budget on this machine. Nothing else may run.

    python bench/cpu.py                  # -> bench/cpu.md, cpu.png (about an hour on 2 cores)
    python bench/cpu.py --budget 60      # a shorter sweep
    python bench/cpu.py --profile        # where the step's time goes
    python bench/cpu.py --time_checkpoint  # the grace period a SIGTERM needs, for each preset

1. Speed. Matmul GFLOP/s in fp32 and bf16, and one training step of the cpu model as this
   repo computed it before (full fp32 logits) against the chunked loss, in fp32 and bf16,
   with and without keep_freed_memory. Each measurement is a child process of its own (its
   own peak memory), in turn with the others, three times.
2. The sweep. Each configuration trains with pretrain.py for --budget seconds of steps
   (max_steps from a timed calibration), scored on the same validation rows where its row
   length is 256; then the best three with two more seeds; then the winner in fp32 on the
   same steps, three seeds, to show that bf16 learns as much per step."""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import torch

from common import BENCH, ROOT, SEEDS, evals, hardware, save, spread, train, write
import data
import harness
import model
import pretrain

BASE = dict(pretrain.PRESETS["cpu"], n_layer=4, n_head=4, n_embd=128, seq_len=256, batch_size=8, lr=3e-3, warmup=20)
SWEEP = {  # name: changes to BASE (the cpu preset before this sweep)
    "base 4x128": {}, "wide 4x192": dict(n_embd=192, n_head=4), "wider 4x256": dict(n_embd=256, n_head=4),
    "deep 6x128": dict(n_layer=6), "shallow 2x192": dict(n_layer=2, n_embd=192, n_head=4),
    "deep-wide 6x192": dict(n_layer=6, n_embd=192, n_head=4), "rows 128 x 16": dict(seq_len=128, batch_size=16),
    "rows 512 x 4": dict(seq_len=512, batch_size=4), "batch 16": dict(batch_size=16), "lr 1e-3": dict(lr=1e-3),
    "lr 6e-3": dict(lr=6e-3), "warmup 60": dict(warmup=60), "wsd": dict(schedule="wsd"),
}
VARIANTS = ("full fp32", "full bf16", "chunked fp32", "chunked bf16", "chunked bf16, no keep_freed_memory")


def flags(config):
    return [f"--{k}={v}" for k, v in config.items() if k in (
        "n_layer", "n_head", "n_embd", "seq_len", "batch_size", "lr", "warmup", "schedule")]


def step_time(config, variant, steps=8):
    """Child process: seconds per training step of config, median over steps, and peak GB."""
    if "no keep_freed" not in variant:
        harness.keep_freed_memory()
    if variant.startswith("full"):  # the loss as this repo computed it before: all (B, T, vocab) logits in fp32
        model.linear_cross_entropy = lambda h, w, y: torch.nn.functional.cross_entropy(
            (h @ w.to(h.dtype).T).float().flatten(0, 1), y.flatten(), ignore_index=-1)
    corpus = data.load_corpus("stdlib", quiet=True)
    rows = data.pack_split(corpus, data.split_documents(corpus)[0], config["seq_len"], "bestfit")
    net = model.GPT(model.GPTConfig(block_size=config["seq_len"], n_layer=config["n_layer"], n_head=config["n_head"],
                                    n_embd=config["n_embd"]))
    optimizer = pretrain.make_optimizer(net, 1e-3, 0.1, "cpu")
    times, batch_times = [], []
    for i in range(steps + 2):  # the first two warm up
        t0 = time.perf_counter()
        batch = data.get_batch(corpus, rows, config["seq_len"], i, config["batch_size"], seed=0)
        t1 = time.perf_counter()
        with harness.autocast_for("cpu", "bf16" if "bf16" in variant else "fp32"):
            _, loss = net(batch["x"], batch["y"], batch["doc_ids"], batch["pos_ids"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        batch_times.append(t1 - t0)
    return {"s": statistics.median(times[2:]), "batch_s": statistics.median(batch_times[2:]),
            "peak_gb": harness.peak_memory_gb("cpu"), "flops": net.flops_per_token(config["seq_len"])}


def child(config, variant):
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps([config, variant])], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def matmul_gflops(dtype, shape=(2048, 128, 50304), repeats=5):
    """The best GFLOP/s of (m, k) @ (k, n) over repeats: the lm_head's forward shape, the biggest matmul of the step."""
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def speed(lines):
    path = os.path.join(ROOT, "out", "cpu_speed.json")  # measured once; delete it to measure again
    if os.path.exists(path):
        peak, runs = json.load(open(path))
    else:
        peak = {name: max(matmul_gflops(dtype, shape) for shape in ((2048, 128, 50304), (2048, 2048, 2048)))
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        runs = {v: [] for v in VARIANTS}
        for _ in range(3):  # interleaved: a slow minute of the machine hits every variant alike
            for v in VARIANTS:
                runs[v].append(child(BASE, v))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump([peak, runs], f)
    print(json.dumps([peak, runs]), flush=True)
    tokens = BASE["batch_size"] * BASE["seq_len"]
    before = statistics.median(r["s"] for r in runs["full fp32"])
    lines += ["## 1. Speed", "", f"Matmul peak (the best of the lm_head's forward shape and 2048^3): fp32 "
              f"{peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s. One step of the cpu model "
              f"({BASE['n_layer']} x {BASE['n_embd']}, {BASE['batch_size']} x {BASE['seq_len']} tokens), median of 8 "
              "steps, three interleaved repeats (mean ± sd of the repeats):", "",
              "| step | ms per step | tokens/s | vs before | model FLOP/s, % of the bf16 peak | batch ms | peak memory GB |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for v, rs in runs.items():
        s = statistics.median(r["s"] for r in rs)
        lines.append(f"| {v}{' (before)' if v == 'full fp32' else ''} | {spread([1000 * r['s'] for r in rs])} | "
                     f"{tokens / s:,.0f} | {before / s:.2f}x | {100 * rs[0]['flops'] * tokens / s / 1e9 / peak['bf16']:.0f} % | "
                     f"{1000 * statistics.median(r['batch_s'] for r in rs):.1f} | {max(r['peak_gb'] for r in rs):.2f} |")
    now = statistics.median(r["s"] for r in runs["chunked bf16"])
    lines += ["", f"Targets: twice the tokens/s of before, reached {before / now:.2f}x; model FLOP/s at least 50 % of "
              f"the bf16 peak, reached {100 * runs['chunked bf16'][0]['flops'] * tokens / now / 1e9 / peak['bf16']:.0f} %. "
              "Where the step's time goes: `python bench/cpu.py --profile`."]
    return runs


def time_checkpoint(repeats=3):
    """The grace period to give a scheduler between SIGTERM and SIGKILL. For each preset, the
    write of its final checkpoint (weights and AdamW's two moments) from this machine's
    memory to its disk; for the cpu preset, a real run stopped by SIGTERM, from the signal
    to its exit (the rest of the step, an evaluation, the write). Printed, not kept."""
    path = os.path.join(ROOT, "out", "time_checkpoint", "ckpt.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"Hardware: {hardware()}; {repeats} repeats (mean ± sd)\n\n| preset | parameters | checkpoint | write s |\n"
          "| --- | --- | --- | --- |")
    for name, preset in pretrain.PRESETS.items():
        net = model.GPT(model.GPTConfig(block_size=preset["seq_len"], n_layer=preset["n_layer"],
                                        n_head=preset["n_head"], n_embd=preset["n_embd"]))
        optimizer = pretrain.make_optimizer(net, 1e-3, 0.1, "cpu")
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # AdamW's moments exist from the first step on, and the checkpoint holds them
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            harness.save_checkpoint(path, net, optimizer, 0, {})
            seconds.append(time.perf_counter() - t0)
        print(f"| {name} | {net.num_params() / 1e6:.1f}M | {os.path.getsize(path) / 2**20:,.0f} MB | {spread(seconds)}, "
              f"at most {max(seconds):.1f} |", flush=True)
        del net, optimizer
    out_dir, seconds = os.path.dirname(path), []
    for _ in range(repeats):
        if os.path.exists(os.path.join(out_dir, "log.jsonl")):
            os.remove(os.path.join(out_dir, "log.jsonl"))  # the last run's
        run = subprocess.Popen([sys.executable, "pretrain.py", "--preset", "cpu", "--device", "cpu", "--out_dir", out_dir,
                                "--overwrite_out_dir", "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while not evals(out_dir, "loss") and run.poll() is None:  # the first log line: training is under way
            time.sleep(0.1)
        t0 = time.perf_counter()
        run.send_signal(signal.SIGTERM)
        run.wait()
        seconds.append(time.perf_counter() - t0)
        assert run.returncode == 143, run.stderr.read().decode()
    print(f"\ncpu preset, a real run: SIGTERM to exit {spread(seconds)} s, at most {max(seconds):.1f} s")


def sweep(args, lines):
    """max_steps that fill the budget: first from a timed calibration, then, where the first
    run's own steps took over 10 % more or less time, from that run, which is run again; a
    configuration that only changes the schedule takes the steps of the same model.
    Kept in out/cpu_sweep/steps.json, so that a second invocation reuses the runs."""
    config_of = {name: {**BASE, **change} for name, change in SWEEP.items()}
    path = os.path.join(ROOT, "out", "cpu_sweep", "steps.json")
    steps = json.load(open(path)) if os.path.exists(path) else {}
    for name, config in config_of.items():
        steps.setdefault(name, max(20, int(args.budget / child(config, "chunked bf16")["s"])))
    def seconds_per_step(out_dir):  # the median step of a finished run, evaluations excluded
        log = evals(out_dir, "seconds")
        return statistics.median(b["seconds"] - a["seconds"] for a, b in zip(log, log[1:]))
    def run(name, seed, dtype="auto"):
        config, n = config_of[name], steps[name]
        eval_batches = 64 // config["batch_size"] if config["seq_len"] == 256 else 8  # the same 64 rows of 256
        folder = f"out/cpu_sweep/{name.replace(' ', '_')}-{dtype}@{seed}"
        return train("pretrain.py", folder, ["--preset", "cpu", "--device", "cpu", *flags(config), "--seed", seed,
                                             "--dtype", dtype, "--eval_interval", max(1, n // 4), "--eval_batches",
                                             eval_batches, "--log_interval", 1, "--sample_tokens", 0], n)
    def shape(name):
        return [config_of[name][k] for k in ("n_layer", "n_head", "n_embd", "seq_len", "batch_size")]
    first = {}
    for name in SWEEP:
        twin = next(other for other in SWEEP if shape(other) == shape(name))  # the same model: the same steps
        steps[name] = steps[twin]
        first[name] = run(name, SEEDS[0])
        if name == twin and abs(steps[name] * seconds_per_step(first[name]) / args.budget - 1) > 0.1:
            steps[name] = max(20, round(args.budget / seconds_per_step(first[name])))
            first[name] = run(name, SEEDS[0])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(steps, f, indent=1)
    comparable = [name for name in SWEEP if config_of[name]["seq_len"] == 256]  # scored on the same rows
    best = sorted(comparable, key=lambda name: evals(first[name])[-1]["val_loss"])[:3]
    seeds = {name: [first[name]] + [run(name, seed) for seed in SEEDS[1:]] for name in best}
    fp32 = [run(best[0], seed, "fp32") for seed in SEEDS]
    lines += ["", f"## 2. The sweep: {args.budget} s of training steps each", "",
              "Changes to the cpu preset as it was (4 x 128, rows 8 x 256, lr 3e-3, warmup 20, cosine). "
              "Validation: the same 64 rows of 256 tokens for every run but the two with other row lengths "
              "(their own rows, not comparable). One seed for all; the best three with three seeds.", "",
              "| configuration | steps | tokens | validation loss, seed 1337 | three seeds |", "| --- | --- | --- | --- | --- |"]
    for name in sorted(SWEEP, key=lambda name: evals(first[name])[-1]["val_loss"]):
        last = evals(first[name])[-1]
        three = spread([evals(d)[-1]["val_loss"] for d in seeds[name]]) if name in seeds else ""
        lines.append(f"| {name} | {steps[name]} | {last['tokens']:,} | {last['val_loss']:.3f} | {three} |")
    lines += ["", f"bf16 against fp32, {best[0]}, {steps[best[0]]} steps, three seeds each:", "",
              "| matmuls | validation loss | seconds |", "| --- | --- | --- |"]
    for label, dirs in (("bf16 (auto)", seeds[best[0]]), ("fp32", fp32)):
        lines.append(f"| {label} | {spread([evals(d)[-1]['val_loss'] for d in dirs])} | "
                     f"{spread([evals(d, 'seconds')[-1]['seconds'] for d in dirs])} |")
    plot(first, best, os.path.join(BENCH, "cpu.png"))


def plot(first, best, path):
    """Validation loss against wall-clock seconds, one line per configuration (seed 1337)."""
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, d in first.items():
        seconds = {r["step"]: r["seconds"] for r in evals(d, "seconds")}
        points = [(seconds[r["step"]], r["val_loss"]) for r in evals(d) if r["step"] in seconds]
        ax.plot(*zip(*points), "o-" if name in best else ".--", lw=2 if name in best else 1, ms=4, label=name)
    ax.set(xlabel="seconds since training began (evaluations included)", ylabel="validation loss", title="the cpu sweep")
    ax.legend(fontsize=8, ncol=2)
    save(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=120, help="seconds of training steps per sweep run")
    parser.add_argument("--profile", action="store_true", help="where a chunked bf16 step's time goes, then exit")
    parser.add_argument("--time_checkpoint", action="store_true", help="the grace period a SIGTERM needs, then exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_checkpoint:
        return time_checkpoint()
    if args.child:
        return print(json.dumps(step_time(*json.loads(args.child))))
    if args.profile:  # (the data's packing is in it too, once: a few % of the total)
        with torch.profiler.profile() as prof:
            step_time(BASE, "chunked bf16", steps=4)
        return print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    lines = [f"# The cpu preset\n\nCommand: `python bench/cpu.py --budget {args.budget:g}`. Hardware: {hardware()}.\n"]
    speed(lines)
    sweep(args, lines)
    write(os.path.join(BENCH, "cpu.md"), lines)


if __name__ == "__main__":
    main()
