"""Evaluation: sliding windows score every target exactly once, inside
its document; stride == sequence length is the flat evaluation; the audit dump reproduces val_bpb.
"""

import math

import numpy as np
import pytest
import torch

import train_gpt as tg

CPU = torch.device("cpu")
VOCAB = 64
CFG = tg.ModelConfig(
    vocab_size=VOCAB,
    num_layers=4,
    model_dim=32,
    num_heads=4,
    num_kv_heads=2,
    rope_dims=4,
    loop_start=1,
    loop_end=1,
    num_loops=1,
    parallel_start_layer=3,
)


def stream(doc_lens: list[int], seed: int = 0) -> np.ndarray:
    """[BOS] + random non-BOS ids per document, back to back."""
    rng = np.random.default_rng(seed)
    return np.concatenate([[tg.BOS_ID, *rng.integers(4, VOCAB, n - 1)] for n in doc_lens]).astype(
        np.uint16
    )


DOCS = [1, 5, 40, 16, 17, 100, 3, 64, 2]


@pytest.mark.parametrize("seq_len, stride", [(16, 4), (16, 16), (7, 3), (32, 1), (200, 8)])
def test_windows_score_every_target_once_inside_its_document(seq_len, stride):
    tokens = stream(DOCS)
    windows = tg.eval_windows(tokens, seq_len, stride)
    scored = sorted(t for _, end, first in windows for t in range(first + 1, end + 1))
    assert scored == list(range(1, tokens.size))  # every target (token index) exactly once
    doc_start = np.maximum.accumulate(np.where(tokens == tg.BOS_ID, np.arange(tokens.size), 0))
    for start, end, first in windows:
        assert end - start <= seq_len and start <= first < end
        assert doc_start[start] == doc_start[end - 1]  # inputs never cross a document
        for t in range(first, end):  # input t predicts token t + 1: its context is [start, t]
            assert t - start + 1 >= min(t - doc_start[t] + 1, seq_len - stride + 1)


def test_stride_equal_to_seq_len_gives_the_flat_rows():
    tokens = stream(DOCS)
    flat, same = tg.pack_val_rows(tokens, 16, 64), tg.pack_val_rows(tokens, 16, 64, stride=16)
    assert len(flat) == len(same)
    for a, b in zip(flat, same, strict=True):
        assert all(
            torch.equal(u, v)
            for u, v in zip((a.x, a.y, a.starts, a.pos), (b.x, b.y, b.starts, b.pos), strict=True)
        )


@pytest.mark.parametrize("stride", [0, 4])
def test_rows_carry_each_target_once_with_its_stream_index(stride):
    tokens = stream(DOCS, seed=1)
    rows = tg.pack_val_rows(tokens, 16, 48, stride=stride)
    pos = torch.cat([r.pos[r.y >= 0] for r in rows]).numpy()
    ys = torch.cat([r.y[r.y >= 0] for r in rows]).numpy()
    assert sorted(pos.tolist()) == list(range(1, tokens.size))
    assert np.array_equal(ys, tokens[pos])
    for r in rows:  # every window is its own piece: a piece start wherever a window begins
        assert r.x.shape == (1, 48) and bool(r.starts[0, 0])


def random_model(seed: int = 0) -> tg.GPT:
    torch.manual_seed(seed)
    model = tg.GPT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p.float()) * 0.1)
    return model


def fake_luts(seed: int = 0) -> tg.ByteLuts:
    g = torch.Generator().manual_seed(seed)
    boundary = torch.zeros(VOCAB, dtype=torch.bool)
    boundary[:4] = True
    base = torch.where(boundary, 0, torch.randint(1, 5, (VOCAB,), generator=g)).to(torch.int16)
    return tg.ByteLuts(base, torch.rand(VOCAB, generator=g) < 0.3, boundary)


SOLO = tg.DistEnv(0, 1, 0, CPU)  # one process, no process group


