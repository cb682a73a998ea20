"""Tests of data/build_shards.py and data/cached_challenge_fineweb.py on small generated data.

The downloader is exercised against a stand-in hub: a folder laid out like the hub's URL space,
reached through file:// or a tiny HTTP server on 127.0.0.1. Nothing here touches the network.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import itertools
import json
import lzma
import random
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "data")]
import build_shards  # noqa: E402
import cached_challenge_fineweb as downloader  # noqa: E402

from train_gpt import (  # noqa: E402
    BOS_ID,
    HEADER_WORDS,
    SHARD_MAGIC,
    SHARD_VERSION,
    build_byte_luts,
    read_shard,
    write_shard,
)

CORPUS_PART = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "wiki_en_00.jsonl.xz"
WORDS = [
    "the",
    "of",
    "and",
    "a",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "by",
    "with",
    "as",
    "at",
    "from",
    "his",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "also",
    "has",
    "or",
    "had",
    "first",
    "one",
    "their",
    "its",
    "new",
    "after",
    "who",
    "they",
    "have",
    "two",
    "her",
    "she",
    "been",
    "other",
    "when",
    "time",
    "all",
    "during",
    "there",
    "into",
    "school",
    "would",
    "more",
    "may",
    "years",
    "over",
    "only",
    "most",
    "some",
    "city",
    "made",
    "world",
    "where",
    "later",
    "up",
    "such",
    "used",
    "many",
    "can",
    "state",
    "about",
    "national",
    "river",
    "north",
    "music",
    "team",
    "war",
    "house",
    "film",
    "game",
    "album",
]
RARE = [
    "café",
    "naïve",
    "Zürich",
    "—",
    "日本語",
    "€5",
    "3.14159",
    "1999",
    "🙂",
    "Ærø",
    "«quote»",
    "x²",
]
VAL_DOCS = 10
SHARD_TOKENS = 4000


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Unique wiki-like documents: a title line, a blank line, paragraphs, some non-ASCII."""
    rng = random.Random(seed)
    docs = []
    for k in range(n):
        paragraphs = []
        for _ in range(rng.randint(1, 4)):
            words = [
                rng.choice(WORDS) if rng.random() > 0.06 else rng.choice(RARE)
                for _ in range(rng.randint(20, 90))
            ]
            paragraphs.append(" ".join(words).capitalize() + ".")
        docs.append(f"Document {k} {rng.choice(WORDS)}\n\n" + "\n".join(paragraphs))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "wt", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def split_at_bos(tokens: np.ndarray) -> list[list[int]]:
    starts = np.flatnonzero(tokens == BOS_ID)
    return [
        tokens[a + 1 : b].tolist()
        for a, b in zip(starts, list(starts[1:]) + [len(tokens)], strict=True)
    ]


def normalized(sp: spm.SentencePieceProcessor, text: str) -> str:
    return sp.decode(sp.encode(text))


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """The first documents of the testbed corpus when it is there (real text), else generated."""
    generated = make_docs(70)
    if not CORPUS_PART.exists():
        return generated
    real = [text for text, _ in itertools.islice(build_shards.iter_jsonl_docs([CORPUS_PART]), 25)]
    return [t[:3000] for t in real] + generated[25:]  # clipped: keep tokenizer training fast


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, docs: list[str]) -> dict:
    """One build shared by the split tests. Document 40 repeats validation document 3."""
    tmp = tmp_path_factory.mktemp("built")
    source = write_jsonl(tmp / "docs.jsonl.gz", docs[:40] + [docs[3]] + docs[40:])
    out = tmp / "out"
    manifest = build_shards.main(
        [
            "--docs",
            str(source),
            "--out",
            str(out),
            "--vocab-size",
            "400",
            "--val-docs",
            str(VAL_DOCS),
            "--shard-tokens",
            str(SHARD_TOKENS),
        ]
    )
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    val = np.concatenate([read_shard(p) for p in sorted(out.glob("fineweb_val_*.bin"))])
    train = np.concatenate([read_shard(p) for p in sorted(out.glob("fineweb_train_*.bin"))])
    return {
        "out": out,
        "source": source,
        "manifest": manifest,
        "sp": sp,
        "val": val,
        "train": train,
        "docs": docs,
    }


