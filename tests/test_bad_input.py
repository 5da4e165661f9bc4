"""Every flag checked: each bad input below ends the run with one line that names the flag
or file, exit status 1, before any data is loaded, and never a traceback."""

import os
import subprocess
import sys

import pytest

import cpt
import harness
import pretrain
from test_cpt import base, cpt_args  # noqa: F401  (base is a fixture: a tiny pretrained model)
from test_pretrain import ROOT, tiny_args

PRETRAIN_CASES = [  # (flags added to a tiny run, words the message must hold)
    (["--lr", "-1"], "--lr: -1 is not valid"),
    (["--lr", "nan"], "--lr: nan is not valid"),
    (["--n_head", "3", "--n_embd", "128"], "--n_embd 128 must split into --n_head 3"),
    (["--n_head", "0"], "--n_head: 0 is not valid"),
    (["--n_head", "4", "--n_embd", "36"], "heads of an even size"),
    (["--n_layer", "0"], "--n_layer: 0 is not valid"),
    (["--max_steps", "0"], "--max_steps: 0 is not valid"),
    (["--max_steps", "-5"], "--max_steps: -5 is not valid"),
    (["--eval_interval", "0"], "--eval_interval: 0 is not valid"),
    (["--log_interval", "0"], "--log_interval: 0 is not valid"),
    (["--eval_batches", "0"], "--eval_batches: 0 is not valid"),
    (["--grad_accum", "0"], "--grad_accum: 0 is not valid"),
    (["--batch_size", "0"], "--batch_size: 0 is not valid"),
    (["--seed", "-1"], "--seed: -1 is not valid"),
    (["--grad_clip", "0"], "--grad_clip: 0 is not valid"),
    (["--grad_clip", "-1"], "--grad_clip: -1 is not valid"),
    (["--min_lr_ratio", "5"], "--min_lr_ratio: 5 is not valid"),
    (["--min_lr_ratio", "-1"], "--min_lr_ratio: -1 is not valid"),
    (["--weight_decay", "-1"], "--weight_decay: -1 is not valid"),
    (["--warmup", "-5"], "--warmup: -5 is not valid"),
    (["--warmup", "30"], "--warmup 30 must be less than --max_steps 20"),
    (["--meta_cooldown", "1"], "--meta_cooldown: 1 is not valid"),
    (["--meta_cooldown", "-0.1"], "--meta_cooldown: -0.1 is not valid"),
    (["--meta_drop", "1.5"], "--meta_drop: 1.5 is not valid"),
    (["--decay_frac", "0"], "--decay_frac: 0 is not valid"),
    (["--sample_tokens", "-5"], "--sample_tokens: -5 is not valid"),
    (["--compile=off"], "--compile/--no-compile: ignored explicit argument 'off'"),
    (["--attn_backend", "flash"], "--attn_backend: invalid choice: 'flash'"),
    (["--max_steps", "abc"], "--max_steps: 'abc' is not a whole number"),
    (["--init", "x.pt"], "--init is for --sample"),
    (["--seq_len", "100000"], "one step needs about"),
    (["--data", "missing.jsonl"], "data source 'missing.jsonl' not found"),
    (["--preset", "huge"], "--preset: invalid choice: 'huge'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
]


def one_line_error(call, argv):
    """Run call(argv) as main() does and return its message; it must be one 'error: ' line."""
    with pytest.raises(SystemExit) as stop:
        call(argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    return message


@pytest.mark.parametrize("flags, says", PRETRAIN_CASES, ids=[" ".join(f) for f, _ in PRETRAIN_CASES])
def test_pretrain_refuses_with_one_line(tmp_path, flags, says):
    assert says in one_line_error(pretrain.main, tiny_args(tmp_path / "run", 20, *flags))
    assert not (tmp_path / "run" / "log.jsonl").exists()  # refused before training started


@pytest.mark.parametrize("out_dir, says", [("", "--out_dir '' is empty"), ("file", "is a file")])
def test_out_dir_that_cannot_be_a_folder(tmp_path, out_dir, says):
    (tmp_path / "file").write_text("not a folder")
    argv = tiny_args(tmp_path, 20) + ["--out_dir", str(tmp_path / out_dir) if out_dir else ""]
    assert says in one_line_error(pretrain.main, argv)


def test_a_second_run_on_the_same_out_dir_stops(tmp_path):
    """The first run holds a lock on its out_dir; a second process must not write there."""
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {ROOT!r}); import harness; "
                               f"lock = harness.claim_out_dir({str(tmp_path)!r}, 0); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert "another run is writing to" in one_line_error(pretrain.main, tiny_args(tmp_path, 20))
    finally:
        holder.kill()
        holder.wait()
    pretrain.main(tiny_args(tmp_path, 2))  # the lock goes with the process that held it


def test_resume_errors_name_what_to_do(tmp_path, base):  # noqa: F811
    pretrain.main(tiny_args(tmp_path / "run", 4))
    assert "leave those flags out" in one_line_error(pretrain.main, tiny_args(tmp_path / "run", 4, "--n_embd", "48", "--resume"))
    message = one_line_error(pretrain.main, tiny_args(tmp_path / "run", 8, "--resume"))
    assert "cosine schedule" in message and "--schedule wsd" in message and "cpt.py" in message
    cpt.main(cpt_args(base, tmp_path / "cpt", 1))
    assert "python cpt.py --resume" in one_line_error(pretrain.main, ["--resume", "--out_dir", str(tmp_path / "cpt")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ckpt.pt").write_bytes(b"x" * 500)
    message = one_line_error(pretrain.main, ["--resume", "--out_dir", str(tmp_path / "bad")])
    assert "cannot read checkpoint" in message and "it is damaged" in message


def test_resume_as_printed_takes_every_setting_from_the_checkpoint(tmp_path):
    """`--resume --out_dir DIR` alone continues a run started with non-default flags."""
    pretrain.main(tiny_args(tmp_path, 6, "--eval_interval", "3"))
    pretrain.main(["--resume", "--out_dir", str(tmp_path), "--device", "cpu"])
    assert harness.load_checkpoint(tmp_path / "ckpt.pt")["args"]["n_embd"] == 32


CPT_CASES = [
    (["--eval_interval", "0"], "--eval_interval: 0 is not valid"),
    (["--batch_size", "0"], "--batch_size: 0 is not valid"),
    (["--grad_accum", "0"], "--grad_accum: 0 is not valid"),
    (["--log_interval", "0"], "--log_interval: 0 is not valid"),
    (["--eval_batches", "0"], "--eval_batches: 0 is not valid"),
    (["--max_steps", "0"], "--max_steps: 0 is not valid"),
    (["--grad_clip", "-1"], "--grad_clip: -1 is not valid"),
    (["--compile=off"], "--compile/--no-compile: ignored explicit argument 'off'"),
    (["--replay", "1.5"], "--replay: 1.5 is not valid: it must be in [0, 1)"),
    (["--val_fraction", "0"], "--val_fraction: 0 is not valid: it must be in (0, 1)"),
]


@pytest.mark.parametrize("flags, says", CPT_CASES, ids=[" ".join(f) for f, _ in CPT_CASES])
def test_cpt_refuses_with_one_line(base, tmp_path, flags, says):  # noqa: F811
    assert says in one_line_error(cpt.main, cpt_args(base, tmp_path, 5, *flags))


def test_cpt_out_dir_that_is_a_file(base, tmp_path):  # noqa: F811
    (tmp_path / "file").write_text("not a folder")
    assert "is a file" in one_line_error(cpt.main, cpt_args(base, tmp_path / "file", 5))


def test_a_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "pretrain.py", "--out_dir", str(tmp_path), "--lr", "-1", "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: argument --lr: -1 is not valid: it must be a positive number (see --help)"
