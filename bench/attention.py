"""kernels.cu against PyTorch's attention on a GPU: forward and backward TFLOP/s of causal
attention, plain and within documents, and each backend's errors against float64. Without
documents: ours (kernels.cu) and SDPA's flash kernel. With documents: ours, SDPA with a
boolean document mask and FlexAttention with a document block mask. Each row goes into
attention.md as soon as it is measured (a run cut short keeps what it measured); the plot,
attention.png, is drawn at the end. Both are written beside this file unless --out says.

    python bench/attention.py            # the sweep: d64/d128, T 1k-8k, no documents and ~256, ~1k
    python bench/attention.py --quick    # the headline shapes, for bench/gpu_check.sh
    python bench/attention.py --device cpu --seq_lens 64 --head_dims 32 --tokens 128  # dry run

Cost (estimates; nothing here has been timed on a GPU yet): each row times forward and
backward with triton's do_bench (about 0.1 s of repeats each, after its own estimate), so
about 1 s a row. FlexAttention is compiled once per (head size, T) shape with dynamic=False,
for forward and backward: its inductor forward alone took 12 s per shape on this repo's
2-core CPU, so count ~15 s per shape on a 16-core GPU machine. --quick: 4 shapes, 20 rows,
~80 s; the sweep: 8 shapes, 64 rows, ~3 min. The first line of each row's output says what
its first call (compile or build included) took, to check these estimates.
"""

import argparse
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F

from common import BENCH, save
import harness
import model
from model import attention, document_causal_mask

OURS = "ours (kernels.cu)"
FULL = dict(seq_lens="1024,2048,4096,8192", doc_lens="0,256,1024", head_dims="64,128")
# The headline shapes: both head sizes, a short and a long row, without documents and with
# documents of ~1k tokens (the stdlib corpus averages ~860 tokens a document).
QUICK = dict(seq_lens="1024,4096", doc_lens="0,1024", head_dims="64,128")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=BENCH, help="folder for the .md and .png")
    p.add_argument("--quick", action="store_true", help=f"the headline shapes: {QUICK}")
    p.add_argument("--seq_lens", help=f"comma-separated T (default {FULL['seq_lens']})")
    p.add_argument("--doc_lens", help=f"comma-separated mean document lengths, 0 for none (default {FULL['doc_lens']})")
    p.add_argument("--head_dims", help=f"comma-separated head sizes, model width 1024 (default {FULL['head_dims']})")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = tokens / T)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of this script")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():  # a list given on the command line wins
        setattr(args, key, getattr(args, key) or value)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: bench/attention.py needs a CUDA GPU, and PyTorch sees none (--device cpu: a dry run)")
    torch._dynamo.config.cache_size_limit = 64  # FlexAttention compiles once per shape: 8 in the sweep
    args.device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                        else f"CPU ({torch.get_num_threads()} threads; a dry run)")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    os.makedirs(args.out, exist_ok=True)
    path, rows = os.path.join(args.out, "attention.md"), []
    for D, T, doc_len in itertools.product(ints(args.head_dims), ints(args.seq_lens), ints(args.doc_lens)):
        for row in bench_one(D, T, doc_len, T == min(ints(args.seq_lens)), args):
            rows.append(row)
            write_markdown(rows, args, path)  # after every row: a run cut short keeps what it measured
    plot(rows, os.path.join(args.out, "attention.png"), args.device_name)
    print(f"wrote {path} and attention.png")
    failed = [r for r in rows if "failed" in r]
    if failed and args.device == "cuda":
        sys.exit(f"error: {len(failed)} of {len(rows)} rows failed; {path} says why")


