import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

import data
import harness
import pretrain
from model import BadInput
from test_data import check_exact_cover, write_jsonl
from test_pretrain import ROOT, tiny_args

TEXTS = ["import json\n\ndef load(path):\n    return json.load(open(path))\n",
         "x = 1",
         "class Queue:\n    '''A first-in first-out queue.'''\n" * 6,
         "def add(a, b):\n    return a + b\n"]
URLS = ["docs.python.org/3/library/json", "example.com/x", "docs.python.org/3/library/queue", ""]


@pytest.fixture()
def corpus(tmp_path):
    return data.load_corpus(write_jsonl(tmp_path / "meta.jsonl", TEXTS, URLS))


def test_prefix_sits_after_eot_and_is_never_a_target(corpus):
    meco = data.with_metadata(corpus, "url")
    encoder = data.get_tokenizer()
    for d, url in enumerate(URLS):
        prefix = encoder.encode_ordinary(f"URL: {url}\n\n") if url else []
        text = corpus.tokens[corpus.offsets[d] + 1:corpus.offsets[d + 1]].tolist()
        assert meco.lengths[d] == corpus.lengths[d] + len(prefix)
        x, y = meco.segment(d, 0, int(meco.lengths[d]))
        assert x.tolist() == [data.EOT] + prefix + text
        p = len(prefix)
        assert (y[:p] == -1).all()          # no loss on predicting the metadata
        assert y[p] == text[0]              # the first text token is predicted from the URL
        assert y[p + 1:].tolist() == text[1:] + [data.EOT]


def test_hashed_urls_are_consistent_labels(corpus):
    meco = data.with_metadata(corpus, "hash")
    encoder = data.get_tokenizer()
    label = encoder.decode(meco.prefixes[0].tolist())
    assert label.startswith("URL: ") and label.endswith("\n\n") and len(label) == len("URL: ") + 8 + 2
    assert "docs.python" not in label
    again = data.with_metadata(corpus, "hash")
    assert all(np.array_equal(a, b) for a, b in zip(meco.prefixes, again.prefixes))
    assert not np.array_equal(meco.prefixes[0], meco.prefixes[2])
    assert len(meco.prefixes[3]) == 0  # no URL, no prefix


def test_packing_makes_room_for_the_prefix_and_keeps_it_with_the_text(corpus):
    meco = data.with_metadata(corpus, "url")
    seq_len = 24
    lengths = [int(n) for n in meco.lengths]
    for strategy in data.PACKINGS:
        rows = data.pack_documents(lengths, seq_len, strategy)
        check_exact_cover(rows, lengths, seq_len)  # the prefix counts toward the row length
        for row in rows:
            for d, start, stop in row:
                if start == 0 and strategy != "concat" and strategy != "concat-docmask":
                    assert stop >= min(lengths[d], meco.prefix_lengths[d] + 2)  # EOT + prefix + first text token
        batch = data.rows_to_batch(meco, rows, seq_len)
        assert (batch["y"] != -1).sum() == sum(corpus.lengths)  # every text token (+ end) is a target once


def test_without_prefixes_scores_the_same_text(corpus):
    meco = data.with_metadata(corpus, "url")
    rows = data.pack_documents(meco.lengths, 32, "bestfit")
    with_url = data.rows_to_batch(meco, rows, 32)
    plain = data.rows_to_batch(corpus, data.without_prefixes(rows, meco), 32)
    for b in range(len(rows)):
        assert sorted(with_url["y"][b][with_url["y"][b] != -1].tolist()) == \
               sorted(plain["y"][b][plain["y"][b] != -1].tolist())
    assert (plain["x"] == meco.prefixes[0][0]).sum() < (with_url["x"] == meco.prefixes[0][0]).sum()


def test_meta_without_urls_is_a_clear_error(tmp_path):
    plain = data.load_corpus(write_jsonl(tmp_path / "nourl.jsonl", ["a b c", "d e f"]))
    with pytest.raises(BadInput, match="needs a URL per document"):
        data.with_metadata(plain, "url")


