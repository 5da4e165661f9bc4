"""The grading tests of the "implement" exercises in tests/exercises.md: one test per
exercise, each small (under 2 s on a busy 2-core CPU, most of them far less) and each
calling only its own function, so that when you blank an exercise (its code between
`# exercise N begins` and `# exercise N ends`) exactly one test here fails.

    pytest tests/test_graded.py                      # all of them
    pytest tests/test_graded.py::test_flash_forward  # one exercise

Every function under test is called through its module (model.flash_forward, not a
name imported from it), so tests/test_exercises.py can swap in a blanked copy and check
that each test really fails without its exercise.
"""

import functools
import math
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch

import cpt
import data
import model
import pretrain


# -----------------------------------------------------------------------------
# Helpers: attention by its definition, and random documents

def naive_attention(q, k, v, doc_ids):
    """(o, lse2): softmax over the full (T, T) score matrix, in float64. lse2 is the
    log2 of each row's sum of exp(scores), as flash_forward returns it."""
    T, D = q.shape[2], q.shape[3]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])  # (B, 1, T, T)
    scores = (q @ k.mT / math.sqrt(D)).masked_fill(~allowed, -math.inf)  # (B, H, T, T)
    return torch.softmax(scores, dim=-1) @ v, scores.logsumexp(-1) / math.log(2)


def random_documents(B, T, mean_len, gen):
    """(B, T) int32 doc ids, non-decreasing: each row cut into documents at random places."""
    cuts = torch.rand(B, T, generator=gen) < 1.0 / mean_len
    return cuts.cumsum(1).to(torch.int32)


def one_document_then_several(B, T, gen):
    """Row 0: one document (plain causal attention). Other rows: documents of ~12 tokens."""
    doc_ids = random_documents(B, T, 12, gen)
    doc_ids[0] = 0
    return doc_ids


def random_qkv(B, H, T, D, gen):
    return [torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(3)]


@contextmanager
def every_key_tile_left_of_the_diagonal():
    """Tile skipping is its own exercise (test_key_tile_range). While grading the online
    softmax, visit every key tile up to the diagonal: still correct (skipped tiles are
    fully masked), and it also checks that tiles with no visible key change nothing."""
    def all_tiles(docs, m0, block_m, block_n):
        return 0, min(m0 + block_m, docs.numel())
    with mock.patch.object(model, "key_tile_range", all_tiles):
        yield


# -----------------------------------------------------------------------------
# 1. The attention mirror: forward, backward, tile skipping

def test_flash_forward():
    """model.flash_forward against the definition: o and lse, plain causal and with
    documents, tiles small enough that a row spans several key tiles. Scores are large
    (q scaled by 3), so a later key tile often raises the running max: an online softmax
    that does not rescale what it summed before (alpha) is caught."""
    gen = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 2, 75, 8
    q, k, v = random_qkv(B, H, T, D, gen)
    q = 3 * q
    doc_ids = one_document_then_several(B, T, gen)
    with every_key_tile_left_of_the_diagonal():
        o, lse = model.flash_forward(q, k, v, doc_ids, 16, 16)
    want_o, want_lse = naive_attention(q, k, v, doc_ids)
    torch.testing.assert_close(o, want_o, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-10)


def test_flash_backward():
    """model.flash_backward against autograd through the definition. Its inputs o and
    lse come from naive_attention, not from flash_forward, so this grades the backward
    alone."""
    gen = torch.Generator().manual_seed(1)
    B, H, T, D = 2, 2, 75, 8
    q, k, v = random_qkv(B, H, T, D, gen)
    do = torch.randn(B, H, T, D, generator=gen, dtype=torch.float64)
    doc_ids = one_document_then_several(B, T, gen)
    q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
    o, lse = naive_attention(q_, k_, v_, doc_ids)
    want = torch.autograd.grad(o, (q_, k_, v_), do)
    got = model.flash_backward(do, q, k, v, o.detach(), lse.detach(), doc_ids, 16, 16)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_key_tile_range():
    """model.key_tile_range visits exactly the key tiles that hold at least one key the
    query tile may see: skip one of those and the output is wrong; visit one more and the
    kernel works for nothing. Tile sizes differ between queries and keys, and documents
    start anywhere, not only at tile boundaries."""
    gen = torch.Generator().manual_seed(2)
    for T, block_m, block_n, mean_len in [(70, 16, 16, 10), (100, 16, 8, 25), (90, 8, 16, 5),
                                          (130, 32, 32, 40), (64, 16, 16, 1000), (33, 16, 16, 1)]:
        docs = random_documents(1, T, mean_len, gen)[0]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        seen = (j <= i) & (docs[:, None] == docs[None, :])  # (T, T): query i may see key j
        for m0 in range(0, T, block_m):
            n_start, n_end = model.key_tile_range(docs, m0, block_m, block_n)
            visited = list(range(n_start, n_end, block_n))
            needed = [n0 for n0 in range(0, T, block_n) if seen[m0:m0 + block_m, n0:n0 + block_n].any()]
            assert visited == needed, f"T={T}, tiles {block_m}x{block_n}, query tile at {m0}: " \
                                      f"visits key tiles {visited}, needs {needed}"


