"""Section 5 (Model): shapes and counts, layer schedule, RoPE, XSA, gates, zero-init identity,
causality, document isolation, SmearGate BOS fix, attention backends, adapters, skips and lanes.

Properties that must hold for any weights are checked on randomised weights (the zero-initialised
projections would make most of them trivially true). Forwards run in fp32 without autocast.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL
from torch import nn

import train_gpt as tg
from train_gpt import BOS_ID, GPT, ModelConfig

TINY = ModelConfig(vocab_size=512, **TINY_MODEL)
MATH, FLEX = ("math", "math"), ("flex", "flex")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def randomize_(model: GPT, seed: int = 0) -> GPT:
    """Weights with every branch, gate, lane and skip active (no zero, no 0.5, no identity)."""
    g = torch.Generator().manual_seed(seed)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            if p is model.tok_emb.weight:
                p.copy_(0.5 * noise)
            elif id(p) in linear:
                p.copy_(noise / math.sqrt(p.shape[1]))
            else:
                p.add_(0.3 * noise)
        model.smear_lambda.fill_(0.8)
    return model


def tiny_model(seed: int = 0, backends=MATH, cfg: ModelConfig = TINY) -> GPT:
    torch.manual_seed(seed)
    return randomize_(GPT(cfg, backends).eval(), seed)


def random_ids(T: int, seed: int = 0, bos_at=(), vocab: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (1, T), generator=g)
    ids[0, list(bos_at)] = BOS_ID
    return ids


@pytest.fixture(scope="module")
def default_model():
    """GPT(ModelConfig()) at its default init. Orthogonal init is swapped for a Gaussian to save ~6
    s: nothing tested with this model depends on Q/K/V/up being orthogonal."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.init, "orthogonal_", lambda w: nn.init.normal_(w, std=w.shape[1] ** -0.5))
        torch.manual_seed(0)
        return GPT(ModelConfig()).eval()


# ---------------- shapes and counts ---------------------------------------------------------------
def test_default_parameter_count(default_model):
    """The records log 35,945,671 parameters, with lane scalars (2 resid + 4 post) for all 11
    layers; only the 3 parallel layers (8, 9, 10) own them here, 8 x 6 fewer. Each group is checked
    against its shapes."""
    d, L, V = 512, 11, 8192
    groups = {k: sum(p.numel() for p in ps) for k, ps in default_model.param_groups().items()}
    # Q, k, v, o, up, down.
    assert groups["matrices"] == L * (d * d + 2 * (256 * d) + d * d + 2 * (2048 * d))
    assert groups["embed"] == V * d
    assert groups["scalars"] == L * (d + d + 2 * d + 8 + 8 * 12) + 3 * (2 + 4) + 2 * 8 * d + 12 + 1
    assert sum(p.numel() for p in default_model.parameters()) == 35_945_671 - 8 * 6


def test_forward_shapes_and_loss(default_model):
    ids = random_ids(16, vocab=8192, bos_at=(0, 9))
    with torch.no_grad():
        logits = default_model(ids, looping=True)
        targets = ids.roll(-1, 1)
        targets[0, -1] = -1
        nll = default_model(ids, targets, looping=True)
    assert logits.shape == (1, 16, 8192) and logits.dtype == torch.float32
    assert nll.shape == (1, 16) and nll[0, -1] == 0
    ref = F.cross_entropy(logits[0, :-1], targets[0, :-1], reduction="none")
    torch.testing.assert_close(nll[0, :-1], ref)


def test_dtypes_after_init(default_model):
    """The tied embedding is bf16, every other parameter fp32."""
    for name, p in default_model.named_parameters():
        assert p.dtype == (torch.bfloat16 if name == "tok_emb.weight" else torch.float32), name


def test_param_groups_partition(default_model):
    groups = default_model.param_groups()
    linear = [m.weight for m in default_model.modules() if isinstance(m, nn.Linear)]
    assert len(groups["matrices"]) == 66 == 6 * 11
    assert {id(p) for p in groups["matrices"]} == {id(p) for p in linear}
    adam = groups["embed"] + groups["scalars"]
    assert not {id(p) for p in adam} & {id(p) for p in linear}
    assert groups["embed"] == [default_model.tok_emb.weight]
    everything = [id(p) for g in groups.values() for p in g]
    assert len(everything) == len(set(everything)) == len(list(default_model.parameters()))


