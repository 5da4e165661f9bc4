"""Attention backends. On CPU: the mirror (kernels.cu's algorithm in plain PyTorch)
against naive float64 attention, its tile skipping, the operator that holds it (opcheck,
torch.compile of the whole GPT), the screen and the kernel loader's messages. On a GPU
(tests marked cuda): kernels.cu against naive attention and SDPA, and its edge cases."""

import math
import re

import pytest
import torch
from torch.utils import cpp_extension

import model
from model import GPT, BadInput, GPTConfig, attention, flash_attention, flash_backward, flash_forward


def naive_attention(q, k, v, doc_ids):
    """The definition, in float64: softmax over the full (T, T) score matrix."""
    B, H, T, D = q.shape
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.mT / math.sqrt(D)  # (B, H, T, T)
    scores = scores.masked_fill(~allowed(doc_ids, B, T, q.device), -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def naive_lse(q, k, doc_ids):
    """Natural-log log-sum-exp of each row's scores, (B, H, T), float64."""
    B, H, T, D = q.shape
    scores = q.double() @ k.double().mT / math.sqrt(D)
    return scores.masked_fill(~allowed(doc_ids, B, T, q.device), -math.inf).logsumexp(-1)


def allowed(doc_ids, B, T, device):
    """(B, 1, T, T): query i sees key j iff j <= i and same document. Written out here,
    not borrowed from model.py, so the tests do not trust the code they test."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    if doc_ids is None:
        return (j <= i).expand(B, 1, T, T)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return ((j <= i) & same)[:, None]


def random_doc_ids(B, T, mean_len, gen, device="cpu"):
    """(B, T) int32, non-decreasing: each row cut into documents at random places. Ids
    start at a random offset, because only equality between ids may matter."""
    cuts = torch.rand(B, T, generator=gen) < 1.0 / mean_len
    first = torch.randint(0, 1000, (B, 1), generator=gen)
    return (first + cuts.cumsum(1)).to(torch.int32).to(device)


def make_doc_ids(kind, B, T, gen, device="cpu"):
    if kind == "none":
        return None
    if kind == "one-token":  # every token its own document: each row sees only itself
        return torch.arange(T, dtype=torch.int32, device=device).expand(B, T).contiguous()
    if kind == "single":  # one document per row: must equal plain causal
        return torch.full((B, T), 7, dtype=torch.int32, device=device)
    if kind.startswith("mean"):
        return random_doc_ids(B, T, int(kind[4:]), gen, device)
    raise ValueError(kind)


def random_qkv(B, H, T, D, dtype, gen, device="cpu"):
    return [torch.randn(B, H, T, D, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
            for _ in range(3)]


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def naive_with_grads(q, k, v, doc_ids, dout):
    """Naive attention and its gradients, all in float64 (from float64 copies of the
    inputs, so that not even the gradients are rounded to the inputs' precision)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = naive_attention(q, k, v, doc_ids)
    return [out.detach()] + list(grads(out, (q, k, v), dout.double()))


# -----------------------------------------------------------------------------
# The reference backend against the definition (CPU)

CASES = [  # B, H, T, D, block_m, block_n, documents
    (2, 3, 37, 16, 16, 16, "mean8"),
    (1, 2, 100, 32, 16, 32, "mean20"),
    (2, 2, 77, 8, 32, 16, "none"),
    (1, 2, 50, 8, 16, 16, "one-token"),
    (3, 1, 1, 8, 16, 16, "mean4"),  # T = 1
    (2, 1, 64, 16, 16, 16, "single"),
    (1, 2, 130, 16, 64, 64, "mean30"),  # the kernel's tile sizes, T not a multiple of them
    (2, 1, 200, 8, 16, 8, "mean3"),  # many short documents, key tiles smaller than query tiles
]


@pytest.mark.parametrize("case", CASES, ids=[f"T{c[2]}-tiles{c[4]}x{c[5]}-{c[6]}" for c in CASES])
def test_mirror_matches_naive_float64(case):
    """flash_forward and flash_backward, with tiles small enough that short sequences
    span many, against the definition: o, lse, and the gradients."""
    B, H, T, D, block_m, block_n, docs = case
    gen = torch.Generator().manual_seed(T * 1000 + block_m)
    q, k, v = (t.detach() for t in random_qkv(B, H, T, D, torch.float64, gen))
    doc_ids = make_doc_ids(docs, B, T, gen)
    dout = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)

    docs_or_zeros = model.mirror_doc_ids(doc_ids, q)
    out, lse = flash_forward(q, k, v, docs_or_zeros, block_m, block_n)
    got_grads = flash_backward(dout, q, k, v, out, lse, docs_or_zeros, block_m, block_n)
    want, *want_grads = naive_with_grads(q, k, v, doc_ids, dout)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse * math.log(2), naive_lse(q, k, doc_ids), rtol=0, atol=1e-10)
    for got, expected in zip(got_grads, want_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", ["reference", "cuda"])  # on a CPU, "cuda" is the mirror too
def test_operator_matches_naive_float64(backend):
    """The same through attention(), the operator and its registered backward."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = random_qkv(2, 2, 130, 16, torch.float64, gen)
    doc_ids = random_doc_ids(2, 130, 30, gen)
    dout = torch.randn(2, 2, 130, 16, generator=gen, dtype=torch.float64)
    out = attention(q, k, v, doc_ids, backend=backend)
    want, *want_grads = naive_with_grads(q, k, v, doc_ids, dout)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    for got, expected in zip(grads(out, (q, k, v), dout), want_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_reference_in_low_precision_is_close_to_naive(dtype, atol):
    """float32 inside as in the kernel: the error is that of rounding the inputs/outputs."""
    gen = torch.Generator().manual_seed(1)
    B, H, T, D = 2, 2, 90, 32
    q, k, v = random_qkv(B, H, T, D, dtype, gen)
    doc_ids = random_doc_ids(B, T, 25, gen)
    dout = torch.randn(B, H, T, D, generator=gen).to(dtype)
    out = attention(q, k, v, doc_ids, backend="reference")
    assert out.dtype == dtype
    want, *want_grads = naive_with_grads(q, k, v, doc_ids, dout)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=atol)
    for got, expected in zip(grads(out, (q, k, v), dout), want_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=4 * atol)


@pytest.mark.parametrize("docs", ["none", "mean40"])
def test_reference_backend_equals_sdpa_backend(docs):
    gen = torch.Generator().manual_seed(2)
    B, H, T, D = 2, 2, 150, 16
    q, k, v = random_qkv(B, H, T, D, torch.float32, gen)
    doc_ids = make_doc_ids(docs, B, T, gen)
    dout = torch.randn(B, H, T, D, generator=gen)
    out = attention(q, k, v, doc_ids, backend="reference")
    want = attention(q, k, v, doc_ids, backend="sdpa")
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    for got, expected in zip(grads(out, (q, k, v), dout), grads(want, (q, k, v), dout)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_reference_takes_non_contiguous_views():
    """The model hands attention transposed views of its qkv projection."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 150, 3, 2, 8, generator=gen, dtype=torch.float64)  # (B, T, 3, nh, hs)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, nh, T, hs), not contiguous
    doc_ids = random_doc_ids(2, 150, 40, gen)
    torch.testing.assert_close(attention(q, k, v, doc_ids, backend="reference"),
                               naive_attention(q, k, v, doc_ids), rtol=0, atol=1e-10)


# -----------------------------------------------------------------------------
# Tile skipping: skipped tiles are fully masked, visited ones are not (CPU)

@pytest.mark.parametrize("seed", range(6))
def test_tile_ranges_skip_exactly_the_fully_masked_tiles(seed):
    """The ranges must cover every visible (query, key) pair, or the output is wrong, and
    must skip what they can, or the kernel does work for nothing. Check both: a tile
    outside the range has no visible pair, and every tile inside has at least one.
    Also: tile_fully_visible is true exactly when the whole tile is visible."""
    gen = torch.Generator().manual_seed(seed)
    T = int(torch.randint(1, 150, (1,), generator=gen))
    block_m, block_n = [(16, 16), (16, 32), (32, 16), (8, 8), (64, 64), (16, 8)][seed]
    docs = random_doc_ids(1, T, [2, 5, 20, 60, 1000, 9][seed], gen)[0]
    seen = allowed(docs[None], 1, T, "cpu")[0, 0]  # (T, T)
    skipped = 0
    for m0 in range(0, T, block_m):
        n_start, n_end = model.key_tile_range(docs, m0, block_m, block_n)
        for n0 in range(0, T, block_n):
            tile = seen[m0:m0 + block_m, n0:n0 + block_n]
            in_range = n_start <= n0 < n_end
            assert bool(tile.any()) == in_range, (m0, n0)
            skipped += not in_range
            full_tile = m0 + block_m <= T and n0 + block_n <= T
            fully = model.tile_fully_visible(docs, m0, n0, block_m, block_n)
            assert fully == (full_tile and bool(tile.all())), (m0, n0)
    for n0 in range(0, T, block_n):
        m_start, m_end = model.query_tile_range(docs, n0, block_m, block_n)
        for m0 in range(0, T, block_m):
            tile = seen[m0:m0 + block_m, n0:n0 + block_n]
            assert bool(tile.any()) == (m_start <= m0 < m_end), (m0, n0)
    if T > 4 * max(block_m, block_n):
        assert skipped > 0  # causal alone skips tiles above the diagonal


def test_doc_start_and_end():
    docs = torch.tensor([3, 3, 5, 5, 5, 8, 9, 9], dtype=torch.int32)
    assert [model.doc_start(docs, t) for t in range(8)] == [0, 0, 2, 2, 2, 5, 6, 6]
    assert [model.doc_end(docs, t) for t in range(8)] == [2, 2, 5, 5, 5, 6, 8, 8]


# -----------------------------------------------------------------------------
# Choosing a backend, and the kernel loader's one-line messages (CPU)

def test_auto_on_cpu_is_sdpa_and_unknown_backends_are_bad_input():
    gen = torch.Generator().manual_seed(4)
    q, k, v = random_qkv(1, 2, 20, 8, torch.float32, gen)
    doc_ids = random_doc_ids(1, 20, 5, gen)
    assert torch.equal(attention(q, k, v, doc_ids), attention(q, k, v, doc_ids, backend="sdpa"))
    with pytest.raises(BadInput, match="unknown attention backend 'flash'"):
        attention(q, k, v, doc_ids, backend="flash")
    mixed = attention(q.bfloat16(), k.half(), v, doc_ids)  # sdpa promotes (the kernel's screen sends them)
    torch.testing.assert_close(mixed, attention(q.bfloat16().float(), k.half().float(), v, doc_ids))
    # "cuda" on a CPU: the operator runs its mirror, exactly what "reference" runs.
    assert torch.equal(attention(q, k, v, doc_ids, backend="cuda"), attention(q, k, v, doc_ids, backend="reference"))


def test_unsorted_doc_ids_are_refused_or_right_never_silently_wrong():
    """The mirror's tile ranges need sorted ids, so "reference" and "cuda" (here: the
    mirror in the operator) refuse them; sdpa's and flex's masks compare ids for equality,
    so theirs is the definition's answer for any ids. (kernels.cu writes NaN: a cuda test.)"""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (t.detach() for t in random_qkv(1, 1, 70, 8, torch.float64, gen))  # flex: no CPU backward
    unsorted = torch.tensor([[0] * 30 + [1] * 20 + [0] * 20], dtype=torch.int32)
    for backend in ("reference", "cuda"):
        with pytest.raises(BadInput, match="non-decreasing"):
            attention(q, k, v, unsorted, backend=backend)
    for backend in ("sdpa", "flex"):  # both compare ids for equality
        torch.testing.assert_close(attention(q, k, v, unsorted, backend=backend), naive_attention(q, k, v, unsorted),
                                   rtol=0, atol=1e-10)


# -----------------------------------------------------------------------------
# The operator (CPU, where it runs the mirror): opcheck, autograd, torch.compile

@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("docs", ["none", "mean20"])
def test_operator_passes_opcheck(mirror, docs):
    """torch.library's own checks: the schema, the autograd registration, the fake
    implementation against the real one, and tracing forward + backward with AOTAutograd
    (dynamic shapes), which is what torch.compile does."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = random_qkv(2, 2, 70, 8, torch.float32, gen)
    doc_ids = make_doc_ids(docs, 2, 70, gen)
    torch.library.opcheck(flash_attention, (q, k, v, doc_ids, mirror))
    q64, k64, v64 = random_qkv(1, 2, 30, 8, torch.float64, gen)  # the fake's lse dtype follows q's
    torch.library.opcheck(flash_attention, (q64, k64, v64, None, mirror))


def test_operator_is_once_differentiable():
    """A double backward (create_graph=True) must raise, not silently drop the terms that
    the backward's own backward would give; lse is marked non-differentiable."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = random_qkv(1, 2, 20, 8, torch.float64, gen)
    out = attention(q, k, v, None, backend="cuda")
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="flash_attention_backward"):
        torch.autograd.grad(dq.sum(), q)
    o, lse = flash_attention(q, k, v, None, False)
    assert o.requires_grad and not lse.requires_grad


