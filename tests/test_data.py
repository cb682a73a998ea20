"""Section 4 (Data): shards, documents, the packing loader, validation rows and the byte
LUTs of the bpb metric."""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MICRO_MODEL

import train_gpt as tg
from train_gpt import BOS_ID, DistEnv, TrainLoader

CPU = torch.device("cpu")
# Text that SentencePiece must spell with byte-fallback pieces in a 1024-piece vocabulary, plus
# accents, digits, punctuation and symbols (none of the strings starts with whitespace).
SPECIAL_TEXTS = [
    "Café au lait costs €5 🙂 — naïve Zürich, 日本語 and x² «quote» 3.14159",
    "🙂🙃 emoji only 🚀",
    "Ærøskøbing: ǅ ǈ Ǳ ﬁ (ligature) and ½ ⅓ — NFKC changes some of these",
    "Line one\nLine two\twith a tab   and  spaces",
    "1999-2024: 123456789 digits split one by one",
]


# ---------------- shards --------------------------------------------------------------------------
def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 2**16, size=12_345, dtype=np.uint16)
    tokens[:2] = (0, 2**16 - 1)
    path = tmp_path / "fineweb_train_000000.bin"
    tg.write_shard(path, tokens)
    assert path.stat().st_size == 4 * tg.HEADER_WORDS + 2 * tokens.size
    header = np.fromfile(path, dtype="<i4", count=tg.HEADER_WORDS)
    assert list(header[:3]) == [20240520, 1, tokens.size] and not header[3:].any()
    out = tg.read_shard(path)
    assert out.dtype == np.uint16 and np.array_equal(out, tokens)


def test_write_shard_rejects_ids_outside_uint16(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        tg.write_shard(tmp_path / "x.bin", np.array([1, 70_000]))


def _corrupt(path: Path, word: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[4 * word : 4 * word + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage", ["magic", "version", "truncated", "too_long", "header_only_part"]
)
def test_bad_shard_raises_naming_the_file(tmp_path, damage):
    path = tmp_path / f"fineweb_val_{damage}.bin"
    tg.write_shard(path, np.arange(1000, dtype=np.uint16))
    if damage == "magic":
        _corrupt(path, 0, 12345)
    elif damage == "version":
        _corrupt(path, 1, 2)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "too_long":
        path.write_bytes(path.read_bytes() + b"\0\0")
    else:
        path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=str(path)):
        tg.read_shard(path)


def test_shard_paths_sorted_and_skip_byte_sidecars(tmp_path):
    for name in (
        "fineweb_val_000001.bin",
        "fineweb_val_000000.bin",
        "fineweb_val_bytes_000000.bin",
        "fineweb_train_000000.bin",
    ):
        tg.write_shard(tmp_path / name, np.array([BOS_ID, 5, 6], dtype=np.uint16))
    assert [p.name for p in tg.shard_paths(tmp_path, "val")] == [
        "fineweb_val_000000.bin",
        "fineweb_val_000001.bin",
    ]
    assert [p.name for p in tg.shard_paths(tmp_path, "train")] == ["fineweb_train_000000.bin"]


def test_shard_paths_errors(tmp_path):
    tg.write_shard(
        tmp_path / "fineweb_val_bytes_000000.bin", np.array([BOS_ID, 5], dtype=np.uint16)
    )
    with pytest.raises(tg.ConfigError, match="DATA_PATH.*fineweb_val_"):
        tg.shard_paths(tmp_path, "val")  # a sidecar alone is not a shard
    with pytest.raises(tg.ConfigError, match="DATA_PATH"):
        tg.shard_paths(tmp_path / "missing", "train")


# ---------------- documents -----------------------------------------------------------------------
def test_tokenizer_ids_and_document_concatenation(sp):
    """[BOS]+doc back to back, no EOS; splitting at BOS recovers the documents."""
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, BOS_ID, 2, 3)
    doc1, doc2 = "The first toy document.", "A second one, with 42 digits and é."
    ids1, ids2 = sp.encode(doc1), sp.encode(doc2)
    assert BOS_ID not in ids1 + ids2
    tokens = np.array([BOS_ID, *ids1, BOS_ID, *ids2], dtype=np.uint16)
    assert tokens.tolist() == [1, *ids1, 1, *ids2]
    docs = np.split(tokens, np.flatnonzero(tokens == BOS_ID))[1:]
    assert [sp.decode(d[1:].tolist()) for d in docs] == [doc1, doc2]


