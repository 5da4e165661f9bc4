"""
The GPT: a pre-norm decoder-only transformer, and the attention function it calls.

Read top-down: GPTConfig -> GPT (embed -> blocks -> norm -> tied unembedding)
-> Block -> CausalSelfAttention -> attention(q, k, v, doc_ids), which dispatches to
one of four backends that compute the same thing:

    "sdpa"       torch.nn.functional.scaled_dot_product_attention (the baseline)
    "reference"  the tiled online-softmax algorithm of kernels.cu, in plain PyTorch
    "cuda"       kernels.cu, built on first use, as one PyTorch operator
    "flex"       PyTorch's FlexAttention, compiled to Triton: the fallback on GPUs without kernels.cu

Two ideas run through the whole file:
- doc_ids (B, T): several documents share one row of the batch; token i may attend to
  token j only if j <= i and both belong to the same document.
- pos_ids (B, T): rotary positions restart at 0 for every document, so a document
  packed after others sees exactly what it would see alone.
"""

import functools
import hashlib
import importlib
import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # FlexAttention: torch 2.5 and newer
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    create_block_mask = flex_attention = None


@dataclass
class GPTConfig:
    block_size: int = 256      # longest sequence the model is trained on
    vocab_size: int = 50304    # GPT-2's 50257 padded up to a multiple of 64 (faster matmuls)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    rope_base: float = 10000.0


class BadInput(Exception):
    """A problem with what the user asked for. Scripts print it as one line and exit 1."""


# -----------------------------------------------------------------------------
# The model

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix embeds and unembeds
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size, config.rope_base)
        self.attn_backend = "auto"  # not part of the config: a checkpoint runs on any backend
        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer), so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weight counted once

    def forward(self, idx, targets=None, doc_ids=None, pos_ids=None):
        """idx, targets: (B, T) int64, target -1 = no loss. doc_ids, pos_ids: (B, T) or None."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise BadInput(f"sequence length {T} is longer than the model's block size "
                           f"{self.config.block_size}; use a shorter --seq_len")
        if pos_ids is None:
            pos_ids = torch.arange(T, device=idx.device).expand(B, T)
        cos, sin = self.rotary(pos_ids)  # (B, 1, T, hs/2) each
        x = self.wte(idx)  # (B, T, C)
        shared = {}  # what attention builds once per forward for every layer (flex's block mask)
        for block in self.blocks:
            x = block(x, cos, sin, doc_ids, self.attn_backend, shared)
        x = self.norm_f(x)
        if targets is None:
            return self.lm_head(x).float(), None  # (B, T, vocab), float32 for a stable softmax
        return None, linear_cross_entropy(x, self.lm_head.weight, targets)  # no (B, T, vocab) logits

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM paper
        appendix B: 6 per parameter (matmuls) plus the attention scores and weighted sum,
        6 * n_layer * T * n_embd (counted for full T x T attention, as PaLM and nanoGPT do)."""
        return 6 * self.num_params() + 6 * self.config.n_layer * T * self.config.n_embd

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Continue idx (B, T) by sampling one token at a time. No KV cache: every step
        re-runs the (cropped) context, which is slow but has nothing hidden."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])  # the context, cropped
            logits = logits[:, -1, :] / max(temperature, 1e-6)
            logits[:, 50257:] = -float("inf")  # the padding rows of the vocab are never tokens
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth] = -float("inf")
            next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


# -----------------------------------------------------------------------------
# The loss, without the (B, T, vocab) logits

# Rows per chunk. On a CPU 128 gives the cpu step its smallest peak memory (0.8 GB, bench/cpu.md);
# bigger chunks were up to ~10 % faster in a rough check by hand, at up to twice the memory. On a
# GPU each chunk costs a dozen launches and a pass over dW (vocab x C, float32): from 2048 rows on
# it was as fast as the full logits in a check by hand on an H200, at a fifth of their memory.
LOSS_CHUNK_CPU = 128
LOSS_CHUNK_GPU = 2048


def linear_cross_entropy(h, weight, targets):
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-1) without the (B, T, vocab) logits,
    but 0, not nan, when every target is -1. h: (B, T, C), weight: (vocab, C), targets: (B, T)."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    want_grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)  # not in evaluation
    with torch.autocast(device, enabled=False):  # LinearCrossEntropy casts to dtype itself
        return LinearCrossEntropy.apply(h.flatten(0, -2), weight, targets.flatten(), dtype, want_grads)


