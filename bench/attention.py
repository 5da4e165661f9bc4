"""kernels.cu against PyTorch's attention on a GPU: forward and backward TFLOP/s of causal
attention within documents, and each backend's errors against float64. Backends: ours
(kernels.cu), SDPA's flash kernel with no documents at all (the speed limit of plain
causal attention, not the same computation), SDPA with a boolean document mask, and
FlexAttention with a document block mask. Writes attention.md and .png beside this file.

    python bench/attention.py [--out FOLDER] [--seq_lens 1024,2048] [--head_dims 64]
    python bench/attention.py --device cpu --seq_lens 128 --doc_lens 32 --tokens 256  # dry run
"""

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

from common import BENCH, save
import harness
from model import attention, document_causal_mask

OURS = "ours (kernels.cu)"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=BENCH, help="folder for the .md and .png")
    p.add_argument("--seq_lens", default="1024,2048,4096,8192", help="comma-separated T")
    p.add_argument("--doc_lens", default="256,1024", help="comma-separated mean document lengths")
    p.add_argument("--head_dims", default="64,128", help="comma-separated head sizes (model width stays 1024)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = tokens / T)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of this script")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: bench/attention.py needs a CUDA GPU, and PyTorch sees none (--device cpu: a dry run)")
    torch._dynamo.config.cache_size_limit = 64  # FlexAttention compiles once per shape
    args.device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                        else f"CPU ({torch.get_num_threads()} threads; a dry run)")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    rows = []
    for D, T, doc_len in itertools.product(ints(args.head_dims), ints(args.seq_lens), ints(args.doc_lens)):
        rows += bench_one(D, T, doc_len, args)
    errors = [e for D in ints(args.head_dims) for e in errors_against_float64(D, min(ints(args.seq_lens)), args)]
    os.makedirs(args.out, exist_ok=True)
    write_markdown(rows, errors, args, os.path.join(args.out, "attention.md"))
    plot(rows, os.path.join(args.out, "attention.png"), args.device_name)
    print(f"wrote {args.out}/attention.md and attention.png")


def bench_one(D, T, doc_len, args):
    """Time every backend on one batch. FLOPs count only the (query, key) pairs the mask
    allows, sum(L^2 / 2) over the documents, at 4 D per pair forward (S = Q K^T and P V)
    and 2.5 times that backward (FlashAttention's convention), for every backend alike."""
    B, H = max(1, args.tokens // T), 1024 // D
    doc_ids, q, k, v, dout = random_inputs(B, H, T, D, doc_len, T + D + doc_len, args.device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    lengths = torch.cat([torch.unique_consecutive(row, return_counts=True)[1] for row in doc_ids.cpu()])
    fwd_flops = 4 * D * H * (float((lengths.double() ** 2).sum()) / 2)
    rows = []
    for name, fn in backends(doc_ids, args.device).items():
        row = dict(D=D, T=T, doc_len=doc_len, B=B, backend=name)
        where = f"d{D:<3d} T {T:5d}, documents ~{doc_len:5d}: {name:27s}"
        try:
            fwd_ms, bwd_ms = time_forward_backward(fn, q, k, v, dout, args.device)
            row.update(fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd=fwd_flops / fwd_ms / 1e9, bwd=2.5 * fwd_flops / bwd_ms / 1e9)
            print(f"{where} forward {row['fwd']:6.1f} TFLOP/s ({fwd_ms:7.3f} ms), backward {row['bwd']:6.1f} "
                  f"({bwd_ms:7.3f} ms)", flush=True)
        except Exception as e:  # out of memory, a FlexAttention that does not compile here...
            row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}" if str(e) else type(e).__name__
            print(f"{where} {row['failed']}", flush=True)
        rows.append(row)
    return rows


def random_inputs(B, H, T, D, mean_len, seed, device):
    """doc_ids (B, T), cut into documents every ~mean_len tokens at random, and bf16 q, k, v, dout (B, H, T, D)."""
    gen = torch.Generator().manual_seed(seed)
    doc_ids = (torch.rand(B, T, generator=gen) < 1.0 / mean_len).cumsum(dim=1).to(torch.int32).to(device)
    return doc_ids, *(torch.randn(B, H, T, D, generator=gen).to(device, torch.bfloat16) for _ in range(4))


def backends(doc_ids, device):
    """name -> f(q, k, v). Masks are built here, outside the timing, which favours the
    baselines: a model rebuilds them at every step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, T = doc_ids.shape
    mask = document_causal_mask(doc_ids)  # (B, 1, T, T) bool

    def sdpa_flash_no_docs(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION if device == "cuda" else SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    fns = {OURS: lambda q, k, v: attention(q, k, v, doc_ids, backend="cuda"),
           "SDPA flash, no documents": sdpa_flash_no_docs,
           "SDPA + boolean mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def document_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        block_mask = create_block_mask(document_causal, B, None, T, T, device=device)
        flex = torch.compile(flex_attention, dynamic=False)
        fns["FlexAttention + block mask"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask)
    except Exception as e:  # an older torch, or no compiler for it here
        print(f"FlexAttention skipped: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
    return fns


def time_forward_backward(fn, q, k, v, dout, device):
    """Milliseconds per forward, and per backward of a kept graph: medians, after a warm-up
    that builds kernels and compiles FlexAttention. On a GPU, triton's do_bench (CUDA
    events, the L2 cache flushed between calls); on a CPU (a dry run), torch's Timer."""
    from torch.utils.benchmark import Timer
    torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    out = fn(q, k, v)
    if device == "cuda":
        from triton.testing import do_bench
        ms = lambda f: do_bench(f, return_mode="median")  # noqa: E731
    else:
        ms = lambda f: 1e3 * Timer("f()", globals={"f": f}).timeit(3).median  # noqa: E731
    return ms(lambda: fn(q, k, v)), ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))