# ----------------------------------------------------------------------------
# build_shards.py
# ----------------------------------------------------------------------------
def test_shard_headers_and_sizes(built: dict) -> None:
    out = built["out"]
    train_files = sorted(out.glob("fineweb_train_*.bin"))
    assert [p.name for p in train_files] == [
        f"fineweb_train_{i:06d}.bin" for i in range(len(train_files))
    ]
    assert len(train_files) >= 2, "the shard size should have cut the train split"
    for path in train_files + sorted(out.glob("fineweb_val_*.bin")):
        raw = path.read_bytes()
        header = np.frombuffer(raw[: 4 * HEADER_WORDS], dtype="<i4")
        assert (header[0], header[1]) == (SHARD_MAGIC, SHARD_VERSION)
        assert not header[3:].any()
        assert len(raw) == 4 * HEADER_WORDS + 2 * int(header[2])
        if path in train_files[:-1]:
            assert header[2] == SHARD_TOKENS  # only the last shard of a split is short
    assert not list(out.glob("*.tmp"))


def test_val_is_first_n_docs_and_train_follows(built: dict) -> None:
    sp, docs = built["sp"], built["docs"]
    val_docs = split_at_bos(built["val"])
    assert val_docs == [sp.encode(text) for text in docs[:VAL_DOCS]]
    assert built["val"][0] == BOS_ID and built["train"][0] == BOS_ID
    assert split_at_bos(built["train"])[0] == sp.encode(docs[VAL_DOCS])  # no EOS, no gap
    assert built["manifest"]["val"]["docs"] == VAL_DOCS


def test_no_document_in_both_splits(built: dict) -> None:
    sp = built["sp"]
    val = {tuple(d) for d in split_at_bos(built["val"])}
    train = [tuple(d) for d in split_at_bos(built["train"])]
    assert not val.intersection(train)
    assert len(train) == len(built["docs"]) - VAL_DOCS  # every other doc, the val copy dropped
    assert built["manifest"]["train"]["dropped_val_copies"] == 1
    assert sp.decode(list(train[-1])) == normalized(sp, built["docs"][-1])


def test_byte_rule_matches_decoded_text(built: dict) -> None:
    """Bytes credited by the LUT rule over the val stream = UTF-8 bytes of the decoded documents."""
    sp = built["sp"]
    luts = build_byte_luts(sp, sp.vocab_size())
    decoded = sum(len(sp.decode(ids).encode("utf-8")) for ids in split_at_bos(built["val"]))
    assert (
        build_shards.count_bytes(built["val"], luts) == decoded == built["manifest"]["val"]["bytes"]
    )
    assert build_shards.check_byte_rule(sp, ["naïve café 🙂 — 3.14 日本語", "x"], luts) == 2