class LinearCrossEntropy(torch.autograd.Function):
    """Fused linear cross-entropy, as in Liger Kernel (Hsu et al. 2024, FusedLinearCrossEntropy).

    Notice that the gradients are computed in the forward. A chunk of rows has its (rows, vocab)
    logits for a moment: their loss, then dlogits = softmax - onehot, turned at once into the
    chunk's rows of dh = dlogits @ W and its share of dW = dlogits.T @ h; the next chunk reuses
    the memory. The loss is a scalar, so the backward only scales dh and dW by its incoming
    gradient. The matmuls are lm_head's forward and backward ones, none recomputed. Under
    autocast they run in its dtype (bf16); the softmax and dW's sum over chunks in float32."""

    @staticmethod
    def forward(ctx, h, weight, targets, dtype, want_grads):
        # h (N, C), weight (V, C), targets (N,). acc: the softmax's float32 (float64 in tests).
        acc = torch.promote_types(dtype, torch.float32)
        keep = (targets != -1).to(acc)[:, None]  # (N, 1) 0 for an ignored row
        count = keep.sum().clamp(min=1)  # every target ignored: loss 0 and no gradient, not 0 / 0
        targets = targets.clamp(min=0)[:, None]  # (N, 1) an ignored row picks token 0; keep zeroes it
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=acc, device=h.device)
        if want_grads:  # not in evaluation: there dw alone would be a (vocab, C) float32 buffer per batch
            dh = torch.zeros(h.shape, dtype=acc, device=h.device)
            dw = torch.zeros(weight.shape, dtype=acc, device=h.device)
        chunk = LOSS_CHUNK_CPU if h.device.type == "cpu" else LOSS_CHUNK_GPU
        for i in range(0, h.size(0), chunk):
            rows = slice(i, i + chunk)
            h_c = h[rows].to(dtype)  # (n, C)
            logp = (h_c @ w.T).log_softmax(-1, dtype=acc)  # (n, V) this chunk's log-probabilities
            loss -= (logp.gather(1, targets[rows]) * keep[rows]).sum()
            if want_grads:
                dlogits = logp.exp_()  # the softmax, in place
                dlogits[torch.arange(len(h_c), device=h.device), targets[rows, 0]] -= 1  # minus the one-hot
                dlogits = dlogits.to(dtype)
                dh[rows] = dlogits @ w * keep[rows]  # ignored rows zeroed in (n, C), cheaper than in (n, V)
                dw += dlogits.T @ (h_c * keep[rows].to(dtype))
        if want_grads:
            ctx.save_for_backward((dh / count).to(h.dtype), (dw / count).to(weight.dtype))
        return loss / count

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward raises, not drops terms
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return grad_loss * dh, grad_loss * dw, None, None, None


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, doc_ids, backend, shared=None):
        x = x + self.attn(self.norm_1(x), cos, sin, doc_ids, backend, shared)
        x = x + self.mlp(self.norm_2(x))
        return x


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, doc_ids, backend, shared=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = attention(q, k, v, doc_ids, backend, shared)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019): LayerNorm without the mean
    subtraction and bias. Computed in float32 so bf16 activations do not lose precision."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight).type_as(x)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer, Su et al. 2021). Notice that a token's angle depends
    only on its pos_id: a document whose pos_ids start at 0 is rotated as if alone in its row."""

    def __init__(self, head_dim, max_len, base):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (hs/2,)
        angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (max_len, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, pos_ids):
        return self.cos[pos_ids].unsqueeze(1), self.sin[pos_ids].unsqueeze(1)  # (B, 1, T, hs/2)


def apply_rotary(x, cos, sin):
    """Rotate each pair (x1, x2) of the head dimension by its angle. x: (B, nh, T, hs)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


# -----------------------------------------------------------------------------
# Attention: one function, four backends that compute the same thing

ATTN_BACKENDS = ("auto", "sdpa", "reference", "cuda", "flex")


def attention(q, k, v, doc_ids=None, backend="auto", shared=None):
    """Causal attention within documents. q, k, v: (B, nh, T, hs) -> (B, nh, T, hs).
    doc_ids: (B, T), non-decreasing along each row, or None for plain causal attention.
    shared: a dict for what one forward builds once for all its layers, or None.
    "auto" runs kernels.cu where it can take q; on other GPUs flex for batches with
    documents, or sdpa where FlexAttention cannot run either (auto_backend). On CPU and MPS
    it runs sdpa: FlexAttention has no backward there (torch 2.13 raises NotImplementedError)."""
    if backend == "auto":
        backend = auto_backend(q, k, v, doc_ids) if q.is_cuda else "sdpa"
    if backend == "sdpa":
        return sdpa_attention(q, k, v, doc_ids)
    if backend == "flex":
        return flex_document_attention(q, k, v, doc_ids, shared)
    if backend not in ATTN_BACKENDS:
        raise BadInput(f"unknown attention backend '{backend}'; choose one of {', '.join(ATTN_BACKENDS)}")
    if backend == "cuda" and q.is_cuda and (problem := kernel_problem(q, k, v)) is not None:
        raise BadInput(f"attention backend 'cuda' cannot run: {problem}; "
                       f"or use 'auto', which runs {fallback_in_words(q.size(-1))} here")
    if doc_ids is not None:
        doc_ids = doc_ids.to(torch.int32).contiguous()  # (B, T), as the kernel reads them
    # kernels.cu wants dense (B, nh, T, hs): copies made here, outside the operator, can be
    # fused by torch.compile into the rotary embedding that makes q and k.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return flash_attention(q, k, v, doc_ids, backend == "reference")[0]


