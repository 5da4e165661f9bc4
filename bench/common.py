"""What the bench scripts share: the repo on the import path, training runs as child
processes (a finished run is reused), seeds summarised as mean and spread, the one rule that
decides which differences a table may claim, the hardware line, and plotting.

    python bench/common.py --mark README.md bench/*.md   # mark tables already written"""

from itertools import combinations
import os
import platform
import re
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, ROOT)

import harness  # noqa: E402  (after the path is set)

SEEDS = (1337, 1338, 1339)
# The cpu preset as the packing, MeCo and CPT tables were measured (fp32, before bench/cpu.py
# chose today's preset): pinned, so that their commands still give their numbers.
OLD_CPU = dict(n_layer=4, n_head=4, n_embd=128, seq_len=256, batch_size=8, lr=3e-3, warmup=20, dtype="fp32")
RECIPE = ["--preset", "cpu", "--device", "cpu", *(f"--{k}={v}" for k, v in OLD_CPU.items())]


def train(script, out_dir, flags, steps):
    """Run `python <script> <flags> --out_dir <out_dir>` and return out_dir. A run whose log
    already holds its final evaluation is reused (delete the folder to train it again). A
    failing run stops the experiment with one line; the run printed its own reason above."""
    out_dir = os.path.join(ROOT, out_dir)  # runs live in the repo's out/, wherever this is started from
    if any(r["step"] == steps for r in evals(out_dir)):
        return out_dir
    # Any other run in this folder (stopped half way, or of another length) is this bench's own
    # and is trained again from the start, as it always was here: scripts refuse a folder
    # holding a run's checkpoint, so the bench says so deliberately, with --overwrite_out_dir.
    command = [sys.executable, script, *map(str, flags), "--max_steps", str(steps), "--out_dir", out_dir, "--quiet",
               "--overwrite_out_dir"]
    print(" ".join(command[1:]), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        sys.exit(f"error: the run in {out_dir} failed (see its message above); fix it and run this script again, "
                 "finished runs are reused")
    return out_dir


def evals(out_dir, key="val_loss"):
    """The records of a run's log that hold `key`."""
    return [r for r in harness.read_log(os.path.join(out_dir, "log.jsonl")) if key in r]


def final(out_dir, key="val_loss"):
    """The last logged value of `key` in a run."""
    return evals(out_dir, key)[-1][key]


def spread(values):
    """'mean ± sd' over seeds, sd the sample standard deviation."""
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else float('nan'):.3f}"


def resolved(a, b):
    """The one rule for every comparison in bench/ and the README: two rows differ when their
    means are further apart than the sum of their two standard deviations (a, b: (mean, sd)).
    Rough on purpose: two or three seeds cannot carry a finer test."""
    return abs(a[0] - b[0]) - (a[1] + b[1]) > 1e-9  # a tie on the printed digits is not apart


CELL = re.compile(r"\**([-+]?\d+\.\d+)\** ± (\d+\.\d+)(?: \([a-z]+\))?")  # a cell of 'mean ± sd' alone, marked or not
NOTE = ("Letters: in a column, rows that share a letter are within spread (`bench/common.py:resolved`); rows "
        "with no letter in common differ by more than their spread. Bold: the lowest, resolved from every other row.")


def mark(text):
    """Mark every markdown table in text by `resolved`, in each column of 'mean ± sd' cells:
    a cell gets the letters of the largest groups of rows that are all within spread of each
    other (tables are small, so every subset is tried), and the lowest mean is bold only if it
    is a group of its own. Marks already there are replaced: a table can be marked again."""
    parts = re.split(r"((?:^\|.*\n)+)", text, flags=re.M)  # odd parts are tables
    for p in range(1, len(parts), 2):
        rows = [line.strip().strip("|").split("|") for line in parts[p].splitlines()]
        marked = False
        for j in range(len(rows[0])):
            found = {i: CELL.fullmatch(row[j].strip()) for i, row in enumerate(rows) if i > 1 and j < len(row)}
            found = {i: m for i, m in found.items() if m}
            cells = {i: (float(m[1]), float(m[2])) for i, m in found.items()}
            if len(cells) < 2:
                continue
            near = [set(g) for n in range(len(cells), 0, -1) for g in combinations(cells, n)
                    if not any(resolved(cells[a], cells[b]) for a, b in combinations(g, 2))]
            groups = sorted((g for g in near if not any(g < h for h in near)), key=lambda g: min(cells[i][0] for i in g))
            for i, m in found.items():
                letters = "".join(chr(ord("a") + k) for k, g in enumerate(groups) if i in g)
                mean = f"**{m[1]}**" if groups[0] == {i} else m[1]  # the lowest, resolved from every other row
                rows[i][j] = f" {mean} ± {m[2]} ({letters}) "
            marked = True
        if marked:
            parts[p] = "".join(f"|{'|'.join(row)}|\n" for row in rows) + f"\n{NOTE}\n"
            parts[p + 1] = re.sub(r"\A\nLetters: .*\n", "", parts[p + 1])  # the note of an earlier marking
    return "".join(parts)


def write(path, lines):
    """Write a bench report, its tables marked, and print it."""
    text = mark("\n".join(lines) + "\n")
    with open(path, "w") as f:
        f.write(text)
    print(text, end="")


def hardware():
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    # Python too: the stdlib and pydoc corpora are the running Python's own files.
    return (f"{threads} thread(s) per run of a {os.cpu_count()}-core {name}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def band(ax, xs, runs, label, **style):
    """Mean over seeds (runs: one list of y per seed), in a band from the lowest to the highest seed."""
    ys = np.array(runs, dtype=float)
    line, = ax.plot(xs, ys.mean(axis=0), label=label, **style)
    ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2, lw=0)


def save(fig, path, dpi=110):
    """Lay a figure out, write it to path and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    harness.pyplot().close(fig)


if __name__ == "__main__":  # mark the tables of files written before, README.md too
    if sys.argv[1:2] != ["--mark"]:  # --help too
        sys.exit(print(__doc__) if sys.argv[1:2] in (["-h"], ["--help"]) else "usage: python bench/common.py --mark FILE.md ...")
    for path in sys.argv[2:]:
        with open(path) as f:
            text = mark(f.read())
        with open(path, "w") as f:
            f.write(text)