def test_val_shard_holds_the_validation_documents(tiny_data, sp):
    tokens = tg.load_val_tokens(tiny_data.path)
    docs = np.split(tokens, np.flatnonzero(tokens == BOS_ID))[1:]
    assert len(docs) == len(tiny_data.val_docs)
    assert [d[1:].tolist() for d in docs] == tiny_data.val_ids


# ---------------- segment_starts ------------------------------------------------------------------
def naive_segment_starts(x: np.ndarray, max_len: int) -> np.ndarray:
    out, since = np.zeros(x.shape, dtype=bool), 0
    for i, token in enumerate(x):
        since = 0 if (i == 0 or token == BOS_ID) else since + 1
        out[i] = since % max_len == 0
    return out


@pytest.mark.parametrize("max_len", [1, 7, 32, 10_000])
def test_segment_starts(max_len):
    rng = np.random.default_rng(max_len)
    x = rng.integers(2, 50, size=600).astype(np.uint16)
    x[rng.choice(600, size=12, replace=False)] = BOS_ID
    x[[0, 3, 4]] = (7, BOS_ID, BOS_ID)  # position 0 is not a BOS; two BOS in a row
    expected = naive_segment_starts(x, max_len)
    got_np = tg.segment_starts(x, max_len)
    got_torch = tg.segment_starts(torch.from_numpy(x.astype(np.int64))[None], max_len)
    assert np.array_equal(got_np, expected)
    assert np.array_equal(got_torch[0].numpy(), expected)
    assert got_np[0] and got_np[x == BOS_ID].all()


# ---------------- TrainLoader ---------------------------------------------------------------------
SHARD_STRIDE = 20_000


