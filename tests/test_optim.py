"""Section 6 (Optimizer): Polar Express Newton-Schulz, Muon, schedules, clipping."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from conftest import TINY_MODEL
from torch import nn

import train_gpt as tg
from train_gpt import Muon, newton_schulz

TINY = tg.ModelConfig(vocab_size=512, **TINY_MODEL)
FP32_NS = functools.partial(newton_schulz, dtype=torch.float32)
SOLO = tg.DistEnv(0, 1, 0, torch.device("cpu"))  # one process, no process group


# ---------------- Newton-Schulz -------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(512, 2048), (2048, 512), (256, 512)])
def test_newton_schulz_singular_value_band(shape):
    """Five Polar Express steps map a Gaussian's singular values into ~[0.859, 1.141] (measured)."""
    u = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(newton_schulz(u, torch.float32))
    assert s.min() > 0.85 and s.max() < 1.15
    s16 = torch.linalg.svdvals(newton_schulz(u).float())  # the default bf16 path
    assert s16.min() > 0.84 and s16.max() < 1.16


def test_newton_schulz_scale_invariant_and_transposes():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(3, 64, 160, generator=g)  # batched: per-matrix norms
    o = newton_schulz(u, torch.float32)
    assert o.shape == u.shape and o.dtype == torch.float32
    torch.testing.assert_close(newton_schulz(37.5 * u, torch.float32), o, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(newton_schulz(1e-3 * u, torch.float32), o, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(newton_schulz(u.mT, torch.float32), o.mT, atol=1e-6, rtol=1e-6)
    # each matrix is orthogonalised on its own: scaling one leaves the others alone
    scaled = u.clone()
    scaled[0] *= 100
    torch.testing.assert_close(newton_schulz(scaled, torch.float32), o, atol=1e-5, rtol=1e-4)


# ---------------- schedules -----------------------------------------------------------------------
def test_muon_momentum_warmup():
    assert tg.muon_momentum(0, 0.97) == pytest.approx(0.92)
    assert tg.muon_momentum(750, 0.97) == pytest.approx(0.945)
    assert tg.muon_momentum(1500, 0.97) == pytest.approx(0.97)
    assert tg.muon_momentum(5000, 0.97) == pytest.approx(0.97)


@pytest.mark.parametrize(
    "frac, expected",
    [
        (0.0, 1.0),
        (0.1, 1.0),
        (0.15, 1.0),
        (0.5, 0.5 / 0.85),
        (0.9, 0.1 / 0.85),
        (0.915, 0.1),
        (0.95, 0.1),
        (1.0, 0.1),
        (1.2, 0.1),
    ],
)
def test_lr_multiplier(frac, expected):
    assert tg.lr_multiplier(frac, 0.85, 0.1) == pytest.approx(expected, abs=1e-9)


def test_lr_multiplier_edges():
    assert tg.lr_multiplier(0.5, 0.85, 0.1) == pytest.approx(0.5882, abs=1e-4)
    assert tg.lr_multiplier(0.99, 0.0, 0.1) == 1.0  # no warmdown
    assert tg.lr_multiplier(0.99, 0.5, 0.0) == pytest.approx(0.02)  # no floor


# ---------------- Muon ----------------------------------------------------------------------------
def test_muon_decreases_a_quadratic():
    g = torch.Generator().manual_seed(0)
    targets = [0.1 * torch.randn(*shape, generator=g) for shape in ((32, 16), (32, 16), (16, 48))]
    params = [nn.Parameter(torch.zeros_like(t)) for t in targets]
    opt = Muon(params, lr=0.05, momentum=0.9, wd=0.0, dist_env=SOLO, orthogonalize=FP32_NS)
    losses = []
    for _ in range(30):
        loss = sum(((p - t) ** 2).sum() for p, t in zip(params, targets, strict=True))
        losses.append(loss.item())
        loss.backward()
        opt.reduce_grads()
        opt.step()
        for p in params:
            p.grad = None
    assert losses[-1] < 0.25 * losses[0]
    assert all(b < a for a, b in itertools.pairwise(losses[:11]))


def test_muon_update_rule():
    """One step by hand: Nesterov momentum, unit rows, NS, decoupled wd, sqrt(max(1, rows/cols))."""
    g = torch.Generator().manual_seed(0)
    tall, wide = (
        nn.Parameter(torch.randn(48, 16, generator=g)),
        nn.Parameter(torch.randn(16, 48, generator=g)),
    )
    start = [tall.detach().clone(), wide.detach().clone()]
    seen = []

    def spy(u):
        seen.append(u.clone())
        return FP32_NS(u)

    lr, mu, wd = 0.1, 0.9, 0.2
    opt = Muon([wide, tall], lr=lr, momentum=mu, wd=wd, dist_env=SOLO, orthogonalize=spy)
    grads = [torch.randn(48, 16, generator=g), torch.randn(16, 48, generator=g)]
    tall.grad, wide.grad = grads[0].clone(), grads[1].clone()
    sq = opt.reduce_grads()
    assert sq.item() == pytest.approx(sum(float(x.square().sum()) for x in grads), rel=1e-5)
    opt.step()
    for u in seen:  # MuonEq-R: every row of U has unit L2 norm
        torch.testing.assert_close(u.norm(dim=-1), torch.ones(u.shape[:-1]))
    # sqrt(max(1, rows/cols)), written out: the tall (48, 16) matrix steps sqrt(3) further, the wide
    # one 1
    for p, w0, grad, scale in zip((tall, wide), start, grads, (3**0.5, 1.0), strict=True):
        u = grad + mu * grad  # first step: buf = G, U = G + mu * buf
        u = u / u.norm(dim=-1, keepdim=True)
        expected = w0 * (1 - lr * wd) - lr * scale * FP32_NS(u[None])[0]
        torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)


# ---------------- build_optimizers / clipping -----------------------------------------------------
def tiny_setup(seed: int = 0, clip: float = 0.3):
    torch.manual_seed(seed)
    model = tg.GPT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = tg.TrainConfig(grad_clip_norm=clip)
    return model, tg.build_optimizers(model, cfg, dist_env=SOLO, orthogonalize=FP32_NS), cfg


def backward(model: tg.GPT, scale: float = 1.0, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 512, (1, 64), generator=g)
    ids[0, 0] = tg.BOS_ID
    (
        scale * model(ids, ids.roll(-1, 1), tg.segment_starts(ids, 32), looping=True).mean()
    ).backward()


def test_build_optimizers_groups_and_hyperparameters():
    model, opts, cfg = tiny_setup()
    assert sum(len(g["params"]) for g in opts.muon.param_groups) == 6 * TINY.num_layers
    embed, scalars = opts.adam.param_groups
    assert embed["params"] == [model.tok_emb.weight]
    assert (embed["lr"], embed["weight_decay"]) == (cfg.tied_embed_lr, cfg.embed_wd)
    assert (scalars["lr"], scalars["weight_decay"]) == (cfg.scalar_lr, cfg.adam_wd)
    assert opts.adam.defaults["betas"] == (0.9, cfg.beta2) and opts.adam.defaults["eps"] == 1e-8
    assert all((g["lr"], g["wd"]) == (cfg.matrix_lr, cfg.muon_wd) for g in opts.muon.param_groups)
    for g in opts.muon.param_groups:  # one group per matrix shape
        assert len({tuple(p.shape) for p in g["params"]}) == 1
    assert opts.base_lrs == [
        [cfg.matrix_lr] * len(opts.muon.param_groups),
        [cfg.tied_embed_lr, cfg.scalar_lr],
    ]


def test_set_schedule():
    _, opts, cfg = tiny_setup()
    opts.set_schedule(0.25, 0.93)
    for opt, lrs in zip(opts.all(), opts.base_lrs, strict=True):
        assert [g["lr"] for g in opt.param_groups] == [lr * 0.25 for lr in lrs]
    assert all(g["momentum"] == 0.93 for g in opts.muon.param_groups)
    opts.set_schedule(1.0, 0.97)
    assert [g["lr"] for g in opts.adam.param_groups] == [cfg.tied_embed_lr, cfg.scalar_lr]


def capture_applied_gradients(opts: tg.Optimizers) -> dict:
    """Record what each optimizer step receives: Muon's shards times grad_scale, AdamW's grads."""
    seen = {}
    muon_step, adam_step = opts.muon.step, opts.adam.step

    def muon(grad_scale=1.0):
        seen["muon"] = [s * grad_scale for s in opts.muon.shards]
        return muon_step(grad_scale)

    def adam(*args, **kwargs):
        seen["adam"] = [p.grad.clone() for p in opts.adam_params if p.grad is not None]
        return adam_step(*args, **kwargs)

    opts.muon.step, opts.adam.step = muon, adam
    return seen


@pytest.mark.parametrize("loss_scale, clipped", [(100.0, True), (1e-4, False)])
def test_optimizer_step_clips_global_norm(loss_scale, clipped):
    model, opts, cfg = tiny_setup()
    backward(model, loss_scale)
    grads = [p.grad.float().clone() for p in model.parameters()]
    pre = torch.stack([g.square().sum() for g in grads]).sum().sqrt()
    seen = capture_applied_gradients(opts)
    norm = tg.optimizer_step(opts, cfg.grad_clip_norm)
    torch.testing.assert_close(norm, pre, rtol=1e-5, atol=0)  # returns the pre-clip norm
    applied = [s.float() for s in seen["muon"]] + [g.float() for g in seen["adam"]]
    applied_norm = torch.stack([a.square().sum() for a in applied]).sum().sqrt()
    assert (pre > cfg.grad_clip_norm) == clipped
    if clipped:
        assert applied_norm <= cfg.grad_clip_norm + 1e-6
        assert applied_norm == pytest.approx(cfg.grad_clip_norm, rel=1e-3)
    else:
        # Unchanged below the threshold.
        torch.testing.assert_close(applied_norm, pre, rtol=1e-5, atol=0)
    assert all(p.grad is None for p in model.parameters())  # gradients cleared


def test_optimizer_step_without_clipping():
    model, opts, _ = tiny_setup(clip=0.0)
    backward(model, 100.0)
    pre = torch.stack([p.grad.float().square().sum() for p in model.parameters()]).sum().sqrt()
    seen = capture_applied_gradients(opts)
    tg.optimizer_step(opts, 0.0)
    applied = [s.float() for s in seen["muon"]] + [g.float() for g in seen["adam"]]
    torch.testing.assert_close(
        torch.stack([a.square().sum() for a in applied]).sum().sqrt(), pre, rtol=1e-5, atol=0
    )
