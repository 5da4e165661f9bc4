"""cpt.py: schedules, replay arithmetic, both validation losses, exact resume, clear errors.

The "old domain" is a tiny model pretrained for 10 steps on a made-up code corpus (a
.jsonl written here); CPT then moves it to pydoc. Every run takes seconds."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import cpt
import data
import harness
import pretrain
from model import BadInput
from test_faults import run_and_signal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A folder with old.jsonl (40 code-like documents) and run/ckpt.pt, a 2-layer,
    32-wide model pretrained on it for 10 steps."""
    folder = tmp_path_factory.mktemp("cpt_base")
    with open(folder / "old.jsonl", "w") as f:
        for i in range(40):
            text = "".join(f"def total_{i}_{j}(values, start={j}):\n    return sum(values) * {i} + start\n\n"
                           for j in range(10))
            f.write(json.dumps({"text": text, "url": f"example.org/{i}"}) + "\n")
    pretrain.main(["--data", str(folder / "old.jsonl"), "--out_dir", str(folder / "run"), "--preset", "cpu",
                   "--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--seq_len", "64",
                   "--batch_size", "4", "--max_steps", "10", "--warmup", "2", "--lr", "3e-3",
                   "--eval_interval", "10", "--eval_batches", "2", "--log_interval", "1",
                   "--sample_tokens", "0", "--quiet"])
    return folder


def cpt_args(base, out_dir, steps=10, *extra):
    return ["--init", str(base / "run" / "ckpt.pt"), "--data", "pydoc", "--out_dir", str(out_dir),
            "--device", "cpu", "--max_steps", str(steps), "--warmup", "4", "--eval_interval", "5",
            "--log_interval", "1", "--sample_tokens", "0", "--quiet", *extra]


def run_cpt(argv):
    return cpt.run(cpt.build_parser().parse_args(argv))


def losses(out_dir, key="loss"):
    return {r["step"]: r[key] for r in harness.read_log(os.path.join(out_dir, "log.jsonl")) if key in r}


@pytest.fixture(scope="module")
def cpt_run(base, tmp_path_factory):
    """One finished 10-step CPT run with 5 % replay."""
    out_dir = tmp_path_factory.mktemp("cpt_run")
    run_cpt(cpt_args(base, out_dir, 10, "--replay", "0.05"))
    return out_dir


# ---------------------------------------------------------------- schedules

def schedule(kind, warmup=10):
    """cpt's schedule for a run that pretrained with peak 1.0 and ended at 0.1, 100 CPT steps."""
    return cpt.lr_schedule(kind, max_lr=1.0, min_lr=0.1, warmup=warmup, max_steps=100,
                           constant_lr=0.4, cooldown=20, anneal=10)


def test_rewarm_cosine_warms_up_from_the_final_lr_and_decays_again():
    lr = schedule("rewarm-cosine")
    assert lr(0) == pytest.approx(0.19)      # starts one warmup step above the old final LR, not at 0
    assert lr(9) == lr(10) == pytest.approx(1.0)
    assert lr(55) == pytest.approx(0.55)     # half way down the cosine
    assert lr(100) == lr(1000) == pytest.approx(0.1)
    assert schedule("rewarm-cosine", warmup=0)(0) == pytest.approx(1.0)


def test_constant_schedule_never_rewarms():
    lr = schedule("constant")
    assert [lr(s) for s in (0, 9, 50, 99, 100, 1000)] == pytest.approx([0.1] * 6)
    assert schedule("constant", warmup=0)(0) == pytest.approx(0.1)


def test_infinite_schedule_phases():
    lr = schedule("infinite")                 # warmup 0-9, cooldown 10-29, constant 30-89, anneal 90-99
    assert lr(0) == pytest.approx(0.19) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)       # cooldown starts at the peak
    assert lr(20) == pytest.approx(0.7)       # half way from 1.0 to the constant 0.4
    assert lr(30) == lr(60) == lr(89) == lr(90) == pytest.approx(0.4)
    assert lr(95) == pytest.approx(0.2)       # exponential anneal: 0.4 * (0.1 / 0.4) ** 0.5
    assert lr(100) == lr(1000) == pytest.approx(0.1)
    assert schedule("infinite", warmup=0)(0) == pytest.approx(1.0)
    # constant_lr None is warmup-stable-decay: the stable phase sits at the peak
    assert pretrain.learning_rate(50, 1.0, 0.1, 10, 100, kind="infinite", anneal=10) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        pretrain.learning_rate(50, 1.0, 0.1, 10, 100, kind="linear")


# ---------------------------------------------------------------- replay

@pytest.mark.parametrize("batch_size", [1, 4, 8, 12])
@pytest.mark.parametrize("replay", [0.0, 0.05, 0.1, 0.25, 1 / 3, 0.5, 0.95])
def test_replay_fraction_is_exact_to_one_row(batch_size, replay):
    total = 0
    for index in range(2000):
        k = cpt.replay_count(index, batch_size, replay)
        assert k in (math.floor(batch_size * replay), math.ceil(batch_size * replay))
        assert cpt.sum_replayed(index, batch_size, replay) == total
        total += k
        assert abs(total - (index + 1) * batch_size * replay) < 1  # never a whole row off