# ---------------- depth recurrence ----------------------------------------------------------------
def test_layer_schedule_golden():
    cfg = ModelConfig()
    assert tg.layer_schedule(cfg, looping=True) == (
        [0, 1, 2, 3, 4, 5, 3, 4],
        [5, 3, 4, 5, 6, 7, 8, 9, 10],
    )
    assert tg.layer_schedule(cfg, looping=False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert tg.num_skips(cfg) == 8
    assert tg.layer_schedule(TINY, looping=True) == ([0, 1], [1, 2, 3])
    assert tg.layer_schedule(TINY, looping=False) == ([0, 1], [2, 3])
    r0405 = ModelConfig(loop_start=4, loop_end=5, num_loops=2)
    assert tg.layer_schedule(r0405, looping=True) == (
        [0, 1, 2, 3, 4, 5, 4],
        [5, 4, 5, 6, 7, 8, 9, 10],
    )


def test_looping_adds_no_parameters():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for looping in (False, True):
        model.zero_grad()
        model(random_ids(32), random_ids(32, seed=1), looping=looping).mean().backward()
        assert {k: v.shape for k, v in model.state_dict().items()} == {
            k: v.shape for k, v in before.items()
        }
    # looped, every parameter takes part in the forward
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---------------- RoPE ----------------------------------------------------------------------------
def test_partial_rope():
    g = torch.Generator().manual_seed(0)
    D, rope_dims = 16, 8
    pos = torch.tensor([[0, 1, 2, 5, 13, 100, 103, 2000]])
    cos, sin = tg.rope_tables(pos, rope_dims, 10000.0)
    assert cos.shape == (1, 8, rope_dims // 2) and cos.dtype == torch.float32
    x = torch.randn(1, 8, 3, D, generator=g)
    y = tg.apply_rope(x, cos, sin)
    assert torch.equal(y[..., rope_dims:], x[..., rope_dims:])  # dims >= rope_dims untouched
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[..., :rope_dims].norm(dim=-1), x[..., :rope_dims].norm(dim=-1))
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0: no rotation

    q, k = torch.randn(D, generator=g), torch.randn(D, generator=g)

    def score(p: int, r: int) -> float:
        c, s = tg.rope_tables(torch.tensor([[p, r]]), rope_dims, 10000.0)
        rq = tg.apply_rope(q.expand(1, 2, 1, D), c, s)[0, 0, 0]
        rk = tg.apply_rope(k.expand(1, 2, 1, D), c, s)[0, 1, 0]
        return float(rq[:rope_dims] @ rk[:rope_dims])

    assert (
        score(5, 2)
        == pytest.approx(score(3, 0), abs=1e-5)
        == pytest.approx(score(103, 100), abs=1e-4)
    )
    assert score(40, 40) == pytest.approx(score(0, 0), abs=1e-5)
    assert abs(score(5, 2) - score(9, 2)) > 1e-3


# ---------------- XSA and the output gate ---------------------------------------------------------
def test_xsa_output_orthogonal_to_own_value():
    g = torch.Generator().manual_seed(0)
    B, T, H, Hkv, D = 2, 5, 8, 4, 16
    y, v = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, Hkv, D, generator=g)
    out = tg.xsa(y, v)
    v_hat = F.normalize(v, dim=-1)
    for h in range(H):
        kv = h // (H // Hkv)  # GQA: query head h reads K/V head h // group
        assert (out[:, :, h] * v_hat[:, :, kv]).sum(-1).abs().max() < 1e-5
        removed = y[:, :, h] - out[:, :, h]  # the removed part is along v-hat
        torch.testing.assert_close(
            removed, (y[:, :, h] * v_hat[:, :, kv]).sum(-1, keepdim=True) * v_hat[:, :, kv]
        )
    torch.testing.assert_close(tg.xsa(out, v), out, atol=1e-6, rtol=0)


def attention_parts(monkeypatch, attn: tg.Attention, n: torch.Tensor, layout: tg.Layout):
    """(output, y before the gate) of one Attention forward, y captured at the xsa() call."""
    captured = {}
    real_xsa = tg.xsa

    def spy(y, v):
        captured["y"] = real_xsa(y, v)
        return captured["y"]

    monkeypatch.setattr(tg, "xsa", spy)
    out = attn(n, layout)
    return out, captured["y"]


