"""Attention backends. On CPU: the reference backend (kernels.cu's algorithm in plain
PyTorch) against naive float64 attention, its tile skipping, and the kernel loader's
messages. On a GPU (tests marked cuda): kernels.cu against naive attention and SDPA."""

import math
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

import model
from model import BadInput, attention, flash_forward, reference_attention


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
def test_reference_matches_naive_float64(case):
    B, H, T, D, block_m, block_n, docs = case
    gen = torch.Generator().manual_seed(T * 1000 + block_m)
    q, k, v = random_qkv(B, H, T, D, torch.float64, gen)
    doc_ids = make_doc_ids(docs, B, T, gen)
    dout = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)

    out = reference_attention(q, k, v, doc_ids, block_m, block_n)
    want = naive_attention(q, k, v, doc_ids)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    for got, expected in zip(grads(out, (q, k, v), dout), grads(want, (q, k, v), dout)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)

    docs_or_zeros = doc_ids if doc_ids is not None else torch.zeros(B, T, dtype=torch.int32)
    _, lse = flash_forward(q.detach(), k.detach(), v.detach(), docs_or_zeros, block_m, block_n)
    torch.testing.assert_close(lse * math.log(2), naive_lse(q.detach(), k.detach(), doc_ids),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_reference_in_low_precision_is_close_to_naive(dtype, atol):
    """float32 inside as in the kernel: the error is that of rounding the inputs/outputs."""
    gen = torch.Generator().manual_seed(1)
    B, H, T, D = 2, 2, 90, 32
    q, k, v = random_qkv(B, H, T, D, dtype, gen)
    doc_ids = random_doc_ids(B, T, 25, gen)
    dout = torch.randn(B, H, T, D, generator=gen).to(dtype)
    out = reference_attention(q, k, v, doc_ids, 16, 32)
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
    x = torch.randn(2, 40, 3, 2, 8, generator=gen, dtype=torch.float64)  # (B, T, 3, nh, hs)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, nh, T, hs), not contiguous
    doc_ids = random_doc_ids(2, 40, 10, gen)
    torch.testing.assert_close(reference_attention(q, k, v, doc_ids, 16, 16),
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
    with pytest.raises(BadInput, match="cuda.*cpu"):
        attention(q, k, v, doc_ids, backend="cuda")


def test_reference_refuses_unsorted_doc_ids():
    q, k, v = random_qkv(1, 1, 4, 8, torch.float32, torch.Generator().manual_seed(5))
    with pytest.raises(BadInput, match="non-decreasing"):
        reference_attention(q, k, v, torch.tensor([[0, 1, 0, 1]], dtype=torch.int32))


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
def test_loader_says_why_once_and_does_not_build(fresh_loader, capsys, monkeypatch, take_away, says):
    take_away(monkeypatch)
    assert model.load_kernel() is None
    line = one_line_said(capsys)
    assert line.startswith("attention: kernels.cu not used, 'auto' uses sdpa: ")
    assert __import__("re").search(says, line), line
    assert model.load_kernel() is None
    assert capsys.readouterr().out == ""  # said once
    assert fresh_loader == []  # never tried to build


def test_loader_reports_the_first_compiler_error_once(fresh_loader, capsys, monkeypatch):
    log = ("Error building extension 'minipretrain_attention': [1/2] /usr/local/cuda/bin/nvcc "
           "--generate-dependencies-with-compile -c kernels.cu -o kernels.cuda.o\n"
           "FAILED: kernels.cuda.o\n"
           "/src/kernels.cu(212): error: identifier \"BLOCK_Q\" is undefined\n"
           "/src/kernels.cu(230): error: expected a \";\"\n"
           "2 errors detected in the compilation of \"/src/kernels.cu\".\n")
    calls = []

    def failing_build(verbose):
        calls.append(verbose)
        raise RuntimeError(log)
    monkeypatch.setattr(model, "_build_kernel", failing_build)
    assert model.load_kernel() is None
    line = one_line_said(capsys)
    assert 'kernels.cu(212): error: identifier "BLOCK_Q" is undefined' in line
    assert "load_kernel(verbose=True)" in line  # how to see the whole log
    assert model.load_kernel() is None
    assert calls == [False]  # not retried on every call
    assert capsys.readouterr().out == ""


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
        assert a <= 2 * b + 1e-3, f"{name}: kernel error {a:.2e}, sdpa error {b:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("D", model.KERNEL_HEAD_DIMS)
def test_kernel_lse_and_output_match_the_reference(D):
    """The mirror and the kernel compute the same thing: compare lse too."""
    gen = torch.Generator().manual_seed(D)
    B, H, T = 2, 2, 300
    q, k, v = [t.detach() for t in random_qkv(B, H, T, D, torch.bfloat16, gen, "cuda")]
    doc_ids = random_doc_ids(B, T, 60, gen, "cuda")
    o = torch.empty_like(q)
    lse = torch.empty(B, H, T, device="cuda")
    model.load_kernel().forward(q, k, v, doc_ids, o, lse, torch.cuda.current_stream().cuda_stream)
    o_ref, lse_ref = flash_forward(q, k, v, doc_ids)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=1e-3)  # both fp32 from the same scores
    # Both rounded to bf16 (and the kernel rounds P too): allow a bf16 ulp or two.
    torch.testing.assert_close(o.float(), o_ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("D", model.KERNEL_HEAD_DIMS)
@pytest.mark.parametrize("T, docs", [(1, "none"), (70, "one-token"), (129, "mean30"), (500, "mean90")])
def test_kernel_writes_every_output_element(D, T, docs):
    """Outputs filled with nan before launch: any element the kernel forgets stays nan."""
    gen = torch.Generator().manual_seed(T)
    B, H = 2, 2
    q, k, v = [t.detach() for t in random_qkv(B, H, T, D, torch.bfloat16, gen, "cuda")]
    doc_ids = make_doc_ids(docs, B, T, gen, "cuda")
    if doc_ids is not None:
        doc_ids = doc_ids.contiguous()
    dout = torch.randn(B, H, T, D, generator=gen).to("cuda", torch.bfloat16)
    kernel = model.load_kernel()
    stream = torch.cuda.current_stream().cuda_stream
    o, dq, dk, dv = (torch.full_like(q, math.nan) for _ in range(4))
    lse = torch.full((B, H, T), math.nan, device="cuda")
    kernel.forward(q, k, v, doc_ids, o, lse, stream)
    kernel.backward(dout, q, k, v, o, lse, doc_ids, dq, dk, dv, stream)
    for name, t in [("o", o), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)]:
        assert torch.isfinite(t).all(), f"{name} has elements the kernel did not write (or nan)"


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


@pytest.mark.cuda
def test_kernel_build_is_cached():
    """After the first build, loading the kernel in a fresh process takes < 2 s."""
    model.load_kernel()
    code = "import time, model; t = time.time(); assert model.load_kernel(); print(time.time() - t)"
    seconds = float(subprocess.check_output([sys.executable, "-c", code], cwd=model.__file__.rsplit("/", 1)[0]))
    assert seconds < 2.0, seconds
