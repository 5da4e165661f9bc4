import json
import os
import sysconfig
import time

import numpy as np
import pytest
import torch

import data
from model import BadInput


def write_jsonl(path, texts, urls=None):
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            record = {"text": text}
            if urls:
                record["url"] = urls[i]
            f.write(json.dumps(record) + "\n")
    return str(path)


def texts_of(corpus):
    """Each document's text, decoded back from the cached tokens (without its leading EOT)."""
    decode = data.get_tokenizer().decode
    return [decode(corpus.tokens[a + 1:b].tolist()) for a, b in zip(corpus.offsets, corpus.offsets[1:])]


def corpus_of_sizes(sizes):
    """A corpus with documents of the given token counts, built without any file."""
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return data.Corpus(np.full(offsets[-1] + 1, data.EOT, np.uint16), offsets, [""] * len(sizes), {"source": "sizes"})


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_matches_gpt2_and_round_trips():
    enc = data.get_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's published ids
    assert enc.n_vocab == 50257 and enc.eot_token == data.EOT
    text = "def f(x):\n\treturn x ** 2  # ünïcödé, emoji 🐍, CJK 漢字\n"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_tokenizer_refuses_files_with_the_wrong_hash(monkeypatch):
    data.get_tokenizer.cache_clear()
    monkeypatch.setitem(data.GPT2_BPE_SHA256, "vocab.bpe", "0" * 64)
    try:
        with pytest.raises(BadInput, match="not GPT-2's vocab.bpe"):
            data.get_tokenizer()
    finally:
        data.get_tokenizer.cache_clear()


# ---------------------------------------------------------------- sources

def test_split_python_module_cuts_at_top_level_definitions():
    source = ('"""Module doc."""\nimport os\n\nX = 1\n\n'
              '# helper for f\n@decorator\ndef f():\n    return X\n\n'
              'class C:\n    def method(self):\n        pass\n\nY = 2\n')
    pieces = data.split_python_module(source)
    assert "".join(pieces) == source  # nothing lost, nothing repeated
    assert pieces[0].startswith('"""Module doc."""') and "def f" not in pieces[0]
    assert pieces[1].startswith("# helper for f\n@decorator\ndef f():")
    assert pieces[2].startswith("class C:") and "def method" in pieces[2] and "Y = 2" in pieces[2]
    assert data.split_python_module("def broken(:\n") == ["def broken(:\n"]  # unparsable: one document


def test_stdlib_source_skips_tests_and_names_modules():
    files, _ = data.list_source("stdlib")
    root = sysconfig.get_paths()["stdlib"]
    rel = [os.path.relpath(f, root) for f in files]
    assert "json/decoder.py" in rel and "os.py" in rel
    assert not any(r.startswith(("test/", "site-packages/")) or "/tests/" in r for r in rel)
    assert data.module_name(os.path.join(root, "json", "__init__.py"), root) == "json"


def test_pydoc_corpus_has_reference_urls():
    corpus = data.load_corpus("pydoc", quiet=True)
    assert len(corpus) > 50
    assert all(u.startswith("docs.python.org/3/reference#") for u in corpus.urls)


def test_folder_source_and_non_utf8_bytes(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_bytes(b"caf\xe9 latin-1 bytes")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    corpus = data.load_corpus(str(tmp_path))
    assert corpus.urls == ["a.txt", os.path.join("sub", "b.md")]
    assert texts_of(corpus) == ["first document", "caf\ufffd latin-1 bytes"]
    assert "1 file(s) were not valid UTF-8" in capsys.readouterr().out


def test_folder_skips_broken_links_binary_and_other_encodings(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "B.TXT").write_text("an upper-case extension")
    (tmp_path / "c.Md").write_bytes(b"\xef\xbb\xbfa UTF-8 byte-order mark")
    (tmp_path / "utf16.txt").write_text("UTF-16 text", encoding="utf-16")  # a BOM, and NUL bytes
    (tmp_path / "utf16_cjk.txt").write_bytes("漢字".encode("utf-16"))  # a BOM and no NUL: only the BOM tells
    (tmp_path / "cp1251.txt").write_bytes("Привет, мир".encode("cp1251"))  # mostly bytes that are not UTF-8
    (tmp_path / "image.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "deleted.txt")
    corpus = data.load_corpus(str(tmp_path))
    assert corpus.urls == ["B.TXT", "a.txt", "c.Md"]
    assert texts_of(corpus) == ["an upper-case extension", "plain text", "a UTF-8 byte-order mark"]
    out = capsys.readouterr().out
    assert "note: 4 file(s) skipped as binary or not UTF-8" in out
    assert "note: 2 file(s) skipped as unreadable: a link to nothing, a link loop" in out


def test_one_text_file_is_a_source(tmp_path):
    path = tmp_path / "notes.TXT"
    path.write_text("\ufeffone document, saved with a byte-order mark")
    corpus = data.load_corpus(str(path))
    assert corpus.urls == ["notes.TXT"] and texts_of(corpus) == ["one document, saved with a byte-order mark"]


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', "not json"], "line 2 is not valid JSON"),
    (['{"text": "ok"}', '{"body": "x"}'], 'line 2 has no "text"'),
    (['["text"]'], 'line 1 has no "text"'),
    ([], "contains no text"),
    (['{"text": "   "}'], "contains no text"),
])
def test_bad_jsonl(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInput, match=message):
        data.load_corpus(str(path))