def errors_against_float64(D, T, args):
    """Max |error| of out, dq, dk, dv against float64, for each backend that computes the documents."""
    doc_ids, q, k, v, dout = random_inputs(1, 4, T, D, 256, D, args.device)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=document_causal_mask(doc_ids))
    want = [want] + list(torch.autograd.grad(want, (q64, k64, v64), dout.double()))
    errors, fns = [], backends(doc_ids, args.device)
    fns.pop("SDPA flash, no documents")  # it ignores the documents: a different function
    for name, fn in fns.items():
        try:
            q1, k1, v1 = (t.clone().requires_grad_() for t in (q, k, v))
            got = fn(q1, k1, v1)
            got = [got] + list(torch.autograd.grad(got, (q1, k1, v1), dout))
            errors.append(dict(D=D, T=T, backend=name, **{key: (a.double() - b).abs().max().item()
                                                          for key, a, b in zip(("out", "dq", "dk", "dv"), got, want)}))
        except Exception as e:
            print(f"errors of {name} skipped: {type(e).__name__}")
    return errors


def write_markdown(rows, errors, args, path):
    ours = {(r["D"], r["T"], r["doc_len"]): r for r in rows if r["backend"] == OURS and "failed" not in r}
    lines = ["# Attention: kernels.cu vs PyTorch\n",
             f"Device: **{args.device_name}**, PyTorch {torch.__version__}, CUDA {torch.version.cuda}. "
             f"bf16, model width 1024 (16 heads of 64 or 8 of 128), {args.tokens:,} tokens per batch "
             f"(B = tokens / T). Command: `python bench/attention.py --seq_lens {args.seq_lens} "
             f"--doc_lens {args.doc_lens} --head_dims {args.head_dims} --tokens {args.tokens}`.\n",
             "TFLOP/s count only the pairs the causal document mask allows (sum of L^2/2 per document, "
             "4 d FLOPs per pair forward, 2.5x that backward), for every backend. *SDPA flash, no documents* "
             "ignores the documents (it computes all T^2/2 causal pairs): the speed of plain causal attention, "
             "not the same computation. *ours faster* = the backend's time / ours. Medians of CUDA-event "
             "timings (triton's do_bench); masks built outside the timing.\n",
             "| head size | T | mean document | backend | forward TFLOP/s | backward TFLOP/s | forward ms | "
             "backward ms | ours faster (fwd / bwd) |", "|" + " --- |" * 9]
    for r in rows:
        where, ref = f"| {r['D']} | {r['T']} | {r['doc_len']} | {r['backend']} |", ours.get((r["D"], r["T"], r["doc_len"]))
        if "failed" in r:
            lines.append(f"{where} {r['failed']} | | | | |")
            continue
        ratio = f"{r['fwd_ms'] / ref['fwd_ms']:.2f}x / {r['bwd_ms'] / ref['bwd_ms']:.2f}x" if ref and ref is not r else ""
        lines.append(f"{where} {r['fwd']:.1f} | {r['bwd']:.1f} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {ratio} |")
    lines += ["", "Max |error| against float64 (the same bf16 inputs, 1 x 4 heads, documents of ~256 tokens):\n",
              "| head size | T | backend | out | dq | dk | dv |", "|" + " --- |" * 7]
    lines += [f"| {e['D']} | {e['T']} | {e['backend']} | {e['out']:.1e} | {e['dq']:.1e} | {e['dk']:.1e} | "
              f"{e['dv']:.1e} |" for e in errors]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(rows, path, device):
    """TFLOP/s against T, forward above backward: a column per (head size, mean document length)."""
    plt = harness.pyplot()
    panels = sorted({(r["D"], r["doc_len"]) for r in rows})
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 7), squeeze=False, sharey="row")
    for col, (D, doc_len) in enumerate(panels):
        for row, (key, label) in enumerate([("fwd", "forward"), ("bwd", "backward")]):
            ax = axes[row, col]
            for backend in dict.fromkeys(r["backend"] for r in rows):
                points = [(r["T"], r[key]) for r in rows if r["backend"] == backend and "failed" not in r
                          and (r["D"], r["doc_len"]) == (D, doc_len)]
                if points:
                    ax.plot(*zip(*points), "o-", ms=3, label=backend)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{label}, head size {D}, documents ~{doc_len}", fontsize=9)
            ax.set_xlabel("sequence length T")
    axes[0, 0].set_ylabel("forward TFLOP/s")
    axes[1, 0].set_ylabel("backward TFLOP/s")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"causal attention within documents, bf16, on {device}", fontsize=10)
    save(fig, path)


if __name__ == "__main__":
    main()
