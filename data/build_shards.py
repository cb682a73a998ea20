"""Build train_gpt.py token shards (and a SentencePiece tokenizer) from raw text documents.

This is the local twin of the challenge's FineWeb export (its data/ scripts): the first N
documents are the validation split, every later document is training data, each document is
written as [BOS] + pieces with no EOS, and documents run back to back across shard boundaries.

Usage:
    # a JSONL corpus, e.g. the Wikipedia testbed (validation = the first 500 documents)
    python data/build_shards.py --docs corpus/wiki_en_0{0,1}.jsonl.xz --out .testbed/sp8192 \
        --vocab-size 8192 --val-docs 500 --max-train-tokens 26000000 --shard-tokens 10000000
    # no download at all: documents built from the Python standard library's docstrings
    python data/build_shards.py --from-stdlib --out data/stdlib_sp1024 --vocab-size 1024 \
        --val-docs 300
    # re-encode with an existing tokenizer instead of training one
    python data/build_shards.py --docs more.jsonl.gz --out DIR --vocab-size 8192 --val-docs 500 \
        --tokenizer data/tokenizers/fineweb_8192_bpe.model

Writes into --out: tokenizer.model, fineweb_val_000000.bin..., fineweb_train_000000.bin... and
manifest.json (counts, sources with sha256, options, checks). The tokenizer is trained on training
documents only, and a training document whose text equals a validation document's is dropped.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import itertools
import json
import lzma
import multiprocessing as mp
import os
import platform
import random
import sys
import sysconfig
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import sentencepiece as spm

# train_gpt.py owns the shard format and the byte-counting rule; we import them rather than keep
# a second copy that could drift (train_gpt.py imports nothing from here: it stands alone).
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))
from train_gpt import (  # noqa: E402
    BOS_ID,
    HEADER_WORDS,
    SHARD_MAGIC,
    SHARD_VERSION,
    ConfigError,
    build_byte_luts,
    count_bytes,
    read_shard,
    write_shard,
)
from train_gpt import check_byte_rule as check_texts  # noqa: E402

# ----------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------
DEFAULT_SHARD_TOKENS = 10**8  # the challenge's shard size; the last shard of a split is short
DEFAULT_TOKENIZER_TRAIN_BYTES = 50_000_000  # SentencePiece BPE takes ~3 s per 30 MB on 2 cores
MAX_VOCAB = 2**16  # tokens are stored as uint16
# The records' tokenizer options (those of the challenge's data/ export).
SPM_OPTIONS: dict[str, object] = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}
# SentencePiece silently skips training sentences longer than this many bytes (default 4192), so
# we feed it paragraphs and raise the limit to keep long paragraphs.
SPM_MAX_SENTENCE_BYTES = 1 << 16
ENCODE_BATCH_CHARS = 1 << 20  # text per worker task: large enough to hide pickling overhead
BYTE_CHECK_DOCS = 200  # documents of each split whose byte count is checked against decoding
PROGRESS_EVERY_S = 2.0
STDLIB_MIN_DOC_CHARS = (
    40  # shorter docstrings ("Return x.") teach little and are mostly boilerplate
)
STDLIB_SHUFFLE_SEED = 1337  # the stdlib source is shuffled once so that val is a random sample
VAL_NAME = "fineweb_val_{index:06d}.bin"
TRAIN_NAME = "fineweb_train_{index:06d}.bin"


def log(event: str, **fields: object) -> None:
    """One `event key:value ...` line, the project's log format."""
    parts = [event] + [f"{k}:{v}" for k, v in fields.items()]
    print(" ".join(parts), flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


# ----------------------------------------------------------------------------
# Document sources
#
# Each source yields (text, fraction of the input consumed so far); the fraction drives the
# progress ETA when no token cap is given. Empty documents are skipped everywhere, so "the first
# N documents" means the first N non-empty ones.
# ----------------------------------------------------------------------------
def open_compressed(raw: IO[bytes], name: str) -> IO[str]:
    """Text view of a plain, .gz or .xz file. Lines end at "\\n" only (some texts hold U+2028)."""
    if name.endswith(".xz"):
        binary: IO[bytes] = lzma.open(raw)  # noqa: SIM115 (the caller's `with` closes the view)
    elif name.endswith(".gz"):
        binary = gzip.open(raw)  # noqa: SIM115
    else:
        binary = raw
    return io.TextIOWrapper(binary, encoding="utf-8", newline="")


def iter_jsonl_docs(paths: list[Path]) -> Iterator[tuple[str, float]]:
    """Documents of JSONL files, one {"text": ...} object per line, in file then line order."""
    sizes = [p.stat().st_size for p in paths]
    total, done = max(sum(sizes), 1), 0
    for path, size in zip(paths, sizes, strict=True):
        with open(path, "rb") as raw, open_compressed(raw, path.name) as lines:
            for line_no, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(
                        f"{path}:{line_no}: not a {{'text': ...}} JSON line ({err})"
                    ) from err
                if text.strip():
                    yield text, (done + raw.tell()) / total
        done += size


def _docstrings_of_file(path_and_module: tuple[str, str]) -> list[tuple[str, str]]:
    """(qualified name, docstring) for every docstring of one stdlib file."""
    path, module = path_and_module
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError):  # lib2to3 fixtures etc. are Python 2 on purpose
        return []
    if module == "pydoc_data.topics":
        return _pydoc_topics(tree)
    found = []

    def visit(node: ast.AST, qualname: str) -> None:
        doc = ast.get_docstring(node) if isinstance(node, DOC_NODES) else None
        if doc and len(doc) >= STDLIB_MIN_DOC_CHARS:
            found.append((qualname, doc))
        for child in ast.iter_child_nodes(node):
            name = getattr(child, "name", None) if isinstance(child, DOC_NODES) else None
            visit(child, f"{qualname}.{name}" if name else qualname)

    visit(tree, module)
    return found


DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _pydoc_topics(tree: ast.Module) -> list[tuple[str, str]]:
    """The language reference topics that pydoc ships as one dict literal (~0.46 MB of prose):
    not docstrings, but the best prose in the stdlib, and it lifts the source above 2.5 MB."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            topics = ast.literal_eval(node.value)
            return [(key, text.strip()) for key, text in sorted(topics.items())]
    return []


def stdlib_documents(root: Path | None = None, workers: int = 1) -> list[str]:
    """Deterministic documents from the docstrings of the standard library under `root` (default:
    this interpreter's): "qualified.name", a blank line, the docstring. Parsed with `ast`, never
    imported, so nothing runs and no module can hang or need a display. Files in sorted path
    order; a docstring seen before (inherited, copied) is dropped; then one fixed shuffle."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    jobs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts:
            continue  # third-party code differs between machines
        parts = rel.with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or root.name
        jobs.append((str(path), module))
    with mp.Pool(workers) as pool:
        per_file = pool.map(_docstrings_of_file, jobs, chunksize=16)
    seen: set[bytes] = set()
    docs = []
    for qualname, doc in (pair for found in per_file for pair in found):
        if text_hash(doc) not in seen:
            seen.add(text_hash(doc))
            docs.append(f"{qualname}\n\n{doc}")
    random.Random(STDLIB_SHUFFLE_SEED).shuffle(docs)
    return docs


def iter_list_docs(docs: list[str]) -> Iterator[tuple[str, float]]:
    for i, text in enumerate(docs):
        yield text, (i + 1) / len(docs)


# ----------------------------------------------------------------------------
# Split: the first N documents are validation, the rest training, minus copies of val documents.
# ----------------------------------------------------------------------------
@dataclass
class Split:
    val_docs: list[str]
    val_hashes: set[bytes]
    source: Iterator[tuple[str, float]]  # positioned just after the last val document
    dropped_duplicates: int = 0  # training documents dropped because a val document has the text

    def train_docs(self) -> Iterator[tuple[str, float]]:
        for text, fraction in self.source:
            if text_hash(text) in self.val_hashes:
                self.dropped_duplicates += 1
                continue
            yield text, fraction


def split_documents(source: Iterator[tuple[str, float]], val_docs: int) -> Split:
    val = [text for text, _ in itertools.islice(source, val_docs)]  # reads no document past them
    if len(val) < val_docs:
        raise SystemExit(
            f"error: only {len(val)} documents in the input, --val-docs asks for {val_docs}"
        )
    return Split(val_docs=val, val_hashes={text_hash(t) for t in val}, source=source)


def take_bytes(docs: Iterator[tuple[str, float]], limit: int) -> list[tuple[str, float]]:
    """The first documents of `docs` up to `limit` UTF-8 bytes (at least one document)."""
    taken, size = [], 0
    for text, fraction in docs:
        taken.append((text, fraction))
        size += len(text.encode("utf-8"))
        if size >= limit:
            break
    return taken


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int, threads: int) -> bytes:
    """Train the records' SentencePiece BPE on `texts`; returns the serialized model."""
    paragraphs = (p for text in texts for p in text.split("\n") if p.strip())
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=paragraphs,
            model_writer=model,
            vocab_size=vocab_size,
            num_threads=threads,
            input_sentence_size=0,  # use every paragraph; the caller already capped the input
            max_sentence_length=SPM_MAX_SENTENCE_BYTES,
            minloglevel=2,  # the trainer's per-iteration chatter would drown our progress lines
            **SPM_OPTIONS,
        )
    except RuntimeError as err:  # e.g. a vocabulary smaller than the characters to cover
        raise SystemExit(f"error: SentencePiece training failed: {err}") from err
    return model.getvalue()