def tiny_gpt(backend, n_embd=32, n_head=2, device="cpu"):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=n_head, n_embd=n_embd)).to(device)
    gpt.attn_backend = backend
    return gpt


def packed_batch(device="cpu"):
    """Two rows of 64 tokens: one packed with three documents, one a single document."""
    gen = torch.Generator().manual_seed(8)
    idx, targets = (torch.randint(0, 256, (2, 64), generator=gen) for _ in range(2))
    lengths = [[10, 40, 14], [64]]
    doc_ids = torch.tensor([sum(([d] * n for d, n in enumerate(row)), []) for row in lengths], dtype=torch.int32)
    pos_ids = torch.tensor([sum((list(range(n)) for n in row), []) for row in lengths])
    return [t.to(device) for t in (idx, targets, doc_ids, pos_ids)]


def loss_and_grads(gpt, batch):
    _, loss = gpt(*batch)
    loss.backward()
    grads = [p.grad.clone() for p in gpt.parameters()]
    gpt.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_compiled_gpt_with_the_operator_matches_eager():
    """torch.compile(fullgraph=True) of the whole GPT: fullgraph raises at the first graph
    break, so compiling at all proves there is none; then the compiled loss and gradients
    must be the eager ones (the same operator runs in both)."""
    gpt = tiny_gpt("cuda")  # on a CPU: the operator with the mirror inside
    batch = packed_batch()
    eager_loss, eager_grads = loss_and_grads(gpt, batch)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(gpt, fullgraph=True), batch)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    sdpa_loss, _ = loss_and_grads(tiny_gpt("sdpa"), batch)
    torch.testing.assert_close(compiled_loss, sdpa_loss, rtol=1e-5, atol=1e-5)  # and it is attention