def test_out_gate_zero_weight_is_exactly_half(monkeypatch):
    torch.manual_seed(0)
    attn = tg.Attention(TINY, xsa_on=True)
    with torch.no_grad():
        attn.proj.weight.normal_()
    assert not attn.out_gate.any()
    ids = random_ids(24, bos_at=(0, 10))
    n = torch.randn(1, 24, TINY.model_dim)
    with torch.no_grad():
        out, y = attention_parts(
            monkeypatch, attn, n, tg.make_layout(ids, tg.segment_starts(ids, 128), TINY, MATH)
        )
        assert torch.equal(out, attn.proj((y * 0.5).reshape(1, 24, -1)))
        attn.out_gate.normal_()  # nonzero gate: g = sigmoid(0.5 * W n[:12]) per head
        out, y = attention_parts(monkeypatch, attn, n, tg.make_layout(ids, None, TINY, MATH))
        gate = torch.sigmoid(0.5 * n[..., :12] @ attn.out_gate.T)
        torch.testing.assert_close(out, attn.proj((y * gate[..., None]).reshape(1, 24, -1)))


# ---------------- zero-init identity --------------------------------------------------------------
def identity_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """30 tanh(rms_norm(e_t) E^T / 30), with x0 rounded to bf16 as the bf16 embedding gives it."""
    E = model.tok_emb.weight
    x0 = tg.rms_norm(E[ids]).float()
    return 30 * torch.tanh(tg.rms_norm(x0) @ E.float().T / 30)


