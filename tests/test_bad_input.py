"""Every flag checked: each bad input below ends the run with one line that names the flag
or file, exit status 1, before any data is loaded, and never a traceback."""

import os
import shutil
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


def run_in_a_process(script, argv, cwd=ROOT):
    """A real process: (exit status, stderr)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    return result.returncode, result.stderr.strip()


def test_a_new_run_refuses_a_folder_holding_a_run(tmp_path):
    """pretrain.py without --resume into a run's folder is refused, saying what is there and
    the three ways on; the run is untouched. --overwrite_out_dir starts over, deleting the
    old run's checkpoints (a kept ckpt_<step>.pt too), and does not mix with --resume."""
    run = tmp_path / "run"
    pretrain.main(tiny_args(run, 4, "--schedule", "wsd", "--decay_frac", "0.5"))  # keeps ckpt_2.pt
    before = (run / "ckpt.pt").read_bytes()
    status, stderr = run_in_a_process("pretrain.py", tiny_args(run, 6))
    assert status == 1 and stderr == (
        f"error: --out_dir {run} holds a pretrain.py run (step 4 of 4); continue it with --resume, choose another "
        "--out_dir, or pass --overwrite_out_dir to start over (it deletes that run's checkpoints)")
    assert (run / "ckpt.pt").read_bytes() == before
    assert "give one of them" in one_line_error(pretrain.main, tiny_args(run, 4, "--resume", "--overwrite_out_dir"))
    pretrain.main(tiny_args(run, 2, "--overwrite_out_dir"))
    assert harness.load_checkpoint(run / "ckpt.pt")["step"] == 2 and not (run / "ckpt_2.pt").exists()


def test_python_pretrain_twice_keeps_the_first_run(tmp_path, monkeypatch):
    """The default --out_dir is out/<preset>: a second `python pretrain.py` there is refused."""
    argv = tiny_args("unused", 2)
    del argv[argv.index("--out_dir"):argv.index("--out_dir") + 2]
    monkeypatch.chdir(tmp_path)
    pretrain.main(argv)
    before = (tmp_path / "out" / "cpu" / "ckpt.pt").read_bytes()
    status, stderr = run_in_a_process("pretrain.py", argv, cwd=tmp_path)
    assert status == 1 and stderr.startswith("error: --out_dir out/cpu holds a pretrain.py run (step 2 of 2)"), stderr
    assert (tmp_path / "out" / "cpu" / "ckpt.pt").read_bytes() == before


def test_cpt_never_writes_where_its_init_checkpoint_is(base, tmp_path):  # noqa: F811
    """cpt.py refuses an --out_dir holding its --init checkpoint, whatever the flags and
    however the path is spelled (real paths are compared); and, like pretrain.py, a
    folder holding another CPT run unless --resume or --overwrite_out_dir."""
    shutil.copytree(base / "run", tmp_path / "run")
    init, before = tmp_path / "run" / "ckpt.pt", (tmp_path / "run" / "ckpt.pt").read_bytes()
    argv = cpt_args(base, tmp_path / "run", 2)
    argv[argv.index("--init") + 1] = str(init)
    status, stderr = run_in_a_process("cpt.py", argv)
    assert status == 1 and stderr == (f"error: --out_dir {tmp_path / 'run'} holds the --init checkpoint {init}, "
                                      "which this run would overwrite; choose another --out_dir"), stderr
    (tmp_path / "link").symlink_to(tmp_path / "run")
    for out_dir, flags in [(tmp_path / "run", ["--overwrite_out_dir"]), (tmp_path / "link", ["--overwrite_out_dir"]),
                           (tmp_path / "run" / ".." / "run", [])]:
        argv = cpt_args(base, out_dir, 2, *flags)
        argv[argv.index("--init") + 1] = str(init)
        assert "holds the --init checkpoint" in one_line_error(cpt.main, argv)
    argv = cpt_args(base, tmp_path / "run", 2, "--resume")
    argv[argv.index("--init") + 1] = str(init)
    one_line_error(cpt.main, argv)  # refused too (here: the pretraining run's settings are not this run's)
    assert init.read_bytes() == before
    cpt.main(cpt_args(base, tmp_path / "cpt", 2))
    message = one_line_error(cpt.main, cpt_args(base, tmp_path / "cpt", 2))
    assert "holds a cpt.py run (step 2 of 2); continue it with --resume" in message


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