BUILD_KERNEL = model._build_kernel
IS_AVAILABLE = torch.cuda.is_available


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """A loader that has not tried yet, on a pretend sm_86 GPU with every tool present.
    Each test then takes one thing away."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(model, "_kernel", None)
    monkeypatch.setattr(model, "_kernel_error", None)
    monkeypatch.setattr(model, "_said", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setattr(model, "self_check", lambda module: None)  # tests/test_selfcheck.py checks it
    builds = []

    def pretend_build(verbose):
        builds.append(verbose)
        return "the module"
    monkeypatch.setattr(model, "_build_kernel", pretend_build)
    return builds


def one_line_said(capsys):
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_loader_builds_once_when_all_is_there(fresh_loader, capsys):
    assert model.load_kernel() == "the module"
    assert model.load_kernel() == "the module"
    assert fresh_loader == [False]
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("take_away, says", [
    (lambda mp: mp.setattr(cpp_extension, "is_ninja_available", lambda: False), "pip install ninja"),
    (lambda mp: mp.setattr(cpp_extension, "CUDA_HOME", None), "nvcc not found .* set CUDA_HOME"),
    (lambda mp: mp.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5)), "sm_75.*sm_80"),
    (lambda mp: mp.setattr(torch.cuda, "is_available", lambda: False), "no CUDA device"),
])
def test_loader_records_why_and_does_not_build(fresh_loader, capsys, monkeypatch, take_away, says):
    take_away(monkeypatch)
    assert model.load_kernel() is None
    assert re.search(says, model._kernel_error) and "\n" not in model._kernel_error, model._kernel_error
    assert model.load_kernel() is None
    assert capsys.readouterr().out == ""  # said where the backend is chosen (tests/test_devices.py)
    assert fresh_loader == []  # never tried to build


NVCC_COMMAND = ("Error building extension 'minipretrain_attention_sm86': [1/2] /usr/local/cuda/bin/nvcc "
                "--generate-dependencies-with-compile -gencode=arch=compute_86,code=sm_86 -c kernels.cu -o kernels.cuda.o\n"
                "FAILED: kernels.cuda.o\n")
COMPILER_LOGS = {  # what cpp_extension raises, and the line the fallback must show
    "nvcc": (NVCC_COMMAND + "/src/kernels.cu(212): error: identifier \"BLOCK_Q\" is undefined\n"
             "/src/kernels.cu(230): error: expected a \";\"\n2 errors detected in the compilation of "
             "\"/src/kernels.cu\".\nninja: build stopped: subcommand failed.\n",
             '/src/kernels.cu(212): error: identifier "BLOCK_Q" is undefined'),
    "ptxas": (NVCC_COMMAND + "ptxas error   : Entry function '_Z25attention_backward_kernelI13__nv_bfloat16Li128EEv6Params'"
              " uses too much shared data (0x1a200 bytes, 0xc000 max)\nptxas fatal   : Ptx assembly aborted due to"
              " errors\nninja: build stopped: subcommand failed.\n",
              "ptxas error   : Entry function '_Z25attention_backward_kernelI13__nv_bfloat16Li128EEv6Params' uses too much"),
    "nvcc fatal": (NVCC_COMMAND + "nvcc fatal   : Unsupported gpu architecture 'compute_86'\n"
                   "ninja: build stopped: subcommand failed.\n", "nvcc fatal   : Unsupported gpu architecture"),
    "no error line": ("The detected CUDA version (12.1) mismatches the version that was used to compile\n"
                      "PyTorch (11.8). Please make sure to use the same CUDA versions.\n",
                      "The detected CUDA version (12.1) mismatches"),
}


@pytest.mark.parametrize("log, shows", COMPILER_LOGS.values(), ids=COMPILER_LOGS.keys())
def test_loader_reports_the_first_compiler_error_once(fresh_loader, capsys, monkeypatch, log, shows):
    calls = []

    def failing_build(verbose):
        calls.append(verbose)
        raise RuntimeError(log)
    monkeypatch.setattr(model, "_build_kernel", failing_build)
    assert model.load_kernel() is None
    line = model._kernel_error
    assert "kernels.cu failed to build: " + shows in line and "\n" not in line, line
    assert "load_kernel(verbose=True)" in line  # how to see the whole log
    assert model.load_kernel() is None
    assert calls == [False]  # not retried on every call
    assert capsys.readouterr().out == ""


def test_loader_builds_for_the_visible_architecture_only(fresh_loader, monkeypatch):
    """One -gencode, for the GPU that is there, and one cached build per architecture;
    TORCH_CUDA_ARCH_LIST (here: GPUs too old for cp.async) must not matter."""
    loads = []
    monkeypatch.setattr(model, "_build_kernel", BUILD_KERNEL)  # the real one, not fresh_loader's
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: loads.append(kw) or "the module")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0;7.5+PTX")
    assert model.load_kernel() == "the module"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    model._build_kernel(False)
    (sm86, sm90) = loads
    assert sm86["name"] == "minipretrain_attention_sm86" and sm90["name"] == "minipretrain_attention_sm90"
    assert [f for f in sm86["extra_cuda_cflags"] if "arch" in f] == ["-gencode=arch=compute_86,code=sm_86"]
    assert [f for f in sm90["extra_cuda_cflags"] if "arch" in f] == ["-gencode=arch=compute_90,code=sm_90"]
    # cpp_extension adds the TORCH_CUDA_ARCH_LIST flags only when no flag names an arch:
    assert cpp_extension._get_cuda_arch_flags(sm86["extra_cuda_cflags"]) == []
    assert cpp_extension._get_cuda_arch_flags([]) != []  # (it would, without our -gencode)


# -----------------------------------------------------------------------------
# The screen: what kernels.cu cannot take falls back with one line (CPU)

@pytest.mark.parametrize("shape, dtypes, says", [
    ((2, 2, 0, 64), (torch.bfloat16,) * 3, r"\(2, 2, 0, 64\): nothing to compute"),
    ((0, 2, 16, 64), (torch.bfloat16,) * 3, r"\(0, 2, 16, 64\): nothing to compute"),
    ((2, 0, 16, 64), (torch.bfloat16,) * 3, r"\(2, 0, 16, 64\): nothing to compute"),
    ((1, 2, 16, 64), (torch.bfloat16, torch.float16, torch.bfloat16), "mixed dtypes"),
    ((1, 2, 16, 64), (torch.float32,) * 3, "float16 or bfloat16, not torch.float32"),
    ((1, 2, 16, 48), (torch.bfloat16,) * 3, r"head sizes \(32, 64, 128\), not 48"),
])
def test_screen_names_what_the_kernel_cannot_take(fresh_loader, shape, dtypes, says):
    """kernel_problem reads shapes and dtypes only, so it is checked here on CPU tensors
    (with a pretend GPU for the build), and the one line it returns says what is wrong."""
    q, k, v = (torch.zeros(shape, dtype=dtype) for dtype in dtypes)
    problem = model.kernel_problem(q, k, v)
    assert problem is not None and "\n" not in problem and re.search(says, problem), problem
    assert model.kernel_problem(*(torch.zeros(1, 2, 16, 64, dtype=torch.bfloat16),) * 3) is None
    assert fresh_loader == [False]  # the build is only tried for inputs the kernel takes


def test_screen_and_loader_trace_under_compile(fresh_loader, capsys, monkeypatch):
    """Under torch.compile(fullgraph=True) the screen, the build and the fallback line
    must not break the graph: they run once, while tracing."""
    monkeypatch.setattr(torch.cuda, "is_available", IS_AVAILABLE)  # torch.compile asks too: the truth,
    monkeypatch.setattr(model, "_build_problem", lambda: None)  # so pretend the GPU here

    def build_like_ninja(verbose):  # a real build runs ninja and nvcc, which no tracer follows
        torch._dynamo.graph_break()
        fresh_loader.append(verbose)
        return "the module"
    monkeypatch.setattr(model, "_build_kernel", build_like_ninja)

    def choose(q, k, v):
        problem = model.kernel_problem(q, k, v)
        if problem is not None:
            model.say_once(f"not the kernel: {problem}")
            return q * 2
        return q * 3
    compiled = torch.compile(choose, fullgraph=True, backend="eager")
    q = torch.ones(1, 2, 16, 64)
    assert torch.equal(compiled(q, q, q), q * 2) and torch.equal(compiled(q, q, q), q * 2)
    assert "not torch.float32" in one_line_said(capsys)  # said once, while tracing
    q = q.bfloat16()
    assert torch.equal(compiled(q, q, q), q * 3) and torch.equal(compiled(q, q, q), q * 3)
    assert fresh_loader == [False] and capsys.readouterr().out == ""


# -----------------------------------------------------------------------------
# FlexAttention, "flex": its forward on CPU (torch has no CPU backward for it); on a GPU all

@pytest.mark.parametrize("T, docs", [(1, "mean4"), (37, "none"), (128, "single"), (129, "mean20"),
                                     (300, "one-token"), (300, "mean60")])
def test_flex_forward_matches_naive_float64(T, docs):
    """Uncompiled, on a CPU, FlexAttention scores every pair its mask allows: this checks
    the mask (documents, causality, lengths that cut a 128-token tile)."""
    gen = torch.Generator().manual_seed(T + len(docs))
    q, k, v = (t.detach() for t in random_qkv(2, 2, T, 16, torch.float64, gen))
    doc_ids = make_doc_ids(docs, 2, T, gen)
    out = attention(q, k, v, doc_ids, backend="flex")
    torch.testing.assert_close(out, naive_attention(q, k, v, doc_ids), rtol=0, atol=1e-12)


@pytest.mark.parametrize("T, docs", [(300, "mean60"), (520, "mean200"), (256, "none"), (200, "one-token")])
def test_flex_block_mask_visits_exactly_the_tiles_with_something_visible(T, docs):
    """What the compiled kernel skips: a 128 x 128 tile is visited iff some query in it sees
    some key (brute force over the definition), and is "full" (no mask) iff all of them do."""
    gen = torch.Generator().manual_seed(T)
    doc_ids = make_doc_ids(docs, 2, T, gen)
    B, n = 1 if doc_ids is None else 2, -(-T // 128)
    mask = model.document_block_mask(doc_ids, T, "cpu")
    seen = torch.zeros(B, 1, n * 128, n * 128, dtype=torch.bool)
    seen[..., :T, :T] = allowed(doc_ids, B, T, "cpu")
    tiles = seen.view(B, 1, n, 128, n, 128)
    assert torch.equal(mask.to_dense().bool(), tiles.any(5).any(3))
    assert torch.equal(mask.full_kv_num_blocks, tiles.all(5).all(3).sum(-1).int())


def test_flex_builds_one_block_mask_per_forward_not_per_layer(monkeypatch):
    builds, real = [], model.document_block_mask
    monkeypatch.setattr(model, "document_block_mask", lambda *a: builds.append(1) or real(*a))
    gpt = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=3, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(24))
    with torch.no_grad():
        for seed in (0, 1):  # two batches, three layers each
            doc_ids = random_doc_ids(2, 32, 8, torch.Generator().manual_seed(seed))
            gpt.attn_backend = "flex"
            logits, _ = gpt(idx, doc_ids=doc_ids)
            gpt.attn_backend = "sdpa"
            torch.testing.assert_close(logits, gpt(idx, doc_ids=doc_ids)[0], rtol=1e-5, atol=1e-5)
    assert len(builds) == 2
    # Compiled, as a GPU trains: the spy's appends are replayed each call, one per mask in the graph.
    builds.clear()
    gpt.attn_backend = "flex"
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(gpt, fullgraph=True)(idx, doc_ids=doc_ids)[0], logits,
                                   rtol=1e-5, atol=1e-5)
    assert len(builds) == 1


def test_flex_is_compiled_once_per_shape_not_per_batch(monkeypatch):
    """The compiled FlexAttention a GPU runs (here compiled for the CPU, forward only): a new
    batch's documents are a new block mask for the same compiled code, not a new compile."""
    gen = torch.Generator().manual_seed(21)
    q, k, v = (t.detach() for t in random_qkv(2, 2, 64, 16, torch.float32, gen))
    flex = model.compiled_flex_attention()
    for _ in range(3):
        doc_ids = random_doc_ids(2, 64, 10, gen)
        out = flex(q, k, v, block_mask=model.document_block_mask(doc_ids, 64, "cpu"))
        torch.testing.assert_close(out.double(), naive_attention(q, k, v, doc_ids), rtol=0, atol=1e-5)
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # from the second batch on


