import os
import subprocess
import sys

import pytest
import torch

import data
import harness
import pretrain
from model import BadInput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(out_dir, steps=20, *extra):
    """A 2-layer, 32-wide model on the pydoc corpus: a whole run takes seconds."""
    return ["--data", "pydoc", "--out_dir", str(out_dir), "--preset", "cpu", "--device", "cpu",
            "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--seq_len", "64",
            "--batch_size", "4", "--max_steps", str(steps), "--warmup", str(min(5, steps // 2)), "--lr", "3e-3",
            "--eval_interval", "10", "--eval_batches", "2", "--log_interval", "1",
            "--sample_tokens", "0", "--quiet", *extra]


def losses(out_dir):
    return {r["step"]: r["loss"] for r in harness.read_log(os.path.join(out_dir, "log.jsonl")) if "loss" in r}


# ---------------------------------------------------------------- schedule

def test_learning_rate_at_key_steps():
    lr = lambda step, warmup=10: pretrain.learning_rate(step, 1.0, 0.1, warmup, 110)
    assert lr(0) == pytest.approx(0.1)        # warmup starts at max_lr / warmup, not 0
    assert lr(9) == pytest.approx(1.0)        # and reaches max_lr on its last step
    assert lr(10) == pytest.approx(1.0)       # cosine starts at the top
    assert lr(60) == pytest.approx(0.55)      # half way down: (max + min) / 2
    assert lr(110) == lr(500) == pytest.approx(0.1)  # at and past the end: min_lr
    assert lr(0, warmup=0) == pytest.approx(1.0)
    assert pretrain.learning_rate(0, 1.0, 0.1, 4, 110, start_lr=0.2) == pytest.approx(0.4)  # rewarming


# ---------------------------------------------------------------- a whole run

def test_smoke_run_writes_everything_and_learns(tmp_path):
    pretrain.main(tiny_args(tmp_path, 30, "--sample_tokens", "8"))
    log = harness.read_log(tmp_path / "log.jsonl")
    train = [r for r in log if "loss" in r]
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert all({"step", "tokens", "lr", "loss"} <= set(r) for r in train)
    assert [r["step"] for r in evals] == [10, 20, 30] and "val_loss_pydoc" in evals[0]
    assert train[-1]["tokens"] == 30 * 4 * 64
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5  # deterministic: 10.34 -> 9.54
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert (tmp_path / "samples.txt").read_text().count("=== prompt") == 4
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 30 and ckpt["data"]["source"] == "pydoc" and ckpt["config"]["n_embd"] == 32


def dies_at_batch(index, monkeypatch, run):
    """run() as a run that dies (a power cut) when it asks for batch `index`."""
    real_get_batch = data.get_batch
    def get_batch(corpus, rows, seq_len, i, *args, **kw):
        if i == index:
            raise RuntimeError("power cut")
        return real_get_batch(corpus, rows, seq_len, i, *args, **kw)
    monkeypatch.setattr(data, "get_batch", get_batch)
    with pytest.raises(RuntimeError, match="power cut"):
        run()
    monkeypatch.undo()


def test_resume_after_a_crash_continues_exactly(tmp_path, monkeypatch):
    """20 straight steps == a run that dies at step 11 (checkpoint at 10) + --resume."""
    straight = tmp_path / "straight"
    pretrain.main(tiny_args(straight, 20))

    crashed = tmp_path / "crashed"
    dies_at_batch(11, monkeypatch, lambda: pretrain.main(tiny_args(crashed, 20)))
    assert max(losses(crashed)) == 11  # it got past the checkpoint before dying
    pretrain.main(tiny_args(crashed, 20, "--resume"))

    a, b = losses(straight), losses(crashed)
    assert sorted(b) == list(range(1, 21))  # the resumed log has no duplicate steps
    assert all(abs(a[s] - b[s]) < 1e-4 for s in range(1, 21)), [(a[s], b[s]) for s in (11, 20)]
    assert a[20] != a[19]


def test_fp16_resume_restores_the_gradient_scaler(tmp_path, monkeypatch):
    """--dtype fp16 (auto's choice on GPUs before sm_80) trains with a gradient scaler; its
    state, the scale and the steps since it last grew, is in the checkpoint, so a resumed run
    continues exactly. fp16 matmuls are slow on this CPU: 6 steps."""
    args = lambda out, *extra: tiny_args(out, 6, "--dtype", "fp16", "--eval_interval", "3", *extra)  # noqa: E731
    pretrain.main(args(tmp_path / "straight"))
    dies_at_batch(4, monkeypatch, lambda: pretrain.main(args(tmp_path / "crashed")))
    pretrain.main(args(tmp_path / "crashed", "--resume"))
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "crashed")
    assert sorted(b) == list(range(1, 7)) and all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)
    scalers = [harness.load_checkpoint(tmp_path / run / "ckpt.pt")["scaler"] for run in ("straight", "crashed")]
    assert scalers[0] == scalers[1] and scalers[0]["_growth_tracker"] == 6, scalers  # 6 steps without an overflow


