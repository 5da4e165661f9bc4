"""What each kind of machine gets, simulated on this CPU with monkeypatch (no GPU here):
the attention backend `auto` runs, the autocast dtype, whether torch.compile stays on,
and the one line each decision prints. The GPU rows of README's device table."""

import importlib.util
import re

import pytest
import torch
from torch.utils import cpp_extension

import harness
import model
import pretrain
from model import BadInput

IS_AVAILABLE = torch.cuda.is_available

# name: (capability, nvcc) for an NVIDIA GPU, or "mps" / "cpu"; then what it gets: the
# backend for a batch with documents and for one without, the dtype, compile, and the
# lines printed (regular expressions, in order).
MACHINES = {
    "sm_90 with nvcc": ((9, 0), True, "cuda", "cuda", torch.bfloat16, True, []),
    "sm_90 without nvcc": ((9, 0), False, "flex", "sdpa", torch.bfloat16, True, [
        r"^attention: 'auto' uses flex for batches with documents and sdpa for the others, not kernels.cu: "
        r"nvcc not found \(CUDA_HOME=None\); install the CUDA toolkit .* and set CUDA_HOME to it$"]),
    "sm_75 (T4)": ((7, 5), True, "flex", "sdpa", torch.float16, True, [
        r"^attention: 'auto' uses flex for batches with documents and sdpa for the others, not kernels.cu: "
        r"the GPU is sm_75; the kernel's bf16 mma.sync and cp.async need sm_80 or newer$"]),
    "sm_61 (GTX 1080)": ((6, 1), True, "sdpa", "sdpa", None, False, [
        r"^attention: 'auto' uses sdpa, not kernels.cu: the GPU is sm_61; .* need sm_80 or newer; "
        r"nor flex: the GPU is sm_61 and Triton, .* needs sm_70 or newer$",
        r"^torch.compile off: the GPU is sm_61 and Triton, which torch.compile generates GPU code with, "
        r"needs sm_70 or newer$"]),
    "mps": ("mps", None, "sdpa", "sdpa", None, True, []),
    "cpu": ("cpu", None, "sdpa", "sdpa", None, True, []),
}


@pytest.fixture
def machine(request, monkeypatch, tmp_path):
    """Pretend to be MACHINES[name]: what torch says about CUDA and MPS, the CUDA toolkit,
    Triton; a kernel loader that has not tried yet. Returns the device pick_device picks."""
    kind, nvcc = MACHINES[request.param][:2]
    monkeypatch.setattr(model, "_kernel", None)
    monkeypatch.setattr(model, "_kernel_error", None)
    monkeypatch.setattr(model, "_said", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: isinstance(kind, tuple))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: kind == "mps")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # a CPU without bf16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    if isinstance(kind, tuple):
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "nvcc").write_text("")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: kind)
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
        monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path) if nvcc else None)
        monkeypatch.setattr(model, "_build_kernel", lambda verbose: "the module")  # a build that works
        monkeypatch.setattr(model, "self_check", lambda module: None)  # and passes its self-check
        find_spec = importlib.util.find_spec  # Triton, as PyTorch's CUDA wheels bring it
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else find_spec(name, *a))
    return harness.pick_device("auto")


def backend_for(device, dtype, doc_ids, monkeypatch):
    """The backend `auto` runs for a (1, 2, 16, 64) q in the run's dtype. A simulated GPU
    has no CUDA tensors, so for it the choice is asked directly (attention() asks it for
    q.is_cuda); elsewhere attention() runs, and a spy says which backend computed."""
    q = torch.zeros(1, 2, 16, 64, dtype=dtype or torch.float32)
    if device == "cuda":
        return model.auto_backend(q, q, q, doc_ids)
    ran = []
    with monkeypatch.context() as spies:
        for backend, name in (("sdpa", "sdpa_attention"), ("flex", "flex_document_attention")):
            real = getattr(model, name)
            spies.setattr(model, name, lambda *a, real=real, backend=backend: ran.append(backend) or real(*a))
        model.attention(q, q, q, doc_ids)
    return ran[0] if ran else "the operator"


@pytest.mark.parametrize("machine", MACHINES, indirect=True)
def test_each_machine_gets_its_backend_dtype_and_compile_with_one_line_each(machine, request, capsys, monkeypatch):
    kind, _, with_docs, without_docs, dtype, compiled, lines = MACHINES[request.node.callspec.params["machine"]]
    assert machine == (kind if isinstance(kind, str) else "cuda")
    assert harness.autocast_dtype(machine) == dtype
    assert harness.grad_scaler(machine).is_enabled() == (dtype == torch.float16)  # fp16 needs loss scaling
    doc_ids = torch.tensor([[0] * 10 + [1] * 6], dtype=torch.int32)
    assert backend_for(machine, dtype, doc_ids, monkeypatch) == with_docs
    assert backend_for(machine, dtype, doc_ids, monkeypatch) == with_docs  # the line is said once
    assert backend_for(machine, dtype, None, monkeypatch) == without_docs
    assert harness.compile_here(True, machine) == compiled  # a GPU preset's compile=True
    said = capsys.readouterr().out.splitlines()
    assert len(said) == len(lines) and all(re.search(p, line) for p, line in zip(lines, said)), said