def test_flex_compiled_into_a_layer_matches_sdpa():
    """torch.compile of an attention layer with flex, as a GPU trains it (here the CPU's
    forward): q, k, v come from the layer's matmul and rotary inside the graph. Without the
    .contiguous() in flex_document_attention, torch 2.13 read the strided v wrongly here."""
    torch.manual_seed(0)
    layer = model.CausalSelfAttention(GPTConfig(n_head=2, n_embd=32)).eval()
    cos, sin = model.Rotary(16, 64, 10000.0)(torch.arange(64).expand(2, 64))
    x, doc_ids = torch.randn(2, 64, 32), random_doc_ids(2, 64, 10, torch.Generator().manual_seed(22))
    with torch.no_grad():
        got = torch.compile(layer, fullgraph=True)(x, cos, sin, doc_ids, "flex")
        torch.testing.assert_close(got, layer(x, cos, sin, doc_ids, "sdpa"), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, docs", [(1, "none"), (65, "mean20"), (333, "mean50"), (1000, "none"), (2048, "mean700")])
def test_flex_as_accurate_as_sdpa(dtype, T, docs, monkeypatch):
    """The compiled FlexAttention on a GPU, forward and backward, against float64: at most a
    small multiple of SDPA's error in the same precision, as the kernel is held to."""
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 64)  # one compile per case, never eager
    gen = torch.Generator().manual_seed(T + 5)
    q, k, v = random_qkv(2, 3, T, 64, dtype, gen, "cuda")
    doc_ids = make_doc_ids(docs, 2, T, gen, "cuda")
    dout = torch.randn(2, 3, T, 64, generator=gen).to("cuda", dtype)
    out = attention(q, k, v, doc_ids, backend="flex")
    assert out.dtype == dtype and out.shape == q.shape
    ours, theirs = sdpa_error_and_ours(out, q, k, v, doc_ids, dout)
    for name, a, b in zip(["out", "dq", "dk", "dv"], ours, theirs):
        assert a <= 2 * b + 1e-3, f"{name}: flex error {a:.2e}, sdpa error {b:.2e}"


