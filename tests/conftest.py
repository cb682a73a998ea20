"""Shared fixtures: a tiny SentencePiece tokenizer, tiny shards and a tiny run configuration.

Everything is built once per session in a temporary folder. Text comes from the testbed corpus (a
local corpus of Wikipedia JSONL parts, when present: the first documents of part 00), otherwise from
the docstrings of the Python standard library, so the suite runs anywhere without a download."""

from __future__ import annotations

import ast
import io
import json
import lzma
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train_gpt  # noqa: E402 (after the sys.path entry above)

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
VOCAB_SIZE = 1024
NUM_DOCS = 160  # documents read (val + train)
NUM_VAL_DOCS = 40  # the first documents are validation, as in the challenge's data
VAL_DOC_CHARS = 1000  # validation documents are cut (at a line end) to keep evaluation fast
MAX_TRAIN_TOKENS = 200_000
TOKENIZER_TRAIN_CHARS = 400_000
# The records' SentencePiece options (the challenge's data/ export).
SPM_OPTIONS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
)


def pytest_configure(config) -> None:
    marker = "torchrun: launches train_gpt.py with torchrun on 2-3 gloo ranks (6-30 s each)"
    config.addinivalue_line("markers", marker)


def corpus_documents(n: int) -> list[str]:
    """The first n documents of the testbed corpus, or stdlib docstrings when it is absent."""
    part = CORPUS / "wiki_en_00.jsonl.xz"
    if part.is_file():
        docs = []
        with lzma.open(part, "rt", encoding="utf-8") as f:
            for line in f:
                docs.append(json.loads(line)["text"])
                if len(docs) == n:
                    break
        return docs
    return stdlib_documents(n)


def stdlib_documents(n: int) -> list[str]:
    """Documents made of the docstrings of standard-library modules (one document per module)."""
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        nodes = [
            tree,
            *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))),
        ]
        texts = [ast.get_docstring(node) for node in nodes]
        text = "\n".join(t.strip() for t in texts if t and t.strip())
        if len(text) > 400:
            docs.append(f"{path.stem}\n\n{text}")
        if len(docs) == n:
            break
    return docs


def cut_at_line(text: str, limit: int) -> str:
    """The leading lines of text, about limit characters (at least one line)."""
    out, size = [], 0
    for line in text.split("\n"):
        out.append(line)
        size += len(line) + 1
        if size >= limit:
            break
    return "\n".join(out).rstrip()


def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        num_threads=2,
        minloglevel=2,
        **SPM_OPTIONS,
    )
    return model.getvalue()


@pytest.fixture(scope="session")
def documents() -> list[str]:
    docs = [d.strip() for d in corpus_documents(NUM_DOCS)]
    docs[:NUM_VAL_DOCS] = [cut_at_line(d, VAL_DOC_CHARS) for d in docs[:NUM_VAL_DOCS]]
    return docs


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, documents) -> Path:
    """A SentencePiece BPE trained on training documents only (never the validation ones)."""
    text, texts = 0, []
    for doc in documents[NUM_VAL_DOCS:]:
        texts.append(doc)
        text += len(doc)
        if text >= TOKENIZER_TRAIN_CHARS:
            break
    path = tmp_path_factory.mktemp("tokenizer") / "tok.model"
    path.write_bytes(train_tokenizer(texts, VOCAB_SIZE))
    return path


@pytest.fixture(scope="session")
def sp(tokenizer_path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tokenizer_path))


