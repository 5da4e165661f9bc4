"""The kernel's self-check (model.self_check), on CPU: the child process runs the real cases, with
the kernel replaced by stand-ins named by "module:function" (these functions, imported by the
child): the mirror must pass; a wrong, a NaN-making, a CUDA-error-raising, a crashing and a
hanging one must each fail with one line that names the case, and make "auto" fall back."""

import functools
import os
import re
import signal
import time
import types

import pytest
import torch
from torch.utils import cpp_extension

import model

HERE = "tests.test_selfcheck"
SELF_CHECK = model.self_check


# The stand-ins for the kernel: function(q, k, v, doc_ids) -> out, run in the child.

def mirror(q, k, v, doc_ids):
    return model.attention(q, k, v, doc_ids, backend="reference")


def leaks_across_documents(q, k, v, doc_ids):
    return model.attention(q, k, v, None, backend="reference")  # right without documents only


def nan_in_the_backward(q, k, v, doc_ids):
    # sqrt(0) adds 0 to the output, but its gradient is inf, and inf * 0 = NaN in dq
    return mirror(q, k, v, doc_ids) + torch.sqrt(q * 0)


def cuda_error(q, k, v, doc_ids):
    raise RuntimeError("CUDA error: an illegal memory access was encountered\n"
                       "CUDA kernel errors might be asynchronously reported at some other API call, ...")


def crashes(q, k, v, doc_ids):
    os.kill(os.getpid(), signal.SIGSEGV)


def hangs(q, k, v, doc_ids):
    time.sleep(600)


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A pretend sm_86 GPU, a copy of kernels.cu to edit, and a pretend build in tmp_path."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(
        name="NVIDIA Pretend", major=8, minor=6))
    source = tmp_path / "kernels.cu"
    source.write_text(open(model.KERNEL_SOURCE).read())
    monkeypatch.setattr(model, "KERNEL_SOURCE", str(source))
    return types.SimpleNamespace(module=types.SimpleNamespace(__file__=str(tmp_path / "build" / "x.so")),
                                 source=source, folder=tmp_path / "build")


def checked(capsys, gpu, under_check, timeout=120):
    """self_check's answer, and the one line it printed (None if it printed nothing)."""
    gpu.folder.mkdir(exist_ok=True)
    error = model.self_check(gpu.module, HERE + ":" + under_check, timeout)
    out = capsys.readouterr().out.splitlines()
    assert len(out) <= 1, out
    return error, (out or [None])[0]


SAYS = "attention: checking kernels.cu against float64 attention on this GPU (a few seconds, once)... "


def test_the_mirror_passes_once_per_machine_and_kernel_source(capsys, gpu):
    assert checked(capsys, gpu, "mirror") == (None, SAYS + "passed")
    (passed,) = gpu.folder.glob("*.passed")
    assert "NVIDIA Pretend sm_86" in passed.read_text()
    assert checked(capsys, gpu, "crashes") == (None, None)  # remembered: no child, not a word
    gpu.source.write_text(gpu.source.read_text() + "\n// a change\n")
    error, line = checked(capsys, gpu, "crashes")  # another kernel: checked again
    assert "SIGSEGV" in error and line == SAYS + "failed: " + error


def test_the_key_names_what_could_change_the_verdict(gpu, monkeypatch):
    key = model._machine_key(0)
    assert re.fullmatch(r"NVIDIA Pretend sm_86; driver .+; CUDA .+; torch .+; kernels.cu \+ model.py sha256 [0-9a-f]{16}", key)
    gpu.source.write_text(gpu.source.read_text().replace("BLOCK_M", "BLOCK_Q"))
    assert model._machine_key(0) != key
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert "torch 9.9.9" in model._machine_key(0)


FAILURES = {  # stand-in: the line must say
    "leaks_across_documents": r"in case bfloat16, head size 32, T 190, documents: out error \d\.\de\+00, allowed",
    "nan_in_the_backward": r"in case bfloat16, head size 32, T 190, no documents: dq error nan, allowed",
    "cuda_error": r"no documents: RuntimeError: CUDA error: an illegal memory access was encountered \(",
    "crashes": r"in case bfloat16, head size 32, T 190, no documents: the process died of SIGSEGV",
    "hangs": r": no answer within 5 s",  # (within 5 s the child may still be loading torch)
}


@pytest.mark.parametrize("under_check", FAILURES)
def test_a_broken_kernel_fails_with_one_line_naming_the_case_and_the_log(capsys, gpu, under_check):
    error, line = checked(capsys, gpu, under_check, timeout=5 if under_check == "hangs" else 120)
    assert line == SAYS + "failed: " + error
    assert error.startswith("kernels.cu failed its self-check on this GPU ") and "\n" not in error
    assert re.search(FAILURES[under_check], error), error
    log = re.fullmatch(r".* \(whole log: (.*)\)", error).group(1)
    assert os.path.dirname(log) == str(gpu.folder) and os.path.exists(log)
    assert not list(gpu.folder.glob("*.passed"))  # a failure is not remembered


def test_a_failed_check_makes_auto_fall_back_as_a_failed_build_does(capsys, gpu, monkeypatch, tmp_path):
    """Through load_kernel, on a pretend GPU with every tool present: the kernel is not used,
    kernel_problem gives the check's line (so "auto" falls back with it and "cuda" stops with
    it), and the check is not run again."""
    monkeypatch.setattr(model, "_kernel", None)
    monkeypatch.setattr(model, "_kernel_error", None)
    monkeypatch.setattr(model, "_said", set())
    monkeypatch.setattr(model, "_build_problem", lambda: None)
    builds = []
    monkeypatch.setattr(model, "_build_kernel", lambda verbose: builds.append(verbose) or gpu.module)
    stand_in = functools.partial(SELF_CHECK, under_check=HERE + ":leaks_across_documents")
    monkeypatch.setattr(model, "self_check", stand_in)
    gpu.folder.mkdir()
    assert model.load_kernel() is None
    error = model._kernel_error
    assert error.startswith("kernels.cu failed its self-check") and "documents: out error" in error
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == SAYS + "failed: " + error
    assert all(error in line for line in lines)
    q = torch.zeros(1, 2, 16, 64, dtype=torch.bfloat16)
    assert model.kernel_problem(q, q, q) == error
    assert model.load_kernel() is None and builds == [False]
    assert capsys.readouterr().out == ""


def test_the_build_says_so_only_when_it_will_compile(capsys, gpu, monkeypatch, tmp_path):
    """One line before nvcc runs (a minute or two, silent otherwise); none when cpp_extension
    will only load the build it cached, newer than kernels.cu."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: kw["build_directory"])
    folder = str(tmp_path / "extensions" / "minipretrain_attention_sm86")
    says = f"attention: building kernels.cu for sm_86, a minute or two, once; cached in {folder}\n"
    assert model._build_kernel(False) == folder
    assert capsys.readouterr().out == says
    built = tmp_path / "extensions" / "minipretrain_attention_sm86" / "minipretrain_attention_sm86.so"
    built.write_text("")
    assert model._build_kernel(False) == folder and capsys.readouterr().out == ""
    os.utime(gpu.source, (time.time() + 10, time.time() + 10))  # kernels.cu edited since
    assert model._build_kernel(False) == folder and capsys.readouterr().out == says