def test_missing_source_and_empty_folder(tmp_path):
    with pytest.raises(BadInput, match="not found; use stdlib"):
        data.load_corpus(str(tmp_path / "nope.jsonl"))
    with pytest.raises(BadInput, match="no .txt or .md files"):
        data.load_corpus(str(tmp_path))


def test_folder_with_nothing_readable(tmp_path, capsys):
    (tmp_path / "data.txt").write_bytes(b"\x00\x01\x02")
    (tmp_path / "gone.md").symlink_to(tmp_path / "nowhere")
    with pytest.raises(BadInput, match=r"contains no text that can be read \(see the notes above\)"):
        data.load_corpus(str(tmp_path))
    assert "note: 1 file(s) skipped as binary" in capsys.readouterr().out


def test_token_cache_that_is_a_file_or_read_only(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", ["one", "two"])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("MINIPRETRAIN_CACHE", str(blocker))
    fix = "; point MINIPRETRAIN_CACHE at a folder you can write to"
    with pytest.raises(BadInput, match=r"could not write the token cache in .*a_file \(.+\)" + fix):
        data.load_corpus(path)
    if os.geteuid() == 0:
        return  # root writes into a read-only folder anyway
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    monkeypatch.setenv("MINIPRETRAIN_CACHE", str(read_only))
    with pytest.raises(BadInput, match=r"\(Permission denied\)" + fix):
        data.load_corpus(path)


def test_one_document_is_not_enough(tmp_path):
    corpus = data.load_corpus(write_jsonl(tmp_path / "one.jsonl", ["only one"]))
    with pytest.raises(BadInput, match="need at least 2"):
        data.split_documents(corpus)


# ---------------------------------------------------------------- cache

def test_cache_is_reused_rebuilt_when_stale_and_when_truncated(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", ["alpha beta", "gamma delta epsilon"], ["a.com", "b.com"])
    first = data.load_corpus(path)
    assert first.urls == ["a.com", "b.com"]
    assert first.tokens[0] == data.EOT and first.tokens[-1] == data.EOT
    assert len(first.tokens) == first.offsets[-1] + 1

    def no_rebuild(*args):
        raise AssertionError("the cache should have been reused")
    monkeypatch.setattr(data, "write_cache", no_rebuild)
    t0 = time.time()
    again = data.load_corpus(path)
    assert time.time() - t0 < 1.0
    assert np.array_equal(again.tokens, first.tokens)
    monkeypatch.undo()

    time.sleep(0.01)
    write_jsonl(path, ["alpha beta", "a changed second document"])  # new size and mtime: new key
    changed = data.load_corpus(path)
    expected = np.array(changed.tokens)  # a copy: .tokens maps the file truncated below
    assert changed.info["fingerprint"] != first.info["fingerprint"]
    folder = [f for f in os.listdir(os.environ["MINIPRETRAIN_CACHE"]) if changed.info["fingerprint"] in f][0]
    tokens_file = os.path.join(os.environ["MINIPRETRAIN_CACHE"], folder, "tokens.u16")
    with open(tokens_file, "r+b") as f:
        f.truncate(4)  # a crash or a full disk left half a file
    rebuilt = data.load_corpus(path)
    assert np.array_equal(rebuilt.tokens, expected)


def test_concatenated_sources(tmp_path):
    a = data.load_corpus(write_jsonl(tmp_path / "a.jsonl", ["one", "two two"]))
    b = data.load_corpus(write_jsonl(tmp_path / "b.jsonl", ["three three three"]))
    both = data.load_corpus(f"{tmp_path / 'a.jsonl'}+{tmp_path / 'b.jsonl'}")
    assert len(both) == 3 and both.tokens[-1] == data.EOT
    assert list(both.lengths) == list(a.lengths) + list(b.lengths)
    assert np.array_equal(both.tokens[both.offsets[2]:both.offsets[3]], b.tokens[:-1])


# ---------------------------------------------------------------- split

def test_split_is_deterministic_disjoint_and_complete():
    corpus = data.load_corpus("pydoc", quiet=True)
    train, val = data.split_documents(corpus)
    train2, val2 = data.split_documents(corpus)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert len(val) >= 1 and not set(train) & set(val)
    assert sorted(set(train) | set(val)) == list(range(len(corpus)))


def test_split_holds_out_a_share_of_tokens_not_of_documents():
    # 20 small documents and one huge one: the old rule held out the huge one (83 % of the tokens)
    sizes = np.array([1000] * 20 + [100_000])
    train, val = data.split_documents(corpus_of_sizes(sizes))
    target = 0.05 * sizes.sum()
    assert 20 in train and target / 2 <= sizes[val].sum() <= 2 * target
    # where documents draw their share of tokens anyway, the split is the seeded draw as before
    train, val = data.split_documents(corpus_of_sizes([50] * 400))
    assert list(val) == list(np.flatnonzero(np.random.default_rng(1234).random(400) < 0.05))


@pytest.mark.parametrize("sizes, fraction, val", [
    ([5, 10**6, 10**6], 0.05, [0]),   # every document but one is over twice the target
    ([10**6, 10**6], 0.05, [0]),      # none is: the smallest (the first of equals) still goes
    ([1, 1, 1], 0.9, [1, 2]),         # the target is nearly everything: one stays for training
])
def test_split_keeps_a_document_on_each_side(sizes, fraction, val):
    train, held = data.split_documents(corpus_of_sizes(sizes), fraction)
    assert list(held) == val and len(train) == len(sizes) - len(val)


@pytest.mark.parametrize("seed", range(5))
def test_split_holds_the_share_of_tokens_for_skewed_document_sizes(seed):
    sizes = np.random.default_rng(seed).lognormal(6, 2, size=60).astype(int) + 1  # 2 to ~50k tokens
    train, val = data.split_documents(corpus_of_sizes(sizes))
    target = 0.05 * sizes.sum()
    assert target / 2 <= sizes[val].sum() <= 2 * target
    assert sorted(set(train) | set(val)) == list(range(60)) and not set(train) & set(val)


def test_split_summary_counts_tokens_and_warns_about_few_val_documents():
    corpus = corpus_of_sizes([600_000, 500_000, 1000, 2000, 3000])
    assert data.split_summary(corpus, np.array([0, 1]), np.array([2, 3, 4])) == \
        "2 train / 3 val documents (1,100,000 / 6,000 tokens)"
    lines = data.split_summary(corpus_of_sizes([1200, 34]), np.array([0]), np.array([1])).splitlines()
    assert lines[0] == "1 train / 1 val documents (1,200 / 34 tokens)"
    assert lines[1].startswith("warning: only 1 validation document(s)")


def test_unigram_loss_by_hand(tmp_path):
    corpus = data.load_corpus(write_jsonl(tmp_path / "u.jsonl", ["a a a b", "a b"]))
    train, val = np.array([0]), np.array([1])
    counts = np.bincount(corpus.tokens[corpus.offsets[0]:corpus.offsets[1]], minlength=data.EOT + 1) + 1.0
    p = counts / counts.sum()
    val_tokens = corpus.tokens[corpus.offsets[1]:corpus.offsets[2]]
    assert data.unigram_loss(corpus, train, val) == pytest.approx(-np.log(p[val_tokens]).mean())


# ---------------------------------------------------------------- packing

def naive_best_fit_decreasing(lengths, seq_len):
    """The textbook algorithm, O(n * rows): for each piece, longest first, scan every row."""
    pieces = [(d, s, min(s + seq_len, n)) for d, n in enumerate(lengths) for s in range(0, n, seq_len)]
    pieces.sort(key=lambda p: p[1] - p[2])
    rows, room = [], []
    for piece in pieces:
        n = piece[2] - piece[1]
        fitting = [i for i in range(len(rows)) if room[i] >= n]
        if fitting:
            best = min(fitting, key=lambda i: (room[i], -i))  # least room; ties: the newest row
            rows[best].append(piece)
            room[best] -= n
        else:
            rows.append([piece])
            room.append(seq_len - n)
    return rows


def check_exact_cover(rows, lengths, seq_len):
    covered = {d: np.zeros(n, dtype=int) for d, n in enumerate(lengths)}
    for row in rows:
        assert 0 < sum(stop - start for _, start, stop in row) <= seq_len
        for d, start, stop in row:
            assert 0 <= start < stop <= lengths[d]
            covered[d][start:stop] += 1
    assert all((c == 1).all() for c in covered.values())  # every token exactly once


@pytest.mark.parametrize("seed", range(5))
def test_packers_cover_every_token_once(seed):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(8, 64))
    lengths = [int(n) for n in rng.integers(1, 3 * seq_len, size=int(rng.integers(1, 200)))]
    for strategy in data.PACKINGS:
        check_exact_cover(data.pack_documents(lengths, seq_len, strategy), lengths, seq_len)


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_equals_brute_force_and_splits_only_long_documents(seed):
    rng = np.random.default_rng(100 + seed)
    seq_len = int(rng.integers(8, 64))
    lengths = [int(n) for n in rng.integers(1, 2 * seq_len, size=300)]
    rows = data.pack_documents(lengths, seq_len, "bestfit")
    reference = naive_best_fit_decreasing(lengths, seq_len)
    # Rows with equal room are interchangeable, so ties may send a piece to a different
    # row; but every choice takes the same amount of room, so the fill of the rows agrees.
    def fills(rows):
        return sorted(sum(stop - start for _, start, stop in row) for row in rows)
    assert fills(rows) == fills(reference)
    for d, n in enumerate(lengths):
        segments = [seg for row in rows for seg in row if seg[0] == d]
        assert len(segments) == -(-n // seq_len)  # a document that fits is never split
    # small documents leave best fit almost no waste: within 1 % of the minimum row count
    small = [int(n) for n in rng.integers(1, seq_len // 4 + 1, size=2000)]
    minimum = -(-sum(small) // seq_len)
    assert len(data.pack_documents(small, seq_len, "bestfit")) <= minimum * 1.01 + 1

def test_concat_rows_are_full_and_pad_rows_hold_one_piece():
    lengths = [5, 17, 3, 9]
    concat = data.pack_documents(lengths, 8, "concat")
    assert [sum(b - a for _, a, b in row) for row in concat] == [8, 8, 8, 8, 2]
    pad = data.pack_documents(lengths, 8, "pad")
    assert all(len(row) == 1 for row in pad) and len(pad) == 1 + 3 + 1 + 2


@pytest.mark.parametrize("lengths, seq_len, strategy, message", [
    ([3, 4], 0, "bestfit", "seq_len must be positive"),
    ([], 8, "bestfit", "no documents"),
    ([3, 4], 8, "zigzag", "unknown packing 'zigzag'"),
])
def test_packing_bad_input(lengths, seq_len, strategy, message):
    with pytest.raises(BadInput, match=message):
        data.pack_documents(lengths, seq_len, strategy)


def test_packing_stats_by_hand():
    rows = [[(0, 0, 4), (1, 0, 4)], [(1, 4, 6)]]  # doc 1 is split; row 2 is 2/8 full
    stats = data.packing_stats(rows, 8)
    assert stats["padding_pct"] == pytest.approx(100 * 6 / 16)
    assert stats["split_docs_pct"] == pytest.approx(50)
    assert stats["docs_per_row"] == pytest.approx(1.5)
    # row 1: 36 causal pairs, 2 * 10 inside documents -> 16 cross; row 2: 3 pairs, none cross
    assert stats["cross_doc_pairs_pct"] == pytest.approx(100 * 16 / 39)


# ---------------------------------------------------------------- batches

def test_batches_follow_documents(tmp_path):
    texts = [" ".join(["word"] * n) for n in (3, 12, 5, 7)]
    corpus = data.load_corpus(write_jsonl(tmp_path / "b.jsonl", texts))
    seq_len = 10
    rows = data.pack_documents(corpus.lengths, seq_len, "bestfit")
    batch = data.rows_to_batch(corpus, rows, seq_len)
    stream = corpus.tokens.astype(np.int64)
    for b, row in enumerate(rows):
        t = 0
        for segment, (d, start, stop) in enumerate(row):
            n, s = stop - start, corpus.offsets[d] + start
            assert batch["x"][b, t:t + n].tolist() == stream[s:s + n].tolist()
            assert batch["y"][b, t:t + n].tolist() == stream[s + 1:s + n + 1].tolist()  # next token
            assert batch["doc_ids"][b, t:t + n].eq(segment).all()
            assert batch["pos_ids"][b, t:t + n].tolist() == list(range(n))
            t += n
        assert batch["y"][b, t:].eq(-1).all()  # padding: no loss
        assert batch["doc_ids"][b, t:].eq(len(row)).all()
        assert (batch["doc_ids"][b].diff() >= 0).all()
    flat = data.rows_to_batch(corpus, rows, seq_len, docmask=False)
    assert "doc_ids" not in flat and flat["pos_ids"][0].tolist() == list(range(seq_len))


def test_batch_order_is_a_pure_function_of_seed_and_index(tmp_path):
    corpus = data.load_corpus("pydoc", quiet=True)
    rows = data.pack_documents(corpus.lengths, 64, "bestfit")
    a = data.get_batch(corpus, rows, 64, 5, 4, seed=1)
    b = data.get_batch(corpus, rows, 64, 5, 4, seed=1)
    c = data.get_batch(corpus, rows, 64, 6, 4, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["x"], c["x"])
    # one epoch visits every row exactly once
    n = len(rows)
    seen = [r for i in range(n // 4) for r in data.batch_rows(n, i, 4, seed=1)]
    assert len(set(seen)) == len(seen) == 4 * (n // 4)
