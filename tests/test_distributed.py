import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import harness
import pretrain
from test_pretrain import ROOT, losses, tiny_args


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """torchrun, 2 CPU processes (gloo), 2 rows each == 1 process with 4 rows: the same
    rows, and DDP's averaged gradient equals the full batch's gradient. concat packing has
    no padding, so every process scores the same number of tokens and the match is exact
    up to float rounding (fp32: bf16 rounding would hide a mismatch)."""
    common = ["--packing", "concat", "--max_steps", "6", "--eval_interval", "3", "--grad_accum", "2", "--dtype", "fp32"]
    pretrain.main(tiny_args(tmp_path / "one", 6, *common, "--batch_size", "4"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "pretrain.py", *tiny_args(tmp_path / "two", 6, *common, "--batch_size", "2")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 7))  # one log, written once (by process 0)
    assert all(abs(one[s] - two[s]) < 1e-4 for s in one), (one, two)
    ckpt = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["args"]["world"] == 2
    log = harness.read_log(tmp_path / "two" / "log.jsonl")
    assert log[-1]["tokens"] == 6 * 2 * 2 * 2 * 64  # steps x processes x rows x micro-steps x seq_len


def test_sigterm_to_one_process_stops_both_at_one_step_and_resume_continues(tmp_path):
    """A scheduler's SIGTERM may reach the processes of a torchrun job at different steps
    (here: only one of them gets it). Both must stop after the same step (they agree by an
    all-reduce), process 0 writes the checkpoint, both exit 143, and --resume under torchrun
    continues to the losses of the same torchrun run never stopped."""
    if shutil.which("pgrep") is None:
        pytest.skip("needs pgrep to find torchrun's worker processes")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ("--eval_interval", "40", "--batch_size", "2")
    straight = subprocess.run(torchrun + tiny_args(tmp_path / "straight", 40, *flags), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    two = tiny_args(tmp_path / "two", 40, *flags)
    launcher = subprocess.Popen(torchrun + two, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / "two" / "log.jsonl", time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    workers = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                  text=True).stdout.split()]
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGTERM)  # one worker only, whichever rank it is
    try:
        _, stderr = launcher.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # processes that disagree hang in an all-reduce: end them (own sessions)
        for pid in workers + [launcher.pid]:
            os.kill(pid, signal.SIGKILL)
        launcher.wait()
        raise
    stops = re.findall(r"interrupted by SIGTERM: checkpoint saved at step (\d+)", stderr)
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]  # both processes, the same step
    assert "exitcode:143" in stderr.replace(" ", ""), stderr[-3000:]  # torchrun's report of the workers
    step = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["step"]
    assert str(step) == stops[0] and 3 <= step < 40 and step == max(losses(tmp_path / "two"))

    result = subprocess.run(torchrun + two + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "two")
    assert sorted(b) == list(range(1, 41))
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), [(a[s], b[s]) for s in (step, 40)]