def auto_backend(q, k, v, doc_ids=None):
    """What "auto" runs for CUDA tensors q, k, v: "cuda" where kernels.cu can take them, else
    "flex" or "sdpa" (gpu_fallback), after one line, once, saying why and what runs instead."""
    problem = kernel_problem(q, k, v)
    if problem is None:
        return "cuda"
    fallback = gpu_fallback(q.size(-1))
    nor = f"; nor flex: {flex_problem(q.size(-1))}" if fallback == "sdpa" else ""
    say_once(f"attention: 'auto' uses {fallback_in_words(q.size(-1))}, not kernels.cu: {problem}{nor}")
    return "sdpa" if doc_ids is None else fallback  # plain causal needs no mask: sdpa's own flash kernel


def gpu_fallback(head_size):
    """flex where FlexAttention can run on this GPU: without it a batch with documents needs
    sdpa with a (B, 1, T, T) mask, which rules out sdpa's flash kernel."""
    return "sdpa" if flex_problem(head_size) else "flex"


def fallback_in_words(head_size):
    return "flex for batches with documents and sdpa for the others" if gpu_fallback(head_size) == "flex" else "sdpa"


@torch.compiler.assume_constant_result  # under torch.compile: asked once, while tracing
def flex_problem(head_size):
    """Why FlexAttention cannot run on this CUDA GPU, or None."""
    if flex_attention is None:
        return f"torch {torch.__version__} has no FlexAttention (2.5 or newer has it)"
    if head_size < 16:
        return f"its GPU kernel takes head sizes of 16 or more, not {head_size}"
    return triton_problem()


