"""Section 8 (Quantize & serialize): GPTQ vs round-to-nearest, SDClip scales, value
ranges per bit width, the artifact container (round trip, byte shuffle, damaged files, atomic
write), the scheme table, Hessian collection, the code wrapper, and a tiny fresh-process round
trip (train + export, then EVAL_ARTIFACT in a new process that has no training shards).

Everything runs on CPU with random data from fixed seeds (never zeros: the zero-initialised output
projections are randomised before anything is quantized).
"""

from __future__ import annotations

import ast
import dataclasses
import io
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conftest import TINY_MODEL, TINY_MODEL_ENV  # noqa: E402

import train_gpt as tg  # noqa: E402

CPU = torch.device("cpu")
SOLO = tg.DistEnv(0, 1, 0, CPU)  # one process, no process group
MATH = ("math", "math")
TINY = tg.ModelConfig(vocab_size=300, **TINY_MODEL)
# Distinct values per role, so a mis-routed parameter cannot pass by coincidence.
# LQER off: these tests check stored values against q * s exactly (LQER has tests of its own).
QCFG = tg.QuantConfig(
    matrix_bits=6,
    embed_bits=7,
    attn_clip_sigmas=13.0,
    mlp_clip_sigmas=11.5,
    embed_clip_sigmas=14.0,
    lqer_top_k=0,
)


# ---------------- helpers -------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: one intra-op thread is as fast, and it keeps the suite fast when
    other processes share the two cores (OpenMP workers spin-waiting on a busy core are not)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def rtn(w: torch.Tensor, bits: int, k: float) -> torch.Tensor:
    """Round-to-nearest with SDClip scales: the baseline GPTQ must beat (and equal with H = I)."""
    s = tg.sdclip_scales(w, bits, k)
    return torch.clamp(torch.round(w.float() / s[:, None]), -qmax(bits), qmax(bits))


def proxy_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    d = w.double() - w_hat.double()
    return torch.trace(d @ h.double() @ d.T).item()


def dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s.float()[:, None]


def randomize_(model: tg.GPT, seed: int) -> tg.GPT:
    """Every parameter random (the output projections start at zero, gates at 0, scales at 1)."""
    g = torch.Generator().manual_seed(seed)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        for p in model.parameters():
            r = torch.randn(p.shape, generator=g)
            if p is model.tok_emb.weight:
                r = 0.05 * r
            elif id(p) in linear:
                r = r / math.sqrt(p.shape[1])
            else:  # control tensors: around 1 for vectors (scales), around 0 otherwise
                r = 0.3 * r + (1.0 if p.ndim == 1 else 0.0)
            p.copy_(r.to(p.dtype))
    return model


def tiny_model(seed: int = 0, cfg: tg.ModelConfig = TINY) -> tg.GPT:
    torch.manual_seed(seed)
    return randomize_(tg.GPT(cfg, MATH), seed)


