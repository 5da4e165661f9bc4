import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, BadInput, RMSNorm, Rotary, apply_rotary, attention


def tiny(block_size=32, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, n_layer=2, n_head=2, n_embd=32, **kw))


def test_shapes_and_ignored_targets():
    model = tiny()
    idx = torch.randint(0, 50257, (3, 16))
    targets = idx.clone()
    targets[:, :5] = -1
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 50304) and loss.shape == ()
    # -1 targets contribute nothing: the loss is the mean over the other positions only
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, 50304), targets[:, 5:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)
    assert model(idx)[1] is None


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