# -----------------------------------------------------------------------------
# 2. Document packing: best-fit decreasing, and positions inside documents

def naive_best_fit_decreasing(sizes, seq_len):
    """Best-fit decreasing by its definition: longest first, each into the open row with
    the least room that still fits it. Returns the sorted fill of the rows."""
    rooms = []
    for n in sorted(sizes, reverse=True):
        fits = [r for r in range(len(rooms)) if rooms[r] >= n]
        if fits:
            best = min(fits, key=lambda r: rooms[r])
            rooms[best] -= n
        else:
            rooms.append(seq_len - n)
    return sorted(seq_len - room for room in rooms)


def test_pack_best_fit():
    """data.pack_best_fit: every piece exactly once, no row longer than seq_len, and rows
    filled as best-fit decreasing fills them. Pieces start where they start in real packing:
    the later pieces of a split document start after 0, so a piece's size is stop - start,
    and sorting by stop is not sorting by size."""
    # By hand: rows of 7 and pieces of 1, 3, 5, 3 tokens. Longest first: 5 opens a row
    # (room 2), 3 opens one (room 4), 3 joins it (room 1). The last piece, 1 token, fits
    # both rows; best fit takes the one with least room, which it fills exactly. (First
    # fit would take the first row: rows of 6 and 6 instead of 5 and 7; so would the order
    # of the stops, 19, 10, 8, 3.)
    pieces = [(0, 7, 8), (1, 0, 3), (2, 14, 19), (3, 7, 10)]
    rows = data.pack_best_fit(pieces, 7)
    assert sorted(sorted(row) for row in rows) == [[(0, 7, 8), (1, 0, 3), (3, 7, 10)], [(2, 14, 19)]]

    rng = np.random.default_rng(0)
    for _ in range(5):
        seq_len = int(rng.integers(8, 64))
        sizes = rng.integers(1, seq_len + 1, size=200)
        starts = rng.integers(0, 4, size=200) * seq_len  # piece k of a document starts at k * seq_len
        pieces = [(d, int(s), int(s + n)) for d, (s, n) in enumerate(zip(starts, sizes))]
        rows = data.pack_best_fit(pieces, seq_len)
        assert sorted(p for row in rows for p in row) == pieces  # each piece once, none cut
        fills = sorted(sum(stop - start for _, start, stop in row) for row in rows)
        assert max(fills) <= seq_len
        assert fills == naive_best_fit_decreasing(sizes.tolist(), seq_len)


class Documents:
    """A stand-in for data.Corpus with just what rows_to_batch needs: segment(d, start,
    stop) -> (inputs, targets) of positions start..stop-1 of document d."""

    def __init__(self, docs):
        self.docs = [np.array(doc, dtype=np.int64) for doc in docs]

    def segment(self, d, start, stop):
        doc = np.append(self.docs[d], data.EOT)  # the target of the last token: "the document ends"
        return doc[start:stop], doc[start + 1:stop + 1]