def bench_one(D, T, doc_len, with_errors, args):
    """Time every backend on one batch, yielding a row as each is measured; with_errors:
    also their errors against float64 on the same inputs. FLOPs count only the (query, key)
    pairs the mask allows, sum(L^2 / 2) over the documents (L = T without documents), at
    4 D per pair forward (S = Q K^T and P V) and 2.5 times that backward (FlashAttention's
    convention), for every backend alike."""
    B, H = max(1, args.tokens // T), 1024 // D
    doc_ids, q, k, v, dout = random_inputs(B, H, T, D, doc_len, T + D + doc_len, args.device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    lengths = (torch.full((B,), T) if doc_ids is None else
               torch.cat([torch.unique_consecutive(row, return_counts=True)[1] for row in doc_ids.cpu()]))
    fwd_flops = 4 * D * H * (float((lengths.double() ** 2).sum()) / 2)
    want = float64_reference(q, k, v, doc_ids, dout) if with_errors else None
    for name, fn in backends(doc_ids, args.device).items():
        row = dict(D=D, T=T, doc_len=doc_len, B=B, backend=name)
        where = f"d{D:<3d} T {T:5d}, documents {describe(doc_len):>5s}: {name:27s}"
        try:
            first_s, fwd_ms, bwd_ms = time_forward_backward(fn, q, k, v, dout, args.device)
            row.update(first_s=first_s, fwd_ms=fwd_ms, bwd_ms=bwd_ms,
                       fwd=fwd_flops / fwd_ms / 1e9, bwd=2.5 * fwd_flops / bwd_ms / 1e9)
            if want is not None:
                row["errors"] = errors_against(want, fn, q, k, v, dout)
            print(f"{where} forward {row['fwd']:6.1f} TFLOP/s ({fwd_ms:7.3f} ms), backward {row['bwd']:6.1f} "
                  f"({bwd_ms:7.3f} ms); first call {first_s:.1f} s", flush=True)
        except Exception as e:  # out of memory, a FlexAttention that does not compile here...
            row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}" if str(e) else type(e).__name__
            print(f"{where} {row['failed']}", flush=True)
        yield row


def describe(doc_len):
    return f"~{doc_len}" if doc_len else "none"


def random_inputs(B, H, T, D, mean_len, seed, device):
    """doc_ids (B, T), cut into documents every ~mean_len tokens at random (None for
    mean_len 0: plain causal), and bf16 q, k, v, dout (B, H, T, D)."""
    gen = torch.Generator().manual_seed(seed)
    doc_ids = (torch.rand(B, T, generator=gen) < 1.0 / mean_len).cumsum(dim=1).to(torch.int32).to(device) if mean_len else None
    return doc_ids, *(torch.randn(B, H, T, D, generator=gen).to(device, torch.bfloat16) for _ in range(4))


def backends(doc_ids, device):
    """name -> f(q, k, v). Masks are built here, outside the timing, which favours the
    baselines: a model rebuilds them at every step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if doc_ids is None:
        def sdpa_flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION if device == "cuda" else SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return {OURS: lambda q, k, v: attention(q, k, v, None, backend="cuda"), "SDPA flash": sdpa_flash}
    T = doc_ids.size(1)
    mask = document_causal_mask(doc_ids)  # (B, 1, T, T) bool
    fns = {OURS: lambda q, k, v: attention(q, k, v, doc_ids, backend="cuda"),
           "SDPA + boolean mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
    if model.flex_attention is None:  # a torch older than 2.5
        print(f"FlexAttention skipped: torch {torch.__version__} has none")
        return fns
    block_mask = model.document_block_mask(doc_ids, T, device)  # the training path's, shared
    flex = model.compiled_flex_attention()  # compiled once; dynamo then compiles once per shape
    fns["FlexAttention + block mask"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask)
    return fns


def time_forward_backward(fn, q, k, v, dout, device):
    """Seconds of the first forward and backward (kernel builds and FlexAttention's compile
    included), then milliseconds per forward and per backward of a kept graph: medians. On
    a GPU, triton's do_bench (CUDA events, the L2 cache flushed between calls); on a CPU (a
    dry run), torch's Timer."""
    from torch.utils.benchmark import Timer
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    started = time.time()
    torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    sync()
    first_s = time.time() - started
    out = fn(q, k, v)
    if device == "cuda":
        from triton.testing import do_bench
        ms = lambda f: do_bench(f, return_mode="median")  # noqa: E731
    else:
        ms = lambda f: 1e3 * Timer("f()", globals={"f": f}).timeit(3).median  # noqa: E731
    return first_s, ms(lambda: fn(q, k, v)), ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))


