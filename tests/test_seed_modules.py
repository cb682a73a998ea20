"""The seed records' modules (README "Presets"), one property test each: gates, BigramHash, value
embeddings, value residual, parallel forms, skips, legacy SmearGate, dense training rows, recurrence
by step, Muon options, the older records' quantizers and the TTT options. Forwards run in fp32, no
autocast."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

import train_gpt as tg
from train_gpt import BOS_ID, GPT, ModelConfig

TINY = ModelConfig(
    vocab_size=512,
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
MATH = ("math", "math")


def tiny(**fields: object) -> ModelConfig:
    return dataclasses.replace(TINY, **fields)


def randomized(cfg: ModelConfig, seed: int = 0) -> GPT:
    """GPT(cfg) with every weight random (branches, gates, lanes and skips all active)."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise / math.sqrt(p.shape[1]) if p.ndim == 2 else p + 0.3 * noise)
    return model


def random_ids(T: int, seed: int = 0, bos_at=(0,)) -> torch.Tensor:
    ids = torch.randint(4, 512, (1, T), generator=torch.Generator().manual_seed(seed))
    ids[0, list(bos_at)] = BOS_ID
    return ids


def layout(ids: torch.Tensor, cfg: ModelConfig = TINY, documents: bool = True) -> tg.Layout:
    return tg.make_layout(ids, tg.segment_starts(ids, 128, documents), cfg, MATH)


def spy_attention(monkeypatch) -> list[dict]:
    """Record q, k, v and the output y of every attention call (the one dispatch point)."""
    calls, real = [], tg.attention

    def spy(q, k, v, lay):
        y = real(q, k, v, lay)
        calls.append(dict(q=q, k=k, v=v, y=y))
        return y

    monkeypatch.setattr(tg, "attention", spy)
    return calls


# ---------------------------------------------------------------- attention output gates ----------
def gate_parts(monkeypatch, attn: tg.Attention, n: torch.Tensor, ids: torch.Tensor):
    """(output, y after XSA before the gate) of one attention forward."""
    seen, real = {}, tg.xsa
    monkeypatch.setattr(tg, "xsa", lambda y, v: seen.setdefault("y", real(y, v)))
    out = attn(n, layout(ids))
    return out, seen["y"]


def test_headwise_gate_is_sigmoid_of_the_extra_q_rows(monkeypatch):
    """#2005: c_q has H more rows; their outputs gate the heads after XSA (0.5 when they are 0), and
    the query uses only the first H * D rows."""
    cfg = tiny(attn_gate="headwise")
    torch.manual_seed(0)
    attn = tg.Attention(cfg, xsa_on=True)
    assert (
        attn.c_q.weight.shape == (4 * 16 + 4, 64)
        and attn.out_gate is None
        and attn.gate_proj is None
    )
    n, ids = torch.randn(1, 12, 64), random_ids(12)
    with torch.no_grad():
        attn.proj.weight.normal_()
        out, y = gate_parts(monkeypatch, attn, n, ids)
        u = n @ attn.c_q.weight[64:].T  # (B, T, H) gate logits
        torch.testing.assert_close(
            out, attn.proj((y * torch.sigmoid(u)[..., None]).reshape(1, 12, -1))
        )
        attn.c_q.weight[64:] = 0
        out0, y0 = gate_parts(monkeypatch, attn, n, ids)
        assert torch.equal(y0, y)  # the gate rows never reach q
        torch.testing.assert_close(out0, attn.proj((0.5 * y).reshape(1, 12, -1)))


def test_linear_gate_with_bias_is_sigmoid_4_at_init(monkeypatch):
    """#1232: sigmoid(W n + b) per head, W = 0 and b = 4 at init; a scalar (AdamW) fp16 tensor."""
    cfg = tiny(attn_gate="linear")
    torch.manual_seed(0)
    attn = tg.Attention(cfg, xsa_on=True)
    assert attn.gate_proj.weight.shape == (4, 64) and torch.equal(
        attn.gate_proj.bias, torch.full((4,), 4.0)
    )
    n, ids = torch.randn(1, 12, 64), random_ids(12)
    with torch.no_grad():
        attn.proj.weight.normal_()
        out, y = gate_parts(monkeypatch, attn, n, ids)
        torch.testing.assert_close(
            out, attn.proj((y * torch.sigmoid(torch.tensor(4.0))).reshape(1, 12, -1))
        )
        attn.gate_proj.weight.normal_()
        out, y = gate_parts(monkeypatch, attn, n, ids)
        g = torch.sigmoid(n @ attn.gate_proj.weight.T + attn.gate_proj.bias)
        torch.testing.assert_close(out, attn.proj((y * g[..., None]).reshape(1, 12, -1)))
    model = GPT(cfg)
    gate = model.blocks[0].attn.gate_proj
    assert {id(gate.weight), id(gate.bias)} <= {id(p) for p in model.param_groups()["scalars"]}
    schemes = tg.quant_schemes(model, tg.QuantConfig())
    assert schemes["blocks.0.attn.gate_proj.weight"].kind == "fp16"