@pytest.mark.parametrize("machine", ["sm_90 without nvcc", "sm_75 (T4)"], indirect=True)
def test_backend_cuda_where_the_kernel_cannot_run_is_one_line_with_the_reason_and_the_fix(machine, capsys):
    """Refused at the flag check, before any data is read, and not after an "'auto' uses"
    line that contradicts it."""
    with pytest.raises(BadInput) as e:
        harness.check_attention_backend("cuda", machine, "auto", 64)
    assert re.fullmatch(r"--attn_backend cuda cannot run here: (nvcc not found .*set CUDA_HOME to it|the GPU is sm_75; "
                        r".*need sm_80 or newer); or use --attn_backend auto, which runs flex for batches with "
                        r"documents and sdpa for the others here", str(e.value)), e.value
    harness.check_attention_backend("flex", machine, "auto", 64)  # flex can
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("machine", ["sm_90 with nvcc"], indirect=True)
def test_backend_cuda_refuses_what_the_kernel_cannot_take_before_the_run(machine):
    harness.check_attention_backend("cuda", machine, "auto", 64)  # bf16, head size 64: fine
    with pytest.raises(BadInput, match="float16 or bfloat16, not torch.float32"):
        harness.check_attention_backend("cuda", machine, "fp32", 64)
    with pytest.raises(BadInput, match=r"head sizes \(32, 64, 128\), not 48; or use --attn_backend auto, which runs flex for"):
        harness.check_attention_backend("cuda", machine, "auto", 48)
    with pytest.raises(BadInput, match="flex cannot run here: its GPU kernel takes head sizes of 16 or more, not 8"):
        harness.check_attention_backend("flex", machine, "auto", 8)


@pytest.mark.parametrize("machine", ["mps", "cpu"], indirect=True)
@pytest.mark.parametrize("backend", ["cuda", "flex"])
def test_cuda_and_flex_on_a_cpu_or_mac_are_refused_not_slow(machine, backend):
    """--attn_backend cuda on a CPU would run the mirror, a Python loop over tiles: refused,
    pointing to auto and reference. (attention(..., backend="cuda") on CPU tensors still
    runs the mirror: the operator's CPU implementation, which the tests use.)"""
    with pytest.raises(BadInput, match=f"--attn_backend {backend} runs .* needs a CUDA GPU; this run is on {machine}: "
                                       "use --attn_backend auto .* or reference"):
        harness.check_attention_backend(backend, machine, "auto", 64)


def test_pretrain_with_backend_cuda_on_a_cpu_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--device", "cpu", "--preset", "cpu", "--attn_backend", "cuda", "--out_dir", str(tmp_path)])
    assert str(e.value).startswith("error: --attn_backend cuda runs kernels.cu, which needs a CUDA GPU; this run is on cpu")
    assert capsys.readouterr().out == ""  # nothing before it


@pytest.mark.parametrize("machine", ["sm_90 with nvcc"], indirect=True)
def test_a_misaligned_input_is_copied_for_the_kernel(machine):
    """A dense slice of a bigger tensor can start off a 16-byte boundary, where cp.async
    cannot read it; the operator copies it (dense_aligned) instead of failing."""
    storage = torch.randn(1 + 2 * 16 * 64, dtype=torch.bfloat16)
    q = storage[1:].view(1, 2, 16, 64)  # dense, 2 bytes past an aligned start
    assert q.is_contiguous() and q.data_ptr() % 16 == 2
    aligned = model.dense_aligned(q)
    assert aligned.data_ptr() % 16 == 0 and torch.equal(aligned, q)
    assert model.dense_aligned(aligned) is aligned  # no copy when none is needed
    assert model.auto_backend(q, q, q) == "cuda"  # so auto keeps the kernel for it


@pytest.mark.parametrize("machine", ["sm_75 (T4)"], indirect=True)
def test_the_choice_and_its_line_trace_under_compile(machine, monkeypatch, capsys):
    """On a GPU the model is compiled with attention() in its graph: choosing flex, and the
    line, happen once while tracing, with no graph break (fullgraph would raise)."""
    monkeypatch.setattr(torch.cuda, "is_available", IS_AVAILABLE)  # torch.compile asks too: the truth
    choose = torch.compile(lambda q, docs: q * (2 if model.auto_backend(q, q, q, docs) == "flex" else 3),
                           fullgraph=True, backend="eager")
    q, docs = torch.ones(1, 2, 16, 64, dtype=torch.float16), torch.zeros(1, 16, dtype=torch.int32)
    assert torch.equal(choose(q, docs), q * 2) and torch.equal(choose(q, docs), q * 2)
    assert len(capsys.readouterr().out.splitlines()) == 1