def triton_problem():
    """Why torch.compile cannot make GPU code (Triton kernels, which FlexAttention is too) on
    this CUDA GPU, or None."""
    major, minor = torch.cuda.get_device_capability()
    if major < 7:
        return (f"the GPU is sm_{major}{minor} and Triton, which torch.compile generates GPU code with, "
                "needs sm_70 or newer")
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (PyTorch's CUDA wheels for Linux bring it; pip install triton)"
    return None


def document_causal_mask(doc_ids):
    """(B, T) doc ids -> (B, 1, T, T) boolean mask, True where attention is allowed."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)  # (B, T, T)
    return (causal & same_doc).unsqueeze(1)


def sdpa_attention(q, k, v, doc_ids):
    """PyTorch's fused attention. Documents need an explicit (B, 1, T, T) mask, which rules out
    its flash backend: the cost our kernel removes. Right for any doc_ids, sorted or not."""
    dtype = torch.promote_types(q.dtype, torch.promote_types(k.dtype, v.dtype))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)  # SDPA takes one dtype: promote mixed ones
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(doc_ids))


def flex_document_attention(q, k, v, doc_ids, shared=None):
    """FlexAttention (Dong et al. 2024, "Flex Attention: A Programming Model for Generating
    Optimized Attention Kernels"): the mask is a Python function of (batch, head, query,
    key), which torch.compile fuses into a Triton kernel; no toolkit, no (T, T) matrix.
    Notice the block mask: for each 128 x 128 tile, empty (skipped), full (no mask
    evaluated) or partial, the three cases kernels.cu tells apart with key_tile_range and
    tile_fully_visible. Built once per forward, not per layer: GPT.forward hands every layer
    the same `shared` dict (compiled, too: one mask in the graph). Its cost per step, measured
    on a CPU: README, technique 2."""
    dtype = torch.promote_types(q.dtype, torch.promote_types(k.dtype, v.dtype))
    # One dtype, as in sdpa, and dense: compiled into a GPT on a CPU, torch 2.13's FlexAttention
    # read the strided v (a view of the qkv matmul) wrongly (tests/test_attention.py).
    q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
    shared = {} if shared is None else shared
    if "block_mask" not in shared:
        shared["block_mask"] = document_block_mask(doc_ids, q.size(2), q.device)
    # Inside a compiled model it is traced into the graph; alone it is compiled by itself
    # on a GPU; on a CPU (a test's forward) it runs uncompiled.
    compiled = q.is_cuda and not torch.compiler.is_compiling()
    return (compiled_flex_attention() if compiled else flex_attention)(q, k, v, block_mask=shared["block_mask"])


def document_block_mask(doc_ids, T, device):
    """FlexAttention's BlockMask for causal attention within documents. doc_ids: (B, T), equal
    ids = one document (any order is right, as in sdpa), or None for plain causal attention
    over T tokens. create_block_mask evaluates the mask on all B x T x T pairs, once."""
    if doc_ids is None:
        return create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, T, T, device=device)

    def causal_same_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
    return create_block_mask(causal_same_document, doc_ids.size(0), None, T, T, device=device)


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled for the GPU: once per shape (dynamic=False), not per step; a new
    batch's doc_ids are a new block mask, the same compiled kernel."""
    return torch.compile(flex_attention, dynamic=False)


# -----------------------------------------------------------------------------
# "reference" and "cuda" are one operator, like aten::mm: torch.compile keeps it as one
# node of its graph, and autograd runs the backward registered for it. CUDA tensors go to
# kernels.cu unless `mirror` asks for the mirror (flash_forward, flash_backward below),
# which runs on every other device too: that is how CI tests, without a GPU, the very
# operator a GPU runs (opcheck, torch.compile).

@torch.library.custom_op("minipretrain::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: Optional[torch.Tensor],
                    mirror: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, nh, T, hs) and lse (B, nh, T), log2 of each row's sum of 2^scores."""
    if mirror or not q.is_cuda:
        return flash_forward(q, k, v, mirror_doc_ids(doc_ids, q))
    # Buffers are allocated here, in sight, on the stream the kernel runs on (kernels.cu).
    q, k, v = dense_aligned(q), dense_aligned(k), dense_aligned(v)
    o = torch.empty_like(q)  # (B, nh, T, hs)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)  # (B, nh, T)
    load_kernel().forward(q, k, v, doc_ids, o, lse, torch.cuda.current_stream(q.device).cuda_stream)
    return o, lse


@flash_attention.register_fake  # what torch.compile traces with: shapes, dtypes, strides
def _(q, k, v, doc_ids, mirror):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # as flash_forward
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("minipretrain::flash_attention_backward", mutates_args=())
def flash_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             o: torch.Tensor, lse: torch.Tensor, doc_ids: Optional[torch.Tensor],
                             mirror: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv: an operator of its own, so compiled backward graphs hold it too."""
    if mirror or not q.is_cuda:
        return flash_backward(do, q, k, v, o, lse, mirror_doc_ids(doc_ids, q))
    do, q, k, v = (dense_aligned(t) for t in (do, q, k, v))  # do: often a view
    delta = torch.empty_like(lse)  # (B, nh, T) rowsum(dO * O), the preprocess fills it
    dq_accum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # summed into by atomicAdd
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    load_kernel().backward(do, q, k, v, o, lse, doc_ids, delta, dq_accum, dk, dv,
                           torch.cuda.current_stream(q.device).cuda_stream)
    return dq_accum.to(q.dtype), dk, dv


@flash_attention_backward.register_fake
def _(do, q, k, v, o, lse, doc_ids, mirror):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def dense_aligned(t):
    """t as kernels.cu reads it: dense, from a 16-byte boundary (cp.async moves 16 bytes). A
    slice of a bigger tensor can be dense and start anywhere; it is copied here, where the
    tensor is real, since torch.compile traces attention() with tensors that have no address."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _save_for_backward(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])  # lse: a loss on it would get no gradient
    ctx.save_for_backward(*inputs[:3], *output, inputs[3])  # q, k, v, o, lse, doc_ids
    ctx.mirror = inputs[4]


def _backward(ctx, do, _):
    # Once differentiable: the backward op has no backward, so a double backward raises (not drops terms).
    dq, dk, dv = flash_attention_backward(do, *ctx.saved_tensors, ctx.mirror)
    return dq, dk, dv, None, None


flash_attention.register_autograd(_backward, setup_context=_save_for_backward)


# -----------------------------------------------------------------------------
# The reference backend: kernels.cu's algorithm in plain PyTorch. Read this first, beside
# kernels.cu: same tiles, loops and names. Upper case names (Q, K, V, S, P, dO, dS, dK, dV)
# are tiles, lower case (q, k, v, o, do, lse, delta, dq) whole (B, nh, T, ...) tensors. A
# loop over b and tiles here is the kernel's grid of thread blocks; heads run in parallel.

BLOCK_M = 64  # query rows per tile (kernels.cu BLOCK_M)
BLOCK_N = 64  # key rows per tile (kernels.cu BLOCK_N)
LOG2E = 1.4426950408889634  # log2(e): softmax in base 2, because exp2 is one GPU instruction


def mirror_doc_ids(doc_ids, q):
    """doc_ids for the mirror: zeros for plain causal; refused unsorted, since the tile
    ranges binary-search them (on a GPU the check syncs, as every tile of the mirror does)."""
    if doc_ids is None:
        return torch.zeros(q.size(0), q.size(2), dtype=torch.int32, device=q.device)
    if (doc_ids[:, 1:] < doc_ids[:, :-1]).any():
        raise BadInput("doc_ids must be non-decreasing along each row")
    return doc_ids


def flash_forward(q, k, v, doc_ids, block_m=BLOCK_M, block_n=BLOCK_N):
    """FlashAttention forward (Dao et al. 2022), with FlashAttention-2's loop order
    (Dao 2023, Algorithm 1): query tiles outside, key tiles inside.

    Notice that the (T, T) score matrix never exists. A query tile keeps a running max m,
    a running sum l and an unnormalised output acc; when a new key tile raises the max,
    alpha = 2^(m_old - m_new) rescales what was summed so far (the online softmax).
    Also notice which key tiles are visited at all: none right of the diagonal and none
    before the document of the tile's first query. Only tiles cut by the diagonal or a
    document boundary need the element mask. Returns o (B, nh, T, hs) and lse (B, nh, T),
    log2 of each row's sum of 2^scores: all the backward needs to rebuild the softmax."""
    B, H, T, D = q.shape
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # the kernel: fp32
    scale_log2 = LOG2E / math.sqrt(D)  # e^(x / sqrt(D)) == 2^(x * scale_log2)
    o = q.new_empty(q.shape)  # dense, whatever q's strides (as the operator promises)
    lse = torch.empty(B, H, T, dtype=acc_dtype, device=q.device)
    for b in range(B):
        docs = doc_ids[b]  # (T,)
        for m0 in range(0, T, block_m):  # kernel: one thread block per (b, head, query tile)
            m1 = min(m0 + block_m, T)
            Q = q[b, :, m0:m1].to(acc_dtype)  # (H, BM, D)
            m = torch.full((H, m1 - m0), -math.inf, dtype=acc_dtype, device=q.device)  # row max of S
            l = torch.zeros(H, m1 - m0, dtype=acc_dtype, device=q.device)  # row sum of 2^(S - m)
            acc = torch.zeros(H, m1 - m0, D, dtype=acc_dtype, device=q.device)  # P @ V, unnormalised
            n_start, n_end = key_tile_range(docs, m0, block_m, block_n)
            for n0 in range(n_start, n_end, block_n):
                n1 = min(n0 + block_n, T)
                K = k[b, :, n0:n1].to(acc_dtype)  # (H, BN, D)
                V = v[b, :, n0:n1].to(acc_dtype)  # (H, BN, D)
                S = (Q @ K.mT) * scale_log2  # (H, BM, BN) scores, in base-2 units
                if not tile_fully_visible(docs, m0, n0, block_m, block_n):
                    S = S.masked_fill(~visible(docs, m0, m1, n0, n1), -math.inf)
                # exercise 1 begins: the online softmax
                m_new = torch.maximum(m, S.amax(-1))  # (H, BM)
                # A row that has seen only masked keys has m_new = -inf, and -inf - -inf is nan.
                # Subtracting 0 instead gives 2^-inf = 0: nothing is added, nothing breaks.
                m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)
                P = torch.exp2(S - m_safe[..., None])  # (H, BM, BN)
                alpha = torch.exp2(m - m_safe)  # (H, BM) rescales the old sums to the new max
                l = alpha * l + P.sum(-1)
                acc = alpha[..., None] * acc + P @ V  # kernel: P is rounded to bf16/fp16 here
                m = m_new
                # exercise 1 ends
            # Every real row sees at least itself, so l > 0 here.
            o[b, :, m0:m1] = (acc / l[..., None]).to(q.dtype)
            lse[b, :, m0:m1] = m + torch.log2(l)
    return o, lse


