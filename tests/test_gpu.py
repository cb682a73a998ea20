"""GPU kernels against their eager references (skipped without CUDA)."""

import pytest
import torch

import train_gpt as tg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_qkv(B: int, T: int, H: int = 8, Hkv: int = 4, D: int = 64, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn(B, T, h, D, device="cuda", generator=g, dtype=torch.bfloat16)
        for h in (H, Hkv, Hkv)
    ]


def test_piece_bounds_on_gpu_match_host():
    starts = doc_starts(2, 4096, seed=3)
    assert torch.equal(tg.piece_bounds(starts).cpu(), tg.piece_bounds(starts.cpu()))


def layout_for(starts: torch.Tensor, backend: str) -> tg.Layout:
    cfg = tg.ModelConfig()
    ids = torch.full(starts.shape, 5, device="cuda")
    return tg.make_layout(ids, starts, cfg, (backend, backend))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


FLASH = [b for b in tg.FLASH_BACKENDS if tg.flash_available(b)]
DOC_MASKED = ["flex", *FLASH]


def doc_starts(B: int, T: int, seed: int) -> torch.Tensor:
    """Rows of several documents (one of a single token, two adjacent starts), cut into pieces <=
    2048."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (B, T), generator=g)
    for row in range(B):
        ids[row, torch.randint(1, T, (5,), generator=g)] = tg.BOS_ID
    ids[0, [100, 1500, 1501]] = tg.BOS_ID
    return tg.segment_starts(ids, 2048).cuda()


def attend(backend: str, q, k, v, starts, dout):
    """Output and (dq, dk, dv) of attention with one backend; the math reference runs in float32."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if backend == "math":
        q32, k32, v32 = (t.float() for t in (q, k, v))
        out = tg.attention(q32, k32, v32, layout_for(starts, "math"))
    else:
        fn = torch.compile(tg.attention) if backend == "flex" else tg.attention
        out = fn(q, k, v, layout_for(starts, backend))
    out.backward(dout)
    return out, (q.grad, k.grad, v.grad)


@pytest.mark.parametrize("backend", DOC_MASKED)
@pytest.mark.parametrize("B, T", [(1, 4096), (2, 3072)])
def test_doc_masked_attention_matches_math(backend, B, T):
    """Values and gradients against the float32 math reference, several documents per row, bf16
    inputs."""
    starts = doc_starts(B, T, seed=T)
    q, k, v = random_qkv(B, T, seed=B)
    dout = torch.randn_like(q)
    ref, ref_grads = attend("math", q, k, v, starts, dout)
    out, grads = attend(backend, q, k, v, starts, dout)
    assert rel_err(out, ref) < 1e-2
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) < 2e-2


@pytest.mark.parametrize("backend", ["cudnn", *FLASH])
def test_dense_causal_matches_math(backend):
    q, k, v = random_qkv(4, 2048)
    ids = torch.full((4, 2048), 5, device="cuda")
    cfg = tg.ModelConfig()
    ref = tg.attention(
        q.float(), k.float(), v.float(), tg.make_layout(ids, None, cfg, ("math", "math"))
    )
    out = tg.attention(
        q,
        k,
        v,
        tg.make_layout(ids, None, cfg, ("flex" if backend == "cudnn" else backend, backend)),
    )
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("backend", DOC_MASKED)
def test_compiled_model_matches_eager(backend):
    """The fullgraph-compiled model (no graph break) against the eager math model: nll and
    gradients. A second batch with other documents but the same cu_seqlens bucket must not
    recompile."""
    torch.manual_seed(0)
    cfg = tg.ModelConfig(vocab_size=1024)
    model = tg.GPT(cfg, ("math", "math")).cuda()
    for p in model.parameters():  # leave the zero-init identity so every branch contributes
        torch.nn.init.normal_(p, std=0.02)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)

    def nll_and_grads(fn, batch):
        model.zero_grad(set_to_none=True)
        nll = tg.forward_nll(fn, batch, looping=True, device=torch.device("cuda"))
        nll.mean().backward()
        return nll.detach(), [p.grad.clone() for p in model.parameters()]

    for seed in (0, 1):
        x = torch.randint(2, 1024, (1, 4096), generator=torch.Generator().manual_seed(seed))
        x[0, torch.randint(0, 4096, (6,), generator=torch.Generator().manual_seed(seed))] = (
            tg.BOS_ID
        )
        y = torch.randint(0, 1024, x.shape)
        batch = tg.Batch(x, y, tg.segment_starts(x, 2048), max_piece=2048)
        model.backends = ("math", "math")
        eager, eager_grads = nll_and_grads(model, batch)
        model.backends = (backend, backend)
        with torch._dynamo.config.patch(error_on_recompile=seed > 0):
            out, grads = nll_and_grads(compiled, batch)
        assert rel_err(out, eager) < 2e-2
        assert (
            rel_err(
                torch.cat([g.flatten() for g in grads]),
                torch.cat([g.flatten() for g in eager_grads]),
            )
            < 5e-2
        )
