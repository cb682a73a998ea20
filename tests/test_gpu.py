"""GPU kernels against their eager references (skipped without CUDA)."""
import pytest
import torch

import train_gpt as tg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_qkv(B: int, T: int, H: int = 8, Hkv: int = 4, D: int = 64, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, T, h, D, device="cuda", generator=g, dtype=torch.bfloat16) for h in (H, Hkv, Hkv)]


def layout_for(starts: torch.Tensor, backend: str) -> tg.Layout:
    cfg = tg.ModelConfig()
    ids = torch.full(starts.shape, 5, device="cuda")
    return tg.make_layout(ids, starts, cfg, (backend, backend))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_flex_doc_mask_matches_math():
    T = 4096
    starts = torch.zeros(1, T, dtype=torch.bool, device="cuda")
    starts[0, [0, 100, 1500, 1501, 3000]] = True
    starts = starts | tg.segment_starts(torch.cumsum(starts, 1) * 0 + 5, 2048)  # pieces <= 2048
    q, k, v = random_qkv(1, T)
    ref = tg.attention(q, k, v, layout_for(starts, "math"))
    flex = torch.compile(tg.attention)
    out = flex(q, k, v, layout_for(starts, "flex"))
    assert rel_err(out, ref) < 1e-2


def test_cudnn_dense_causal_matches_math():
    q, k, v = random_qkv(4, 2048)
    ids = torch.full((4, 2048), 5, device="cuda")
    cfg = tg.ModelConfig()
    ref = tg.attention(q, k, v, tg.make_layout(ids, None, cfg, ("math", "math")))
    out = tg.attention(q, k, v, tg.make_layout(ids, None, cfg, ("flex", "cudnn")))
    assert rel_err(out, ref) < 1e-2


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    cfg = tg.ModelConfig(vocab_size=1024)
    model = tg.GPT(cfg, ("flex", "cudnn")).cuda()
    for p in model.parameters():  # leave the zero-init identity so every branch contributes
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randint(0, 1024, (1, 4096), device="cuda")
    x[0, ::700] = tg.BOS_ID
    starts = tg.segment_starts(x, 2048)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(x, x, starts, looping=True)
        compiled = torch.compile(model, dynamic=False)(x, x, starts, looping=True)
    assert rel_err(compiled, eager) < 2e-2