def flash_backward(do, q, k, v, o, lse, doc_ids, block_m=BLOCK_M, block_n=BLOCK_N):
    """FlashAttention-2 backward (Dao 2023, Algorithm 2).

    Notice three things. P is rebuilt from S and the saved lse: exp2(S - lse) is already
    normalised, so no (T, T) matrix was ever stored. The softmax backward
    dS = P * (dP - delta) needs only delta = rowsum(dO * O), computed once up front
    (the "preprocess"). And the outer loop runs over key tiles, so a tile's dK and dV are
    finished on chip, while dq gets a piece from every key tile: the kernel adds those
    pieces into a float32 buffer with atomicAdd (dq below)."""
    B, H, T, D = q.shape
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D)
    scale_log2 = scale * LOG2E
    # exercise 2 begins: the preprocess, delta
    delta = (do.to(acc_dtype) * o.to(acc_dtype)).sum(-1)  # (B, H, T) the preprocess: D = rowsum(dO * O)
    # exercise 2 ends
    dq = torch.zeros(B, H, T, D, dtype=acc_dtype, device=q.device)  # kernel: dq_accum, fp32
    dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)
    for b in range(B):
        docs = doc_ids[b]  # (T,)
        for n0 in range(0, T, block_n):  # kernel: one thread block per (b, head, key tile)
            n1 = min(n0 + block_n, T)
            K = k[b, :, n0:n1].to(acc_dtype)  # (H, BN, D)
            V = v[b, :, n0:n1].to(acc_dtype)  # (H, BN, D)
            dK = torch.zeros(H, n1 - n0, D, dtype=acc_dtype, device=q.device)
            dV = torch.zeros(H, n1 - n0, D, dtype=acc_dtype, device=q.device)
            m_start, m_end = query_tile_range(docs, n0, block_m, block_n)
            for m0 in range(m_start, m_end, block_m):
                m1 = min(m0 + block_m, T)
                Q = q[b, :, m0:m1].to(acc_dtype)  # (H, BM, D)
                dO = do[b, :, m0:m1].to(acc_dtype)  # (H, BM, D)
                S = (Q @ K.mT) * scale_log2  # (H, BM, BN) (the kernel holds its transpose)
                if not tile_fully_visible(docs, m0, n0, block_m, block_n):
                    S = S.masked_fill(~visible(docs, m0, m1, n0, n1), -math.inf)
                P = torch.exp2(S - lse[b, :, m0:m1, None])  # (H, BM, BN) the forward's softmax
                dV += P.mT @ dO  # (H, BN, D)
                dP = dO @ V.mT  # (H, BM, BN)
                # exercise 2 begins: the softmax backward, dS
                dS = P * (dP - delta[b, :, m0:m1, None])  # (H, BM, BN) softmax backward
                # exercise 2 ends
                dK += dS.mT @ Q  # (H, BN, D)
                dq[b, :, m0:m1] += (dS @ K) * scale  # kernel: atomicAdd into dq_accum
            dk[b, :, n0:n1] = (dK * scale).to(k.dtype)
            dv[b, :, n0:n1] = dV.to(v.dtype)
    return dq.to(q.dtype), dk, dv