def test_no_gate_leaves_the_heads_alone(monkeypatch):
    attn = tg.Attention(tiny(attn_gate="none"), xsa_on=True)
    n, ids = torch.randn(1, 12, 64), random_ids(12)
    with torch.no_grad():
        attn.proj.weight.normal_()
        out, y = gate_parts(monkeypatch, attn, n, ids)
    assert torch.equal(out, attn.proj(y.reshape(1, 12, -1)))


# ---------------------------------------------------------------- BigramHash (PR #162) ------------
def test_bigram_hash_index_and_bos_rule():
    """h_t = (36313 id_t XOR 27191 id_(t-1)) mod (Vb - 1); the reserved bucket Vb - 1 where the
    previous token is outside the piece: position 0, and a BOS when attention is masked to
    documents."""
    bigram = tg.BigramHash(tiny(bigram_buckets=37, bigram_dim=8))
    ids = torch.tensor([[BOS_ID, 5, 9, BOS_ID, 7]])

    def h(a: int, b: int) -> int:
        return ((36313 * a) ^ (27191 * b)) % 36

    masked = bigram.index(ids, tg.segment_starts(ids, 128))
    assert masked.tolist() == [[36, h(5, 1), h(9, 5), 36, h(7, 1)]]
    dense = bigram.index(
        ids, tg.segment_starts(ids, 128, documents=False)
    )  # records' training rows
    assert dense.tolist() == [[36, h(5, 1), h(9, 5), h(1, 9), h(7, 1)]]
    big = torch.tensor([[BOS_ID, 59_138, 65_535]])  # int64: no int32 wrap-around for large ids
    expected = ((36313 * 65535) ^ (27191 * 59138)) % 36
    assert bigram.index(big, torch.tensor([[True, False, False]]))[0, 2] == expected


def test_bigram_hash_output_and_routing():
    cfg = tiny(bigram_buckets=37, bigram_dim=8, bigram_proj_gain=0.5)
    torch.manual_seed(0)
    model = GPT(cfg)
    bigram, ids = model.bigram, random_ids(10, bos_at=(0, 4))
    starts = tg.segment_starts(ids, 128)
    assert bigram.table.weight.dtype == torch.bfloat16 and not bigram.table.weight.float().any()
    assert bigram.scale.item() == pytest.approx(0.05)
    P = bigram.proj.weight
    torch.testing.assert_close(
        P.T @ P, 0.25 * torch.eye(8), atol=1e-5, rtol=0
    )  # orthogonal, gain 0.5
    assert not bigram(ids, starts).any()  # zero table: the embedding path is the plain one at init
    with torch.no_grad():
        bigram.table.weight.normal_()
    expected = bigram.scale * bigram.table.weight[bigram.index(ids, starts)].float() @ P.T
    torch.testing.assert_close(bigram(ids, starts), expected)
    groups = model.param_groups()
    assert any(p is P for p in groups["matrices"]) and any(
        p is bigram.table.weight for p in groups["embed"]
    )
    assert any(p is bigram.scale for p in groups["scalars"])


