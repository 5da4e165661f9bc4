import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, BadInput, RMSNorm, Rotary, apply_rotary, attention, linear_cross_entropy


def tiny(block_size=32, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, n_layer=2, n_head=2, n_embd=32, **kw))


def test_shapes_and_ignored_targets():
    model = tiny()
    idx = torch.randint(0, 50257, (3, 16))
    targets = idx.clone()
    targets[:, :5] = -1
    logits, none = model(idx)
    assert logits.shape == (3, 16, 50304) and none is None
    no_logits, loss = model(idx, targets)  # with targets: the loss, never the (B, T, vocab) logits
    assert no_logits is None and loss.shape == ()
    # -1 targets contribute nothing: the loss is the mean over the other positions only
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, 50304), targets[:, 5:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_causal_changing_a_token_changes_only_later_logits():
    model = tiny()
    idx = torch.randint(0, 50257, (1, 20))
    before, _ = model(idx)
    idx[0, 12] = (idx[0, 12] + 1) % 50257
    after, _ = model(idx)
    assert torch.allclose(before[0, :12], after[0, :12], atol=1e-6)
    assert not torch.allclose(before[0, 12:], after[0, 12:], atol=1e-4)


def test_packed_document_sees_exactly_what_it_sees_alone():
    """The packing invariant: doc_ids mask and pos_ids restart make a document's logits
    independent of what was packed before it."""
    model = tiny()
    doc = torch.randint(0, 50257, (1, 11))
    other = torch.randint(0, 50257, (1, 9))
    alone, _ = model(doc)
    packed = torch.cat([other, doc], dim=1)
    doc_ids = torch.tensor([[0] * 9 + [1] * 11], dtype=torch.int32)
    pos_ids = torch.tensor([list(range(9)) + list(range(11))])
    logits, _ = model(packed, doc_ids=doc_ids, pos_ids=pos_ids)
    assert torch.allclose(logits[:, 9:], alone, atol=1e-5)
    # and without the mask the neighbour leaks in
    leaked, _ = model(packed)
    assert not torch.allclose(leaked[:, 9:], alone, atol=1e-3)


def test_sdpa_document_mask_matches_naive_float64():
    torch.manual_seed(1)
    B, H, T, D = 2, 3, 13, 8
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    doc_ids = torch.tensor([[0] * 4 + [1] * 6 + [2] * 3, [0] * 13], dtype=torch.int32)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    expected = scores.softmax(-1) @ v
    assert torch.allclose(attention(q, k, v, doc_ids, backend="sdpa"), expected, atol=1e-10)
    assert torch.allclose(attention(q, k, v, None, backend="sdpa")[1], expected[1], atol=1e-10)


def test_rotary_scores_depend_only_on_relative_position():
    rotary = Rotary(head_dim=16, max_len=64, base=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    def score(pos_q, pos_k):
        cq, sq = rotary(torch.tensor([[pos_q]]))
        ck, sk = rotary(torch.tensor([[pos_k]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()
    assert torch.allclose(score(7, 3), score(40, 36), atol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 5), atol=1e-3)


def test_rmsnorm_matches_torch():
    norm = RMSNorm(24)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 24)
    assert torch.allclose(norm(x), F.rms_norm(x, (24,), norm.weight, eps=1e-6), atol=1e-6)


def test_tied_embedding_and_padded_vocab():
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= 50257
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())


def test_overfits_one_batch():
    """A model that cannot memorise 64 tokens has a broken forward or backward."""
    model = tiny()
    idx = torch.randint(0, 50257, (2, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, loss.item()  # from ~10.8 (uniform over 50k tokens)


def test_generate():
    model = tiny()
    prompt = torch.randint(0, 50257, (2, 5))
    out = model.generate(prompt, 40, temperature=1.0, top_k=50)  # longer than block_size: crops
    assert out.shape == (2, 45) and torch.equal(out[:, :5], prompt)
    assert out.max() < 50257  # the padding rows of the vocab are never sampled
    greedy = model.generate(prompt, 3, top_k=1)
    logits, _ = model(prompt)
    assert torch.equal(greedy[:, 5], logits[:, -1, :50257].argmax(-1))


def test_sequence_longer_than_block_size_is_a_clear_error():
    model = tiny(block_size=8)
    with pytest.raises(BadInput, match="block size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_flops_per_token():
    model = tiny()
    assert model.flops_per_token(32) == 6 * model.num_params() + 6 * 2 * 32 * 32


# The loss: linear_cross_entropy never holds the (rows, vocab) logits; a small LOSS_CHUNK_CPU
# makes several chunks, the last one short, out of a few rows.

def full_logits_loss(h, weight, targets):
    """The reference: every logit at once, then F.cross_entropy."""
    return F.cross_entropy((h @ weight.T).flatten(0, -2), targets.flatten(), ignore_index=-1)


def loss_and_grads(loss_fn, h, weight, targets):
    loss = loss_fn(h, weight, targets)
    return (loss, *torch.autograd.grad(2.5 * loss, (h, weight)))  # 2.5: backward must scale by it


@pytest.mark.parametrize("rows, chunk, ignored", [(30, 7, [0, 8, 9, 29]), (28, 7, []), (5, 8, [2])])
def test_chunked_loss_is_exact_float64(monkeypatch, rows, chunk, ignored):
    """Value and both gradients against full logits: a wrong mean denominator, an ignored row
    left in, a chunk's dW not summed or the last, short chunk dropped would each show."""
    monkeypatch.setattr("model.LOSS_CHUNK_CPU", chunk)
    gen = torch.Generator().manual_seed(0)
    B, T = (2, rows // 2) if rows % 2 == 0 else (1, rows)
    h = torch.randn(B, T, 16, dtype=torch.float64, generator=gen).requires_grad_()  # (B, T, C)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=gen).requires_grad_()  # (V, C)
    targets = torch.randint(0, 50, (rows,), generator=gen)
    targets[ignored] = -1
    targets = targets.view(B, T)
    got = loss_and_grads(linear_cross_entropy, h, weight, targets)
    want = loss_and_grads(full_logits_loss, h, weight, targets)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert (got[1].flatten(0, 1)[ignored] == 0).all()  # an ignored row gets no gradient


def test_chunked_loss_with_every_target_ignored_is_zero(monkeypatch):
    """F.cross_entropy says nan (0 / 0) here, and pretrain.py would stop on a nan loss; a batch
    with nothing to predict has loss 0 and moves nothing."""
    monkeypatch.setattr("model.LOSS_CHUNK_CPU", 4)
    h = torch.randn(1, 10, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    loss, dh, dw = loss_and_grads(linear_cross_entropy, h, weight, torch.full((1, 10), -1))
    assert loss.item() == 0 and not dh.any() and not dw.any()


def test_chunked_loss_without_gradients(monkeypatch):
    """Under torch.no_grad (evaluation) the same loss, and nothing to backpropagate."""
    monkeypatch.setattr("model.LOSS_CHUNK_CPU", 6)
    h, weight = torch.randn(20, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (20,))
    with torch.no_grad():
        loss = linear_cross_entropy(h, weight, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, full_logits_loss(h, weight, targets))


def test_gpt_gradients_with_the_chunked_loss_float64(monkeypatch):
    """The whole model: every parameter's gradient, the tied wte/lm_head weight among them
    (its embedding gradient plus the loss's dW), as with full logits."""
    monkeypatch.setattr("model.LOSS_CHUNK_CPU", 5)
    model = tiny().double()
    idx = torch.randint(0, 50257, (2, 13))
    targets = torch.randint(0, 50257, (2, 13))
    targets[0, :4] = -1
    def grads():
        _, loss = model(idx, targets)
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [loss] + [p.grad.clone() for p in model.parameters()]
    got = grads()
    monkeypatch.setattr("model.linear_cross_entropy", full_logits_loss)
    want = grads()
    assert model.wte.weight.grad[idx[0, 0]].any() and model.wte.weight.grad[50300].any()  # both uses
    for g, w in zip(got, want):  # norms and rotary compute in float32: not to 1e-12
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)


def test_chunked_loss_under_cpu_bf16_autocast(monkeypatch):
    """bf16 matmuls, float32 softmax and gradients: close to the full-logits loss under the
    same autocast, and not the float32 numbers (the matmuls did run in bf16)."""
    monkeypatch.setattr("model.LOSS_CHUNK_CPU", 64)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 100, 64, generator=gen).requires_grad_()
    weight = (0.1 * torch.randn(500, 64, generator=gen)).requires_grad_()
    targets = torch.randint(0, 500, (3, 100), generator=gen)
    targets[:, :10] = -1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(linear_cross_entropy, h, weight, targets)
        want = loss_and_grads(full_logits_loss, h, weight, targets)
        # one row at a time (a mean hides rounding): the same bf16 logits, a float32 softmax
        one_row = [(h[0, r:r + 1], weight, targets[0, r:r + 1]) for r in range(10, 20)]
        rows = torch.stack([linear_cross_entropy(*args) for args in one_row])
        rows_want = torch.stack([full_logits_loss(*args) for args in one_row])
    torch.testing.assert_close(rows, rows_want, rtol=1e-5, atol=0)
    fp32 = loss_and_grads(linear_cross_entropy, h, weight, targets)
    for g, w, f in zip(got, want, fp32):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-4)  # bf16 dlogits: rounded elsewhere
        assert (g - f).abs().max() > 1e-6


@pytest.mark.cuda
def test_chunked_loss_on_a_gpu_under_bf16_autocast():
    """The GPU path (its own chunk size, bf16 tensor-core matmuls): the loss and gradients
    of the full-logits loss under the same autocast, at the laptop preset's width."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(4, 1024, 384, generator=gen).cuda().requires_grad_()
    weight = (0.02 * torch.randn(50304, 384, generator=gen)).cuda().requires_grad_()
    targets = torch.randint(0, 50257, (4, 1024), generator=gen).cuda()
    targets[:, :100] = -1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = loss_and_grads(linear_cross_entropy, h, weight, targets)
        want = loss_and_grads(full_logits_loss, h, weight, targets)
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=0)
    for g, w in zip(got[1:], want[1:]):  # within 3 % of the largest entry: bf16 dlogits are rounded
        scale = w.abs().max()
        torch.testing.assert_close(g / scale, w / scale, rtol=0, atol=3e-2)