# Which tiles to visit. docs is one row of doc_ids, (T,), sorted, so "where does this
# document start / end" is a binary search (torch.searchsorted; the kernel writes it out).

def doc_start(docs, t):
    """First token of the document that holds token t."""
    return int(torch.searchsorted(docs, docs[t:t + 1], right=False))


def doc_end(docs, t):
    """One past the last token of the document that holds token t."""
    return int(torch.searchsorted(docs, docs[t:t + 1], right=True))


def key_tile_range(docs, m0, block_m, block_n):
    """Key tiles [n_start, n_end) that the query tile starting at m0 must visit: from the
    tile holding the start of its first query's document, up to the diagonal."""
    # exercise 3 begins: tile skipping for documents
    n_start = doc_start(docs, m0) // block_n * block_n
    n_end = min(m0 + block_m, docs.numel())
    return n_start, n_end
    # exercise 3 ends


def query_tile_range(docs, n0, block_m, block_n):
    """Query tiles [m_start, m_end) that can see the key tile starting at n0: from the
    diagonal to the end of the document of its last key."""
    n_last = min(n0 + block_n, docs.numel()) - 1
    m_start = n0 // block_m * block_m
    m_end = doc_end(docs, n_last)
    return m_start, m_end


def tile_fully_visible(docs, m0, n0, block_m, block_n):
    """True when every query of the tile sees every key: the whole key tile is at or
    left of the first query, the tile is not cut by the end of the sequence, and the
    first key and the last query share a document (sorted ids: so do all between)."""
    T = docs.numel()
    return (n0 + block_n - 1 <= m0 and m0 + block_m <= T
            and bool(docs[n0] == docs[m0 + block_m - 1]))


def visible(docs, m0, m1, n0, n1):
    """(m1 - m0, n1 - n0) bool, True where query i may attend to key j."""
    i = torch.arange(m0, m1, device=docs.device)[:, None]
    j = torch.arange(n0, n1, device=docs.device)[None, :]
    return (j <= i) & (docs[m0:m1, None] == docs[None, n0:n1])


# -----------------------------------------------------------------------------
# kernels.cu: which inputs it takes, and building it on first use

KERNEL_HEAD_DIMS = (32, 64, 128)  # the instantiations at the bottom of kernels.cu

_kernel = None  # the built extension module, once loaded
_kernel_error = None  # why it cannot be built, once known
_said = set()  # the fallback lines said so far


def kernel_problem(q, k, v):
    """Why kernels.cu cannot take these CUDA tensors, or None: a fallback for "auto", a
    BadInput for "cuda", never a crash. Shapes and dtypes only: torch.compile traces it.
    What the machine lacks comes first: no advice about q for a GPU that cannot run it."""
    B, H, T, D = q.shape
    if (machine := cannot_build()) is not None:
        return machine
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k, v have mixed dtypes ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the kernel takes float16 or bfloat16, not {q.dtype} (train with a bf16/fp16 dtype)"
    if D not in KERNEL_HEAD_DIMS:
        return f"the kernel is built for head sizes {KERNEL_HEAD_DIMS}, not {D}"
    if T == 0 or B * H == 0:
        return f"q is {tuple(q.shape)}: nothing to compute, and an empty grid is no launch"
    return _kernel_error if load_kernel() is None else None