def test_cooldown_switches_at_the_exact_step(tmp_path, monkeypatch):
    phases = [pretrain.uses_metadata(step, max_steps=100, meta_cooldown=0.1) for step in range(120)]
    assert phases == [True] * 90 + [False] * 30

    seen = []  # which corpus each training batch came from, by batch index
    real = data.get_batch
    def spy(corpus, rows, seq_len, index, batch_size, seed, *args):
        if seed != 0:  # seed 0: validation batches
            seen.append((index, corpus.prefixes is not None))
        return real(corpus, rows, seq_len, index, batch_size, seed, *args)
    monkeypatch.setattr(data, "get_batch", spy)
    urls = [f"site{i % 3}.org/page" for i in range(12)]
    path = write_jsonl(tmp_path / "m.jsonl", [f"document number {i} " * 5 for i in range(12)], urls)
    pretrain.main(tiny_args(tmp_path / "run", 10, "--data", path, "--meta", "url", "--meta_cooldown", "0.3",
                            "--grad_accum", "2"))
    assert seen == [(i, i // 2 < 7) for i in range(20)]  # steps 0-6 with URLs, 7-9 without
    # the model at the end of the URL phase is kept beside the final one
    assert harness.load_checkpoint(tmp_path / "run" / "ckpt_7.pt")["step"] == 7
    assert harness.load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == 10


def test_sampling_with_a_url(tmp_path):
    pretrain.main(tiny_args(tmp_path, 5, "--meta", "url"))
    command = [sys.executable, "pretrain.py", "--sample", "--init", str(tmp_path / "ckpt.pt"), "--device", "cpu",
               "--url", "docs.python.org/3/library/asyncio", "--prompt", "def ", "--sample_tokens", "5"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("URL: docs.python.org/3/library/asyncio\n\ndef ")
    missing = subprocess.run(command[:2] + ["--sample"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "--sample needs --init" in missing.stderr


def test_grammar_corpus_is_deterministic_and_its_urls_name_the_source():
    """The controlled corpus must be the same on every machine, and its URL must carry
    real information: a word-count classifier fit on half the documents names the
    grammar of the other half far above chance (1 in 8). Shuffled or constant URLs fail."""
    docs = data.grammar_documents(n_docs=800)
    assert docs == data.grammar_documents(n_docs=800)
    assert docs != data.grammar_documents(n_docs=800, seed=1)
    vocabulary = {w for words in data.WORDS.values() for w in words} | {"and", "but"}
    for _, text in docs:
        sentences = text.split(". ")
        assert 3 <= len(sentences) <= 8 and text.endswith(".")
        assert set(text.replace(".", "").split()) <= vocabulary
    train, test = docs[:400], docs[400:]
    sources = sorted({url for url, _ in docs})
    assert sources == [f"grammar{k}.example" for k in range(8)]
    counts = {s: Counter() for s in sources}
    for url, text in train:
        counts[url].update(text.split())
    def log_likelihood(text, source):
        total = sum(counts[source].values()) + len(vocabulary) + 1
        return sum(np.log((counts[source][w] + 1) / total) for w in text.split())
    right = sum(max(sources, key=lambda s: log_likelihood(text, s)) == url for url, text in test)
    assert right / len(test) > 0.9


def test_ablations_drop_some_prefixes_or_train_on_them(corpus):
    """--meta_drop leaves a fixed share of documents without a URL (the rest keep theirs);
    --meta_loss makes the URL tokens targets too, with the same inputs."""
    meco = data.with_metadata(corpus, "url")
    dropped = data.with_metadata(corpus, "url", drop=0.5)
    kept = [len(p) > 0 for p in dropped.prefixes]
    assert kept == [len(p) > 0 for p in data.with_metadata(corpus, "url", drop=0.5).prefixes]  # a fixed choice
    assert 0 < sum(kept) < sum(len(p) > 0 for p in meco.prefixes)
    assert all(k == 0 or k == m for k, m in zip(dropped.prefix_lengths, meco.prefix_lengths))
    lossy = data.with_metadata(corpus, "url", loss=True)
    x, y = meco.segment(0, 0, int(meco.lengths[0]))
    lx, ly = lossy.segment(0, 0, int(meco.lengths[0]))
    p = int(meco.prefix_lengths[0])
    assert np.array_equal(x, lx) and np.array_equal(y[p:], ly[p:])
    assert (y[:p] == -1).all() and ly[:p].tolist() == x[1:p + 1].tolist()  # each URL token is the next target