def test_manifest_counts_and_sources(built: dict) -> None:
    manifest, out = built["manifest"], built["out"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["val"]["tokens"] == len(built["val"])
    assert manifest["train"]["tokens"] == len(built["train"])
    assert manifest["train"]["docs"] == int((built["train"] == BOS_ID).sum())
    assert sum(f["tokens"] for f in manifest["train"]["files"]) == len(built["train"])
    assert (
        manifest["sources"][0]["sha256"] == hashlib.sha256(built["source"].read_bytes()).hexdigest()
    )
    model_sha = hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest()
    assert manifest["tokenizer"]["sha256"] == model_sha
    assert manifest["tokenizer"]["spm_options"]["byte_fallback"] is True
    assert manifest["tokenizer"]["vocab_size"] == built["sp"].vocab_size() <= 400
    assert manifest["checks"]["byte_rule_docs"] > VAL_DOCS


def test_max_train_tokens_and_existing_tokenizer(built: dict, tmp_path: Path) -> None:
    out = tmp_path / "capped"
    manifest = build_shards.main(
        [
            "--docs",
            str(built["source"]),
            "--out",
            str(out),
            "--vocab-size",
            str(built["sp"].vocab_size()),
            "--val-docs",
            str(VAL_DOCS),
            "--max-train-tokens",
            "1234",
            "--tokenizer",
            str(built["out"] / "tokenizer.model"),
            "--workers",
            "1",
        ]
    )
    train = np.concatenate([read_shard(p) for p in sorted(out.glob("fineweb_train_*.bin"))])
    assert len(train) == manifest["train"]["tokens"] == 1234
    assert np.array_equal(train, built["train"][:1234])  # same tokenizer, same stream, cut
    assert manifest["tokenizer"]["trained"] is False
    assert (out / "tokenizer.model").read_bytes() == (built["out"] / "tokenizer.model").read_bytes()


def test_refuses_existing_output_and_bad_tokenizers(built: dict, tmp_path: Path) -> None:
    args = ["--docs", str(built["source"]), "--val-docs", "2", "--workers", "1"]
    with pytest.raises(SystemExit, match="--overwrite"):
        build_shards.main(args + ["--out", str(built["out"]), "--vocab-size", "400"])
    # A tokenizer trained on text without spaces has no standalone "▁" piece.
    no_space = build_shards.train_tokenizer([t.replace(" ", "") for t in make_docs(30)], 400, 1)
    (tmp_path / "nospace.model").write_bytes(no_space)
    with pytest.raises(SystemExit, match="standalone"):
        build_shards.main(
            args
            + [
                "--out",
                str(tmp_path / "a"),
                "--vocab-size",
                "400",
                "--tokenizer",
                str(tmp_path / "nospace.model"),
            ]
        )
    with pytest.raises(SystemExit, match="pieces; --vocab-size"):
        build_shards.main(
            args
            + [
                "--out",
                str(tmp_path / "b"),
                "--vocab-size",
                "8192",
                "--tokenizer",
                str(built["out"] / "tokenizer.model"),
            ]
        )


def test_reads_plain_gz_and_xz(tmp_path: Path) -> None:
    docs = make_docs(5, seed=3) + ["line\u2028separator inside"]
    for name in ("d.jsonl", "d.jsonl.gz", "d.jsonl.xz"):
        got = list(build_shards.iter_jsonl_docs([write_jsonl(tmp_path / name, docs)]))
        assert [text for text, _ in got] == docs
        assert got[-1][1] == pytest.approx(1.0, abs=0.05)
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(build_shards.iter_jsonl_docs([tmp_path / "bad.jsonl"]))


def write_fake_stdlib(root: Path) -> None:
    """Modules with docstrings at every level, a duplicate, a short one and a Python 2 file."""
    long_doc = " ".join(make_docs(1, seed=9)[0].split()[:40])
    for i in range(30):
        text = " ".join(make_docs(1, seed=100 + i)[0].split()[:60])
        (root / "pkg").mkdir(parents=True, exist_ok=True)
        (root / "pkg" / f"mod{i:02d}.py").write_text(
            f'"""{text}"""\n\nclass Thing:\n    """{long_doc}"""\n\n'
            f'    def method(self):\n        """Too short."""\n\n'
            f'if True:\n    def helper():\n        """{text[::-1]}"""\n'
        )
    (root / "py2.py").write_text('print "not python 3"\n')
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third.py").write_text(f'"""{long_doc} third party"""\n')


def test_stdlib_documents_are_deterministic(tmp_path: Path) -> None:
    write_fake_stdlib(tmp_path)
    docs = build_shards.stdlib_documents(tmp_path, workers=2)
    assert docs == build_shards.stdlib_documents(tmp_path, workers=1)
    assert len(docs) == 30 + 1 + 30  # module docs, one Thing doc (duplicates dropped), helpers
    assert sum(".Thing\n\n" in d for d in docs) == 1  # the same docstring in 30 modules
    assert any(d.startswith("pkg.mod07.helper\n\n") for d in docs)
    assert not any("Too short" in d or "third party" in d for d in docs)


def test_from_stdlib_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_stdlib(tmp_path / "lib")
    monkeypatch.setattr(
        build_shards.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path / "lib")}
    )
    manifest = build_shards.main(
        [
            "--from-stdlib",
            "--out",
            str(tmp_path / "out"),
            "--vocab-size",
            "400",
            "--val-docs",
            "5",
            "--workers",
            "1",
        ]
    )
    assert manifest["val"]["docs"] == 5 and manifest["train"]["docs"] == 56
    assert manifest["sources"][0]["kind"] == "python-stdlib-docstrings"


# ----------------------------------------------------------------------------
# cached_challenge_fineweb.py against a stand-in hub
# ----------------------------------------------------------------------------
REPO = "test/parameter-golf"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build_shards.train_tokenizer(make_docs(30, seed=5), 400, 1)


@pytest.fixture
def hub(tmp_path: Path, tiny_model: bytes) -> Path:
    """Folder whose layout is the hub's URL space: datasets/<repo>/resolve/main/<path>."""
    base = tmp_path / "hub"
    repo_root = base / "datasets" / REPO / "resolve" / "main" / "datasets"
    shard_dir = repo_root / "datasets" / "fineweb10B_sp1024"
    shard_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_shard(shard_dir / "fineweb_val_000000.bin", rng.integers(0, 1024, 500))
    for i in range(3):
        write_shard(shard_dir / f"fineweb_train_{i:06d}.bin", rng.integers(0, 1024, 800 + i))
    (repo_root / "tokenizers").mkdir()
    (repo_root / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(tiny_model)
    (repo_root / "tokenizers" / "fineweb_1024_bpe.vocab").write_text("<unk>\t0\n")
    manifest = {
        "datasets": [
            {
                "name": "fineweb10B_sp1024",
                "tokenizer_name": "sp_bpe_1024",
                "stats": {"files_train": 3, "files_val": 1},
            }
        ],
        "tokenizers": [
            {
                "name": "sp_bpe_1024",
                "model_path": "tokenizers/fineweb_1024_bpe.model",
                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
            }
        ],
    }
    (repo_root / "manifest.json").write_text(json.dumps(manifest))
    return base


def hub_file(hub: Path, relative: str) -> Path:
    return hub / "datasets" / REPO / "resolve" / "main" / "datasets" / relative


def run_download(endpoint: str, out: Path, *extra: str) -> list[Path]:
    return downloader.main(
        [
            "--endpoint",
            endpoint,
            "--repo-id",
            REPO,
            "--out",
            str(out),
            "--backend",
            "urllib",
            "--variant",
            "sp1024",
            *extra,
        ]
    )


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the stand-in tree, records GETs, and sends the two headers huggingface_hub needs
    to accept a server as a hub (a commit id, and an ETag that changes with the content)."""

    requests: list[str]

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.requests.append(self.path)
        super().do_GET()

    def end_headers(self) -> None:
        file = Path(self.translate_path(self.path))
        if file.is_file():
            self.send_header("X-Repo-Commit", "0" * 40)
            self.send_header("ETag", f'"{hashlib.sha256(file.read_bytes()).hexdigest()}"')
        super().end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_hub(hub: Path):
    handler = type("Handler", (RecordingHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(hub))
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    server.shutdown()
    server.server_close()


def test_download_from_file_endpoint(hub: Path, tmp_path: Path) -> None:
    paths = run_download(f"file://{hub}", tmp_path / "data", "--train-shards", "2")
    names = [p.relative_to(tmp_path / "data").as_posix() for p in paths]
    assert names == [
        "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
        "datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
        "datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
        "tokenizers/fineweb_1024_bpe.model",
        "tokenizers/fineweb_1024_bpe.vocab",
    ]
    for path, name in zip(paths, names, strict=True):
        assert path.read_bytes() == hub_file(hub, name).read_bytes()
    assert (tmp_path / "data" / "manifest.json").exists()
    assert not list((tmp_path / "data").rglob("*.part"))
    assert downloader.pick_backend("auto", f"file://{hub}") == "urllib"


def test_resume_fetches_only_missing_or_broken(
    http_hub: tuple[str, list[str]], tmp_path: Path
) -> None:
    endpoint, requests = http_hub
    out = tmp_path / "data"
    paths = run_download(endpoint, out, "--train-shards", "3")
    assert len(requests) == 1 + 6  # manifest + 4 shards + 2 tokenizer files
    requests.clear()
    paths[1].unlink()  # lost
    paths[2].write_bytes(paths[2].read_bytes()[:-2])  # truncated: size no longer matches the header
    run_download(endpoint, out, "--train-shards", "3")
    assert sorted(r.rsplit("/", 1)[1] for r in requests) == [
        "fineweb_train_000000.bin",
        "fineweb_train_000001.bin",
        "manifest.json",
    ]
    read_shard(paths[1]), read_shard(paths[2])


def test_bad_shard_header_is_refused(hub: Path, tmp_path: Path) -> None:
    bad = hub_file(hub, "datasets/fineweb10B_sp1024/fineweb_train_000001.bin")
    raw = bytearray(bad.read_bytes())
    raw[0] ^= 0xFF  # magic
    bad.write_bytes(bytes(raw))
    with pytest.raises(SystemExit, match="fineweb_train_000001.bin"):
        run_download(f"file://{hub}", tmp_path / "data", "--train-shards", "3")
    shard_dir = tmp_path / "data" / "datasets" / "fineweb10B_sp1024"
    assert (shard_dir / "fineweb_train_000000.bin").exists()
    assert not (shard_dir / "fineweb_train_000001.bin").exists()
    assert not list(shard_dir.glob("*.part"))


def test_manifest_rules(hub: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="has 3 train shards"):
        run_download(f"file://{hub}", tmp_path / "a", "--train-shards", "4")
    with pytest.raises(SystemExit, match="kevclark/parameter-golf"):
        downloader.main(
            [
                "--endpoint",
                f"file://{hub}",
                "--repo-id",
                REPO,
                "--out",
                str(tmp_path / "b"),
                "--backend",
                "urllib",
                "--variant",
                "sp8192",
            ]
        )
    hub_file(hub, "manifest.json").unlink()  # no manifest: the built-in layout, one val shard
    paths = run_download(f"file://{hub}", tmp_path / "c", "--train-shards", "1")
    assert [p.name for p in paths][:2] == ["fineweb_val_000000.bin", "fineweb_train_000000.bin"]


def test_offline_message(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SystemExit, match="offline"):
        run_download(f"http://127.0.0.1:{port}", tmp_path / "data", "--train-shards", "1")


def test_hub_backend(
    hub: Path, http_hub: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The huggingface_hub path against the same stand-in (skipped where it is not installed)."""
    pytest.importorskip("huggingface_hub")
    # Effective if huggingface_hub is not imported yet.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    endpoint, requests = http_hub
    out = tmp_path / "data"
    paths = downloader.main(
        [
            "--endpoint",
            endpoint,
            "--repo-id",
            REPO,
            "--out",
            str(out),
            "--backend",
            "hub",
            "--variant",
            "sp1024",
            "--train-shards",
            "1",
        ]
    )
    assert [p.name for p in paths][:2] == ["fineweb_val_000000.bin", "fineweb_train_000000.bin"]
    for path in paths:
        assert path.read_bytes() == hub_file(hub, path.relative_to(out).as_posix()).read_bytes()
    assert any(r.endswith("manifest.json") for r in requests)