def test_nan_loss_stops_with_the_step_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    real = pretrain.learning_rate
    monkeypatch.setattr(pretrain, "learning_rate",
                        lambda step, *args, **kw: float("nan") if step >= 12 else real(step, *args, **kw))
    with pytest.raises(BadInput, match="loss became nan at step 14"):
        pretrain.train(pretrain.build_parser().parse_args(tiny_args(tmp_path, 20)))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 10 and all(torch.isfinite(p).all() for p in ckpt["model"].values())


def test_a_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    pretrain.main(tiny_args(tmp_path, 10))
    before = (tmp_path / "ckpt.pt").read_bytes()

    def disk_full(obj, f, *args, **kw):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    model = torch.nn.Linear(2, 2)
    model.config = pretrain.GPTConfig()
    with pytest.raises(OSError):
        harness.save_checkpoint(str(tmp_path / "ckpt.pt"), model, torch.optim.SGD(model.parameters(), 0.1), 99, {})
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert os.listdir(tmp_path).count("ckpt.pt.tmp") == 0


# ---------------------------------------------------------------- bad checkpoints and flags

def test_resume_refuses_another_configuration(tmp_path):
    pretrain.main(tiny_args(tmp_path, 10))
    with pytest.raises(BadInput, match=r"another configuration: n_embd=32 \(now 48\)"):
        pretrain.train(pretrain.build_parser().parse_args(tiny_args(tmp_path, 10, "--n_embd", "48", "--resume")))


def test_resume_with_nothing_or_garbage(tmp_path):
    args = pretrain.build_parser().parse_args(tiny_args(tmp_path, 10, "--resume"))
    with pytest.raises(BadInput, match="no checkpoint at"):
        pretrain.train(args)
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    args = pretrain.build_parser().parse_args(tiny_args(tmp_path, 10, "--resume"))
    with pytest.raises(BadInput, match="cannot read checkpoint"):
        pretrain.train(args)


@pytest.mark.parametrize("flags, message", [
    (["--data", "missing.jsonl"], "data source 'missing.jsonl' not found"),
    (["--preset", "huge"], "--preset: invalid choice: 'huge'"),
    (["--device", "cuda"], "no CUDA GPU is visible"),
])
def test_command_line_errors_are_one_line(tmp_path, flags, message):
    if flags[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run([sys.executable, "pretrain.py", "--out_dir", str(tmp_path), "--quiet", *flags],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_resume_refuses_a_checkpoint_trained_on_other_data(tmp_path):
    from test_data import write_jsonl
    path = write_jsonl(tmp_path / "d.jsonl", [f"document {i} " * 20 for i in range(8)])
    pretrain.main(tiny_args(tmp_path / "run", 2, "--data", path, "--eval_interval", "2"))
    write_jsonl(tmp_path / "d.jsonl", [f"edited document {i} " * 20 for i in range(8)])
    with pytest.raises(BadInput, match="was trained on other data"):
        pretrain.train(pretrain.build_parser().parse_args(
            tiny_args(tmp_path / "run", 2, "--data", path, "--eval_interval", "2", "--resume")))


def test_rows_too_short_for_url_prefixes(tmp_path):
    with pytest.raises(BadInput, match="--seq_len 8 leaves no room for text after URL prefixes"):
        pretrain.train(pretrain.build_parser().parse_args(tiny_args(tmp_path, 2, "--seq_len", "8", "--meta", "url")))


def test_a_wsd_run_extended_logs_what_a_longer_run_logs(tmp_path):
    """warmup-stable-decay can be extended: 10 steps, then --resume --max_steps 20, gives
    exactly the losses of 20 straight steps. The extension goes back to the checkpoint kept
    where the first decay began (step 8, still at the peak LR) and decays at step 16."""
    pretrain.main(tiny_args(tmp_path / "straight", 20, "--schedule", "wsd"))
    pretrain.main(tiny_args(tmp_path / "extended", 10, "--schedule", "wsd"))
    assert harness.load_checkpoint(tmp_path / "extended" / "ckpt_8.pt")["step"] == 8
    pretrain.main(["--resume", "--out_dir", str(tmp_path / "extended"), "--max_steps", "20", "--device", "cpu"])
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "extended")
    assert sorted(b) == list(range(1, 21))
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), [(s, a[s], b[s]) for s in (9, 16, 20)]
    lrs = [r["lr"] for r in harness.read_log(tmp_path / "extended" / "log.jsonl") if "loss" in r]
    assert lrs[8:15] == [3e-3] * 7 and lrs[-1] < 3e-3  # stable until step 16 this time, then decaying