# -----------------------------------------------------------------------------
# kernels.cu on a GPU

CUDA_CASES = [  # T, documents
    (1, "none"), (1, "one-token"), (17, "mean4"), (64, "none"), (65, "mean20"),
    (200, "one-token"), (333, "mean50"), (1000, "mean300"), (1000, "none"), (2048, "mean700"),
]


def sdpa_error_and_ours(ours, q, k, v, doc_ids, dout):
    """Max errors against float64 of (our kernel, SDPA in the same dtype), for out, dq, dk, dv."""
    want = naive_with_grads(q, k, v, doc_ids, dout)
    result = []
    for out in (ours, attention(q, k, v, doc_ids, backend="sdpa")):
        got = [out] + list(grads(out, (q, k, v), dout))
        result.append([(a.double() - b).abs().max().item() for a, b in zip(got, want)])
    return result


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", model.KERNEL_HEAD_DIMS)
@pytest.mark.parametrize("T, docs", CUDA_CASES)
def test_kernel_as_accurate_as_sdpa(dtype, D, T, docs):
    """FlashAttention's own test: the kernel's error against float64 may be at most a
    small multiple of SDPA's error in the same precision (plus a floor for tiny errors)."""
    gen = torch.Generator().manual_seed(T * 7 + D)
    B, H = 2, 3
    q, k, v = random_qkv(B, H, T, D, dtype, gen, "cuda")
    doc_ids = make_doc_ids(docs, B, T, gen, "cuda")
    dout = torch.randn(B, H, T, D, generator=gen).to("cuda", dtype)
    out = attention(q, k, v, doc_ids, backend="cuda")
    assert out.dtype == dtype and out.shape == q.shape
    ours, theirs = sdpa_error_and_ours(out, q, k, v, doc_ids, dout)
    for name, a, b in zip(["out", "dq", "dk", "dv"], ours, theirs):
        assert a <= model.kernel_error_allowed(b), f"{name}: kernel error {a:.2e}, sdpa error {b:.2e}"