def float64_reference(q, k, v, doc_ids, dout):
    """out, dq, dk, dv in float64: SDPA's math path on upcast inputs, the same mask."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    if doc_ids is None:
        out = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=document_causal_mask(doc_ids))
    return [out.detach()] + list(torch.autograd.grad(out, (q64, k64, v64), dout.double()))


def errors_against(want, fn, q, k, v, dout):
    """Max |error| of out, dq, dk, dv against the float64 reference."""
    got = fn(q, k, v)
    got = [got] + list(torch.autograd.grad(got, (q, k, v), dout))
    return {key: (a.double() - b).abs().max().item() for key, a, b in zip(("out", "dq", "dk", "dv"), got, want)}


def write_markdown(rows, args, path):
    ours = {(r["D"], r["T"], r["doc_len"]): r for r in rows if r["backend"] == OURS and "failed" not in r}
    lines = ["# Attention: kernels.cu vs PyTorch\n",
             f"Device: **{args.device_name}**, PyTorch {torch.__version__}, CUDA {torch.version.cuda}. "
             f"bf16, causal, model width 1024 (16 heads of 64 or 8 of 128), {args.tokens:,} tokens per batch "
             f"(B = tokens / T). Command: `python bench/attention.py --seq_lens {args.seq_lens} "
             f"--doc_lens {args.doc_lens} --head_dims {args.head_dims} --tokens {args.tokens}`.\n",
             "TFLOP/s count only the pairs the mask allows (sum of L^2/2 per document, L = T without documents, "
             "4 d FLOPs per pair forward, 2.5x that backward), for every backend. *ours faster* = the backend's "
             "time / ours, on the same inputs. Medians of CUDA-event timings (triton's do_bench); masks built "
             "outside the timing. *first call*: the first forward and backward, compiling or building included.\n",
             "| head size | T | documents | backend | forward TFLOP/s | backward TFLOP/s | forward ms | "
             "backward ms | ours faster (fwd / bwd) | first call s |", "|" + " --- |" * 10]
    for r in rows:
        where = f"| {r['D']} | {r['T']} | {describe(r['doc_len'])} | {r['backend']} |"
        ref = ours.get((r["D"], r["T"], r["doc_len"]))
        if "failed" in r:
            lines.append(f"{where} {r['failed']} | | | | | |")
            continue
        ratio = f"{r['fwd_ms'] / ref['fwd_ms']:.2f}x / {r['bwd_ms'] / ref['bwd_ms']:.2f}x" if ref and ref is not r else ""
        lines.append(f"{where} {r['fwd']:.1f} | {r['bwd']:.1f} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {ratio} | "
                     f"{r['first_s']:.1f} |")
    checked = [r for r in rows if "errors" in r]
    lines += ["", "Max |error| against float64 (SDPA's math path on the same bf16 inputs, the shortest T):\n",
              "| head size | T | documents | backend | out | dq | dk | dv |", "|" + " --- |" * 8]
    lines += [f"| {r['D']} | {r['T']} | {describe(r['doc_len'])} | {r['backend']} | "
              + " | ".join(f"{r['errors'][key]:.1e}" for key in ("out", "dq", "dk", "dv")) + " |" for r in checked]
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
            for i, backend in enumerate(dict.fromkeys(r["backend"] for r in rows)):  # a colour per backend
                points = [(r["T"], r[key]) for r in rows if r["backend"] == backend and "failed" not in r
                          and (r["D"], r["doc_len"]) == (D, doc_len)]
                if points:
                    ax.plot(*zip(*points), "o-", ms=3, color=f"C{i}", label=backend)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{label}, head size {D}, documents {describe(doc_len)}", fontsize=9)
            ax.set_xlabel("sequence length T")
        axes[0, col].legend(fontsize=7)  # the backends differ with and without documents
    axes[0, 0].set_ylabel("forward TFLOP/s")
    axes[1, 0].set_ylabel("backward TFLOP/s")
    fig.suptitle(f"causal attention, plain and within documents, bf16, on {device}", fontsize=10)
    save(fig, path)


if __name__ == "__main__":
    main()
