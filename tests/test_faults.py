"""Faults: a run killed at any moment, Ctrl-C and SIGTERM, a full disk, and flags that make no sense."""
import errno
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import pretrain
from model import BadInput
from test_data import write_jsonl
from test_pretrain import ROOT, losses, tiny_args

SAVE_FOREVER = """
import sys, torch
sys.path.insert(0, {root!r})
import harness
from model import GPT, GPTConfig
model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=128))
optimizer = torch.optim.AdamW(model.parameters())
step = 0
while True:  # ~30 MB a checkpoint: a kill usually lands mid-write
    step += 1
    with torch.no_grad():
        model.wte.weight.fill_(step)
    harness.save_checkpoint({path!r}, model, optimizer, step, {{}})
    print(step, flush=True)
"""


def test_sigkill_during_a_checkpoint_write_never_corrupts_it(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    script = SAVE_FOREVER.format(root=ROOT, path=path)
    for delay in (1.5, 2.0, 2.7):
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        child.stdout.readline()  # one checkpoint is complete; the next write is under way
        time.sleep(delay)
        child.kill()  # SIGKILL: no handler, no cleanup, like a power cut for this process
        child.wait()
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["step"] >= 1 and bool((ckpt["model"]["wte.weight"] == ckpt["step"]).all())


def run_and_signal(command, out_dir, signals, lines=3, env=None):
    """Start a run as its own process; once its log holds `lines` steps (the handler is in
    place by then), send it `signals`, one after another; wait for it. (exit status, stderr)."""
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out_dir / "log.jsonl", time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= lines) and time.time() < deadline:
        time.sleep(0.05)
    for signum in signals:
        child.send_signal(signum)
    _, stderr = child.communicate(timeout=120)
    return child.returncode, stderr


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The losses of a 40-step run that nothing interrupts."""
    out_dir = tmp_path_factory.mktemp("straight")
    pretrain.main(tiny_args(out_dir, 40, "--eval_interval", "40"))
    return losses(out_dir)


@pytest.mark.parametrize("signals, status, name", [((signal.SIGINT,), 1, "Ctrl-C"),
                                                   ((signal.SIGTERM, signal.SIGTERM), 143, "SIGTERM")],
                         ids=["ctrl-c", "sigterm-twice"])
def test_a_signal_saves_a_checkpoint_and_resume_gives_the_losses_of_a_straight_run(tmp_path, straight, signals,
                                                                                    status, name):
    """Ctrl-C, or SIGTERM (sent twice, as a worker under Slurm and torchrun may get it):
    the step is finished, the checkpoint written, the resume line printed, exit 1 or 143."""
    out = tmp_path / "run"
    args = tiny_args(out, 40, "--eval_interval", "40")
    returncode, stderr = run_and_signal([sys.executable, "pretrain.py", *args], out, signals)
    assert returncode == status and f"interrupted by {name}: checkpoint saved at step" in stderr, stderr
    assert f"python pretrain.py --resume --out_dir {out}" in stderr and "Traceback" not in stderr
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= step < 40 and step == max(losses(out))  # saved right after the last step it took
    pretrain.main(args + ["--resume"])
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 41))
    assert all(abs(straight[s] - resumed[s]) < 1e-4 for s in straight), [(straight[s], resumed[s]) for s in (step, 40)]


STOP_AND_SAVE = """
import sys, time, torch
sys.path.insert(0, {root!r})
import harness
from model import GPT, GPTConfig
model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=128))
optimizer = torch.optim.AdamW(model.parameters())
def save(step):  # ~30 MB, its weights all equal to its step
    with torch.no_grad():
        model.wte.weight.fill_(step)
    harness.save_checkpoint({path!r}, model, optimizer, step, {{}})
save(1)
with harness.signals_finish_the_step() as stop:
    print("ready", flush=True)
    while not stop.signal:
        time.sleep(0.01)
    print("saving", flush=True)
    save(2)  # the final checkpoint: the second signal comes while it is written
sys.exit(harness.STOP_SIGNALS[stop.signal][1])
"""


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT),
                                           (signal.SIGTERM, signal.SIGKILL)], ids=["term-term", "int-int", "term-kill"])
def test_a_second_signal_during_the_final_checkpoint_leaves_a_whole_one(tmp_path, first, second):
    """A repeated SIGTERM is ignored: the final checkpoint is written, exit 143. A second
    Ctrl-C quits at once and SIGKILL cannot be handled: either way ckpt.pt is the old
    checkpoint or the new one, whole."""
    path = str(tmp_path / "ckpt.pt")
    child = subprocess.Popen([sys.executable, "-c", STOP_AND_SAVE.format(root=ROOT, path=path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(first)
    assert "saving" in next(line for line in child.stdout if line.strip() not in ("", "SIGTERM", "Ctrl-C") and
                                                                   "finishing this step" not in line)
    child.send_signal(second)
    child.communicate(timeout=60)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] in (1, 2) and bool((ckpt["model"]["wte.weight"] == ckpt["step"]).all())
    if second == signal.SIGTERM:
        assert child.returncode == 143 and ckpt["step"] == 2
    else:
        assert child.returncode != 0


def test_disk_full_while_writing_the_token_cache(tmp_path, monkeypatch):
    def disk_full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "save", disk_full)
    path = write_jsonl(tmp_path / "full.jsonl", ["one document", "another document"])
    with pytest.raises(BadInput, match=r"could not write the token cache .*\(No space left on device\)"):
        data.load_corpus(path)
    monkeypatch.undo()
    assert len(data.load_corpus(path)) == 2  # nothing half-written was left to trip over


def test_unknown_device(tmp_path):
    with pytest.raises(BadInput, match="unknown device 'tpu'"):
        pretrain.train(pretrain.build_parser().parse_args(tiny_args(tmp_path, 1, "--device", "tpu")))
