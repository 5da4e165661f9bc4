import os
import subprocess
import sys

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