@torch.compiler.assume_constant_result  # under torch.compile: called once, while tracing
def cannot_build():
    """Why this machine cannot build kernels.cu (asked without building), or None."""
    global _kernel_error
    if _kernel is None and _kernel_error is None:
        _kernel_error = _build_problem()
    return _kernel_error if _kernel is None else None


@torch.compiler.assume_constant_result  # under torch.compile: called once, while tracing
def load_kernel(verbose=False):
    """Build (first time: a minute or two) or load (cached: a second) kernels.cu, and check it
    on this GPU once (self_check): the module, or None with why and how to fix it in
    _kernel_error (attention() says it, once). A failed build or check is not retried."""
    global _kernel, _kernel_error
    if _kernel is None and (_kernel_error is None or verbose):
        _kernel_error = _build_problem()
        if _kernel_error is None:
            try:
                module = _build_kernel(verbose)
            except Exception as e:  # compiler errors, a missing header, a bad toolchain...
                _kernel_error = (f"kernels.cu failed to build: {_first_error_line(str(e))} "
                                 "(whole log: python -c 'import model; model.load_kernel(verbose=True)')")
            else:
                if (_kernel_error := self_check(module)) is None:
                    _kernel = module
    return _kernel


def _build_problem():
    """What stops the build before it starts, or None. Each answer says how to fix it."""
    from torch.utils import cpp_extension  # only here: with a CUDA torch but no GPU, importing it warns
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if torch.version.hip is not None:
        return "this is a ROCm build of PyTorch and kernels.cu is CUDA only"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the GPU is sm_{major}{minor}; the kernel's bf16 mma.sync and cp.async need sm_80 or newer"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    if cpp_extension.CUDA_HOME is None or not os.path.exists(nvcc):
        return (f"nvcc not found (CUDA_HOME={cpp_extension.CUDA_HOME}); install the CUDA toolkit "
                f"{torch.version.cuda} and set CUDA_HOME to it")
    return None


HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_SOURCE = os.path.join(HERE, "kernels.cu")


def _build_kernel(verbose):
    """Compile for the visible GPU only, cached per architecture in ~/.cache/torch_extensions.
    The explicit -gencode makes cpp_extension ignore TORCH_CUDA_ARCH_LIST, on purpose:
    containers often list pre-sm_80 GPUs, which cannot assemble cp.async. No
    --use_fast_math: it would change every division and sqrt; the softmax asks for ex2.approx."""
    from torch.utils import cpp_extension
    arch = "%d%d" % torch.cuda.get_device_capability()  # "86" for an RTX 3090
    name = f"minipretrain_attention_sm{arch}"
    folder = cpp_extension._get_build_directory(name, verbose)  # private, but what load() asks too
    built = os.path.join(folder, name + ".so")  # absent or older than kernels.cu: nvcc will run
    if not os.path.exists(built) or os.path.getmtime(built) < os.path.getmtime(KERNEL_SOURCE):
        print(f"attention: building kernels.cu for sm_{arch}, a minute or two, once; cached in {folder}",
              flush=True)  # seen before the silent minutes, even when stdout goes to a file
    return cpp_extension.load(name=name, sources=[KERNEL_SOURCE], build_directory=folder, verbose=verbose,
                              extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"])


def _first_error_line(log):
    """The line of a compiler log that says what went wrong: nvcc and gcc write "error:",
    ptxas "ptxas error   :" and nvcc's driver "nvcc fatal   :". Else the first line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()] or ["no compiler output"]
    errors = [line for line in lines if re.search(r"(error|fatal)\s*:", line, re.IGNORECASE)]
    return (errors or lines)[0][:300]


@torch.compiler.assume_constant_result  # under torch.compile: said while tracing, no graph break
def say_once(message):
    """One line, once: training goes on with a fallback, and the log says why."""
    if message not in _said:
        _said.add(message)
        print(message)


# -----------------------------------------------------------------------------
# The self-check: on each new machine, kernels.cu proves itself before a run trusts it

def kernel_error_allowed(sdpa_error):
    """The rule of the self-check and of the cuda tests, FlashAttention's own: the kernel's error
    against float64 attention may be at most twice SDPA's in the same precision, plus a floor."""
    return 2 * sdpa_error + 1e-3


def self_check(module, under_check="model:_kernel_under_check", timeout=120):
    """None when the kernel computes attention right on this GPU, else one line naming the case
    that failed and the log. It runs in a child process: an illegal memory access kills CUDA for
    the whole process that made it. A pass is remembered beside the build, under a hash of all
    that could change it; a failure is checked again next time, so a fix shows at once."""
    index = torch.cuda.current_device()
    key = _machine_key(index)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = os.path.join(os.path.dirname(module.__file__), f"selfcheck-{digest}")
    if os.path.exists(name + ".passed"):
        return None
    print("attention: checking kernels.cu against float64 attention on this GPU (a few seconds, once)... ",
          end="", flush=True)
    error = _run_self_check(under_check, index, f"{name}-cuda{index}.log", timeout)
    print("passed" if error is None else f"failed: {error}")
    if error is None:
        with open(name + ".passed", "w") as f:
            f.write(key + "\n")
    return error


def _machine_key(index):
    """All that could change the verdict, in words: the GPU, its driver, CUDA, torch, kernels.cu
    and this file (which allocates the kernel's buffers and calls it)."""
    gpu = torch.cuda.get_device_properties(index)
    source = hashlib.sha256()
    for path in (KERNEL_SOURCE, os.path.abspath(__file__)):
        with open(path, "rb") as f:
            source.update(f.read())
    driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: "?")()  # the CUDA version it supports
    if os.path.exists("/proc/driver/nvidia/version"):  # Linux: the driver's own version, more exact
        with open("/proc/driver/nvidia/version") as f:
            driver = f.readline().strip()
    return (f"{gpu.name} sm_{gpu.major}{gpu.minor}; driver {driver}; CUDA {torch.version.cuda}; "
            f"torch {torch.__version__}; kernels.cu + model.py sha256 {source.hexdigest()[:16]}")