@pytest.mark.parametrize("looping", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_zero_init_logits_depend_on_current_token_only(looping, packed):
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    ids = random_ids(48, bos_at=(0, 20), vocab=40)  # small vocabulary: tokens repeat
    starts = tg.segment_starts(ids, 16) if packed else None
    with torch.no_grad():
        logits = model(ids, starts=starts, looping=looping)
    torch.testing.assert_close(logits, identity_logits(model, ids), atol=1e-6, rtol=1e-5)
    same = (ids[0, :, None] == ids[0, None, :]).nonzero()
    assert len(same) > 48  # some tokens repeat, and their logits are equal
    for a, b in same.tolist():
        torch.testing.assert_close(logits[0, a], logits[0, b], atol=1e-6, rtol=1e-5)


def test_zero_init_identity_default_config(default_model):
    ids = random_ids(24, vocab=8192, bos_at=(0, 7))
    with torch.no_grad():
        logits = default_model(ids, looping=True)
    assert default_model.smear_lambda.item() == 0.0  # SmearGate is the identity at init
    torch.testing.assert_close(logits, identity_logits(default_model, ids), atol=1e-6, rtol=1e-5)


# ---------------- causality and isolation ---------------------------------------------------------
CAUSAL_CASES = [
    pytest.param(MATH, False, 64, id="math-dense"),
    pytest.param(MATH, True, 64, id="math-packed"),
    pytest.param(FLEX, True, 128, id="flex-packed"),
    pytest.param(FLEX, False, 128, id="flex-dense"),
]


@pytest.mark.parametrize("backends, packed, T", CAUSAL_CASES)
@pytest.mark.parametrize("looping", [False, True])
def test_causality(backends, packed, T, looping):
    model = tiny_model(backends=backends)
    ids = random_ids(T, bos_at=(0, 21, 40))
    starts = tg.segment_starts(ids, 32) if packed else None
    with torch.no_grad():
        base = model(ids, starts=starts, looping=looping)
        for t in (9, 30, T - 1):
            changed = ids.clone()
            changed[0, t] = 3 + (ids[0, t] + 1) % 500
            out = model(
                changed, starts=tg.segment_starts(changed, 32) if packed else None, looping=looping
            )
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
            assert (out[:, t] - base[:, t]).abs().max() > 1e-3


@pytest.mark.parametrize("looping", [False, True])
def test_document_isolation(looping):
    """With pieces [a|b], outputs on b equal b alone and never depend on a."""
    model = tiny_model()
    a, b = random_ids(37, seed=1, bos_at=(0,)), random_ids(50, seed=2, bos_at=(0,))
    row = torch.cat([a, b], 1)
    with torch.no_grad():
        alone = model(b, starts=tg.segment_starts(b, 128), looping=looping)
        packed = model(row, starts=tg.segment_starts(row, 128), looping=looping)
        torch.testing.assert_close(packed[:, 37:], alone, atol=1e-5, rtol=1e-5)
        other = torch.cat([random_ids(37, seed=3, bos_at=(0,)), b], 1)
        changed = model(other, starts=tg.segment_starts(other, 128), looping=looping)
        torch.testing.assert_close(changed[:, 37:], packed[:, 37:], atol=1e-6, rtol=0)
        # No pieces: a is visible.
        dense = (
            model(row, looping=looping),
            model(other, looping=looping),
        )
        assert (dense[0][:, 37:] - dense[1][:, 37:]).abs().max() > 1e-3


def test_document_cut_into_pieces_restarts_positions():
    """A document longer than max_len is cut into pieces; each piece scores as if run alone."""
    model = tiny_model()
    doc = random_ids(70, bos_at=(0,))
    with torch.no_grad():
        whole = model(doc, starts=tg.segment_starts(doc, 32), looping=True)
        for lo, hi in ((0, 32), (32, 64), (64, 70)):
            piece = doc[:, lo:hi]
            alone = model(piece, starts=tg.segment_starts(piece, 32), looping=True)
            torch.testing.assert_close(whole[:, lo:hi], alone, atol=1e-5, rtol=1e-5)


def test_padding_piece_changes_nothing():
    """As validation rows do it: a padded tail that is its own piece leaves the real
    tokens' outputs unchanged."""
    model = tiny_model()
    doc = random_ids(40, bos_at=(0, 17))
    padded = torch.cat([doc, torch.zeros(1, 24, dtype=torch.long)], 1)
    starts = tg.segment_starts(padded, 32)
    starts[0, 40] = True
    with torch.no_grad():
        ref = model(doc, starts=tg.segment_starts(doc, 32), looping=True)
        out = model(padded, starts=starts, looping=True)
    torch.testing.assert_close(out[:, :40], ref, atol=1e-5, rtol=1e-5)


# ---------------- FlashAttention dispatch on the CPU ----------------------------------------------
# The FlashAttention kernels need a GPU (tests/test_gpu.py checks them against math). Here the
# varlen entry points are replaced by a float32 reference, so the dispatch around them runs in CI:
# flattening, cu_seqlens with their empty padding pieces, max_seqlen, dense rows, and FA4's
# custom-op autograd.
def reference_varlen(q, k, v, cu, max_len):
    """Causal attention inside each cu_seqlens piece. q: (N, H, D); k, v: (N, Hkv, D) -> out, lse
    (H, N)."""
    out, lse = torch.zeros_like(q), torch.zeros(q.shape[1], q.shape[0])
    bounds = cu.tolist()
    assert bounds == sorted(bounds) and bounds[-1] == q.shape[0], (
        "cu_seqlens must be sorted and end at N"
    )
    for a, b in itertools.pairwise(bounds):
        assert b - a <= max_len, "a piece is longer than max_seqlen"
        if b == a:
            continue
        rep = q.shape[1] // k.shape[1]
        qs = q[a:b].float().transpose(0, 1)  # (H, n, D)
        ks, vs = (t[a:b].float().transpose(0, 1).repeat_interleave(rep, 0) for t in (k, v))
        scores = qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(
            torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf")
        )
        lse[:, a:b] = scores.logsumexp(-1)
        out[a:b] = (scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    return out, lse


def fake_fa4_fwd(q, k, v, *, cu_seqlens_q, max_seqlen_q, causal, return_lse, **_):
    assert causal and return_lse
    return (*reference_varlen(q, k, v, cu_seqlens_q, max_seqlen_q), None, None, None)


def fake_fa4_bwd(q, k, v, out, dout, lse, *, causal, cu_seqlens_q, max_seqlen_q, **_):
    """The attention gradients written out (a custom op's body runs without autograd):
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D)."""
    dq, dk, dv = (torch.zeros_like(t, dtype=torch.float32) for t in (q, k, v))
    rep, scale = q.shape[1] // k.shape[1], q.shape[-1] ** -0.5
    bounds = cu_seqlens_q.tolist()
    for a, b in itertools.pairwise(bounds):
        if b == a:
            continue
        qs, do, o = (t[a:b].float().transpose(0, 1) for t in (q, dout, out))  # (H, n, D)
        ks, vs = (t[a:b].float().transpose(0, 1).repeat_interleave(rep, 0) for t in (k, v))
        scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(
            torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf")
        )
        p = scores.softmax(-1)
        ds = p * (do @ vs.transpose(1, 2) - (do * o).sum(-1, keepdim=True))
        dq[a:b] = (ds @ ks * scale).transpose(0, 1)
        dk[a:b] = (ds.transpose(1, 2) @ qs * scale).unflatten(0, (-1, rep)).sum(1).transpose(0, 1)
        dv[a:b] = (p.transpose(1, 2) @ do).unflatten(0, (-1, rep)).sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@pytest.fixture
def cpu_flash(monkeypatch):
    """FA2's and FA4's entry points backed by reference_varlen (FA2 by its varlen signature)."""
    monkeypatch.setattr(tg, "_fa4_fwd", fake_fa4_fwd)
    monkeypatch.setattr(tg, "_fa4_bwd", fake_fa4_bwd)
    monkeypatch.setattr(
        tg,
        "_fa2_varlen",
        lambda q, k, v, cu, _cu, m, _m, causal: reference_varlen(q, k, v, cu, m)[0],
    )


def test_piece_bounds_offsets_and_bucket():
    starts = torch.zeros(2, 1024, dtype=torch.bool)
    starts[:, 0] = True
    starts[0, [5, 6, 700]] = True
    cu = tg.piece_bounds(starts)
    assert cu.dtype == torch.int32 and cu.numel() == 16  # 2048 / 256 = 8 -> 2^ceil(log2(9))
    assert cu[:6].tolist() == [0, 5, 6, 700, 1024, 2048] and (cu[6:] == 2048).all()
    starts[1, ::16] = True  # 64 more pieces than the floor allows: the next power of two
    assert tg.piece_bounds(starts).numel() == 128 and tg.piece_bounds(starts)[68:].eq(2048).all()


@pytest.mark.parametrize("flash", ["fa2", "fa4"])
@pytest.mark.parametrize("packed", [False, True])
def test_flash_dispatch_matches_math(cpu_flash, flash, packed):
    """The model through the FlashAttention path equals the math path, packed rows (host-made
    cu_seqlens with padding, and without them) and dense rows; gradients too."""
    model = tiny_model()
    ids = torch.cat(
        [random_ids(96, seed=1, bos_at=(0, 7, 8, 50)), random_ids(96, seed=2, bos_at=(0,))]
    )
    starts = tg.segment_starts(ids, 32) if packed else None
    kwargs = [dict(cu_seqlens=tg.piece_bounds(starts), max_piece=32), {}] if packed else [{}]
    model.backends = MATH
    ref = model(ids, starts=starts, looping=True)
    ref_grad = torch.autograd.grad(ref.sum(), model.blocks[1].attn.c_q.weight)[0]
    model.backends = (flash, flash)
    for extra in kwargs:
        out = model(ids, starts=starts, looping=True, **extra)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        grad = torch.autograd.grad(out.sum(), model.blocks[1].attn.c_q.weight)[0]
        assert (grad - ref_grad).norm() / ref_grad.norm() < 1e-4  # float32 summation order only


def test_fa4_custom_op_traces_fullgraph(cpu_flash):
    """torch.compile traces the FA4 custom ops through their fake versions (no graph break), forward
    and backward."""
    q, k, v = (torch.randn(1, 64, h, 16, requires_grad=True) for h in (4, 2, 2))
    ids = random_ids(64, bos_at=(0, 20))
    layout = tg.make_layout(ids, tg.segment_starts(ids, 32), TINY, ("fa4", "fa4"), max_piece=32)
    out = torch.compile(tg.attention, fullgraph=True, backend="aot_eager")(q, k, v, layout)
    layout.backend = "math"
    layout.dense_mask = tg.make_layout(ids, tg.segment_starts(ids, 32), TINY, MATH).dense_mask
    ref = tg.attention(q, k, v, layout)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_mlp_leaky_relu_squared():
    """MLP(n) = (LeakyReLU_0.5(n W_up^T))^2 W_down^T; d/dz = 2z (z > 0), 0.5z (z <= 0)."""
    torch.manual_seed(0)
    mlp = tg.MLP(TINY)
    n = torch.randn(3, 5, 64)
    h = n @ mlp.fc.weight.T
    expected = torch.where(h > 0, h, 0.5 * h).square() @ mlp.proj.weight.T
    torch.testing.assert_close(mlp(n), expected)
    z = torch.linspace(-3, 3, 61, dtype=torch.float64, requires_grad=True)
    F.leaky_relu(z, tg.LEAKY_SLOPE).square().sum().backward()
    torch.testing.assert_close(z.grad, torch.where(z > 0, 2 * z, 0.5 * z).detach())


@pytest.mark.parametrize("packed", [False, True])
def test_smeargate_bos_fix(packed):
    """With random smear weights, nothing of document a reaches its BOS or document b."""
    model = tiny_model()
    a, b = random_ids(10, seed=1), random_ids(10, seed=2)
    ids = torch.cat([a, torch.tensor([[BOS_ID]]), b], 1)
    other = torch.cat([random_ids(10, seed=3), torch.tensor([[BOS_ID]]), b], 1)

    def embed(x):
        starts = tg.segment_starts(x, 128) if packed else None
        return model.embed(x, tg.make_layout(x, starts, TINY, MATH))

    with torch.no_grad():
        e, e_other = embed(ids), embed(other)
        # BOS output = its input.
        assert torch.equal(e[0, 10], tg.rms_norm(model.tok_emb.weight[BOS_ID]))
        assert torch.equal(e[:, 10:], e_other[:, 10:])
        assert (
            e[:, 1:10] - e_other[:, 1:10]
        ).abs().max() > 1e-2  # the gate is active inside a document
        if packed:  # the whole model too: a never reaches the BOS or b
            out = model(ids, starts=tg.segment_starts(ids, 128), looping=True)
            out_other = model(other, starts=tg.segment_starts(other, 128), looping=True)
            torch.testing.assert_close(out[:, 10:], out_other[:, 10:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("looping", [False, True])
def test_flex_matches_math_on_packed_rows(looping):
    """Eager flex attention (CPU) with the block mask built from piece starts equals masked math
    SDPA."""
    model = tiny_model(backends=MATH)
    ids = random_ids(256, bos_at=(0, 5, 100, 101, 130, 250))
    starts = tg.segment_starts(ids, 64)
    with torch.no_grad():
        ref = model(ids, starts=starts, looping=looping)
        model.backends = FLEX
        out = model(ids, starts=starts, looping=looping)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------- adapters (TTT hook) -------------------------------------------------------------
def test_zero_adapter_is_the_plain_forward():
    model = tiny_model()
    ids = random_ids(40, bos_at=(0, 17))
    starts = tg.segment_starts(ids, 32)
    widths = {"q": 64, "k": 32, "v": 32, "o": 64, "mlp": 64, "head": TINY.vocab_size}
    calls = set()

    def zero_lora(slot, layer, x):  # a LoRA with its B matrix at zero
        calls.add((slot, layer))
        a = torch.randn(x.shape[-1], 4)
        return (x @ a) @ torch.zeros(4, widths[slot])

    with torch.no_grad():
        plain = model(ids, starts=starts, looping=True)
        adapted = model(ids, starts=starts, looping=True, adapter=zero_lora)
        assert torch.equal(adapted, plain)
        virtual = sum(map(len, tg.layer_schedule(TINY, True)))
        assert calls == {(s, v) for s in ("q", "k", "v", "o", "mlp") for v in range(virtual)} | {
            ("head", 0)
        }
        nonzero = model(
            ids,
            starts=starts,
            looping=True,
            adapter=lambda s, layer, x: 0.1 * torch.ones(widths[s]),
        )
        assert (nonzero - plain).abs().max() > 1e-3


# ---------------- U-Net skip gates ----------------------------------------------------------------
def identity_trunk_reference(model: GPT, x0: torch.Tensor, looping: bool) -> torch.Tensor:
    """The trunk when every block is the identity (zero output projections): only skip mixing
    (x <- s*w + sigma(g)(x - s*w)) and the lane residual scales (1.1) act."""
    encoder, decoder = tg.layer_schedule(model.cfg, looping)
    skips, x, lane1 = [x0] * len(encoder), x0, None
    for j, i in enumerate(decoder):
        block = model.blocks[i]
        if lane1 is None and block.parallel:
            lane1 = x
        if j < len(model.skip_weights) and skips:
            r, g = model.skip_weights[j] * skips.pop(), torch.sigmoid(model.skip_gates[j])
            x = torch.where(g == 1.0, x, torch.where(g == 0.5, 0.5 * r + 0.5 * x, r + g * (x - r)))
        if block.parallel:
            x, lane1 = block.lane_resid[0] * x, block.lane_resid[1] * lane1
    return x if lane1 is None else 0.5 * (x + lane1)


@pytest.mark.parametrize("gate", [0.0, math.inf])
@pytest.mark.parametrize("looping", [False, True])
def test_skip_gates(gate, looping):
    torch.manual_seed(0)
    model = GPT(TINY).eval()  # identity blocks
    x0 = torch.randn(1, 16, TINY.model_dim)
    layout = tg.make_layout(random_ids(16, bos_at=(0,)), None, TINY, MATH)
    with torch.no_grad():
        model.skip_weights.normal_()
        model.skip_gates.fill_(gate)
        out = model.trunk(x0, layout, looping, None)
        torch.testing.assert_close(
            out, identity_trunk_reference(model, x0, looping), atol=1e-6, rtol=1e-6
        )
        if gate == math.inf:  # the skip path is gone: skip weights are irrelevant
            assert torch.equal(out, x0 * 1.1 if TINY.parallel_start_layer < TINY.num_layers else x0)
            randomize_(model)
            model.skip_gates.fill_(gate)
            a = model.trunk(x0, layout, looping, None)
            model.skip_weights.normal_()
            assert torch.equal(model.trunk(x0, layout, looping, None), a)


# ---------------- two-lane parallel block ---------------------------------------------------------
def test_parallel_block_lane_update(monkeypatch):
    torch.manual_seed(0)
    block = tg.Block(TINY, layer=3)
    assert block.parallel and not tg.Block(TINY, layer=2).parallel
    B, T, d = 1, 8, TINY.model_dim
    x, x0, lane1 = torch.randn(B, T, d), torch.randn(B, T, d), torch.randn(B, T, d)
    A, M = torch.randn(B, T, d), torch.randn(B, T, d)
    seen = {}

    def attn_forward(n, layout, adapter=None, layer=0):
        seen["attn"] = n
        return A

    def mlp_forward(n, adapter=None, layer=0):
        seen["mlp"] = n
        return M

    monkeypatch.setattr(block.attn, "forward", attn_forward)  # substituted branch outputs
    monkeypatch.setattr(block.mlp, "forward", mlp_forward)
    with torch.no_grad():
        for p in (
            block.attn_scale,
            block.mlp_scale,
            block.resid_mix,
            block.lane_resid,
            block.lane_post,
        ):
            p.copy_(torch.randn(p.shape))
        layout = tg.make_layout(random_ids(T), None, TINY, MATH)
        lane0_out, lane1_out = block(x, x0, layout, lane1=lane1)
    r, P = block.lane_resid, block.lane_post  # P[source, lane], source 0 = attention, 1 = MLP
    a, m = block.attn_scale * A, block.mlp_scale * M
    torch.testing.assert_close(lane0_out, r[0] * x + P[0, 0] * a + P[1, 0] * m)
    torch.testing.assert_close(lane1_out, r[1] * lane1 + P[0, 1] * a + P[1, 1] * m)
    x_in = block.resid_mix[0] * x + block.resid_mix[1] * x0  # attention reads lane 0 mixed with x0
    torch.testing.assert_close(seen["attn"], tg.rms_norm(x_in) * block.ln_scale)
    torch.testing.assert_close(seen["mlp"], tg.rms_norm(lane1) * block.ln_scale)  # MLP reads lane 1
    assert block.ln_scale == 1 / math.sqrt(4)
    with torch.no_grad():  # r = 1, P = 1 and equal lanes stay equal
        block.lane_resid.fill_(1.0)
        block.lane_post.fill_(1.0)
        l0, l1 = block(x, x0, layout, lane1=x.clone())
    assert torch.equal(l0, l1)


def test_sequential_block_is_identity_at_init():
    """resid_mix (1, 0) and zero output projections: the block returns its input."""
    torch.manual_seed(0)
    block = GPT(TINY).blocks[1]
    x, x0 = torch.randn(1, 8, 64), torch.randn(1, 8, 64)
    with torch.no_grad():
        out, none = block(x, x0, tg.make_layout(random_ids(8), None, TINY, MATH))
    assert none is None and torch.equal(out, x)
