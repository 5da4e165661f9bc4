"""Faults: a run killed at any moment, Ctrl-C, a full disk, and flags that make no sense."""
import errno
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import harness
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


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path):
    out = tmp_path / "run"
    args = tiny_args(out, 40, "--eval_interval", "40")
    child = subprocess.Popen([sys.executable, "pretrain.py", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.1)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 1 and "interrupted: checkpoint saved at step" in stderr, stderr
    assert "Traceback" not in stderr
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= step < 40 and step == max(losses(out))  # saved right after the last step it took
    pretrain.main(args + ["--resume"])
    assert sorted(losses(out)) == list(range(1, 41))


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