def test_bigram_hash_keeps_documents_apart():
    """With pieces masked to documents, nothing of document a reaches its BOS or document b."""
    model = randomized(tiny(bigram_buckets=37, bigram_dim=8, smear="off"))
    b = random_ids(10, seed=2, bos_at=(0,))
    ids, other = (
        torch.cat([random_ids(10, seed=1), b], 1),
        torch.cat([random_ids(10, seed=3), b], 1),
    )
    with torch.no_grad():
        out, out_other = (
            model(x, starts=tg.segment_starts(x, 128), looping=True) for x in (ids, other)
        )
    torch.testing.assert_close(out[:, 10:], out_other[:, 10:], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- value embeddings / residual -----
def test_value_embeddings_add_to_v_on_the_chosen_layers_only():
    cfg = tiny(ve_layers="2,3", ve_dim=8)
    model = randomized(cfg)
    assert [b.attn.ve_scale is not None for b in model.blocks] == [False, False, True, True]
    ve, ids = model.value_embed, random_ids(12)
    assert ve.table.weight.shape == (512, 8) and ve.proj.weight.shape == (32, 8)
    lay = layout(ids, cfg)
    lay.ve = ve(ids)
    torch.testing.assert_close(lay.ve, ve.scale * ve.table.weight[ids].float() @ ve.proj.weight.T)
    v = torch.randn(1, 12, 32)
    for block in model.blocks:
        lam = block.attn.ve_scale
        expected = v if lam is None else v + lam * lay.ve
        torch.testing.assert_close(block.attn.extra_values(v, lay, layer=5), expected)
    groups = model.param_groups()
    assert any(p is ve.proj.weight for p in groups["matrices"])
    assert any(p is ve.table.weight for p in groups["embed"])
    init = GPT(cfg)
    assert (
        init.value_embed.scale.item() == pytest.approx(0.1)
        and init.blocks[2].attn.ve_scale.item() == 1.0
    )


def test_value_residual_mixes_the_first_layers_values(monkeypatch):
    """#1232: layer 0's V is kept; later (virtual) layers use lambda_0 v0 + lambda_1 v, init (0.5,
    0.5)."""
    cfg = tiny(value_residual=True)
    assert GPT(cfg).blocks[1].attn.vr_lambda.tolist() == [0.5, 0.5]
    model, ids = randomized(cfg), random_ids(16, bos_at=(0, 9))
    plain = GPT(tiny())
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "vr_lambda" not in k})
    with torch.no_grad():
        for b in model.blocks:
            b.attn.vr_lambda.copy_(torch.tensor([1.0, 0.0]))
        calls = spy_attention(monkeypatch)
        model(ids, starts=tg.segment_starts(ids, 128), looping=True)
        assert len(calls) == 5 and all(
            torch.equal(c["v"], calls[0]["v"]) for c in calls
        )  # v0 everywhere
        for b in model.blocks:
            b.attn.vr_lambda.copy_(torch.tensor([0.0, 1.0]))  # v0 weighted 0: the plain model
        torch.testing.assert_close(
            model(ids, looping=True), plain(ids, looping=True), atol=1e-6, rtol=0
        )
    model(ids, ids.roll(-1, 1), looping=True).mean().backward()
    assert (
        model.blocks[0].attn.vr_lambda.grad is None
        and model.blocks[1].attn.vr_lambda.grad is not None
    )


# ---------------------------------------------------------------- parallel forms ------------------
def substituted(monkeypatch, block: tg.Block) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Replace the block's branches by fixed outputs A, M; record their inputs."""
    seen, A, M = {}, torch.randn(1, 8, 64), torch.randn(1, 8, 64)

    def attn_forward(n, *args, **kwargs):
        seen["attn"] = n
        return A

    def mlp_forward(n, *args, **kwargs):
        seen["mlp"] = n
        return M

    monkeypatch.setattr(block.attn, "forward", attn_forward)
    monkeypatch.setattr(block.mlp, "forward", mlp_forward)
    with torch.no_grad():
        for p in (block.attn_scale, block.mlp_scale, block.resid_mix):
            p.copy_(torch.randn(p.shape))
    return seen, A, M


def test_gptj_block_is_one_residual_with_parallel_branches(monkeypatch):
    """#1492: on parallel layers out = x_in + a(x_in) + m(x_in); earlier layers stay sequential."""
    cfg = tiny(parallel_mode="gptj")
    block, x, x0 = tg.Block(cfg, layer=3), torch.randn(1, 8, 64), torch.randn(1, 8, 64)
    assert block.parallel and block.lane_resid is None
    seen, A, M = substituted(monkeypatch, block)
    with torch.no_grad():
        out, lane1 = block(x, x0, layout(random_ids(8), cfg))
    x_in = block.resid_mix[0] * x + block.resid_mix[1] * x0
    assert lane1 is None
    torch.testing.assert_close(out, x_in + block.attn_scale * A + block.mlp_scale * M)
    torch.testing.assert_close(seen["mlp"], tg.rms_norm(x_in) * block.ln_scale)
    torch.testing.assert_close(seen["attn"], seen["mlp"])
    model = GPT(cfg)
    assert model.lane_merge is None and not any("lane" in n for n, _ in model.named_parameters())