def test_training_on_the_mirror_matches_sdpa(tmp_path, monkeypatch):
    """--attn_backend reference (kernels.cu's algorithm in PyTorch) trains the same model as
    SDPA: the same loss at every step, to float tolerance (fp32: bf16 rounding would hide it)."""
    import model
    pretrain.main(tiny_args(tmp_path / "sdpa", 12, "--attn_backend", "sdpa", "--dtype", "fp32"))
    calls, real = [], model.flash_forward
    monkeypatch.setattr(model, "flash_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    pretrain.main(tiny_args(tmp_path / "mirror", 12, "--attn_backend", "reference", "--dtype", "fp32"))
    assert len(calls) >= 12 * 2  # every step, every layer ran the mirror
    a, b = losses(tmp_path / "sdpa"), losses(tmp_path / "mirror")
    assert sorted(b) == list(range(1, 13))
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)
    assert a[12] < a[1] - 0.2  # and it learned something
    assert harness.load_checkpoint(tmp_path / "mirror" / "ckpt.pt")["args"]["attn_backend"] == "reference"


@pytest.mark.cuda
@pytest.mark.parametrize("compile", ["--no-compile", "--compile"])
def test_training_with_flex_on_a_gpu_matches_sdpa(tmp_path, compile):
    """A few steps with FlexAttention on a GPU, on its own and compiled into the model: the
    losses of sdpa, to bf16 rounding, and it learns."""
    for backend in ("sdpa", "flex"):
        pretrain.main(tiny_args(tmp_path / backend, 12, "--device", "cuda", "--attn_backend", backend, compile))
    a, b = losses(tmp_path / "sdpa"), losses(tmp_path / "flex")
    assert sorted(b) == list(range(1, 13)) and all(abs(a[s] - b[s]) < 0.05 for s in a), (a, b)
    assert b[12] < b[1] - 0.2


def test_samples_of_different_prompts_differ():
    """Each start gets its own random draws. A model that looks only at the last token (its
    blocks write nothing) sees the same thing after "def " and "class " (both end in " "),
    so with one seed for every sample it wrote the same continuation after both."""
    torch.manual_seed(0)
    model = pretrain.GPT(pretrain.GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.zero_()
    a = harness.generate_text(model, "cpu", "def ", 12, seed=1337)
    b = harness.generate_text(model, "cpu", "class ", 12, seed=1337)
    assert a.startswith("def ") and b.startswith("class ")
    assert a[len("def "):] != b[len("class "):]
    assert a == harness.generate_text(model, "cpu", "def ", 12, seed=1337)  # and the same start, the same text


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                         (False, False, None)])
def test_cpu_autocasts_to_bf16_only_where_the_cpu_computes_it(monkeypatch, avx512_bf16, amx, expected):
    """--dtype auto: bf16 matmuls on a CPU with avx512_bf16 or AMX, fp32 elsewhere (emulated
    bf16 is slower); --dtype fp32 and bf16 say so whatever the CPU."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    a = torch.randn(4, 8)
    for dtype, want in (("auto", expected), ("fp32", None), ("bf16", torch.bfloat16)):
        with harness.autocast_for("cpu", dtype):
            assert (a @ a.T).dtype == (want or torch.float32), (dtype, want)