def check_tokenizer(sp: spm.SentencePieceProcessor, vocab_size: int, trained: bool) -> None:
    """Refuse tokenizers that train_gpt.py cannot score or store. A tokenizer trained here may
    come out smaller than asked (hard_vocab_limit=False on little text): allowed, with a warning,
    because VOCAB_SIZE must then be set to the real size."""
    try:  # train_gpt.py's own check: a standalone space piece, and text the byte rule can count
        build_byte_luts(sp, sp.vocab_size())
    except ConfigError as exc:
        raise SystemExit(f"error: train_gpt.py cannot score this tokenizer: {exc}") from exc
    if sp.bos_id() != BOS_ID:
        raise SystemExit(f"error: tokenizer BOS id is {sp.bos_id()}, train_gpt.py expects {BOS_ID}")
    if sp.vocab_size() > vocab_size or (sp.vocab_size() < vocab_size and not trained):
        raise SystemExit(
            f"error: the tokenizer has {sp.vocab_size()} pieces; --vocab-size is {vocab_size}"
        )
    if sp.vocab_size() < vocab_size:
        print(
            f"warning: the tokenizer has {sp.vocab_size()} pieces, not {vocab_size} "
            f"(too little text); train with VOCAB_SIZE={sp.vocab_size()}",
            file=sys.stderr,
            flush=True,
        )


# ----------------------------------------------------------------------------
# Encoding (all cores)
#
# A pool of processes encodes batches of about 1 MB of text. At most 2 batches per worker are in
# flight, so a token cap stops reading the input early instead of queueing the whole corpus.
# ----------------------------------------------------------------------------
_worker_sp: spm.SentencePieceProcessor | None = (
    None  # one per worker process, set by the initializer
)


def _init_worker(model_proto: bytes) -> None:
    global _worker_sp
    _worker_sp = spm.SentencePieceProcessor(model_proto=model_proto)


def encode_batch(texts: list[str]) -> np.ndarray:
    """[BOS] + pieces for each document, concatenated (no EOS, as the challenge's export)."""
    assert _worker_sp is not None
    pieces = _worker_sp.encode(texts, out_type=int)
    tokens = [np.array([BOS_ID] + ids, dtype=np.uint16) for ids in pieces]
    return np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.uint16)


def batch_docs(docs: Iterable[tuple[str, float]]) -> Iterator[tuple[list[str], float]]:
    batch: list[str] = []
    size, fraction = 0, 0.0
    for text, fraction in docs:
        batch.append(text)
        size += len(text)
        if size >= ENCODE_BATCH_CHARS:
            yield batch, fraction
            batch, size = [], 0
    if batch:
        yield batch, fraction