def test_five_percent_of_eight_rows():
    assert [cpt.replay_count(i, 8, 0.05) for i in range(10)] == [0, 0, 1, 0, 1] * 2


def test_mixed_batches_take_each_corpus_as_its_own_stream(base):
    old = data.load_corpus(str(base / "old.jsonl"), quiet=True)
    new = data.load_corpus("pydoc", quiet=True)
    old_rows = data.pack_split(old, data.split_documents(old)[0], 64, "bestfit")
    new_rows = data.pack_split(new, data.split_documents(new, 0.2)[0], 64, "bestfit")
    key = lambda x: x.numpy().tobytes()
    old_keys = {key(data.rows_to_batch(old, [row], 64)["x"][0]): i for i, row in enumerate(old_rows)}
    mix = dict(batch_size=4, replay=0.25, seq_len=64, seed=1337)

    replayed = []
    for index in range(len(old_rows) + 3):
        batch = cpt.mixed_batch(index, new, new_rows, old, old_rows, **mix)
        assert batch["x"].shape == batch["y"].shape == batch["doc_ids"].shape == (4, 64)
        picked = [old_keys.get(key(x)) for x in batch["x"]]
        assert sum(i is not None for i in picked) == cpt.replay_count(index, 4, 0.25) == 1
        replayed += [i for i in picked if i is not None]
    # one epoch of the old stream visits every old row once, then a new epoch starts
    assert sorted(replayed[:len(old_rows)]) == list(range(len(old_rows)))

    # no replay: exactly the batches pretrain.py's data.get_batch would give
    mix["replay"] = 0.0
    for index in (0, 7, 500):
        mine = cpt.mixed_batch(index, new, new_rows, old, old_rows, **mix)
        theirs = data.get_batch(new, new_rows, 64, index, 4, 1337)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)

    # torchrun: the slices of two processes make up one process's batch of twice the size
    mix["replay"] = 0.25
    whole = cpt.mixed_batch(3, new, new_rows, old, old_rows, **{**mix, "batch_size": 8})
    halves = [cpt.mixed_batch(3, new, new_rows, old, old_rows, **mix, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(torch.cat([h["x"] for h in halves]), whole["x"])


# ---------------------------------------------------------------- whole runs

def test_cpt_logs_both_domains_from_the_pretrained_model_on(base, cpt_run):
    log = harness.read_log(cpt_run / "log.jsonl")
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert all(r["val_loss_new"] != r["val_loss_old"] and r["val_loss"] == r["val_loss_new"] for r in evals)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 11))
    # "old, before CPT" is the validation loss pretraining ended with: the same held-out rows
    pretrained = [r for r in harness.read_log(base / "run" / "log.jsonl") if "val_loss" in r][-1]
    init_eval = json.load(open(cpt_run / "run.json"))["init_eval"]
    assert init_eval["old"] == pytest.approx(pretrained["val_loss"], abs=1e-6)
    assert init_eval["new"] > evals[-1]["val_loss_new"]  # it learned the new domain
    # step 0 rewarms from the LR pretraining ended with (3e-4) towards its peak (3e-3)
    assert log[0]["lr"] == pytest.approx(3e-4 + (3e-3 - 3e-4) / 4)
    assert (cpt_run / "lr.png").stat().st_size > 5_000 and (cpt_run / "loss.png").stat().st_size > 5_000
    ckpt = torch.load(cpt_run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["data"]["source"] == "pydoc" and ckpt["args"]["replay"] == 0.05
    assert ckpt["old_data"]["source"] == str(base / "old.jsonl")


def test_resume_of_a_cpt_run_continues_exactly(base, tmp_path, monkeypatch):
    """12 straight CPT steps == a run that dies in step 8 (checkpoint at 5) + --resume."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_cpt(cpt_args(base, straight, 12, "--replay", "0.25"))

    real = cpt.mixed_batch
    def dies_at_step_8(index, *args, **kw):
        if index == 7:
            raise RuntimeError("power cut")
        return real(index, *args, **kw)
    monkeypatch.setattr(cpt, "mixed_batch", dies_at_step_8)
    with pytest.raises(RuntimeError, match="power cut"):
        run_cpt(cpt_args(base, crashed, 12, "--replay", "0.25"))
    monkeypatch.undo()
    assert max(losses(crashed)) == 7  # it got past the checkpoint before dying
    run_cpt(["--resume", "--out_dir", str(crashed), "--device", "cpu", "--quiet"])  # the flags come from its checkpoint

    a, b = losses(straight), losses(crashed)
    assert sorted(b) == list(range(1, 13))  # the resumed log has no duplicate steps
    assert all(abs(a[s] - b[s]) < 1e-4 for s in range(1, 13)), [(a[s], b[s]) for s in (8, 12)]
    assert losses(straight, "val_loss_old")[12] == pytest.approx(losses(crashed, "val_loss_old")[12], abs=1e-4)
    assert a[12] != a[11]


def test_sigterm_stops_a_cpt_run_and_resume_gives_the_losses_of_a_straight_run(base, tmp_path):
    """A real cpt.py process: SIGTERM finishes the step, writes the checkpoint and exits
    143; the printed --resume line continues to the losses of a run never stopped."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    flags = ("--replay", "0.25", "--eval_interval", "40")
    run_cpt(cpt_args(base, straight, 40, *flags))
    returncode, stderr = run_and_signal([sys.executable, "cpt.py", *cpt_args(base, stopped, 40, *flags)], stopped,
                                        [signal.SIGTERM])
    assert returncode == 143 and "interrupted by SIGTERM: checkpoint saved at step" in stderr, stderr
    assert f"python cpt.py --resume --out_dir {stopped}" in stderr
    step = torch.load(stopped / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= step < 40 and step == max(losses(stopped))
    run_cpt(["--resume", "--out_dir", str(stopped), "--device", "cpu", "--quiet"])
    a, b = losses(straight), losses(stopped)
    assert sorted(b) == list(range(1, 41))
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), [(a[s], b[s]) for s in (step, 40)]


def test_resume_refuses_other_flags(base, cpt_run):
    with pytest.raises(BadInput, match=r"another configuration: replay=0.05 \(now 0.25\)"):
        run_cpt(["--resume", "--out_dir", str(cpt_run), "--replay", "0.25", "--device", "cpu", "--quiet"])


def test_optimizer_state_is_fresh_unless_kept(base, tmp_path):
    run_cpt(cpt_args(base, tmp_path / "fresh", 1))
    run_cpt(cpt_args(base, tmp_path / "kept", 1, "--keep_optimizer"))
    steps = [torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["optimizer"]["state"][0]["step"].item()
             for name in ("fresh", "kept")]
    assert steps == [1, 11]  # AdamW's step count: 1 CPT step, or 10 pretraining steps + 1


# ---------------------------------------------------------------- bad input

def doctored(base, tmp_path, change):
    """A copy of the base checkpoint with change(ckpt) applied."""
    ckpt = torch.load(base / "run" / "ckpt.pt", weights_only=True)
    change(ckpt)
    path = tmp_path / "doctored.pt"
    torch.save(ckpt, path)
    return path


def test_bad_init_checkpoints(base, tmp_path):
    def fails(init, message):
        with pytest.raises(BadInput, match=message):
            run_cpt(cpt_args(base, tmp_path / "out", 5) + ["--init", str(init)])

    fails(tmp_path / "missing" / "ckpt.pt", "no checkpoint at .*; pass --init")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    fails(tmp_path / "garbage.pt", "cannot read checkpoint")
    fails(doctored(base, tmp_path, lambda c: c["config"].update(n_embd=48)),
          r"weights do not fit its model config .*size mismatch")
    fails(doctored(base, tmp_path, lambda c: c["config"].update(n_experts=8)), "another version of minipretrain")
    fails(doctored(base, tmp_path, lambda c: c.pop("data")), r"not a pretrain.py checkpoint \(no data\)")


@pytest.mark.parametrize("replay", ["-0.1", "1", "1.5"])
def test_replay_out_of_range(base, tmp_path, replay):
    with pytest.raises(SystemExit, match=r"--replay: .* is not valid: it must be in \[0, 1\)"):
        run_cpt(cpt_args(base, tmp_path, 5, "--replay", replay))


def test_replay_needs_the_original_corpus(base, tmp_path, capsys):
    moved = str(tmp_path / "moved.jsonl")
    init = doctored(base, tmp_path, lambda c: (c["data"].update(source=moved), c["args"].update(data=moved)))
    with pytest.raises(BadInput, match=f"--replay 0.05 needs the pretraining corpus '{moved}'"):
        run_cpt(cpt_args(base, tmp_path / "out", 2, "--replay", "0.05") + ["--init", str(init)])
    # without replay the run goes on, measuring the new domain only
    run_cpt(cpt_args(base, tmp_path / "out", 2) + ["--init", str(init)])
    assert "cannot be read, so forgetting is not measured" in capsys.readouterr().out
    evals = [r for r in harness.read_log(tmp_path / "out" / "log.jsonl") if "val_loss" in r]
    assert "val_loss_new" in evals[-1] and "val_loss_old" not in evals[-1]


def test_cpt_on_the_pretraining_data_warns(base, tmp_path, capsys):
    run_cpt(cpt_args(base, tmp_path, 1) + ["--data", str(base / "old.jsonl")])
    assert "is the corpus" in capsys.readouterr().out


def test_command_line_errors_are_one_line(base, tmp_path):
    for flags, message in [(["--replay", "1.5"], "--replay: 1.5 is not valid: it must be in [0, 1)"),
                           (["--init", str(tmp_path / "none.pt")], "no checkpoint at")]:
        result = subprocess.run([sys.executable, "cpt.py", "--out_dir", str(tmp_path), "--device", "cpu",
                                 "--quiet", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