def counter_shards(folder: Path, sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    """Shards whose token at position p of shard s is 2 + s*20000 + p (so any slice can be located),
    except BOS at every document start (documents of 20..300 tokens)."""
    rng = np.random.default_rng(seed)
    shards = []
    for s, size in enumerate(sizes):
        tokens = (2 + s * SHARD_STRIDE + np.arange(size)).astype(np.uint16)
        pos = 0
        while pos < size:
            tokens[pos] = BOS_ID
            pos += int(rng.integers(20, 300))
        tg.write_shard(folder / f"fineweb_train_{s:06d}.bin", tokens)
        shards.append(tokens)
    return shards


def locate(span: np.ndarray, shards: list[np.ndarray]) -> tuple[int, int]:
    """(shard, start) of a span that must be a contiguous slice of one shard."""
    j = int(np.flatnonzero(span != BOS_ID)[0])
    shard, pos = divmod(int(span[j]) - 2, SHARD_STRIDE)
    start = pos - j
    assert start >= 0 and start + span.size <= shards[shard].size, "span crosses a shard end"
    assert np.array_equal(shards[shard][start : start + span.size], span), "span is not contiguous"
    return shard, start


@contextlib.contextmanager
def loader(files, *, row=64, seq_len=32, accum=4, rank=0, world=1, seed=0):
    ld = TrainLoader(
        files,
        row_tokens=row,
        seq_len=seq_len,
        accum=accum,
        dist_env=DistEnv(rank, world, rank, CPU),
        seed=seed,
    )
    try:
        yield ld
    finally:
        ld.close()


def take(ld: TrainLoader, steps: int) -> list[list[tg.Batch]]:
    return [ld.next_batches() for _ in range(steps)]


def chunk(b: tg.Batch) -> np.ndarray:
    """The row+1 stream tokens a micro-batch was cut from."""
    return torch.cat([b.x[0], b.y[0, -1:]]).numpy()


@pytest.fixture
def shard_files(tmp_path):
    shards = counter_shards(tmp_path, [6000, 4000, 5000])
    return tg.shard_paths(tmp_path, "train"), shards


def test_loader_batches_are_shifted_pairs_with_piece_starts(shard_files):
    files, shards = shard_files
    with loader(files) as ld:
        steps = take(ld, 6)
    assert steps[0][0].x[0, 0] == BOS_ID  # the first span starts on a document
    for batches in steps:
        assert len(batches) == 4
        for b in batches:
            assert b.x.shape == b.y.shape == b.starts.shape == (1, 64) and b.x.dtype == torch.int64
            assert torch.equal(b.x[0, 1:], b.y[0, :-1])
            assert torch.equal(b.starts, tg.segment_starts(b.x, 32))
        span = np.concatenate([chunk(b) for b in batches])
        locate(span, shards)  # one contiguous slice of one shard


def test_loader_world2_ranks_partition_the_world1_step(shard_files):
    files, shards = shard_files
    with (
        loader(files, accum=4, world=1) as one,
        loader(files, accum=2, rank=0, world=2) as r0,
        loader(files, accum=2, rank=1, world=2) as r1,
    ):
        single, rank0, rank1 = take(one, 5), take(r0, 5), take(r1, 5)
    for step in range(5):
        ranks = (rank0[step], rank1[step])
        # Slice i -> rank i % world, micro i // world.
        merged = [ranks[i % 2][i // 2] for i in range(4)]
        for a, b in zip(merged, single[step], strict=True):
            assert (
                torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.starts, b.starts)
            )
        spans = [locate(chunk(b), shards) for b in merged]
        # disjoint and contiguous: slice i+1 starts right after slice i in the same shard
        assert all(s == spans[0][0] for s, _ in spans)
        assert [start - spans[0][1] for _, start in spans] == [i * 65 for i in range(4)]


def test_loader_wraps_around_and_is_seeded(shard_files):
    files, shards = shard_files
    total = sum(s.size for s in shards)
    with loader(files, seed=1) as a, loader(files, seed=1) as b, loader(files, seed=2) as c:
        first, same, other = take(a, 150), take(b, 150), take(c, 3)
    assert 2 * total < 150 * 4 * 65  # more than two passes over the data

    def flat(steps):
        return [chunk(x) for batches in steps for x in batches]

    assert all(np.array_equal(p, q) for p, q in zip(flat(first), flat(same), strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(flat(first[:3]), flat(other), strict=True))
    for batches in first:
        locate(np.concatenate([chunk(x) for x in batches]), shards)


def test_loader_recreated_restarts_at_the_first_batch(shard_files):
    files, _ = shard_files
    with loader(files, seed=3) as a:
        first = take(a, 3)
    with loader(files, seed=3) as b:
        again = b.next_batches()
    assert all(
        torch.equal(p.x, q.x) and torch.equal(p.y, q.y)
        for p, q in zip(first[0], again, strict=True)
    )
    assert not torch.equal(first[1][0].x, again[0].x)


def test_loader_reports_shard_without_bos(tmp_path):
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", np.full(5000, 7, dtype=np.uint16))
    with loader(tg.shard_paths(tmp_path, "train")) as ld, pytest.raises(ValueError, match="no BOS"):
        ld.next_batches()


HANG_PROBE = """
import sys, threading, numpy as np, torch
sys.path.insert(0, {root!r})
import train_gpt as tg
# 100 tokens < one 260-token span
tg.write_shard({path!r}, np.array([1] + [5] * 99, dtype=np.uint16))
ld = tg.TrainLoader([__import__("pathlib").Path({path!r})], row_tokens=64, seq_len=32, accum=4,
                    dist_env=tg.DistEnv(0, 1, 0, torch.device("cpu")), seed=0)
out = {{}}
def consume():
    try:
        ld.next_batches()
        out["result"] = "batch"
    except Exception as exc:
        out["result"] = type(exc).__name__
t = threading.Thread(target=consume, daemon=True)
t.start()
t.join(2)
print(out.get("result", "hang"))
import os; os._exit(0)
"""


def test_loader_with_data_smaller_than_a_step_raises(tmp_path):
    code = HANG_PROBE.format(
        root=str(Path(tg.__file__).parent), path=str(tmp_path / "fineweb_train_000000.bin")
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    assert out.strip() in ("ValueError", "ConfigError")


# ---------------- validation tokens and rows ------------------------------------------------------
def test_load_val_tokens_keeps_every_token(tmp_path):
    """N=10,000 tokens stay 10,000 (the records would keep floor((N-1)/2048)*2048+1 = 8,193)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 1000, size=10_000).astype(np.uint16)
    tokens[rng.choice(10_000, 30, replace=False)] = BOS_ID
    tokens[0] = BOS_ID
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", tokens[:6001])
    tg.write_shard(tmp_path / "fineweb_val_000001.bin", tokens[6001:])
    tg.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.ones(10_000, dtype=np.uint16))
    assert np.array_equal(tg.load_val_tokens(tmp_path), tokens)


def test_load_val_tokens_requires_a_leading_bos(tmp_path):
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", np.array([5, BOS_ID, 6], dtype=np.uint16))
    with pytest.raises(ValueError, match="BOS"):
        tg.load_val_tokens(tmp_path)


def piece_ranges(rows: list[tg.Batch]) -> list[tuple[int, int]]:
    """Stream ranges [a, b) of x covered by each non-padding piece, over all rows in order."""
    out, offset = [], 0
    for row in rows:
        n = int((row.y[0] >= 0).sum())
        starts = np.flatnonzero(row.starts[0, :n].numpy()).tolist() + [n]
        out += [(offset + a, offset + b) for a, b in itertools.pairwise(starts)]
        offset += n
    return out


@pytest.mark.parametrize(
    "seq_len, row_tokens", [(128, 256), (128, 512), (100, 128), (64, 1000), (256, 256)]
)
def test_pack_val_rows_scores_every_target_once(tiny_data, seq_len, row_tokens):
    tokens = tiny_data.val_tokens
    rows = tg.pack_val_rows(tokens, seq_len, row_tokens)
    scored_x = np.concatenate([r.x[0][r.y[0] >= 0].numpy() for r in rows])
    scored_y = np.concatenate([r.y[0][r.y[0] >= 0].numpy() for r in rows])
    assert sum(int((r.y >= 0).sum()) for r in rows) == tokens.size - 1
    assert np.array_equal(scored_y, tokens[1:]) and np.array_equal(scored_x, tokens[:-1])
    for r in rows:
        n = int((r.y[0] >= 0).sum())
        assert r.x.shape == (1, row_tokens) and (r.y[0, n:] == -1).all()  # padding only at the tail
        starts = np.flatnonzero(r.starts[0].numpy()).tolist() + [row_tokens]
        assert max(b - a for a, b in itertools.pairwise(starts)) <= min(seq_len, row_tokens)
        assert starts[0] == 0 and (n == row_tokens or r.starts[0, n])  # padding is its own piece
        assert r.starts[0][r.x[0] == BOS_ID].all()
    pieces = piece_ranges(rows)
    assert [a for a, _ in pieces] == np.flatnonzero(
        tg.segment_starts(tokens[:-1], min(seq_len, row_tokens))
    ).tolist()


def test_val_rows_pieces_do_not_depend_on_row_size(tiny_data):
    tokens = tiny_data.val_tokens
    assert piece_ranges(tg.pack_val_rows(tokens, 128, 256)) == piece_ranges(
        tg.pack_val_rows(tokens, 128, 640)
    )


def test_val_score_does_not_depend_on_row_size(tiny_data):
    """Same pieces in different rows give the same per-target nll (fp32 forward, random weights)."""
    torch.manual_seed(0)
    cfg = tg.ModelConfig(vocab_size=tiny_data.vocab_size, **MICRO_MODEL)
    model = tg.GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    tokens = tiny_data.val_tokens[:3000]

    def per_target_nll(row_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            rows = tg.pack_val_rows(tokens, 128, row_tokens)
            parts = [model(r.x, r.y, r.starts, looping=True)[r.y >= 0] for r in rows]
        return torch.cat(parts)

    a, b = per_target_nll(256), per_target_nll(384)
    assert a.shape == b.shape == (tokens.size - 1,)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---------------- byte LUTs -----------------------------------------------------------------------
def lut_bytes(luts: tg.ByteLuts, ids: list[int]) -> int:
    """Bytes credited to the targets of one document, BOS as the first context token."""
    seq = torch.tensor([BOS_ID, *ids])
    return int(luts.target_bytes(seq[:-1], seq[1:]).sum())


@pytest.fixture(scope="module")
def luts(sp):
    return tg.ByteLuts(*(torch.from_numpy(a) for a in tg.build_byte_luts(sp, sp.vocab_size())))


def test_byte_luts_credit_the_decoded_utf8_bytes(sp, luts, tiny_data):
    """The byte rule: sum of target bytes over [BOS]+ids == len(decode(ids).encode()) for every
    validation document and for text that needs byte fallback."""
    for text in SPECIAL_TEXTS + tiny_data.val_docs:
        ids = sp.encode(text)
        assert lut_bytes(luts, ids) == len(sp.decode(ids).encode("utf-8")), text[:40]


def test_byte_luts_cover_byte_fallback_and_boundaries(sp, luts):
    ids = sp.encode(SPECIAL_TEXTS[1])
    assert any(sp.is_byte(i) for i in ids)  # the emoji really went through byte fallback
    base, space, boundary = luts.base_bytes, luts.leading_space, luts.boundary
    assert boundary[[0, 1, 2, 3]].all() and (base[[0, 1, 2, 3]] == 0).all()
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and (base[byte_ids] == 1).all() and not space[byte_ids].any()
    space_id = sp.piece_to_id("\u2581")
    assert space[space_id] and base[space_id] == 0
    # a target after BOS gets no space byte; after an ordinary token it does
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    word = next(
        i for i, piece in enumerate(pieces) if piece.startswith("\u2581") and len(piece) > 2
    )
    x = torch.tensor([BOS_ID, 500])
    assert luts.target_bytes(x, torch.tensor([word, word])).tolist() == [
        int(base[word]),
        int(base[word]) + 1,
    ]


def test_byte_luts_refuse_a_vocabulary_mismatch(sp):
    with pytest.raises(tg.ConfigError, match=r"TOKENIZER_PATH.*VOCAB_SIZE"):
        tg.build_byte_luts(sp, sp.vocab_size() + 1)


def test_byte_luts_refuse_a_tokenizer_without_space_piece():
    class NoSpace:  # the part of the SentencePiece API build_byte_luts needs before it refuses
        def vocab_size(self):
            return 8

        def piece_to_id(self, piece):
            return 3

        def unk_id(self):
            return 3

    with pytest.raises(tg.ConfigError, match="TOKENIZER_PATH"):
        tg.build_byte_luts(NoSpace(), 8)


def test_byte_luts_refuse_a_tokenizer_that_keeps_leading_whitespace(tiny_data):
    """The rule drops a '\u2581' after BOS, right only when SentencePiece strips leading
    whitespace; with remove_extra_whitespaces=False the probe text's first space would go uncounted
    (bpb too low)."""
    import io

    import sentencepiece as spm
    from conftest import SPM_OPTIONS

    model = io.BytesIO()
    lines = [line for doc in tiny_data.val_docs for line in doc.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=400,
        num_threads=1,
        minloglevel=2,
        **dict(SPM_OPTIONS, remove_extra_whitespaces=False),
    )
    keeps = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with pytest.raises(tg.ConfigError, match="TOKENIZER_PATH.*remove_extra_whitespaces=False"):
        tg.build_byte_luts(keeps, keeps.vocab_size())


def test_load_tokenizer_luts(tiny_data):
    luts = tg.load_tokenizer_luts(str(tiny_data.tokenizer_path), tiny_data.vocab_size)
    assert luts.base_bytes.shape == (tiny_data.vocab_size,) and luts.boundary.dtype == torch.bool
    with pytest.raises(tg.ConfigError, match="TOKENIZER_PATH"):
        tg.load_tokenizer_luts(str(tiny_data.tokenizer_path) + ".missing", tiny_data.vocab_size)