def encode_stream(
    pool: mp.pool.Pool, docs: Iterable[tuple[str, float]], workers: int
) -> Iterator[tuple[np.ndarray, float]]:
    """Yields (tokens of a batch, input fraction read) in input order."""
    pending: deque = deque()
    for batch, fraction in batch_docs(docs):
        pending.append((pool.apply_async(encode_batch, (batch,)), fraction))
        if len(pending) >= 2 * workers:
            result, done = pending.popleft()
            yield result.get(), done
    while pending:
        result, done = pending.popleft()
        yield result.get(), done


@dataclass
class Progress:
    """Prints a progress line with rate and ETA at most every PROGRESS_EVERY_S seconds."""

    split: str
    token_cap: int | None = None
    docs: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    last: float = field(default_factory=time.perf_counter)  # first line after PROGRESS_EVERY_S

    def update(self, tokens: int, docs: int, input_fraction: float, final: bool = False) -> None:
        self.docs += docs
        self.tokens += tokens
        now = time.perf_counter()
        if not final and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        done = (
            input_fraction
            if not self.token_cap
            else max(input_fraction, self.tokens / self.token_cap)
        )
        elapsed = now - self.start
        eta = elapsed * (1 - done) / done if 0 < done < 1 and not final else 0.0
        log(
            "encode",
            split=self.split,
            docs=self.docs,
            tokens=self.tokens,
            tok_s=int(self.tokens / max(elapsed, 1e-9)),
            done=f"{100 * min(done, 1):.1f}%",
            eta_s=f"{eta:.0f}",
        )


# ----------------------------------------------------------------------------
# Shard writing and checks
# ----------------------------------------------------------------------------
@dataclass
class ShardWriter:
    """Cuts a token stream into shards of `shard_tokens` (the last one short)."""

    out_dir: Path
    name: str  # VAL_NAME or TRAIN_NAME
    shard_tokens: int
    files: list[dict] = field(default_factory=list)
    _buffer: list[np.ndarray] = field(default_factory=list)
    _buffered: int = 0

    def add(self, tokens: np.ndarray) -> None:
        self._buffer.append(tokens)
        self._buffered += len(tokens)
        while self._buffered >= self.shard_tokens:
            stream = np.concatenate(self._buffer)
            self._write(stream[: self.shard_tokens])
            rest = stream[self.shard_tokens :]
            self._buffer, self._buffered = [rest], len(rest)

    def close(self) -> None:
        if self._buffered:
            self._write(np.concatenate(self._buffer))
        self._buffer, self._buffered = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        path = self.out_dir / self.name.format(index=len(self.files))
        tmp = path.with_name(path.name + ".tmp")  # a killed run never leaves a short .bin behind
        write_shard(tmp, tokens)
        os.replace(tmp, path)
        self.files.append({"name": path.name, "tokens": int(len(tokens))})


def check_byte_rule(sp: spm.SentencePieceProcessor, texts: list[str], luts: tuple) -> int:
    """Exit unless, for every text, the byte count of [BOS] + pieces equals the UTF-8 size of the
    decoded text (train_gpt.check_byte_rule). Returns the number of texts checked."""
    try:
        return check_texts(sp, luts, texts)
    except ConfigError as exc:
        raise SystemExit(f"error: byte rule broken: {exc}") from exc


def verify_shards(out_dir: Path, files: list[dict]) -> None:
    """Re-read every written shard through train_gpt's reader (header, size, count)."""
    for entry in files:
        tokens = read_shard(out_dir / entry["name"])
        if len(tokens) != entry["tokens"]:
            raise SystemExit(
                f"error: {entry['name']} holds {len(tokens)} tokens, expected {entry['tokens']}"
            )