def scoring_pass(model, hp, val, adapted=None) -> tg.ScoringPass:
    """A pass over `val` in rows of 128 tokens (EVAL_SEQ_LEN of hp) on one CPU process."""
    geo = tg.batch_geometry(hp, 1, "math", eval_row=128)
    quiet = tg.Logger(None, False)
    return tg.ScoringPass(adapted or model, model, val, hp.eval, geo, SOLO, True, tg.Work(1), quiet)


def sliding_score(tokens: np.ndarray, row_tokens: int, world: int, **kw) -> dict:
    """Evaluate with the rows split contiguously over `world` fake ranks, sums added by hand."""
    rows = tg.pack_val_rows(tokens, 16, row_tokens, stride=4)
    share = -(-len(rows) // world)
    model, sums = random_model(), np.zeros(3)
    for r in range(world):
        val = tg.ValData((), fake_luts(), rows[r * share : (r + 1) * share])
        out = tg.evaluate(model, val, looping=True, dist_env=SOLO, sliding=True, **kw)
        sums += [out["val_loss"] * out["val_tokens"], out["val_tokens"], out["val_bytes"]]
    return dict(val_loss=sums[0] / sums[1], val_tokens=sums[1], val_bytes=sums[2])


def test_sliding_score_does_not_depend_on_rows_or_ranks():
    tokens = stream(DOCS * 3, seed=2)
    a, b, c = (
        sliding_score(tokens, 32, 1),
        sliding_score(tokens, 96, 1),
        sliding_score(tokens, 32, 3),
    )
    assert a["val_tokens"] == b["val_tokens"] == c["val_tokens"] == tokens.size - 1
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert a["val_loss"] == pytest.approx(c["val_loss"], rel=1e-5)


def test_dump_reproduces_val_bpb(tmp_path):
    tokens = stream(DOCS * 2, seed=3)
    val = tg.ValData((), fake_luts(), tg.pack_val_rows(tokens, 16, 64, stride=4))
    out = tg.evaluate(
        random_model(), val, looping=True, dist_env=SOLO, sliding=True, dump=tmp_path / "d.npz"
    )
    dump = np.load(tmp_path / "d.npz")
    assert dump["nll"].dtype == np.float32 and dump["bytes"].dtype == np.int16
    assert len(dump["nll"]) == len(dump["bytes"]) == tokens.size - 1
    assert int(dump["bytes"].sum()) == out["val_bytes"]
    bpb = dump["nll"].astype(np.float64).sum() / math.log(2) / dump["bytes"].sum()
    assert bpb == pytest.approx(out["val_bpb"], rel=1e-6)


def test_main_reports_ttt_as_the_final_score(tiny_run):
    _, final, _ = tiny_run
    assert final["val_bpb"] == final["ttt_val_bpb"]  # TTT (phased in TINY_ENV) runs last
    assert final["ttt_val_bpb"] != final["sliding_val_bpb"] and "sliding_val_bpb" in final
    assert final["eval_time_ms"] > 0 and final["val_tokens"] > 0


# ---------------- score-first TTT -----------------------------------------------------------------
def ttt_run(tokens: np.ndarray, tmp_path, **eval_overrides) -> tuple[dict, np.ndarray]:
    """eval_ttt of a fixed random model on `tokens`; returns the metrics and the dumped nll."""
    env = dict(
        EVAL_SEQ_LEN="32", EVAL_STRIDE="8", TTT_CHUNK_TOKENS="64", TTT_EPOCHS="2", TTT_LR="0.05"
    )
    env.update({k: str(v) for k, v in eval_overrides.items()})
    hp = tg.Hyperparameters.from_env(env)
    model = random_model()
    val = tg.ValData(tg.pack_val_rows(tokens, 32, 128), fake_luts())
    out = tg.eval_ttt(tg.ttt_mode(scoring_pass(model, hp, val), None), dump=tmp_path / "ttt.npz")
    return out, np.load(tmp_path / "ttt.npz")["nll"]


def test_ttt_scores_every_target_before_any_update_with_it(tmp_path, monkeypatch):
    """Scoring forwards are the ones whose nll reaches score_batch (they run with gradients on, to
    share the training graph); every other forward trains. Fails on a copy that steps before scoring
    its chunk."""
    tokens = stream(DOCS * 2, seed=4)
    events, train_shapes, forward, score_batch = [], set(), tg.forward_nll, tg.score_batch

    def recording(model, batch, **kw):  # every forward starts as a training event
        events.append(["train", set(batch.pos[batch.y >= 0].tolist())])
        train_shapes.add(tuple(batch.x.shape))
        return forward(model, batch, **kw)

    def scoring(nll, batch, *args):
        assert events[-1][1] == set(batch.pos[batch.y >= 0].tolist())
        events[-1][0] = "score"
        return score_batch(nll, batch, *args)

    monkeypatch.setattr(tg, "forward_nll", recording)
    monkeypatch.setattr(tg, "score_batch", scoring)
    out, nll = ttt_run(tokens, tmp_path)
    scored: list[int] = []
    for i, (kind, targets) in enumerate(events):
        if kind == "train":
            assert targets and targets <= set(scored), "trained on a target not yet scored"
        else:
            trained = set().union(*(t for k, t in events[:i] if k == "train"))
            assert not targets & trained, "scored a target after training on it"
            scored += targets
    assert sorted(scored) == list(range(1, tokens.size))  # every target once
    last_chunk_start = ((tokens.size - 2) // 64) * 64 + 1
    # The last chunk is never trained on.
    assert max(max(t) for k, t in events if k == "train") < last_chunk_start
    assert len(nll) == tokens.size - 1 and out["val_tokens"] == tokens.size - 1
    # Scoring and training rows, the last chunk's too: one compiled graph.
    assert len(train_shapes) == 1


@pytest.mark.parametrize(
    "chunk,seq_len,size",
    [
        (64, 32, 128),
        (32768, 2048, 4096),
        (1000, 128, 128),
        (100_000, 2048, 12544),
        (4096, 2048, 2048),
    ],
)
def test_ttt_row_size_is_an_eighth_of_a_chunk_and_holds_a_window(chunk, seq_len, size):
    """Not a function of the world size (it takes none): 1 and 2 ranks cut the same rows."""
    assert tg.ttt_row_size(tg.EvalConfig(ttt_chunk_tokens=chunk), seq_len) == size


def test_work_counts_the_busiest_rank():
    work = tg.Work(world=1)
    work.add([4096] * 3)  # a chunk of 3 rows: 8 GPUs take 1 each, 3x faster, not 8x
    assert work.busiest == {1: 3 * 4096, 8: 4096} and work.speedup() == 3
    # Round-robin from rank 7: rank 7 gets rows 0 and 8.
    work.add([10, 1, 1, 1, 1, 1, 1, 1, 1], first=7)
    assert work.busiest[8] == 4096 + 11 and work.busiest[1] == 3 * 4096 + 18
    two = tg.Work(world=2)
    two.add([5] * 16)
    assert two.busiest == {2: 40, 8: 10} and two.speedup() == 4


@pytest.mark.parametrize("p", [70, 100, 191])
def test_ttt_losses_before_a_change_are_bit_identical(tmp_path, p):
    tokens = stream(DOCS * 2, seed=5)
    changed = tokens.copy()
    changed[p:] = np.random.default_rng(9).integers(1, VOCAB, tokens.size - p)  # BOS may move too
    _, a = ttt_run(tokens, tmp_path / "a" if (tmp_path / "a").mkdir() is None else None)
    _, b = ttt_run(changed, tmp_path / "b" if (tmp_path / "b").mkdir() is None else None)
    assert np.array_equal(a[: p - 1], b[: p - 1])  # targets 1..p-1 depend only on tokens before p
    assert not np.array_equal(a, b)


def sliding_eval(tokens: np.ndarray) -> dict:
    """The random model's sliding-window score: windows of 32, stride 8, rows of 128."""
    val = tg.ValData((), fake_luts(), tg.pack_val_rows(tokens, 32, 128, stride=8))
    return tg.evaluate(random_model(), val, looping=True, dist_env=SOLO, sliding=True)


def test_ttt_with_zero_lr_equals_the_sliding_score(tmp_path):
    tokens = stream(DOCS * 2, seed=6)
    out, _ = ttt_run(tokens, tmp_path, TTT_LR=0)
    sliding = sliding_eval(tokens)
    assert out["val_loss"] == pytest.approx(sliding["val_loss"], rel=1e-6)


# ---------------- per-document LoRA and phased TTT ------------------------------------------------
LORA_ENV = dict(
    EVAL_SEQ_LEN=32,
    EVAL_STRIDE=8,
    TTT_LORA_CHUNK=8,
    TTT_BATCH_DOCS=4,
    TTT_LORA_RANK=4,
    TTT_LORA_LR=0.02,
    TTT_CHUNK_TOKENS=64,
    TTT_PREFIX_DOCS=12,
    TTT_PHASES=2,
    TTT_GLOBAL_LR=0.05,
)
LORA_DOCS = [1, 5, 40, 16, 17, 100, 3, 64, 2, 30, 9, 33]


def lora_run(
    tokens: np.ndarray, tmp_path, mode: str = "lora", record: list | None = None, **overrides
) -> tuple[dict, np.ndarray]:
    """eval_lora_ttt of a fixed random model; returns the metrics and the dumped nll. With record,
    appends ("score", target indices, shape) per scored batch, ("lora", targets, shape) per adapter
    step (the targets whose nll gets a gradient) and ("train", ...) per global SGD row."""
    hp = tg.Hyperparameters.from_env(
        {k: str(v) for k, v in dict(LORA_ENV, TTT_MODE=mode, **overrides).items()}
    )
    model, patch = random_model(), pytest.MonkeyPatch()
    geo = tg.batch_geometry(hp, 1, "math", eval_row=128)
    log = tg.Logger(None, False)
    # Uncompiled on the CPU: the model itself.
    lora = tg.warmup_graphs(model, model, hp.eval, geo, SOLO, looping=True, compiled=False, log=log)
    adapted = model
    if record is not None:
        score_batch, forward_nll, last = tg.score_batch, tg.forward_nll, []

        def scoring(nll, batch, *args):
            record.append(("score", set(batch.pos[batch.y >= 0].tolist()), tuple(batch.x.shape)))
            last[:] = [batch.pos]
            return score_batch(nll, batch, *args)

        # The model, its adapted nll watched.
        def adapted(ids, targets, starts, *, looping, adapter=None, **pieces):
            nll = model(ids, targets, starts, looping=looping, adapter=adapter, **pieces)
            # Backward comes after scoring: last holds this batch's target indices.
            if adapter is not None:
                nll.register_hook(lambda g: record.append(("lora", trained(g), tuple(g.shape))))
            return nll

        def trained(
            g: torch.Tensor,
        ) -> set:  # a step before this batch was scored trains on "unscored" targets
            return (
                set(last[0][g != 0].tolist()) if last and last[0].shape == g.shape else {"unscored"}
            )

        def training(model, batch, **kw):
            if kw.get("adapter") is None:  # a global SGD row, not a LoRA chunk's scoring forward
                assert torch.is_grad_enabled()
                targets = set(batch.pos[batch.y >= 0].tolist())
                record.append(("train", targets, tuple(batch.x.shape)))
            return forward_nll(model, batch, **kw)

        patch.setattr(tg, "score_batch", scoring)
        patch.setattr(tg, "forward_nll", training)
    val = tg.ValData(tg.pack_val_rows(tokens, 32, 128), fake_luts())
    try:
        mode = tg.ttt_mode(scoring_pass(model, hp, val, adapted), lora)
        out = tg.eval_ttt(mode, dump=tmp_path / "lora.npz")
    finally:
        patch.undo()
    return out, np.load(tmp_path / "lora.npz")["nll"]


def test_fresh_lora_adds_exactly_zero():
    """A fresh adapter (B = 0) is the identity: a document's first chunk is scored by the model."""
    lora = tg.LoRA(CFG, 5, 3, 4, 144.0)
    lora.reset([7, 8, 9])
    # Slots start independent, as in the records (not one reseeded draw)
    for slot in (
        "k",
        "v",
        "o",
        "mlp",
    ):
        assert not torch.equal(
            lora.a[slot][:, 0, :, : CFG.model_dim], lora.a["q"][:, 0, :, : CFG.model_dim]
        )
    x = torch.randn(3, 16, CFG.model_dim)
    for slot in ("q", "k", "v", "o", "mlp", "head"):
        assert torch.count_nonzero(lora(slot, 0, x)) == 0
    ids = torch.from_numpy(stream([16, 16, 16], seed=1).astype(np.int64)).view(3, 16)
    model = random_model()
    with torch.no_grad():
        assert torch.equal(
            model(ids, ids, None, looping=True, adapter=lora), model(ids, ids, None, looping=True)
        )
    other = tg.LoRA(CFG, 5, 3, 4, 144.0)
    other.reset([9, 8, 7])  # the same document draws the same A in any row
    assert torch.equal(other.a["q"][:, 0], lora.a["q"][:, 2])


@pytest.mark.parametrize("mode", ["lora", "phased"])
def test_lora_ttt_scores_every_target_once_and_trains_only_on_scored_ones(tmp_path, mode):
    tokens = stream(LORA_DOCS * 2, seed=7)
    record: list = []
    out, nll = lora_run(tokens, tmp_path, mode, record)
    scored: list[int] = []
    for kind, targets, _ in record:
        if kind == "score":
            scored += targets
        else:
            assert targets and targets <= set(scored), f"{kind} step on a target not yet scored"
    assert sorted(scored) == list(range(1, tokens.size)) and len(nll) == tokens.size - 1
    assert sum(k == "lora" for k, _, _ in record) >= len(LORA_DOCS)  # the adapters did learn
    assert out["val_tokens"] == tokens.size - 1
    assert any(k == "train" for k, _, _ in record) == (mode == "phased")
    widths = {shape[1] for k, _, shape in record if k == "score"}
    assert widths == {16, 32}  # TTT_LORA_WIDTHS=2: EVAL_SEQ_LEN and half of it, one graph each


@pytest.mark.parametrize("mode", ["lora", "phased"])
@pytest.mark.parametrize("p", [70, 200, 401])
def test_lora_ttt_losses_before_a_change_are_bit_identical(tmp_path, mode, p):
    tokens = stream(LORA_DOCS * 2, seed=8)
    changed = tokens.copy()
    changed[p:] = np.random.default_rng(9).integers(1, VOCAB, tokens.size - p)  # BOS may move too
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _, a = lora_run(tokens, tmp_path / "a", mode)
    _, b = lora_run(changed, tmp_path / "b", mode)
    assert np.array_equal(a[: p - 1], b[: p - 1])  # targets 1..p-1 depend only on tokens before p
    assert not np.array_equal(a, b)


def test_lora_ttt_with_zero_lr_is_a_document_sliding_window_eval(tmp_path):
    """No learning, no phases = sliding windows of stride TTT_LORA_CHUNK, and the
    adapters change the score once they learn; the first chunk of every document is unchanged."""
    tokens = stream(LORA_DOCS * 2, seed=6)
    frozen, nll0 = lora_run(tokens, tmp_path, TTT_LORA_LR=0)
    sliding = sliding_eval(tokens)
    assert frozen["val_loss"] == pytest.approx(sliding["val_loss"], rel=1e-5)
    (tmp_path / "lr").mkdir()
    learning, nll1 = lora_run(tokens, tmp_path / "lr")
    assert learning["val_loss"] != frozen["val_loss"]
    first = [t - 1 for d, e in tg.doc_spans(tokens) for t in range(d + 1, min(d + 8, e) + 1)]
    assert np.array_equal(nll0[first], nll1[first])


def test_lora_width_is_the_narrowest_static_width_that_holds_the_window():
    assert [tg.lora_width(w, 2048, 2) for w in (1, 48, 1024, 1025, 2048)] == [
        1024,
        1024,
        1024,
        2048,
        2048,
    ]
    assert tg.lora_width(100, 2048, 1) == 2048 and tg.lora_width(100, 2048, 4) == 256