def random_batches(n: int, seed: int, T: int = 128, vocab: int = TINY.vocab_size) -> list[tg.Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(4, vocab, (1, T), generator=g)
        x[0, 0] = tg.BOS_ID
        x[0, torch.randint(1, T, (3,), generator=g)] = tg.BOS_ID  # a few documents per row
        y = torch.randint(4, vocab, (1, T), generator=g)
        out.append(tg.Batch(x, y, tg.segment_starts(x, 64)))
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    """A randomised tiny model, its Hessians on random packed batches, and its written artifact."""
    model = tiny_model(seed=1)
    hessians = tg.collect_hessians(model, random_batches(2, seed=2), SOLO)
    path = tmp_path_factory.mktemp("artifact") / "final_model.pgz"
    run = dict(steps=3, looping=True, prequant_val_bpb=1.25, bytes_code=1234, seed=7)
    size = tg.write_artifact(path, model, hessians, QCFG, run)
    return model, hessians, path, size, run


# ---------------- GPTQ ----------------------------------------------------------------------------
def correlated_problem(seed: int, rows: int = 64, cols: int = 256, n: int = 4096):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    x = torch.randn(n, cols, generator=g) @ mix  # correlated inputs
    return w, x.T @ x


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    bits, k = 6, 12.85
    losses = []
    for seed in range(5):
        w, h = correlated_problem(seed)
        q, s = tg.gptq_quantize(w, h, bits, k)
        assert (
            q.dtype == torch.int8
            and s.dtype == torch.float16
            and q.shape == w.shape
            and s.shape == (64,)
        )
        assert torch.equal(s.float(), tg.sdclip_scales(w, bits, k))  # same scales as RTN
        g_loss = proxy_loss(w, dequant(q, s), h)
        r_loss = proxy_loss(w, rtn(w, bits, k) * s.float()[:, None], h)
        assert g_loss <= r_loss, f"seed {seed}: GPTQ {g_loss:.4g} > RTN {r_loss:.4g}"
        losses.append((g_loss, r_loss))
    g_mean, r_mean = np.mean(losses, axis=0)
    assert g_mean < 0.9 * r_mean, (
        f"GPTQ mean proxy loss {g_mean:.4g} not clearly below RTN {r_mean:.4g}"
    )


@pytest.mark.parametrize("kind", ["identity", "scaled_identity", "diagonal"])
def test_gptq_with_diagonal_hessian_is_round_to_nearest(kind):
    """U is diagonal for a diagonal H (damping included), so no error is propagated: exactly RTN.
    A diagonal with distinct entries also exercises the act-order permutation and its inverse."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 200, generator=g) * 0.02
    h = {
        "identity": torch.eye(200),
        "scaled_identity": 37.5 * torch.eye(200),
        "diagonal": torch.diag(torch.rand(200, generator=g) * 10 + 0.1),
    }[kind]
    for bits, k in ((6, 12.85), (7, 14.0), (6, 3.0)):  # k=3 clips: the clamp must match too
        q, s = tg.gptq_quantize(w, h, bits, k)
        assert torch.equal(q.float(), rtn(w, bits, k)), (bits, k)
        assert torch.equal(s.float(), tg.sdclip_scales(w, bits, k))


def test_gptq_dead_columns_are_zero_and_scales_come_from_the_original_rows():
    w, h = correlated_problem(4, rows=32, cols=160, n=1024)
    dead = torch.tensor([0, 5, 77, 159])
    h[dead, :] = 0
    h[:, dead] = 0
    q, s = tg.gptq_quantize(w, h, 6, 12.85)
    assert torch.equal(s.float(), tg.sdclip_scales(w, 6, 12.85))  # not from the zeroed columns
    assert torch.all(q[:, dead] == 0)
    assert torch.isfinite(dequant(q, s)).all()


@pytest.mark.parametrize("bits", [6, 7, 8])
def test_gptq_values_within_bit_width(bits):
    """A small k clips many entries: |q| <= 2^(bits-1)-1 with the bound reached."""
    w, h = correlated_problem(10 + bits, rows=32, cols=192, n=1024)
    q, _ = tg.gptq_quantize(w, h, bits, clip_sigmas=2.0)
    assert q.abs().max().item() == qmax(bits)
    q, _ = tg.gptq_quantize(w, h, bits, clip_sigmas=12.85)
    assert q.abs().max().item() <= qmax(bits)


# ---------------- SDClip --------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [6, 7, 8])
def test_sdclip_scale_is_fp16_of_k_sigma_over_r(bits):
    g = torch.Generator().manual_seed(bits)
    # Row stds over 4 decades.
    w = torch.randn(40, 300, generator=g) * torch.logspace(-3, 1, 40)[:, None]
    k = 12.85
    s = tg.sdclip_scales(w, bits, k)
    assert s.dtype == torch.float32 and s.shape == (40,)
    expected = (k * w.std(dim=1) / qmax(bits)).half()  # torch's std is unbiased
    assert torch.equal(s.half(), expected)
    assert torch.equal(s, s.half().float())  # representable in fp16
    exact = k * w.double().std(dim=1, unbiased=True) / qmax(bits)
    assert torch.all((s.double() - exact).abs() <= exact * 2.0**-11 * 1.01)  # half an fp16 ulp


def test_sdclip_gaussian_rows_are_never_clipped_by_rtn():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(128, 512, generator=g) * torch.rand(128, 1, generator=g)
    for bits in (6, 7, 8):
        s = tg.sdclip_scales(w, bits, 12.85)
        q = rtn(w, bits, 12.85)
        assert q.abs().max().item() < qmax(bits)  # P(|z| > 12.85) ~ 0: no clipping
        err = (w - q * s[:, None]).abs()
        assert torch.all(err <= s[:, None] / 2 * (1 + 2.0**-10)), bits


# ---------------- int8 rows -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 12), (16, 12), (7, 33)])
def test_quantize_int8_rows(shape):
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    w = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[0])[:, None]
    q, s = tg.quantize_int8_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (shape[0],)
    assert torch.equal(s, (w.abs().amax(dim=1) / 127).half())
    assert q.abs().max().item() <= 127
    err = (w - dequant(q, s)).abs()
    assert torch.all(err <= s.float()[:, None] / 2 + 1e-6 * w.abs()), (
        err / s.float()[:, None]
    ).max()
    assert torch.all(q.abs().amax(dim=1) >= 126)  # the row maximum uses the full range


# ---------------- container -----------------------------------------------------------------------
def sample_stored(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 6e-8, 65504.0, -1e-5]
    )
    return {
        "blocks.0.attn.c_q.weight.q": torch.randint(
            -31, 32, (7, 13), generator=g, dtype=torch.int8
        ),
        "blocks.0.attn.c_q.weight.scale": (torch.rand(7, generator=g) * 1e-2).half(),
        "tok_emb.weight.q": torch.randint(-63, 64, (30, 16), generator=g, dtype=torch.int8),
        "vec16": torch.randn(5, generator=g).half(),
        "cube16": torch.randn(2, 3, 4, generator=g).half(),
        "special16": special.half(),
        "special32": special.float(),
        "mat32": torch.randn(3, 3, generator=g),
        "scalar32": torch.randn((), generator=g),
        "int8_1d": torch.randint(-128, 128, (257,), generator=g, dtype=torch.int8),
    }


HEADER = {
    "model": dataclasses.asdict(TINY),
    "schemes": {"a": "gptq", "b": "fp16"},
    "run": {
        "steps": 3,
        "prequant_val_bpb": 1.2345678901234567,
        "note": "ünïcode ✓",
        "looping": False,
    },
}


@pytest.mark.parametrize("compressor", tg.COMPRESSORS)
def test_pack_unpack_round_trip_bit_exact(tmp_path, compressor):
    stored = sample_stored(0)
    blob = tg.pack_artifact(stored, HEADER, compressor)
    assert blob[:3] == tg.FILE_MAGIC and blob[3] == tg.COMPRESSORS.index(compressor)
    body = tg.byte_unshuffle(tg.decompress_segments(blob[8:], compressor))
    assert body[:4] == tg.ARTIFACT_MAGIC and body[4] == tg.ARTIFACT_VERSION
    path = tmp_path / "a.pgz"
    path.write_bytes(blob)
    header, out = tg.unpack_artifact(path)
    assert {k: v for k, v in header.items() if k != "tensors"} == HEADER
    assert [t[0] for t in header["tensors"]] == list(stored)
    assert list(out) == list(stored)
    for name, t in stored.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape, name
        assert raw(out[name]) == raw(t), name  # bit-exact (NaN, -0.0 included)


@pytest.mark.parametrize("n", [0, 1, 5 * 2**20 + 3])
def test_segments_round_trip_and_reject_a_bad_table(n, monkeypatch):
    monkeypatch.setattr(tg, "COMPRESS_SEGMENT", 2**20)  # several segments without much data
    data = np.random.default_rng(n).integers(0, 4, n, dtype=np.uint8).tobytes()
    packed = tg.compress_segments(data, "brotli")
    assert int.from_bytes(packed[:4], "little") == max(1, -(-n // 2**20))
    assert tg.decompress_segments(packed, "brotli") == data
    with pytest.raises(ValueError):
        tg.decompress_segments(packed[:-1], "brotli")


def test_pack_unpack_zero_element_tensor(tmp_path):
    stored = {"empty16": torch.empty(0, 64, dtype=torch.float16), "x": torch.randn(3).half()}
    path = tmp_path / "a.pgz"
    path.write_bytes(tg.pack_artifact(stored, HEADER, "brotli"))
    _, out = tg.unpack_artifact(path)
    assert out["empty16"].shape == (0, 64) and raw(out["x"]) == raw(stored["x"])


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 1000, 1001, 1002])
def test_byte_shuffle_inverse(n, stride):
    data = np.random.default_rng(n * 10 + stride).integers(0, 256, n, dtype=np.uint8).tobytes()
    shuffled = tg.byte_shuffle(data, stride)
    assert len(shuffled) == n
    assert shuffled == b"".join(data[i::stride] for i in range(stride))  # residue classes in order
    assert tg.byte_unshuffle(shuffled, stride) == data
    assert tg.byte_unshuffle(tg.byte_shuffle(data)) == data  # default stride 2


# ---------------- damaged artifacts ---------------------------------------------------------------
def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_refused(path: Path, *fragments: str) -> None:
    with pytest.raises(tg.ConfigError) as info:
        tg.unpack_artifact(path)
    msg = str(info.value)
    assert str(path) in msg
    for f in fragments:
        assert f in msg, msg


@pytest.mark.parametrize("compressor", tg.COMPRESSORS)
def test_truncated_artifact_refused(tmp_path, compressor):
    blob = tg.pack_artifact(sample_stored(1), HEADER, compressor)
    for n in sorted(
        {0, 2, 3, 4, 5, 6, 20, len(blob) // 3, len(blob) // 2, len(blob) - 7, len(blob) - 1}
    ):
        assert_refused(write(tmp_path, f"t{n}.pgz", blob[:n]))


@pytest.mark.parametrize("compressor", ["lzma", "brotli"])
def test_flipped_bytes_refused(tmp_path, compressor):
    blob = tg.pack_artifact(sample_stored(2), HEADER, compressor)
    for i, pos in enumerate(range(len(blob) // 4, 3 * len(blob) // 4, max(1, len(blob) // 40))):
        bad = bytearray(blob)
        bad[pos] ^= 0x5A
        assert_refused(write(tmp_path, f"f{i}.pgz", bytes(bad)))


def test_older_one_stream_artifact_refused_by_name(tmp_path):
    path = tmp_path / "old.pgz"
    path.write_bytes(b"PGZ" + bytes(20))
    with pytest.raises(tg.ConfigError, match=r"old\.pgz.*one-stream format"):
        tg.unpack_artifact(path)


def test_wrong_file_magic_and_compressor_id_refused(tmp_path):
    blob = tg.pack_artifact(sample_stored(3), HEADER, "brotli")
    assert_refused(write(tmp_path, "magic.pgz", b"PGX" + blob[3:]), "magic")
    assert_refused(write(tmp_path, "pickle.pgz", b"\x80\x04\x95" + blob[3:]), "magic")
    assert_refused(write(tmp_path, "id.pgz", blob[:3] + bytes([len(tg.COMPRESSORS)]) + blob[8:]))
    other = tg.COMPRESSORS.index("lzma")  # brotli data announced as lzma
    assert_refused(write(tmp_path, "swap.pgz", blob[:3] + bytes([other]) + blob[8:]))


def test_wrong_container_version_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "ARTIFACT_VERSION", tg.ARTIFACT_VERSION + 1)
    blob = tg.pack_artifact(sample_stored(4), HEADER, "brotli")
    monkeypatch.undo()
    path = write(tmp_path, "v.pgz", blob)
    assert_refused(path, f"version {tg.ARTIFACT_VERSION + 1}")


def test_wrong_container_magic_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "ARTIFACT_MAGIC", b"PGAX")
    blob = tg.pack_artifact(sample_stored(4), HEADER, "brotli")
    monkeypatch.undo()
    assert_refused(write(tmp_path, "cm.pgz", blob), "magic")


def test_undecodable_header_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(json, "dumps", lambda *args, **kwargs: '{"model": {}, "tensors": [')
    blob = tg.pack_artifact(sample_stored(5), HEADER, "brotli")
    monkeypatch.undo()
    assert_refused(write(tmp_path, "hdr.pgz", blob))


def test_tensor_past_the_end_refused(tmp_path, monkeypatch):
    """A container (consistently compressed) whose last tensor is cut short."""
    real_shuffle = tg.byte_shuffle
    monkeypatch.setattr(tg, "byte_shuffle", lambda data, stride=2: real_shuffle(data[:-3], stride))
    blob = tg.pack_artifact(sample_stored(6), HEADER, "lzma")
    monkeypatch.undo()
    assert_refused(write(tmp_path, "cut.pgz", blob))


@pytest.mark.parametrize(
    "field,value",
    [("num_loops", 2), ("vocab_size", 301), ("model_dim", 128), ("logit_softcap", 15.0)],
)
def test_architecture_mismatch_refused(tiny_artifact, field, value):
    _, _, path, _, _ = tiny_artifact
    other = dataclasses.replace(TINY, **{field: value})
    with pytest.raises(tg.ConfigError) as info:
        tg.load_artifact(path, other, MATH, CPU)
    msg = str(info.value)
    assert str(path) in msg and field.upper() in msg, msg


# ---------------- atomic write --------------------------------------------------------------------
def test_write_artifact_is_atomic(tiny_artifact, tmp_path, monkeypatch):
    model, hessians, good_path, _, run = tiny_artifact
    path = tmp_path / "final_model.pgz"
    old = b"an older artifact that must survive a failed write"
    path.write_bytes(old)

    real_write_bytes = Path.write_bytes

    def half_write(self, data):  # the disk fills up half-way through the temp file
        real_write_bytes(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_write)
    with pytest.raises(OSError):
        tg.write_artifact(path, model, hessians, QCFG, run)
    monkeypatch.undo()
    assert path.read_bytes() == old

    def no_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(OSError):
        tg.write_artifact(path, model, hessians, QCFG, run)
    monkeypatch.undo()
    assert path.read_bytes() == old

    fresh = tmp_path / "fresh" / "final_model.pgz"
    fresh.parent.mkdir()
    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(OSError):
        tg.write_artifact(fresh, model, hessians, QCFG, run)
    monkeypatch.undo()
    assert not fresh.exists()

    size = tg.write_artifact(path, model, hessians, QCFG, run)
    assert size == path.stat().st_size
    assert path.read_bytes() == good_path.read_bytes()  # deterministic output
    # No .tmp left.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["final_model.pgz"]


# ---------------- scheme table --------------------------------------------------------------------
def test_quant_schemes_route_by_role():
    model = tiny_model()
    cfg = tg.QuantConfig(
        matrix_bits=5,
        embed_bits=7,
        attn_clip_sigmas=13.0,
        mlp_clip_sigmas=11.5,
        embed_clip_sigmas=14.0,
    )
    schemes = tg.quant_schemes(model, cfg)
    names = [n for n, _ in model.named_parameters()]
    assert list(schemes) == names  # exactly one scheme per parameter
    for name, s in schemes.items():
        if name == "tok_emb.weight":
            assert s == tg.Scheme("gptq", 7, 14.0)
        elif ".attn." in name and name.endswith(
            ("c_q.weight", "c_k.weight", "c_v.weight", "proj.weight")
        ):
            assert s == tg.Scheme("gptq", 5, 13.0), name
        elif ".mlp." in name and name.endswith(("fc.weight", "proj.weight")):
            assert s == tg.Scheme("gptq", 5, 11.5), name
        elif name.endswith(".attn.out_gate"):
            assert s.kind == "int8_row" and s.bits == 8, name
        else:
            assert s.kind == "fp16", name
            assert model.get_parameter(name).numel() <= 65_536
    kinds = [s.kind for s in schemes.values()]
    L = TINY.num_layers
    assert kinds.count("gptq") == 6 * L + 1 and kinds.count("int8_row") == L
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {n for n, s in schemes.items() if s.kind == "gptq"} == linear | {"tok_emb.weight"}


# ---------------- Hessians ------------------------------------------------------------------------
def head_input_hessian(model: tg.GPT, batches: list[tg.Batch]) -> torch.Tensor:
    """Reference for the tied embedding: mean over batches of h^T h in float64, h = the final
    RMSNorm output (the head input) of the same bf16-autocast forward with looping on."""
    total = 0
    for b in batches:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            layout = tg.make_layout(b.x, b.starts, TINY, MATH)
            h = tg.rms_norm(model.trunk(model.embed(b.x, layout), layout, True, None))
        h = h.reshape(-1, h.shape[-1]).double()
        total = total + h.T @ h
    return total / len(batches)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_collect_hessians_shapes_symmetry_psd():
    model = tiny_model(seed=2)
    batches = random_batches(2, seed=3)
    hessians = tg.collect_hessians(model, batches, SOLO)
    gptq = {n for n, s in tg.quant_schemes(model, QCFG).items() if s.kind == "gptq"}
    assert set(hessians) == gptq and len(hessians) == 6 * TINY.num_layers + 1
    for name, h in hessians.items():
        w = model.get_parameter(name)
        assert h.shape == (w.shape[1], w.shape[1]), name
        h = h.double()
        assert torch.allclose(h, h.T, rtol=1e-5, atol=1e-6 * h.abs().max().item()), name
        ev = torch.linalg.eigvalsh(h)
        assert ev.min() >= -1e-4 * ev.max() and ev.max() > 0, name
    assert hessians["blocks.0.mlp.proj.weight"].shape == (256, 256)
    for i in range(TINY.num_layers):  # c_q, c_k and c_v read the same input
        hq = hessians[f"blocks.{i}.attn.c_q.weight"]
        assert torch.equal(hq, hessians[f"blocks.{i}.attn.c_k.weight"])
        assert torch.equal(hq, hessians[f"blocks.{i}.attn.c_v.weight"])

    # The tied embedding's Hessian is that of the head input (the final RMSNorm output), averaged.
    assert rel_err(hessians["tok_emb.weight"], head_input_hessian(model, batches)) < 2e-2

    # Averaged over batches: the same batch twice gives the same Hessians.
    twice = tg.collect_hessians(model, [batches[0], batches[0]], SOLO)
    once = tg.collect_hessians(model, batches[:1], SOLO)
    for name in once:
        assert rel_err(twice[name], once[name]) < 1e-2, name


def test_collect_hessians_accumulate_in_fp32():
    model = tiny_model(seed=2)
    batches = random_batches(2, seed=3)
    hessians = tg.collect_hessians(model, batches, SOLO)
    assert {h.dtype for h in hessians.values()} == {torch.float32}
    assert rel_err(hessians["tok_emb.weight"], head_input_hessian(model, batches)) < 1e-5


# ---------------- round trip ----------------------------------------------------------------------
def test_load_artifact_reproduces_the_quantized_model(tiny_artifact):
    model, _, path, size, run = tiny_artifact
    assert size == path.stat().st_size and size < tg.SIZE_CAP
    header, stored = tg.unpack_artifact(path)
    schemes = tg.quant_schemes(model, QCFG)
    assert header["schemes"] == {n: s.kind for n, s in schemes.items()}
    assert header["model"] == dataclasses.asdict(TINY) and header["run"] == dict(run, clip_mult=1.0)

    loaded, meta = tg.load_artifact(path, TINY, MATH, CPU)
    assert meta == dict(run, clip_mult=1.0)
    reference = {}
    for name, p in model.named_parameters():
        got = loaded.get_parameter(name)
        assert got.dtype == p.dtype and got.shape == p.shape, name
        kind = schemes[name].kind
        if kind == "fp16":
            assert torch.equal(stored[name], p.detach().half()), name
            want = p.detach().half().to(p.dtype)  # the fp16-rounded original
        else:
            q, s = stored[name + ".q"], stored[name + ".scale"]
            assert q.dtype == torch.int8 and s.dtype == torch.float16 and q.shape == p.shape, name
            assert q.abs().max().item() <= qmax(schemes[name].bits), name
            want = dequant(q, s).to(p.dtype)  # exactly q*s (bf16 for tok_emb)
            assert not torch.equal(want, p.detach()), name  # it really was quantized
        assert torch.equal(got.detach(), want), name
        reference[name] = want

    twin = tg.GPT(TINY, MATH)
    twin.load_state_dict(reference, strict=True)
    x = random_batches(1, seed=9)[0].x
    starts = tg.segment_starts(x, 64)
    with torch.no_grad():
        a = loaded(x, None, starts, looping=True)
        b = twin(x, None, starts, looping=True)
    assert torch.equal(a, b)


# ---------------- code wrapper --------------------------------------------------------------------
def top_level_names(source: str) -> set[str]:
    """Names bound by the module's top-level statements (defs, classes, assignments, imports),
    including optional-import try blocks, excluding the `if __name__ == "__main__":` block."""
    names: set[str] = set()

    def targets(node):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for e in node.elts:
                targets(e)

    def visit(stmts):
        for node in stmts:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    targets(t)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets(node.target)
            elif isinstance(node, ast.Import):
                names.update(a.asname or a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)

    visit(ast.parse(source).body)
    return {n for n in names if not n.startswith("__")}


# Each wrapper runs as the body of a registered module named "not_main" (so its main() is not
# called; dataclasses need the module in sys.modules), like an import of the wrapped file.
EXEC_SCRIPT = """
import json, sys, types
out = {}
for i, path in enumerate(sys.argv[1:]):
    mod = types.ModuleType("not_main")
    sys.modules["not_main"] = mod
    exec(compile(open(path, "rb").read(), path, "exec"), mod.__dict__)
    out[path] = sorted(k for k in vars(mod) if not k.startswith("__"))
print(json.dumps(out))
"""


def test_code_wrapper_defines_the_same_names_in_a_fresh_interpreter(tmp_path):
    source = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    expected = top_level_names(source)
    assert {
        "main",
        "GPT",
        "gptq_quantize",
        "ModelConfig",
        "SIZE_CAP",
        "ARTIFACT_VERSION",
        "FILE_MAGIC",
    } <= expected
    paths = []
    for compressor in tg.COMPRESSORS:
        code = tg.code_wrapper(source, compressor)
        assert len(code) < len(source.encode("utf-8")), compressor
        assert code.count(b"\n") == 2 and code.isascii()
        paths.append(tmp_path / f"wrapped_{compressor}.py")
        paths[-1].write_bytes(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", EXEC_SCRIPT, *map(str, paths)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    defined = json.loads(proc.stdout.strip().splitlines()[-1])
    for compressor, path in zip(tg.COMPRESSORS, paths, strict=True):
        got = set(defined[str(path)])
        assert got == expected | {compressor, "base64"}, (
            compressor,
            sorted(got ^ (expected | {compressor, "base64"})),
        )


# ---------------- fresh-process round trip --------------------------------------------------------
WORDS_SEED = 1234


def synthetic_documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvb"))
    p = np.linspace(2.0, 0.2, letters.size)
    words = [
        "".join(rng.choice(letters, size=int(rng.integers(1, 8)), p=p / p.sum()))
        for _ in range(150)
    ]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    docs = []
    for _ in range(n):
        w = rng.choice(words, size=int(rng.integers(15, 60)), p=zipf / zipf.sum())
        text = " ".join(w) + "."
        if rng.random() < 0.05:
            text += " ça coûte 12€"  # rare characters: left to byte fallback
        docs.append(text)
    return docs


@pytest.fixture(scope="module")
def fresh_process_data(tmp_path_factory):
    import sentencepiece as spm

    docs = synthetic_documents(260, WORDS_SEED)
    val_docs, train_docs = docs[:25], docs[25:]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_docs),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=False,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        hard_vocab_limit=False,
        num_threads=2,
        character_coverage=0.995,
        minloglevel=2,
    )
    root = tmp_path_factory.mktemp("fresh")
    tok = root / "tok.model"
    tok.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(tok))

    def stream(texts):
        return np.array([t for d in texts for t in [tg.BOS_ID, *sp.encode(d)]], dtype=np.uint16)

    full, val_only = root / "data", root / "val_only"
    full.mkdir()
    val_only.mkdir()
    train = stream(train_docs)
    tg.write_shard(full / "fineweb_val_000000.bin", stream(val_docs))
    tg.write_shard(val_only / "fineweb_val_000000.bin", stream(val_docs))
    half = train.size // 2
    tg.write_shard(full / "fineweb_train_000000.bin", train[:half])
    tg.write_shard(full / "fineweb_train_000001.bin", train[half:])
    return root, tok, sp.vocab_size(), full, val_only


def run_trainer(env_overrides: dict, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update({k: str(v) for k, v in env_overrides.items()})
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_gpt.py")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("final "), last
    return json.loads(last.removeprefix("final "))


def test_fresh_process_round_trip(fresh_process_data):
    root, tok, vocab, full, val_only = fresh_process_data
    common = dict(
        TINY_MODEL_ENV,
        TRAIN_SEQ_LEN=64,
        EVAL_SEQ_LEN=64,
        TRAIN_BATCH_TOKENS=1024,
        COMPILE=0,
        TOKENIZER_PATH=tok,
        VOCAB_SIZE=vocab,
        SEED=5,
    )
    out1 = root / "out_train"
    first = run_trainer(
        dict(
            common,
            ITERATIONS=3,
            WARMUP_STEPS=1,
            MAX_WALLCLOCK_SECONDS=0,
            GPTQ_CALIBRATION_BATCHES=2,
            DATA_PATH=full,
            OUT_DIR=out1,
            RUN_ID="train",
        ),
        root,
    )
    artifact = out1 / "final_model.pgz"
    assert artifact.is_file() and Path(first["artifact"]) == artifact and first["steps"] == 3
    assert first["val_tokens"] == tg.read_shard(val_only / "fineweb_val_000000.bin").size - 1
    log = (out1 / "train.log").read_text(encoding="utf-8")
    calib = next(line for line in log.splitlines() if line.startswith("calib "))
    # 12 x 64.
    assert (
        "batches:2 " in calib
        and f"hessians:{6 * 4 + 1} " in calib
        and "tokens_per_batch:768 " in calib
    )
    wrapped = (out1 / "train_gpt_wrapped.py").read_bytes()
    assert wrapped == tg.code_wrapper((ROOT / "train_gpt.py").read_text(encoding="utf-8"), "brotli")

    # A second process with only the validation shard (no training shard can be read) and the
    # artifact.
    second = run_trainer(
        dict(
            common,
            EVAL_ARTIFACT=artifact,
            DATA_PATH=val_only,
            OUT_DIR=root / "out_eval",
            RUN_ID="eval",
        ),
        root,
    )
    for key in (
        "val_bpb",
        "val_loss",
        "val_tokens",
        "val_bytes",
        "bytes_model",
        "bytes_code",
        "bytes_total",
        "steps",
    ):
        assert first[key] == second[key], key
    # Needs the unquantized weights.
    assert "prequant_val_bpb" in first and "prequant_val_bpb" not in second
    size = artifact.stat().st_size
    for final in (first, second):
        assert final["bytes_model"] == size
        assert final["bytes_code"] == len(wrapped)
        assert final["bytes_total"] == final["bytes_model"] + final["bytes_code"]
        assert math.isfinite(final["val_bpb"]) and final["val_bpb"] > 0
    assert not list((root / "out_eval").glob("*.pgz"))  # the eval-only run writes no artifact


# ---------------- LQER ----------------------------------------------------------------------------
def test_lqer_reduces_a_low_rank_error():
    g = torch.Generator().manual_seed(7)
    err = torch.randn(256, 4, generator=g) @ torch.randn(4, 512, generator=g) * 0.05
    err += 0.002 * torch.randn(256, 512, generator=g)
    f = tg.lqer_factors(err)
    assert f["lqA"].shape == (256, tg.LQER_RANK) and f["lqB"].shape == (tg.LQER_RANK, 512)
    assert (
        f["lqA"].min() >= -2
        and f["lqA"].max() <= 1
        and f["lqB"].min() >= -8
        and f["lqB"].max() <= 7
    )
    stored = {"w.q": torch.zeros(256, 512, dtype=torch.int8), "w.scale": torch.ones(256).half()}
    stored.update({f"w.{k}": v for k, v in f.items()})
    correction = tg.dequantize(stored, {"w": "gptq"})["w"]  # q = 0: only the LQER term remains
    assert correction.shape == err.shape
    assert (err - correction).norm() < 0.8 * err.norm()


def test_lqer_corrects_the_worst_matrices_and_round_trips(tmp_path):
    model = tiny_model(seed=4)
    hessians = tg.collect_hessians(model, random_batches(2, seed=5), SOLO)
    cfg = tg.QuantConfig(lqer_top_k=2)
    plain = tg.quantize_model(model, hessians, tg.QuantConfig(lqer_top_k=0))
    stored = tg.quantize_model(model, hessians, cfg)
    corrected = sorted(k[: -len(".lqA")] for k in stored if k.endswith(".lqA"))
    assert len(corrected) == 2
    schemes = {n: s.kind for n, s in tg.quant_schemes(model, cfg).items()}
    with_lqer, without = tg.dequantize(stored, schemes), tg.dequantize(plain, schemes)
    for name in corrected:
        w = model.get_parameter(name).detach().float()
        assert (w - with_lqer[name]).norm() < (w - without[name]).norm(), name
    path = tmp_path / "lqer.pgz"
    tg.write_artifact(path, model, hessians, cfg, {"looping": True})
    rebuilt, _ = tg.load_artifact(path, model.cfg, ("math", "math"), CPU)
    for name in corrected:
        expected = with_lqer[name].to(rebuilt.get_parameter(name).dtype)
        assert torch.equal(rebuilt.get_parameter(name).detach(), expected), name


# ---------------- fitting the cap -----------------------------------------------------------------
def test_write_artifact_fits_the_cap_by_scaling_clip_sigmas(tiny_artifact, tmp_path, monkeypatch):
    """Over the cap, every k is scaled by 2^(1.25 * 8 * overshoot / GPTQ weights) and the model
    quantized again until it fits; the factor is recorded, and an artifact under the cap is
    untouched."""
    model, hessians, _, size, run = tiny_artifact
    lines = []
    log = tg.Logger(None, False)
    log.log = lambda event, **fields: lines.append((event, fields))
    monkeypatch.setattr(tg, "SIZE_CAP", size + 1000)
    assert tg.write_artifact(tmp_path / "same.pgz", model, hessians, QCFG, run, 1000, log) == size
    assert [f["clip_mult"] for _, f in lines] == [1.0]
    lines.clear()
    monkeypatch.setattr(tg, "SIZE_CAP", int(0.93 * size))
    fitted = tg.write_artifact(tmp_path / "fit.pgz", model, hessians, QCFG, run, 1000, log)
    assert fitted + 1000 <= tg.SIZE_CAP and len(lines) >= 2
    mults = [f["clip_mult"] for _, f in lines]
    assert mults[0] == 1.0 and all(a < b for a, b in itertools.pairwise(mults))
    header, stored = tg.unpack_artifact(tmp_path / "fit.pgz")
    assert header["run"]["clip_mult"] == pytest.approx(mults[-1], rel=1e-3)
    w = model.get_parameter("blocks.0.mlp.fc.weight").detach()
    expected = tg.sdclip_scales(
        w, QCFG.matrix_bits, QCFG.mlp_clip_sigmas * header["run"]["clip_mult"]
    )
    assert torch.allclose(
        stored["blocks.0.mlp.fc.weight.scale"].float(), expected.float(), rtol=2e-3
    )


def test_write_artifact_over_the_cap_raises_and_writes_nothing(
    tiny_artifact, tmp_path, monkeypatch
):
    """Still over the cap after FIT_ATTEMPTS quantizations: a named error before anything is written
    (an older file at the path survives); only then would a caller see a result."""
    model, hessians, _, size, run = tiny_artifact
    path = tmp_path / "final_model.pgz"
    path.write_bytes(b"older")
    # 1000 bytes of code: no clip factor gets there.
    monkeypatch.setattr(tg, "SIZE_CAP", 1000 + size // 10)
    with pytest.raises(tg.ArtifactTooLarge, match="not written.*over the"):
        tg.write_artifact(path, model, hessians, QCFG, run, 1000)
    assert issubclass(tg.ArtifactTooLarge, tg.ConfigError)  # __main__ exits with its message
    assert path.read_bytes() == b"older" and [p.name for p in tmp_path.iterdir()] == [
        "final_model.pgz"
    ]