def test_merge_block_keeps_the_lanes_isolated(monkeypatch):
    """#1435, #1536: attention writes only lane 0 (read mixed with x0), the MLP only lane 1."""
    cfg = tiny(parallel_mode="merge")
    block = tg.Block(cfg, layer=3)
    x, x0, lane1 = torch.randn(1, 8, 64), torch.randn(1, 8, 64), torch.randn(1, 8, 64)
    seen, A, M = substituted(monkeypatch, block)
    with torch.no_grad():
        a_lane, m_lane = block(x, x0, layout(random_ids(8), cfg), lane1=lane1)
    x_in = block.resid_mix[0] * x + block.resid_mix[1] * x0
    torch.testing.assert_close(a_lane, x_in + block.attn_scale * A)
    torch.testing.assert_close(m_lane, lane1 + block.mlp_scale * M)
    torch.testing.assert_close(seen["mlp"], tg.rms_norm(lane1) * block.ln_scale)


@pytest.mark.parametrize("mode", ["lanes", "merge"])
def test_lanes_split_around_the_skip_and_join(monkeypatch, mode):
    """lanes: split before the first parallel entry's skip (the skip enters lane 0 only), joined by
    their mean; merge: split after it (both lanes hold the skip), joined by mu lane0 + (1 - mu)
    lane1."""
    cfg = tiny(parallel_mode=mode, num_loops=0, loop_start=0, loop_end=0, parallel_start_layer=2)
    model, inputs, outputs = randomized(cfg), {}, {}
    real = tg.Block.forward

    def record(self, x, x0, lay, *, lane1=None, adapter=None, layer=0):
        inputs[layer] = (x, lane1)
        outputs[layer] = real(self, x, x0, lay, lane1=lane1, adapter=adapter, layer=layer)
        return outputs[layer]

    monkeypatch.setattr(tg.Block, "forward", record)
    with torch.no_grad():
        out = model.trunk(torch.randn(1, 8, 64), layout(random_ids(8), cfg), False, None)
    x, lane1 = inputs[2]  # the first parallel entry (encoder 0, 1; decoder 2, 3)
    assert torch.equal(x, lane1) == (mode == "merge")
    lane0, lane1 = outputs[3]
    if mode == "merge":
        torch.testing.assert_close(out, model.lane_merge * lane0 + (1 - model.lane_merge) * lane1)
    else:
        assert model.lane_merge is None and torch.equal(out, 0.5 * (lane0 + lane1))


def test_dropped_lane_skips_change_nothing():
    """LANE_SKIPS=0 (#1435's code): skips of decoder entries after the merge split are computed and
    lost, so their rows do not matter; the first parallel entry's skip still enters before the
    split."""
    cfg = tiny(
        parallel_mode="merge",
        num_loops=0,
        loop_start=0,
        loop_end=0,
        num_layers=6,
        parallel_start_layer=3,
    )
    x0, lay = torch.randn(1, 8, 64), layout(random_ids(8), cfg)
    for lane_skips in (True, False):
        model = randomized(dataclasses.replace(cfg, lane_skips=lane_skips))
        with torch.no_grad():
            base = model.trunk(x0, lay, False, None)
            diffs = []
            for row in range(3):  # decoder entries 0 (layer 3, before the split), 1, 2
                saved = model.skip_weights[row].clone()
                model.skip_weights[row] += 1.0
                diffs.append((model.trunk(x0, lay, False, None) - base).abs().max().item())
                model.skip_weights[row] = saved
        later = diffs[1:]
        assert (
            diffs[0] > 1e-3
            and (min(later) > 1e-3) == lane_skips
            and (max(later) == 0) == (not lane_skips)
        )


# ---------------------------------------------------------------- U-Net skips ---------------------
def test_ungated_skip_adds_the_weighted_skip():
    model = randomized(tiny(skip_gates=False))
    assert model.skip_gates is None
    x, s = torch.randn(1, 8, 64), torch.randn(1, 8, 64)
    torch.testing.assert_close(model.mix_skip(x, s, 1), x + model.skip_weights[1] * s)