# ----------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--docs", type=Path, nargs="+", help="JSONL files of {'text': ...} (plain, .gz, .xz)"
    )
    source.add_argument(
        "--from-stdlib", action="store_true", help="documents from the stdlib's docstrings"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument(
        "--val-docs", type=int, required=True, help="the first N documents are validation"
    )
    parser.add_argument(
        "--max-train-tokens", type=int, default=None, help="stop after this many tokens"
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="an existing .model; skips training"
    )
    parser.add_argument(
        "--tokenizer-train-bytes",
        type=int,
        default=DEFAULT_TOKENIZER_TRAIN_BYTES,
        help="text of the first training documents the tokenizer learns from",
    )
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    args = parser.parse_args(argv)
    if args.val_docs < 1 or args.shard_tokens < 1 or args.workers < 1:
        parser.error("--val-docs, --shard-tokens and --workers must be positive")
    missing = [str(p) for p in args.docs or [] if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    if not 0 < args.vocab_size <= MAX_VOCAB:
        parser.error(f"--vocab-size must be in 1..{MAX_VOCAB} (tokens are stored as uint16)")
    return args


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    """Create --out; stale shards from an earlier build would be globbed by the trainer, so they
    are removed, but only when asked to."""
    out_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(out_dir.glob("fineweb_*.bin")) + [
        p for p in (out_dir / "manifest.json",) if p.exists()
    ]
    if old and not overwrite:
        raise SystemExit(
            f"error: {out_dir} already holds {old[0].name}; pass --overwrite to replace"
        )
    for path in old:
        path.unlink()


def describe_sources(args: argparse.Namespace, stdlib_docs: list[str] | None) -> list[dict]:
    if stdlib_docs is None:
        return [
            {"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in args.docs
        ]
    digest = hashlib.sha256()
    for text in stdlib_docs:
        digest.update(text_hash(text))
    return [
        {
            "kind": "python-stdlib-docstrings",
            "python": platform.python_version(),
            "root": sysconfig.get_paths()["stdlib"],
            "docs": len(stdlib_docs),
            "sha256": digest.hexdigest(),
        }
    ]


def obtain_tokenizer(
    args: argparse.Namespace, train: Iterator[tuple[str, float]]
) -> tuple[bytes, dict, list[tuple[str, float]]]:
    """Load --tokenizer, or train one on the first --tokenizer-train-bytes of training text. Returns
    the model, its manifest entry, and the training documents read for it (still to encode)."""
    if args.tokenizer is not None:
        return args.tokenizer.read_bytes(), {"source": str(args.tokenizer), "trained": False}, []
    started = time.perf_counter()
    head = take_bytes(train, args.tokenizer_train_bytes)
    texts = [text for text, _ in head]
    model = train_tokenizer(texts, args.vocab_size, args.workers)
    info = {
        "trained": True,
        "train_docs": len(texts),
        "train_bytes": sum(len(t.encode("utf-8")) for t in texts),
        "spm_options": SPM_OPTIONS,
        "train_time_s": round(time.perf_counter() - started, 2),
    }
    log(
        "tokenizer",
        trained_on_docs=info["train_docs"],
        bytes=info["train_bytes"],
        time_s=info["train_time_s"],
    )
    return model, info, head


def tap(
    docs: Iterable[tuple[str, float]], sample: list[str], size: int
) -> Iterator[tuple[str, float]]:
    """Pass documents through, keeping the first `size` texts for the byte-rule check."""
    for text, fraction in docs:
        if len(sample) < size:
            sample.append(text)
        yield text, fraction


def encode_split(
    pool: mp.pool.Pool,
    docs: Iterable[tuple[str, float]],
    writer: ShardWriter,
    progress: Progress,
    workers: int,
) -> dict:
    """Encode documents into `writer`, stopping at progress.token_cap tokens (mid-document)."""
    cap, truncated = progress.token_cap, False
    for tokens, fraction in encode_stream(pool, docs, workers):
        if cap is not None and progress.tokens + len(tokens) >= cap:
            keep = cap - progress.tokens
            truncated = bool(keep < len(tokens) and tokens[keep] != BOS_ID)
            tokens = tokens[:keep]
        writer.add(tokens)
        progress.update(len(tokens), int(np.count_nonzero(tokens == BOS_ID)), fraction)
        if cap is not None and progress.tokens >= cap:
            break
    writer.close()
    progress.update(0, 0, 1.0, final=True)
    return {
        "docs": progress.docs,
        "tokens": progress.tokens,
        "files": writer.files,
        "last_doc_truncated": truncated,
    }


def encode_splits(
    args: argparse.Namespace, model: bytes, split: Split, train: Iterable[tuple[str, float]]
) -> tuple[dict, dict, list[str]]:
    """Write the val shards, then the train shards; returns both summaries and a sample of
    training texts for the byte-rule check."""
    train_sample: list[str] = []
    with mp.Pool(args.workers, initializer=_init_worker, initargs=(model,)) as pool:
        val = encode_split(
            pool,
            iter_list_docs(split.val_docs),
            ShardWriter(args.out, VAL_NAME, args.shard_tokens),
            Progress("val"),
            args.workers,
        )
        train_info = encode_split(
            pool,
            tap(train, train_sample, BYTE_CHECK_DOCS),
            ShardWriter(args.out, TRAIN_NAME, args.shard_tokens),
            Progress("train", args.max_train_tokens),
            args.workers,
        )
    if not train_info["tokens"]:
        raise SystemExit(
            f"error: no training documents after the {args.val_docs} validation documents"
        )
    del val["last_doc_truncated"]  # val always holds whole documents
    train_info["dropped_val_copies"] = split.dropped_duplicates
    return val, train_info, train_sample


def build(args: argparse.Namespace) -> dict:
    """Everything main() does; returns the manifest (also written to --out/manifest.json)."""
    started = time.perf_counter()
    prepare_output(args.out, args.overwrite)
    stdlib_docs = stdlib_documents(workers=args.workers) if args.from_stdlib else None
    source = iter_list_docs(stdlib_docs) if stdlib_docs is not None else iter_jsonl_docs(args.docs)
    split = split_documents(source, args.val_docs)
    train = split.train_docs()  # one generator: the tokenizer reads its head, encoding the rest

    model, tokenizer_info, head = obtain_tokenizer(args, train)
    sp = spm.SentencePieceProcessor(model_proto=model)
    check_tokenizer(sp, args.vocab_size, tokenizer_info["trained"])
    (args.out / "tokenizer.model").write_bytes(model)
    tokenizer_info.update(
        path="tokenizer.model", vocab_size=sp.vocab_size(), sha256=hashlib.sha256(model).hexdigest()
    )
    val, train_info, train_sample = encode_splits(args, model, split, itertools.chain(head, train))

    luts = build_byte_luts(sp, sp.vocab_size())
    checked = check_byte_rule(sp, split.val_docs[:BYTE_CHECK_DOCS] + train_sample, luts)
    verify_shards(args.out, val["files"] + train_info["files"])
    val_tokens = np.concatenate([read_shard(args.out / f["name"]) for f in val["files"]])
    val.update(
        bytes=count_bytes(val_tokens, luts),
        text_bytes=sum(len(t.encode("utf-8")) for t in split.val_docs),
    )
    manifest = {
        "tool": "data/build_shards.py",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "format": {
            "header_words": HEADER_WORDS,
            "magic": SHARD_MAGIC,
            "version": SHARD_VERSION,
            "dtype": "uint16",
            "bos_id": BOS_ID,
            "eos_appended": False,
        },
        "sources": describe_sources(args, stdlib_docs),
        "options": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "docs"
        },
        "tokenizer": tokenizer_info,
        "val": val,
        "train": train_info,
        # Each check raises when it fails, so a written manifest records that all of them passed.
        "checks": {"byte_rule_docs": checked, "shards_reread": True, "no_doc_in_both_splits": True},
        "elapsed_s": round(time.perf_counter() - started, 2),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    manifest = build(args)
    val, train = manifest["val"], manifest["train"]
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    log(
        "done",
        out=args.out,
        val_docs=val["docs"],
        val_tokens=val["tokens"],
        val_bytes=val["bytes"],
        train_docs=train["docs"],
        train_tokens=train["tokens"],
        train_shards=len(train["files"]),
        vocab=manifest["tokenizer"]["vocab_size"],
        mib=f"{size / 2**20:.1f}",
        time_s=manifest["elapsed_s"],
    )
    return manifest


if __name__ == "__main__":
    main()