@pytest.mark.cuda
def test_auto_uses_the_kernel_and_falls_back_for_what_it_cannot_take(capsys, monkeypatch):
    monkeypatch.setattr(model, "_said", set())  # other tests may have said it already
    gen = torch.Generator().manual_seed(8)
    q, k, v = [t.detach() for t in random_qkv(1, 2, 100, 64, torch.bfloat16, gen, "cuda")]
    doc_ids = random_doc_ids(1, 100, 30, gen, "cuda")
    assert torch.equal(attention(q, k, v, doc_ids), attention(q, k, v, doc_ids, backend="cuda"))
    assert torch.equal(attention(q, k, v, doc_ids.long()), attention(q, k, v, doc_ids))  # int64 ids too
    q32, k32, v32 = q.float(), k.float(), v.float()
    assert torch.equal(attention(q32, k32, v32, doc_ids), attention(q32, k32, v32, doc_ids, backend="sdpa"))
    assert "float32" in capsys.readouterr().out
    with pytest.raises(BadInput, match="float32"):
        attention(q32, k32, v32, doc_ids, backend="cuda")
    q48 = torch.randn(1, 2, 100, 48, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(BadInput, match="head sizes"):
        attention(q48, q48, q48, doc_ids, backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("D", model.KERNEL_HEAD_DIMS)
def test_kernel_lse_and_output_match_the_mirror(D):
    """The operator's two implementations compute the same thing: compare lse too."""
    gen = torch.Generator().manual_seed(D)
    B, H, T = 2, 2, 300
    q, k, v = [t.detach() for t in random_qkv(B, H, T, D, torch.bfloat16, gen, "cuda")]
    doc_ids = random_doc_ids(B, T, 60, gen, "cuda")
    o, lse = flash_attention(q, k, v, doc_ids, False)  # kernels.cu
    o_ref, lse_ref = flash_attention(q, k, v, doc_ids, True)  # the mirror, on the GPU
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=1e-3)  # both fp32 from the same scores
    # Both rounded to bf16 (and the kernel rounds P too): allow a bf16 ulp or two.
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=2e-2, atol=2e-2)


GUARD = 64  # sentinel elements on each side of a kernel's buffer (keeps 16-byte alignment)


def guarded(shape, dtype, fill):
    """(buffer, tensor): a dense `shape` tensor carved out of a buffer GUARD elements
    longer at each end, all of it `fill`."""
    n = math.prod(shape)
    buffer = torch.full((n + 2 * GUARD,), fill, dtype=dtype, device="cuda")
    return buffer, buffer[GUARD:GUARD + n].view(shape)


def run_kernel_in_guarded_buffers(q, k, v, doc_ids, dout, fill=math.nan):
    """kernels.cu called directly, forward and backward, writing into guarded buffers
    that start out as `fill` (dq_accum zeroed, as the operator does). {name: (buffer, tensor)}."""
    B, H, T, D = q.shape
    out = {name: guarded(shape, dtype, fill) for name, shape, dtype in [
        ("o", q.shape, q.dtype), ("lse", (B, H, T), torch.float32), ("delta", (B, H, T), torch.float32),
        ("dq_accum", q.shape, torch.float32), ("dk", q.shape, q.dtype), ("dv", q.shape, q.dtype)]}
    out["dq_accum"][1].zero_()
    kernel, stream = model.load_kernel(), torch.cuda.current_stream().cuda_stream
    o, lse = out["o"][1], out["lse"][1]
    kernel.forward(q, k, v, doc_ids, o, lse, stream)
    kernel.backward(dout, q, k, v, o, lse, doc_ids, *(out[n][1] for n in ("delta", "dq_accum", "dk", "dv")), stream)
    torch.cuda.synchronize()
    return out


def bits(t):
    return t.view(torch.uint8)  # compare bit patterns: nan == nan, -0.0 != 0.0


@pytest.mark.cuda
@pytest.mark.parametrize("D", model.KERNEL_HEAD_DIMS)
@pytest.mark.parametrize("T, docs", [(1, "none"), (70, "one-token"), (129, "mean30"), (500, "mean90")])
def test_kernel_writes_every_output_element_and_nothing_else(D, T, docs):
    """Buffers filled with nan before launch: an element the kernel forgets stays nan, and
    a write past either end (a padded row of the last tile, say) lands in a guard band,
    which must keep its nan bit pattern. T is rarely a multiple of the 64-row tiles."""
    gen = torch.Generator().manual_seed(T)
    B, H = 2, 2
    q, k, v = [t.detach() for t in random_qkv(B, H, T, D, torch.bfloat16, gen, "cuda")]
    doc_ids = make_doc_ids(docs, B, T, gen, "cuda")
    dout = torch.randn(B, H, T, D, generator=gen).to("cuda", torch.bfloat16)
    for name, (buffer, t) in run_kernel_in_guarded_buffers(q, k, v, doc_ids, dout).items():
        assert torch.isfinite(t).all(), f"{name} has elements the kernel did not write (or nan)"
        for band in (buffer[:GUARD], buffer[-GUARD:]):
            assert torch.equal(bits(band), bits(torch.full_like(band, math.nan))), f"{name}: guard band written"