def test_skip_count_fixes_the_rows_as_1435():
    """#1435: 5 rows (11 // 2) with layers 4-5 looped once more: decoder entries 0-4 pop encoder
    entries 5..1, and encoder entry 0's output is never used."""
    cfg = ModelConfig(loop_start=4, loop_end=5, num_loops=1, skip_count=5)
    assert tg.layer_schedule(cfg, looping=True) == ([0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9, 10])
    assert tg.num_skips(cfg) == 5 and tg.num_skips(dataclasses.replace(cfg, skip_count=0)) == 6
    small = tiny(skip_count=1)
    assert GPT(small).skip_weights.shape == (1, 64)


# ---------------------------------------------------------------- legacy SmearGate ----------------
def test_legacy_smear_is_a_per_channel_mix_after_the_norm():
    """x_t <- (1 - p) x_t + p x_(t-1), p = sigmoid(gamma) per channel (0.5 at init), after RMSNorm;
    the previous token is zero at a piece start."""
    cfg = tiny(smear="legacy")
    model = GPT(cfg).float()  # fp32 embedding: an exact comparison
    assert (
        model.smear_gate is None and model.smear_lambda is None and model.smear_gamma.shape == (64,)
    )
    assert not model.smear_gamma.any()  # sigmoid(0) = 0.5: half of the previous token at init
    ids = random_ids(10, bos_at=(0, 6))
    with torch.no_grad():
        model.smear_gamma.normal_()
        out = model.embed(ids, layout(ids, cfg))
    x, p = tg.rms_norm(model.tok_emb.weight[ids]), torch.sigmoid(model.smear_gamma)
    prev = torch.cat([torch.zeros(1, 1, 64), x[:, :-1]], 1)
    prev[:, 6] = 0  # a BOS starts a piece
    torch.testing.assert_close(out, (1 - p) * x + p * prev, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- dense training rows -------------
def test_dense_rows_cut_every_seq_len_across_documents():
    """TRAIN_DOC_MASK=0 (the records before #1530): pieces every seq_len tokens whatever the BOS, so
    a document attends to the one before it inside a piece; the default masks them apart."""
    ids = random_ids(16, bos_at=(0, 5, 11))
    assert tg.segment_starts(ids, 8, documents=False)[0].nonzero().view(-1).tolist() == [0, 8]
    assert tg.segment_starts(ids, 8)[0].nonzero().view(-1).tolist() == [0, 5, 11]
    model, other = randomized(TINY), ids.clone()
    other[0, 2] = 7 + ids[0, 2] % 100  # inside the first document
    with torch.no_grad():
        for documents in (True, False):
            a, b = (
                model(x, starts=tg.segment_starts(x, 16, documents), looping=True)
                for x in (ids, other)
            )
            assert ((a[:, 5:] - b[:, 5:]).abs().max() > 1e-4) == (not documents)


def test_train_loader_makes_dense_rows(tiny_data):
    dist_env = tg.DistEnv(0, 1, 0, torch.device("cpu"))
    loader = tg.TrainLoader(
        tg.shard_paths(tiny_data.path, "train"),
        row_tokens=512,
        seq_len=128,
        accum=1,
        dist_env=dist_env,
        seed=0,
        documents=False,
    )
    try:
        batch = loader.next_batches()[0]
    finally:
        loader.close()
    assert (
        batch.starts[0].nonzero().view(-1).tolist() == [0, 128, 256, 384]
        and (batch.x == BOS_ID).sum() > 0
    )


# ---------------------------------------------------------------- recurrence by step --------------
def test_loop_at_step_turns_recurrence_on_at_that_step():
    cfg = tg.TrainConfig(loop_at_step=3, enable_looping_at=2.0)
    assert [tg.loop_due(cfg, 0.99, step) for step in (0, 2, 3, 4)] == [False, False, True, True]
    assert tg.looping_states(cfg, TINY) == (False, True)
    default = tg.TrainConfig()
    assert [tg.loop_due(default, f, 10**6) for f in (0.34, 0.35)] == [False, True]
    assert tg.looping_states(cfg, tiny(num_loops=0)) == (False,)


# ---------------------------------------------------------------- RoPE base, MLP width ------------
def test_rope_base_override_reaches_every_layout():
    """#1232's effective base 1e4 * 2^(16/14): position p, pair j rotates by p * base^(-2j /
    dims)."""
    base = 1e4 * 2 ** (16 / 14)
    cfg = tiny(rope_base=base)
    ids = random_ids(6)
    lay = tg.make_layout(ids, None, cfg, MATH)
    j = torch.arange(4)
    expected = torch.cos(torch.arange(6.0)[:, None] * base ** (-2.0 * j / 8))
    torch.testing.assert_close(lay.cos[0], expected)
    assert not torch.allclose(tg.make_layout(ids, None, TINY, MATH).cos, lay.cos)


def test_mlp_width_three():
    assert GPT(tiny(mlp_mult=3.0)).blocks[0].mlp.fc.weight.shape == (192, 64)


# ---------------------------------------------------------------- Muon options --------------------
def test_fixed_newton_schulz_coefficients():
    """MUON_NS=fixed: five steps of (3.4445, -4.775, 2.0315), a wider singular-value band than PR
    #1344's."""
    u = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    out = tg.newton_schulz(u, torch.float32, coeffs=tg.NS_FIXED)
    x = u / (u.norm() + 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    torch.testing.assert_close(out, x)
    polar, fixed = (
        torch.linalg.svdvals(tg.newton_schulz(u, torch.float32, coeffs=tg.NS_COEFFS[name]))
        for name in ("polar_express", "fixed")
    )
    assert polar.min() > 0.8 and 0.5 < fixed.min() < polar.min() and fixed.max() < 1.2


def test_muon_without_row_normalisation_and_the_routing_of_its_options():
    g = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(8, 16, generator=g))
    seen = []
    for row_norm in (True, False):
        opt = tg.Muon(
            [w],
            lr=0.1,
            momentum=0.9,
            wd=0.0,
            dist_env=tg.DistEnv(0, 1, 0, torch.device("cpu")),
            row_norm=row_norm,
            orthogonalize=lambda u: seen.append(u.clone()) or u,
        )
        w.grad = torch.ones(8, 16)
        opt.reduce_grads()
        opt.step()
    torch.testing.assert_close(seen[0].norm(dim=-1), torch.ones(1, 8))  # unit rows
    torch.testing.assert_close(seen[1], torch.full((1, 8, 16), 1.9))  # G + mu * buf, as is
    solo = tg.DistEnv(0, 1, 0, torch.device("cpu"))
    cfg = tg.TrainConfig(muon_ns="fixed", muon_row_norm=False)
    opts = tg.build_optimizers(GPT(TINY), cfg, solo)
    assert opts.muon.orthogonalize.keywords["coeffs"] == tg.NS_FIXED and not opts.muon.row_norm


# ---------------------------------------------------------------- quantization --------------------
def test_rtn_scales_floor_and_percentile_clip():
    w = torch.tensor([[0.01, -0.02, 0.005, 0.0], [3.1, -1.0, 0.5, 0.25], [1.0, 1.0, 1.0, 100.0]])
    s = tg.rtn_scales(w, 6, 1.0)
    assert s.dtype == torch.float16
    torch.testing.assert_close(
        s.float(), torch.tensor([1 / 31, 3.1 / 31, 100 / 31]).half().float()
    )  # floor
    q, scale = tg.quantize_rtn(w, 6, 1.0)
    assert q.abs().max() <= 31 and torch.equal(
        q[1], torch.round(w[1] / scale[1].float()).to(torch.int8)
    )
    clip = torch.quantile(w[2].abs(), 0.5)
    q, scale = tg.quantize_rtn(w, 8, 0.5)  # the outlier is clipped to the row's median magnitude
    assert scale[2].float() == (clip / 127).half().float() and q[2, 3] == torch.round(
        clip / scale[2].float()
    )


def test_gptq_search_keeps_the_best_candidate_scale():
    """With H = I, GPTQ is round to nearest: the search returns the candidate of least weight
    error."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    w[0, 3] = 40.0  # an outlier row: clipping pays
    q, scale = tg.gptq_search(w, torch.eye(64), 6)
    errors = []
    for p in tg.GPTQ_SEARCH_PERCENTILES:
        s = tg.rtn_scales(w, 6, p).float()[:, None]
        errors.append((w - torch.clamp(torch.round(w / s), -31, 31) * s).square().mean().item())
    err = (w - q.float() * scale.float()[:, None]).square().mean().item()
    assert err == pytest.approx(min(errors), rel=1e-6) and q.abs().max() <= 31


def test_older_records_quant_routing():
    cfg = tiny(bigram_buckets=37, bigram_dim=8, ve_layers="3", attn_gate="none")
    model = GPT(cfg)
    cfg1435 = tg.QuantConfig(matrix_quant="gptq_search", embed_quant="rtn", embed_bits=8)
    search = tg.quant_schemes(model, cfg1435)
    assert search["tok_emb.weight"] == tg.Scheme("rtn", 8, percentile=tg.RTN_TABLE_PERCENTILE)
    assert (
        search["bigram.table.weight"]
        == search["value_embed.table.weight"]
        == search["tok_emb.weight"]
    )
    assert search["blocks.0.attn.c_q.weight"] == tg.Scheme("gptq_search", 6)
    assert search["blocks.0.mlp.fc.weight"] == tg.Scheme("gptq_search", 6)
    assert search["bigram.proj.weight"].kind == search["value_embed.proj.weight"].kind == "fp16"
    assert not any(s.kind == "int8_row" for s in search.values())  # no sparse gate to store
    rtn = tg.quant_schemes(model, tg.QuantConfig(matrix_quant="rtn"))
    assert (
        rtn["blocks.1.attn.proj.weight"] == tg.Scheme("rtn", 6)
        and rtn["tok_emb.weight"].kind == "gptq"
    )
    cfg1492 = tg.QuantConfig(
        embed_bits=8, embed_clip_sigmas=20.0
    )  # #1492, #1536: GPTQ int8 embedding, k 20
    assert tg.quant_schemes(model, cfg1492)["tok_emb.weight"] == tg.Scheme("gptq", 8, 20.0)


# ---------------------------------------------------------------- TTT options ---------------------
def test_ttt_lr_warmup_then_cosine():
    """#1232: W = max(n // 20, 1) warmup chunks at (c + 1) / W, then the cosine over the remaining
    chunks."""
    assert tg.ttt_lr_factor(7, 40, 0.0) == tg.cosine(7, 40)
    factors = [tg.ttt_lr_factor(c, 100, 0.05) for c in range(100)]
    assert factors[:6] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0] and factors[-1] == pytest.approx(
        0.0, abs=1e-12
    )
    assert factors[50] == pytest.approx(tg.cosine(45, 95)) and tg.ttt_lr_factor(0, 10, 0.05) == 1.0


def test_ttt_with_frozen_leading_blocks_trains_only_the_rest(tmp_path):
    cfg = tiny(vocab_size=64, num_layers=4)
    hp = tg.Hyperparameters.from_env(
        dict(
            EVAL_SEQ_LEN="32",
            EVAL_STRIDE="8",
            TTT_CHUNK_TOKENS="64",
            TTT_EPOCHS="2",
            TTT_LR="0.05",
            TTT_FREEZE_BLOCKS="2",
            TTT_LR_WARMUP="0.05",
        )
    )
    solo = tg.DistEnv(0, 1, 0, torch.device("cpu"))
    geo = tg.batch_geometry(hp, 1, "math", eval_row=128)
    model = randomized(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    tokens = np.concatenate([[BOS_ID, *rng.integers(4, 64, n)] for n in (30, 70, 50, 90)]).astype(
        np.uint16
    )
    luts = tg.ByteLuts(
        torch.ones(64, dtype=torch.int16), torch.zeros(64, dtype=torch.bool), torch.arange(64) < 4
    )
    val = tg.ValData(tg.pack_val_rows(tokens, 32, 128), luts)
    quiet = tg.Logger(None, False)
    p = tg.ScoringPass(model, model, val, hp.eval, geo, solo, True, tg.Work(1), quiet)
    tg.eval_ttt(tg.ttt_mode(p, None), dump=None)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and not any(k.startswith(("blocks.0.", "blocks.1.")) for k in changed)
    assert any(k.startswith("blocks.2.") for k in changed)


def test_lora_alpha_sets_the_adapter_scale():
    assert (
        tg.LoRA(TINY, 2, 1, 96, 96.0).scale == 1.0 and tg.LoRA(TINY, 2, 1, 80, 144.0).scale == 1.8
    )