@functools.lru_cache(maxsize=1)
def tiny_gpt():
    """A 1-layer GPT, made once (tests/test_exercises.py runs this test many times)."""
    with torch.random.fork_rng():  # seeded here, without touching other tests' random state
        torch.manual_seed(0)
        return model.GPT(model.GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()


def test_positions_restart_per_document():
    """data.rows_to_batch: pos_ids count from 0 in every segment of a row (padding: 0),
    which is what makes a packed document see exactly what it sees alone."""
    docs = Documents([[data.EOT, 11, 12, 13], [data.EOT, 21, 22], [data.EOT, 31, 32, 33, 34, 35]])
    rows = [[(0, 0, 4), (1, 0, 3)],      # two whole documents and one padding slot
            [(2, 0, 3), (2, 3, 6)],      # a long document cut in two: each piece starts at 0
            [(1, 0, 3), (0, 0, 4)]]      # the same documents in the other order
    batch = data.rows_to_batch(docs, rows, 8)
    assert batch["pos_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0],
                                         [0, 1, 2, 0, 1, 2, 0, 0],
                                         [0, 1, 2, 0, 1, 2, 3, 0]]
    # Why: with its own positions and the document mask, document 1 gets the same logits
    # whether it comes first (row 2) or after document 0 (row 0).
    with torch.no_grad():
        logits, _ = tiny_gpt()(batch["x"], doc_ids=batch["doc_ids"], pos_ids=batch["pos_ids"])
    torch.testing.assert_close(logits[0, 4:7], logits[2, 0:3], rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# 3. MeCo: no loss on the metadata, and the cooldown

def test_no_loss_on_metadata_tokens():
    """data.Corpus.segment with metadata prefixes: document d reads [EOT] + prefix + text;
    a target that is a prefix token is -1 (shown, never taught), and the first text token
    is predicted from the prefix. With prefix_loss=True (the ablation) nothing is masked."""
    EOT = data.EOT
    tokens = np.array([EOT, 11, 12, 13, EOT, 21, 22, EOT], dtype=np.uint16)  # 2 documents + final EOT
    offsets = np.array([0, 4, 7])
    prefixes = [np.array([901, 902, 903]), data.NO_PREFIX]  # document 1 has no URL
    for prefix_loss in (False, True):
        corpus = data.Corpus(tokens, offsets, ["a.org", ""], {}, prefixes, prefix_loss)
        no = lambda t: t if prefix_loss else -1  # noqa: E731  (a prefix token as a target)
        x, y = corpus.segment(0, 0, 7)
        assert x.tolist() == [EOT, 901, 902, 903, 11, 12, 13]
        assert y.tolist() == [no(901), no(902), no(903), 11, 12, 13, EOT]
        x, y = corpus.segment(0, 2, 5)  # a piece that starts inside the prefix
        assert x.tolist() == [902, 903, 11] and y.tolist() == [no(903), 11, 12]
        x, y = corpus.segment(1, 0, 3)
        assert x.tolist() == [EOT, 21, 22] and y.tolist() == [21, 22, EOT]


def test_meco_cooldown():
    """pretrain.uses_metadata: metadata for the first (1 - meta_cooldown) of the steps,
    then none, switching at one exact step (a pure function of the step)."""
    assert [pretrain.uses_metadata(s, 100, 0.1) for s in range(100)] == [True] * 90 + [False] * 10
    assert [pretrain.uses_metadata(s, 10, 0.3) for s in range(10)] == [True] * 7 + [False] * 3
    # Where (1 - meta_cooldown) * max_steps is not whole, the nearest step: 6.7 -> 7, 2.1 -> 2.
    assert [pretrain.uses_metadata(s, 10, 0.33) for s in range(10)] == [True] * 7 + [False] * 3
    assert [pretrain.uses_metadata(s, 3, 0.3) for s in range(3)] == [True] * 2 + [False]
    assert all(pretrain.uses_metadata(s, 50, 0.0) for s in range(50))  # no cooldown: URLs throughout
    assert not any(pretrain.uses_metadata(s, 50, 1.0) for s in range(50))  # all cooldown: never


# -----------------------------------------------------------------------------
# 4. Continued pretraining: replay and rewarming

def test_replay_count():
    """cpt.sum_replayed, through replay_count: batch i gets floor(B r) or ceil(B r) old rows, and after any
    number of batches the total is within one row of the exact share."""
    assert [cpt.replay_count(i, 8, 0.05) for i in range(10)] == [0, 0, 1, 0, 1] * 2
    assert [cpt.replay_count(i, 100, 0.29) for i in range(3)] == [29] * 3  # in floats, 100 * 0.29 = 28.999999999999996
    for batch_size in (1, 8, 12):
        for replay in (0.0, 0.05, 0.25, 1 / 3, 0.9):
            total = 0
            for i in range(500):
                k = cpt.replay_count(i, batch_size, replay)
                assert k in (math.floor(batch_size * replay), math.ceil(batch_size * replay)), (batch_size, replay, i)
                total += k
                assert abs(total - (i + 1) * batch_size * replay) < 1, (batch_size, replay, i)


def test_rewarm_schedule():
    """pretrain.learning_rate's warmup from start_lr, and cpt.lr_schedule: rewarm-cosine
    climbs from the LR pretraining ended with (0.1) back to the peak (1.0), then decays
    to 0.1 again; constant stays at 0.1."""
    assert pretrain.learning_rate(0, 1.0, 0.1, 10, 110) == pytest.approx(0.1)  # from 0: 1/10 of the peak
    assert pretrain.learning_rate(0, 1.0, 0.1, 4, 110, start_lr=0.2) == pytest.approx(0.4)
    lr = cpt.lr_schedule("rewarm-cosine", max_lr=1.0, min_lr=0.1, warmup=10, max_steps=100)
    assert [lr(s) for s in (0, 4, 9, 10)] == pytest.approx([0.19, 0.55, 1.0, 1.0])
    assert lr(55) == pytest.approx(0.55)  # half way down the cosine
    assert lr(100) == lr(500) == pytest.approx(0.1)
    constant = cpt.lr_schedule("constant", max_lr=1.0, min_lr=0.1, warmup=10, max_steps=100)
    assert [constant(s) for s in (0, 9, 50, 100)] == pytest.approx([0.1] * 4)
