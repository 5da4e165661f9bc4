"""What the bench scripts share: the repo on the import path, training runs as child
processes (a finished run is reused), seeds summarised as mean and spread, the hardware
line, and plotting."""

import os
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, ROOT)

import pretrain  # noqa: E402  (after the path is set)

SEEDS = (1337, 1338, 1339)


def train(script, out_dir, flags, steps):
    """Run `python <script> <flags> --out_dir <out_dir>` and return out_dir. A run whose log
    already holds its final evaluation is reused (delete the folder to train it again). A
    failing run stops the experiment with one line; the run printed its own reason above."""
    out_dir = os.path.join(ROOT, out_dir)  # runs live in the repo's out/, wherever this is started from
    if any(r["step"] == steps for r in evals(out_dir)):
        return out_dir
    command = [sys.executable, script, *map(str, flags), "--max_steps", str(steps), "--out_dir", out_dir, "--quiet"]
    print(" ".join(command[1:]), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        sys.exit(f"error: the run in {out_dir} failed (see its message above); fix it and run this script again, "
                 "finished runs are reused")
    return out_dir


def evals(out_dir, key="val_loss"):
    """The records of a run's log that hold `key`."""
    return [r for r in pretrain.read_log(os.path.join(out_dir, "log.jsonl")) if key in r]


def final(out_dir, key="val_loss"):
    """The last logged value of `key` in a run."""
    return evals(out_dir, key)[-1][key]


def spread(values):
    """'mean ± sd' over seeds, sd the sample standard deviation."""
    values = np.asarray(values, dtype=float)
    sd = values.std(ddof=1) if len(values) > 1 else float("nan")
    return f"{values.mean():.3f} ± {sd:.3f}"


def hardware():
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return f"{threads} thread(s) per run of a {os.cpu_count()}-core {name}, torch {torch.__version__}"


def band(ax, xs, runs, label, **style):
    """Mean over seeds (runs: one list of y per seed), in a band from the lowest to the highest seed."""
    ys = np.array(runs, dtype=float)
    line, = ax.plot(xs, ys.mean(axis=0), label=label, **style)
    ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2, lw=0)


def save(fig, path, dpi=110):
    """Lay a figure out, write it to path and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pretrain.pyplot().close(fig)