@dataclass(frozen=True)
class TinyData:
    path: Path  # DATA_PATH
    tokenizer_path: Path
    vocab_size: int
    val_docs: list[str]
    val_ids: list[list[int]]  # sp.encode of every validation document (no BOS)
    val_tokens: np.ndarray  # the whole validation stream, [BOS]+ids per document
    train_tokens: np.ndarray  # the whole training stream (both shards)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, documents, tokenizer_path, sp) -> TinyData:
    """fineweb_val_000000.bin (first documents) and two train shards (the rest, <= 200k tokens)."""
    folder = tmp_path_factory.mktemp("data")
    val_docs = documents[:NUM_VAL_DOCS]
    val_ids = [sp.encode(d) for d in val_docs]
    val = np.array([t for ids in val_ids for t in [train_gpt.BOS_ID, *ids]], dtype=np.uint16)
    train, count = [], 0
    for doc in documents[NUM_VAL_DOCS:]:
        ids = [train_gpt.BOS_ID, *sp.encode(doc)]
        train.append(np.array(ids, dtype=np.uint16))
        count += len(ids)
        if count >= MAX_TRAIN_TOKENS:
            break
    train_tokens = np.concatenate(train)[:MAX_TRAIN_TOKENS]
    half = train_tokens.size // 2
    train_gpt.write_shard(folder / "fineweb_val_000000.bin", val)
    train_gpt.write_shard(folder / "fineweb_train_000000.bin", train_tokens[:half])
    train_gpt.write_shard(folder / "fineweb_train_000001.bin", train_tokens[half:])
    return TinyData(folder, tokenizer_path, sp.vocab_size(), val_docs, val_ids, val, train_tokens)


# The tiny architecture of the CPU tests: 4 layers x 64, 4/2 heads, partial RoPE 8, layer 1 looped
# once more, parallel lanes on the last layer (ModelConfig fields; TINY_ENV has them as settings).
TINY_MODEL = dict(
    num_layers=4,
    model_dim=64,
    num_heads=4,
    num_kv_heads=2,
    rope_dims=8,
    loop_start=1,
    loop_end=1,
    num_loops=1,
    parallel_start_layer=3,
)
TINY_MODEL_ENV = {k.upper(): v for k, v in TINY_MODEL.items()}
# A smaller one, 2 layers x 32, for forward-only checks.
MICRO_MODEL = dict(
    num_layers=2,
    model_dim=32,
    num_heads=2,
    num_kv_heads=1,
    rope_dims=8,
    loop_start=0,
    loop_end=0,
    num_loops=1,
    parallel_start_layer=1,
)
# A tiny run: that model, looping from 30% of training, 2048 tokens per step in 8 rows of 256
# (pieces of 128).
TINY_ENV = dict(
    TINY_MODEL_ENV,
    ITERATIONS=40,
    MAX_WALLCLOCK_SECONDS=0,
    WARMUP_STEPS=1,
    TRAIN_SEQ_LEN=128,
    EVAL_SEQ_LEN=128,
    TRAIN_BATCH_TOKENS=2048,
    EMA_DECAY=0.9,
    COMPILE=0,
    ENABLE_LOOPING_AT=0.3,
    RUN_ID="tiny",
    TTT_MODE="phased",
    TTT_LORA_RANK=4,
    TTT_BATCH_DOCS=8,
    TTT_PREFIX_DOCS=6,
    TTT_LORA_CHUNK=64,
)


def tiny_env(tiny_data: TinyData, out_dir: Path, **overrides: object) -> dict[str, str]:
    """The settings (strings) of a tiny run on tiny_data writing to out_dir, plus overrides."""
    env = dict(
        TINY_ENV,
        DATA_PATH=tiny_data.path,
        TOKENIZER_PATH=tiny_data.tokenizer_path,
        VOCAB_SIZE=tiny_data.vocab_size,
        OUT_DIR=out_dir,
    )
    env.update(overrides)
    return {k: str(v) for k, v in env.items()}


@pytest.fixture
def tiny_hp(tiny_data):
    """tiny_hp(out_dir, **ENV_OVERRIDES) -> Hyperparameters of a tiny CPU run on tiny_data."""

    def build(out_dir: Path, **overrides: object) -> train_gpt.Hyperparameters:
        return train_gpt.Hyperparameters.from_env(tiny_env(tiny_data, out_dir, **overrides))

    return build


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data):
    """One tiny end-to-end run of main(), shared by the tests that only read its results."""
    out_dir = tmp_path_factory.mktemp("tiny_run")
    hp = train_gpt.Hyperparameters.from_env(tiny_env(tiny_data, out_dir))
    final = train_gpt.main(hp, env={})
    return hp, final, out_dir