@pytest.mark.cuda
def test_kernel_isolation_is_exact():
    """Another document's keys and values are masked to exactly 0 weight, and the tiles a
    query visits depend on the ids only: change them and this document's output does not
    change by a single bit."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = [t.detach() for t in random_qkv(2, 3, 400, 64, torch.bfloat16, gen, "cuda")]
    doc_ids = torch.tensor([0] * 130 + [1] * 170 + [2] * 100, dtype=torch.int32, device="cuda").expand(2, 400)
    before = attention(q, k, v, doc_ids, backend="cuda")
    others = torch.ones(400, dtype=torch.bool, device="cuda")
    others[130:300] = False  # everything but document 1
    k2, v2 = k.clone(), v.clone()
    k2[:, :, others] = 30 * torch.randn_like(k2[:, :, others])
    v2[:, :, others] = 1000 * torch.randn_like(v2[:, :, others])
    after = attention(q, k2, v2, doc_ids, backend="cuda")
    assert torch.equal(bits(after[:, :, 130:300]), bits(before[:, :, 130:300]))
    assert not torch.equal(after[:, :, :130], before[:, :, :130])  # (the change did reach the others)


@pytest.mark.cuda
@pytest.mark.parametrize("D", model.KERNEL_HEAD_DIMS)
def test_kernel_is_deterministic_except_dq(D):
    """The forward pass, dk and dv are sums in a fixed order: bitwise equal run to run.
    dq is summed with atomicAdd in whatever order the blocks finish: equal to rounding."""
    gen = torch.Generator().manual_seed(13)
    q, k, v = random_qkv(2, 4, 700, D, torch.bfloat16, gen, "cuda")
    doc_ids = random_doc_ids(2, 700, 150, gen, "cuda")
    dout = torch.randn(2, 4, 700, D, generator=gen).to("cuda", torch.bfloat16)
    runs = []
    for _ in range(2):
        out = attention(q, k, v, doc_ids, backend="cuda")
        runs.append([out] + list(grads(out, (q, k, v), dout)))
    (o1, dq1, dk1, dv1), (o2, dq2, dk2, dv2) = runs
    for a, b in [(o1, o2), (dk1, dk2), (dv1, dv2)]:
        assert torch.equal(bits(a), bits(b))
    torch.testing.assert_close(dq1, dq2, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
def test_kernel_fp16_with_large_scores_and_a_large_grad_output():
    """Scores up to about +-45 (a softmax almost one-hot: the online max must do its
    job) and dO of 100s: fp16 has 5 exponent bits, so overflow would show up here first.
    The kernel must stay finite and about as accurate as SDPA in fp16."""
    gen = torch.Generator().manual_seed(14)
    B, H, T, D = 2, 2, 300, 64
    q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(3))
    q, k = 3 * q, 3 * k  # scores q.k / sqrt(64): a spread of 3 * 3 * sqrt(64) / 8 = 9, tails near +-45
    q, k, v = (t.to("cuda", torch.float16).requires_grad_() for t in (q, k, v))
    dout = (100 * torch.randn(B, H, T, D, generator=gen)).to("cuda", torch.float16)
    doc_ids = random_doc_ids(B, T, 80, gen, "cuda")
    want = naive_with_grads(q, k, v, doc_ids, dout)
    results = {}
    for backend in ("cuda", "sdpa"):
        out = attention(q, k, v, doc_ids, backend=backend)
        results[backend] = [out] + list(grads(out, (q, k, v), dout))
    assert all(torch.isfinite(t).all() for t in results["cuda"])
    for name, ours, theirs, w in zip(["out", "dq", "dk", "dv"], results["cuda"], results["sdpa"], want):
        a, b = ((t.double() - w).abs().max().item() for t in (ours, theirs))
        assert a <= 2 * b + 1e-3 * w.abs().max().item(), f"{name}: kernel error {a:.2e}, sdpa error {b:.2e}"


@pytest.mark.cuda
def test_kernel_takes_transposed_views_and_a_non_contiguous_grad_output():
    """The model hands over (B, T, nh, hs) tensors transposed to (B, nh, T, hs), and the
    gradient that comes back is a transposed view too: the same numbers as dense inputs."""
    gen = torch.Generator().manual_seed(15)
    B, T, H, D = 2, 200, 4, 64
    x, dx = (torch.randn(B, T, 3 * H, D, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
    views = [t.transpose(1, 2).requires_grad_() for t in x.split(H, dim=2)]  # (B, H, T, D), strided
    dense = [t.detach().contiguous().requires_grad_() for t in views]
    dout = dx[:, :, :H].transpose(1, 2)  # not contiguous
    assert not views[0].is_contiguous() and not dout.is_contiguous()
    doc_ids = random_doc_ids(B, T, 50, gen, "cuda").long()  # int64 ids too
    out_v = attention(*views, doc_ids, backend="cuda")
    out_d = attention(*dense, doc_ids, backend="cuda")
    (dq_v, dk_v, dv_v), (dq_d, dk_d, dv_d) = grads(out_v, views, dout), grads(out_d, dense, dout.contiguous())
    for a, b in [(out_v, out_d), (dk_v, dk_d), (dv_v, dv_d)]:
        assert torch.equal(a, b)
    torch.testing.assert_close(dq_v, dq_d, rtol=1e-2, atol=1e-2)  # atomics: rounding order


@pytest.mark.cuda
def test_kernel_grid_takes_more_than_65535_batch_heads():
    """B * H runs along grid.x, which goes to 2^31 - 1; grid.y stops at 65,535."""
    gen = torch.Generator().manual_seed(16)
    B, H, T, D = 2, 32_800, 70, 32  # B * H = 65,600
    q, k, v = random_qkv(B, H, T, D, torch.bfloat16, gen, "cuda")
    doc_ids = random_doc_ids(B, T, 30, gen, "cuda")
    dout = torch.randn(B, H, T, D, generator=gen).to("cuda", torch.bfloat16)
    out = attention(q, k, v, doc_ids, backend="cuda")
    want = attention(q, k, v, doc_ids, backend="sdpa")
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    for got, expected in zip(grads(out, (q, k, v), dout), grads(want, (q, k, v), dout)):
        torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2)


@pytest.mark.cuda
def test_kernel_takes_a_dense_slice_that_starts_off_a_16_byte_boundary():
    """cp.async reads 16 bytes at a time; a dense view 2 bytes into a bigger tensor is
    copied by the operator (dense_aligned), under "auto" and "cuda" alike, never refused."""
    gen = torch.Generator().manual_seed(23)
    n = 2 * 2 * 100 * 64
    storage = torch.randn(1 + 3 * n, generator=gen).to("cuda", torch.bfloat16)
    q, k, v = (storage[1 + i * n:1 + (i + 1) * n].view(2, 2, 100, 64) for i in range(3))
    assert q.is_contiguous() and q.data_ptr() % 16 == 2
    doc_ids = random_doc_ids(2, 100, 30, gen, "cuda")
    want = attention(q.clone(), k.clone(), v.clone(), doc_ids, backend="cuda")
    assert torch.equal(attention(q, k, v, doc_ids), want) and torch.equal(attention(q, k, v, doc_ids, backend="cuda"), want)


@pytest.mark.cuda
def test_kernel_makes_unsorted_doc_ids_nan_never_plausible():
    """The tile ranges binary-search the ids, so kernels.cu checks that they are sorted
    and writes NaN where they are not (a row of the batch whose ids are sorted is fine)."""
    gen = torch.Generator().manual_seed(17)
    q, k, v = [t.detach() for t in random_qkv(2, 2, 200, 64, torch.bfloat16, gen, "cuda")]
    doc_ids = torch.tensor([[0] * 80 + [1] * 60 + [0] * 60, [0] * 100 + [1] * 100], dtype=torch.int32, device="cuda")
    out, lse = flash_attention(q, k, v, doc_ids, False)
    assert out[0].isnan().any() and lse[0].isnan().any()  # the pair (139, 140) is out of order
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()
    assert attention(q, k, v, doc_ids).isnan().any()  # "auto" too: never silently wrong


@pytest.mark.cuda
@pytest.mark.parametrize("shape, dtypes", [
    ((2, 2, 0, 64), (torch.bfloat16,) * 3), ((0, 2, 16, 64), (torch.bfloat16,) * 3),
    ((1, 2, 16, 64), (torch.bfloat16, torch.float16, torch.bfloat16)),
])
def test_auto_falls_back_for_empty_and_mixed_inputs(capsys, monkeypatch, shape, dtypes):
    monkeypatch.setattr(model, "_said", set())
    q, k, v = (torch.randn(shape, device="cuda").to(dtype) for dtype in dtypes)
    assert attention(q, k, v).shape == shape  # sdpa (empty, or after promoting the dtypes)
    assert len(capsys.readouterr().out.splitlines()) == 1
    with pytest.raises(BadInput, match="cannot run"):
        attention(q, k, v, backend="cuda")


@pytest.mark.cuda
def test_kernel_on_a_side_stream():
    """Everything runs on torch's current stream: a side stream gives the same answer."""
    gen = torch.Generator().manual_seed(18)
    q, k, v = random_qkv(2, 2, 300, 64, torch.bfloat16, gen, "cuda")
    doc_ids = random_doc_ids(2, 300, 70, gen, "cuda")
    dout = torch.randn(2, 2, 300, 64, generator=gen).to("cuda", torch.bfloat16)
    out = attention(q, k, v, doc_ids, backend="cuda")
    want = [out] + list(grads(out, (q, k, v), dout))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = attention(q, k, v, doc_ids, backend="cuda")
        got = [out] + list(grads(out, (q, k, v), dout))
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)  # dq: atomics; the rest is exact
    assert torch.equal(got[0], want[0])


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernel_on_a_gpu_that_is_not_the_current_one():
    """A device guard: tensors on cuda:1 while cuda:0 is current run on cuda:1."""
    gen = torch.Generator().manual_seed(19)
    q, k, v = [t.detach() for t in random_qkv(2, 2, 200, 64, torch.bfloat16, gen, "cuda:0")]
    doc_ids = random_doc_ids(2, 200, 50, gen, "cuda:0")
    want = attention(q, k, v, doc_ids, backend="cuda")
    with torch.cuda.device(0):
        got = attention(q.to("cuda:1"), k.to("cuda:1"), v.to("cuda:1"), doc_ids.to("cuda:1"), backend="cuda")
    assert got.device == torch.device("cuda:1") and torch.equal(got.cpu(), want.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpt_on_the_kernel_under_autocast_matches_sdpa(compiled):
    """As pretrain.py trains on a GPU: bf16 autocast (so q, k, v reach the operator in
    bf16; "cuda" would refuse float32), optionally torch.compile(fullgraph=True). The loss
    and gradients must match the same model on SDPA to bf16 precision."""
    batch = packed_batch("cuda")
    results = {}
    for backend in ("cuda", "sdpa"):
        gpt = tiny_gpt(backend, n_embd=128, n_head=2, device="cuda")  # head size 64
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results[backend] = loss_and_grads(torch.compile(gpt, fullgraph=True) if compiled else gpt, batch)
    (loss, grads_), (sdpa_loss, sdpa_grads) = results["cuda"], results["sdpa"]
    torch.testing.assert_close(loss, sdpa_loss, rtol=1e-2, atol=1e-2)
    for got, want in zip(grads_, sdpa_grads):
        assert (got - want).norm() <= 3e-2 * want.norm() + 1e-6


@pytest.mark.cuda
def test_kernel_packed_document_equals_document_alone():
    """The packing invariant, through the kernel: a document in a packed row gets the
    output and gradients it gets alone, and its loss sends exactly zero gradient to
    the documents beside it (which would catch a leaky mask in the backward pass)."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = random_qkv(1, 2, 400, 64, torch.bfloat16, gen, "cuda")
    doc_ids = torch.tensor([0] * 130 + [1] * 170 + [2] * 100, dtype=torch.int32, device="cuda")[None]
    w = torch.randn(1, 2, 170, 64, generator=gen).to("cuda", torch.bfloat16)
    packed = attention(q, k, v, doc_ids, backend="cuda")[:, :, 130:300]
    packed_grads = grads((packed.float() * w).sum(), (q, k, v), None)
    doc = [t.detach()[:, :, 130:300].requires_grad_() for t in (q, k, v)]
    alone = attention(*doc, backend="cuda")
    alone_grads = grads((alone.float() * w).sum(), doc, None)
    # Tiles fall differently in the two runs, so sums run in another order: bf16 ulps.
    torch.testing.assert_close(packed, alone, rtol=2e-2, atol=2e-2)
    for got, want in zip(packed_grads, alone_grads):
        torch.testing.assert_close(got[:, :, 130:300], want, rtol=2e-2, atol=2e-2)
        assert (got[:, :, :130] == 0).all() and (got[:, :, 300:] == 0).all()