def _run_self_check(under_check, index, log_path, timeout):
    """_self_check_child in a child process that writes to log_path: None if it passed, else
    what failed, in one line (the child names each case as it starts it)."""
    command = [sys.executable, "-c", f"import model; model._self_check_child({under_check!r}, {index})"]
    with open(log_path, "w") as log:
        try:
            status = subprocess.run(command, cwd=HERE, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status = None
    if status == 0:
        return None
    with open(log_path) as log:
        lines = log.read().splitlines()
    cases = [line.removeprefix("case: ") for line in lines if line.startswith("case: ")]
    errors = [line.removeprefix("FAILED: ") for line in lines  # ours, or an exception's last line
              if re.match(r"(FAILED|[\w.]+(Error|Exception)): ", line)]
    died = next((sig.name for sig in signal.Signals if sig == -status), f"signal {-status}") if status and status < 0 else None
    why = (f"no answer within {timeout} s" if status is None else f"the process died of {died}" if status < 0 else
           errors[-1][:200] if errors else f"exit status {status}")
    where = f"in case {cases[-1]}" if cases else "before its first case"
    return f"kernels.cu failed its self-check on this GPU {where}: {why} (whole log: {log_path})"


def _self_check_child(under_check, index):
    """The cases, in the child. under_check names "module:function", function(q, k, v, doc_ids)
    -> out: the kernel, or a stand-in in the tests. Forward and backward of each case against
    float64 attention; exit status 1 at the first error out of bounds."""
    module_name, function_name = under_check.split(":")
    attend = getattr(importlib.import_module(module_name), function_name)
    device = f"cuda:{index}" if torch.cuda.is_available() else "cpu"  # cpu: the tests' stand-ins
    gen = torch.Generator().manual_seed(0)
    B, H, T = 2, 2, 190  # T: two whole 64-row tiles and part of a third
    for dtype in (torch.bfloat16, torch.float16):
        for D in KERNEL_HEAD_DIMS:
            for docs in ("no documents", "documents"):
                print(f"case: {str(dtype).removeprefix('torch.')}, head size {D}, T {T}, {docs}", flush=True)
                q, k, v, do = (torch.randn(B, H, T, D, generator=gen).to(device, dtype) for _ in range(4))
                cuts = torch.rand(B, T, generator=gen) < 0.03  # about 6 documents a row
                doc_ids = cuts.cumsum(1).to(device, torch.int32) if docs == "documents" else None
                exact = _out_and_grads(sdpa_attention, q.double(), k.double(), v.double(), doc_ids, do.double())
                ours = _out_and_grads(attend, q, k, v, doc_ids, do)
                sdpa = _out_and_grads(sdpa_attention, q, k, v, doc_ids, do)
                for name, got, sdpa_got, want in zip(("out", "dq", "dk", "dv"), ours, sdpa, exact):
                    error = (got.double() - want).abs().max().item()
                    allowed = kernel_error_allowed((sdpa_got.double() - want).abs().max().item())
                    print(f"  {name}: error {error:.1e}, allowed {allowed:.1e}", flush=True)
                    if not error <= allowed:  # NaN fails too
                        sys.exit(f"FAILED: {name} error {error:.1e}, allowed {allowed:.1e}")


def _out_and_grads(attend, q, k, v, doc_ids, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v, doc_ids)
    return [out, *torch.autograd.grad(out, (q, k, v), do)]


def _kernel_under_check(q, k, v, doc_ids):
    """What the self-check checks: the operator on kernels.cu, loaded here, in the child, unchecked."""
    global _kernel
    _kernel = _kernel or _build_kernel(False)
    return flash_attention(q, k, v, doc_ids, False)[0]
