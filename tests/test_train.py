"""Sections 7-9 (Training, Evaluation, main): EMA, warmup-and-restore, the bpb meter, and tiny
end-to-end runs of main() (one shared run, plus the wallclock-cap path)."""

from __future__ import annotations

import copy
import json
import math
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import MICRO_MODEL
from torch import nn

import train_gpt as tg

CPU = torch.device("cpu")
SOLO = tg.DistEnv(0, 1, 0, CPU)  # one process, no process group
FINAL_KEYS = {
    "val_loss",
    "val_bpb",
    "val_tokens",
    "val_bytes",
    "steps",
    "train_time_ms",
    "peak_mem_mib",
    "attn_backend",
    "world_size",
    "live_val_bpb",
    "seed",
    "run_id",
    "record_legal",
}
LOSS_KEYS = ("val_loss", "val_bpb", "live_val_bpb", "train_time_ms")


# ---------------- EMA -----------------------------------------------------------------------------
def test_ema_converges_geometrically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2, bias=False))
    decay = 0.9965
    ema = tg.EMA(model, decay)
    start = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in model.parameters():  # a constant target theta, away from the EMA's start
            p.add_(torch.randn_like(p))
    theta = [p.detach().clone() for p in model.parameters()]
    for k in range(1, 201):
        ema.update()
        if k in (1, 10, 200):
            for s, s0, t in zip(ema.shadow, start, theta, strict=True):
                torch.testing.assert_close(s - t, decay**k * (s0 - t), atol=1e-6, rtol=1e-4)
    model.load_state_dict(ema.state())
    assert all(
        torch.equal(p.detach(), s) for p, s in zip(model.parameters(), ema.shadow, strict=True)
    )


def test_ema_keeps_fp32_shadow_of_bf16_weights():
    emb = nn.Embedding(10, 4)
    emb.weight.data = emb.weight.data.bfloat16()
    ema = tg.EMA(emb, 0.5)
    assert ema.shadow[0].dtype == torch.float32
    emb.load_state_dict(ema.state())
    assert emb.weight.dtype == torch.bfloat16


# ---------------- warmup and restore --------------------------------------------------------------
def build_trainer(hp: tg.Hyperparameters):
    """What main() builds, by hand: model, optimizers, Trainer and a loader factory."""
    dist_env = tg.DistEnv(0, 1, 0, CPU)
    geo = tg.batch_geometry(hp, 1, "math")
    accum, row = geo.accum, geo.row
    files = tg.shard_paths(hp.data_path, "train")
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp.model)
    opts = tg.build_optimizers(model, hp.train, dist_env)
    tr = tg.Trainer(model, model, opts, hp.train, dist_env, accum)

    def make_loader() -> tg.TrainLoader:
        return tg.TrainLoader(
            files,
            row_tokens=row,
            seq_len=hp.train.train_seq_len,
            accum=accum,
            dist_env=dist_env,
            seed=hp.seed,
        )

    return tr, make_loader


def assert_same_state(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_warmup_and_restore_is_bit_exact(tiny_hp, tmp_path, monkeypatch):
    hp = tiny_hp(tmp_path, WARMUP_STEPS=2)
    tr, make_loader = build_trainer(hp)
    loader = make_loader()
    try:
        for step in range(2):  # real steps first, so the optimizer states are not empty
            tg.train_step(tr, loader.next_batches(), looping=step == 1, lr_mult=0.7, step=step)
        params = copy.deepcopy(tr.base_model.state_dict())
        states = [copy.deepcopy(o.state_dict()) for o in tr.opts.all()]
        assert states[0]["state"] and states[1]["state"]
        calls = []
        real_step = tg.train_step
        monkeypatch.setattr(
            tg, "train_step", lambda *a, **k: calls.append(k["looping"]) or real_step(*a, **k)
        )
        tg.warmup_and_restore(tr, loader)
    finally:
        loader.close()
    assert calls == [False, False, True, True]  # WARMUP_STEPS per looping mode
    assert_same_state(tr.base_model.state_dict(), params, "model")
    assert_same_state([copy.deepcopy(o.state_dict()) for o in tr.opts.all()], states, "optimizers")
    assert tr.base_model.tok_emb.weight.dtype == torch.bfloat16
    assert all(p.grad is None for p in tr.base_model.parameters())


def test_recreated_loader_starts_at_the_first_batch(tiny_hp, tmp_path):
    _, make_loader = build_trainer(tiny_hp(tmp_path))
    first, again = make_loader(), make_loader()
    try:
        a = first.next_batches()
        first.next_batches()
        b = again.next_batches()
    finally:
        first.close()
        again.close()
    assert all(torch.equal(x.x, y.x) and torch.equal(x.y, y.y) for x, y in zip(a, b, strict=True))


def test_looping_states():
    cfg = tg.ModelConfig()
    assert tg.looping_states(tg.TrainConfig(), cfg) == (False, True)
    assert tg.looping_states(tg.TrainConfig(enable_looping_at=0.0), cfg) == (True,)
    assert tg.looping_states(tg.TrainConfig(enable_looping_at=1.5), cfg) == (False,)
    assert tg.looping_states(tg.TrainConfig(), tg.ModelConfig(num_loops=0)) == (False,)


# ---------------- evaluation ----------------------------------------------------------------------
def independent_val_bytes(tiny_data, sp) -> int:
    """UTF-8 bytes of the validation documents as SentencePiece decodes them (no LUTs)."""
    return sum(len(sp.decode(ids).encode("utf-8")) for ids in tiny_data.val_ids)


def test_uniform_logits_score_ln_v(tiny_data, sp):
    """Uniform logits give val_loss = ln V exactly, and bpb = that over ln 2 x bytes."""
    cfg = tg.ModelConfig(vocab_size=tiny_data.vocab_size, **MICRO_MODEL)
    model = tg.GPT(cfg)
    with torch.no_grad():
        model.tok_emb.weight.zero_()  # tied head: all logits are 0
    tokens = tg.load_val_tokens(tiny_data.path)
    luts = tg.load_tokenizer_luts(str(tiny_data.tokenizer_path), tiny_data.vocab_size)
    val = tg.ValData(tg.pack_val_rows(tokens, 128, 512), luts)
    result = tg.evaluate(model, val, looping=True, dist_env=SOLO)
    nbytes = independent_val_bytes(tiny_data, sp)
    assert result["val_tokens"] == tokens.size - 1 and result["val_bytes"] == nbytes
    assert result["val_loss"] == pytest.approx(math.log(tiny_data.vocab_size), abs=1e-6)
    assert result["val_bpb"] == pytest.approx(
        math.log2(tiny_data.vocab_size) * (tokens.size - 1) / nbytes, rel=1e-6
    )


def test_bpb_meter_by_hand():
    luts = tg.ByteLuts(
        base_bytes=torch.tensor([0, 0, 3, 1, 2], dtype=torch.int16),
        leading_space=torch.tensor([False, False, True, False, True]),
        boundary=torch.tensor([True, True, False, False, False]),
    )
    meter = tg.BpbMeter(SOLO)
    x = torch.tensor([[1, 2, 3, 4, 0]])
    y = torch.tensor([[2, 3, 4, 1, -1]])  # 2 after BOS: no space byte; 4 after 3: space byte
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    meter.add(nll, x, y, luts)
    r = meter.result()
    assert (r["val_tokens"], r["val_bytes"]) == (4, 3 + 1 + 3 + 0)
    assert r["val_loss"] == pytest.approx(10 / 4) and r["val_bpb"] == pytest.approx(
        10 / (math.log(2) * 7)
    )


# ---------------- main(): one tiny run ------------------------------------------------------------
def read_log(out_dir) -> list[str]:
    return (out_dir / "train.log").read_text(encoding="utf-8").splitlines()


def test_main_end_to_end(tiny_run, tiny_data, sp):
    hp, final, _ = tiny_run
    assert final.keys() >= FINAL_KEYS
    assert all(math.isfinite(final[k]) for k in LOSS_KEYS)
    assert final["steps"] == hp.train.iterations and final["world_size"] == 1
    assert (
        final["attn_backend"] == "math" and final["seed"] == hp.seed and final["run_id"] == "tiny"
    )
    assert final["val_tokens"] == tiny_data.val_tokens.size - 1
    assert final["val_bytes"] == independent_val_bytes(tiny_data, sp)
    assert final["val_bpb"] == pytest.approx(
        final["val_loss"] * final["val_tokens"] / (math.log(2) * final["val_bytes"]), rel=1e-9
    )
    assert final["peak_mem_mib"] > 0 and final["train_time_ms"] > 0
    assert final["record_legal"] is True  # no validation monitoring, calibration inside its budget


def test_main_log_file(tiny_run):
    hp, final, out_dir = tiny_run
    lines = read_log(out_dir)
    assert lines[0].startswith("source ") and lines[0].endswith("train_gpt.py")
    config = next(line for line in lines if line.startswith("config "))
    assert json.loads(config.removeprefix("config ")) == json.loads(json.dumps(hp.flat()))
    overrides = next(line for line in lines if line.startswith("overrides "))
    assert "NUM_LAYERS=4" in overrides and "ITERATIONS=40" in overrides and "SEED" not in overrides
    assert any(line.startswith("versions python:") and "torch:" in line for line in lines)
    versions = next(i for i, line in enumerate(lines) if line.startswith("versions"))
    assert lines.index(config) < lines.index(overrides) < versions
    assert sum(line.startswith("train step:") for line in lines) >= 5
    loop = next(line for line in lines if line.startswith("loop enabled"))
    # Frac = step / ITERATIONS first reaches ENABLE_LOOPING_AT = 0.3 at step 12.
    assert "step:12 " in loop
    assert lines[-1].startswith("final ") and json.loads(lines[-1].removeprefix("final ")) == final


def test_main_reads_validation_only_after_the_artifact_is_written(tiny_run):
    """Issue #1017: the artifact cannot depend on a validation token: the first `data val_tokens`
    line (the validation read) follows the `artifact` line; in scoring it follows the compile
    warmup."""
    lines = read_log(tiny_run[2])
    artifact = next(i for i, line in enumerate(lines) if line.startswith("artifact path:"))
    reads = [i for i, line in enumerate(lines) if line.startswith("data val_tokens:")]
    assert reads and min(reads) > artifact
    assert all(not line.startswith("val ") for line in lines[:artifact])


def test_loading_ema_then_live_weights_restores_the_live_weights():
    """Weights are loaded by name (TrainResult.weights): the EMA's, then the live ones exactly
    (bf16 fits fp32)."""
    emb = nn.Embedding(10, 4)
    emb.weight.data = emb.weight.data.bfloat16()
    ema = tg.EMA(emb, 0.5)
    with torch.no_grad():
        emb.weight.add_(1.0)
    live = {k: v.clone() for k, v in emb.state_dict().items()}
    emb.load_state_dict(ema.state())
    assert not torch.equal(emb.weight, live["weight"])
    emb.load_state_dict(live)
    assert torch.equal(emb.weight, live["weight"])


def test_main_learns(tiny_run):
    """4 x 64 model, looping on, 40 steps of 2048 tokens: clearly below the uniform bpb."""
    hp, final, out_dir = tiny_run
    uniform = math.log2(hp.model.vocab_size) * final["val_tokens"] / final["val_bytes"]
    assert final["val_bpb"] < 0.8 * uniform
    assert final["live_val_bpb"] < 0.8 * uniform
    losses = [
        float(line.split("loss:")[1].split()[0])
        for line in read_log(out_dir)
        if line.startswith("train step:")
    ]
    assert losses[0] == pytest.approx(math.log(hp.model.vocab_size), abs=0.1)  # starts at ln V
    assert losses[-1] < losses[0] - 1.0


def test_main_eval_artifact_rescores_the_run(tiny_run, tiny_hp, tmp_path):
    """EVAL_ARTIFACT skips training and scores a written artifact: the tiny run's score again."""
    final = tiny_run[1]
    again = tg.main(tiny_hp(tmp_path, EVAL_ARTIFACT=final["artifact"]), env={})
    assert again["val_loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    assert (again["val_tokens"], again["val_bytes"], again["steps"]) == (
        final["val_tokens"],
        final["val_bytes"],
        final["steps"],
    )
    assert not any(line.startswith("train step:") for line in read_log(tmp_path))


def test_main_stops_at_the_wallclock_cap(tiny_hp, tmp_path):
    """The training clock gets MAX_WALLCLOCK_SECONDS - GPTQ_RESERVE_SECONDS = 3 s; the LR schedule
    runs on the fraction of it used. (Written to hold on a loaded machine, where steps are slow.)"""
    # Scoring is not what this test is about.
    hp = tiny_hp(
        tmp_path,
        MAX_WALLCLOCK_SECONDS=3.5,
        GPTQ_RESERVE_SECONDS=0.5,
        ITERATIONS=100_000,
        TTT_ENABLED=0,
        SLIDING_WINDOW_ENABLED=0,
    )
    final = tg.main(hp, env={})
    lines = read_log(tmp_path)
    steps = {
        int(line.split("step:")[1].split("/")[0]): line
        for line in lines
        if line.startswith("train step:")
    }

    def field(line: str, key: str) -> float:
        return float(line.split(f"{key}:")[1].split()[0])

    step_ms = max(field(line, "step_ms") for line in steps.values())
    assert 1 <= final["steps"] < 100_000 and final["steps"] in steps
    # Stops on the step that crosses.
    assert 3000 <= final["train_time_ms"] <= 3000 + 2 * step_ms + 500
    # Step s starts at frac = (time after step s-1) / 3 s.
    for s in range(2, min(final["steps"], 5) + 1):
        frac = field(steps[s - 1], "time_ms") / 3000
        assert field(steps[s], "lr_mult") == pytest.approx(
            tg.lr_multiplier(frac, 0.85, 0.1), abs=2e-3
        )
    for line in lines:
        if line.startswith("loop enabled"):
            assert field(line, "frac") >= hp.train.enable_looping_at
    assert math.isfinite(final["val_bpb"])


def test_wallclock_cap_at_or_below_the_gptq_reserve_is_refused(tiny_hp, tmp_path):
    """MAX_WALLCLOCK_SECONDS=5 with the default 8 s reserve leaves no training time: refused at
    start (a budget of 0 would otherwise mean 'no cap')."""
    with pytest.raises(tg.ConfigError, match="MAX_WALLCLOCK_SECONDS=5"):
        tiny_hp(tmp_path, MAX_WALLCLOCK_SECONDS=5, ITERATIONS=100_000)


# ---------------- rules that cannot break silently ------------------------------------------------
def test_calibration_stops_inside_its_budget_on_training_shards_only(
    tiny_hp, tmp_path, monkeypatch
):
    """Each batch takes 100 ms of a fake clock: a 350 ms budget gets 3 batches (a 4th would end at
    400 ms), never a later end; no budget gets all 16. Only training shards are read (Issue #1017).
    """
    hp = tiny_hp(tmp_path)
    torch.manual_seed(0)
    model, clock, read, read_shard = tg.GPT(hp.model), [0.0], [], tg.read_shard
    model.register_forward_pre_hook(lambda *_: clock.__setitem__(0, clock[0] + 0.1))
    monkeypatch.setattr(tg, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(
        tg, "read_shard", lambda path: read.append(Path(path).name) or read_shard(path)
    )
    hessians, batches, ms = tg.calibrate(model, hp, SOLO, budget_ms=350)
    assert (
        batches == 3
        and ms == pytest.approx(300)
        and len(hessians) == len(hp.model.num_layers * [0]) * 6 + 1
    )
    _, batches, _ = tg.calibrate(model, hp, SOLO, budget_ms=1e9)
    assert batches == hp.quant.gptq_calibration_batches == 16
    assert read and all(name.startswith("fineweb_train_") for name in read)


def test_artifact_records_what_training_did_and_monitoring_is_not_a_record(tiny_hp, tmp_path):
    """Training ends (4 steps) before ENABLE_LOOPING_AT=0.9: the artifact says looping off, whatever
    the config. VAL_LOSS_EVERY=2 reads validation during training: a warning, and record_legal false
    in the final line."""
    hp = tiny_hp(
        tmp_path,
        ITERATIONS=4,
        ENABLE_LOOPING_AT=0.9,
        VAL_LOSS_EVERY=2,
        TTT_ENABLED=0,
        SLIDING_WINDOW_ENABLED=0,
    )
    assert tg.looping_states(hp.train, hp.model) == (False, True)  # the config would loop
    final = tg.main(hp, env={})
    header, _ = tg.unpack_artifact(Path(final["artifact"]))
    assert header["run"]["looping"] is False and header["run"]["steps"] == 4
    lines = read_log(tmp_path)
    assert any(line.startswith("train stop") and "looping:False" in line for line in lines)
    assert any(line.startswith("val step:2 ") for line in lines)  # monitoring ran
    assert final["record_legal"] is False and header["run"]["non_record"]
    # Start and end.
    assert sum(line.startswith("warning") and "VAL_LOSS_EVERY" in line for line in lines) == 2


def test_eval_clock_covers_compile_and_warmup(tiny_run, tiny_hp, tmp_path, monkeypatch):
    """Compile caches are cleared when the eval clock starts, then the warmup compiles (1 s here):
    the clock counts both, so a train+eval run reads like a fresh EVAL_ARTIFACT process. Fails on a
    copy that skips the reset (the diagnostics' graphs would serve) or that restarts the clock after
    the warmup."""
    events, warmup = [], tg.warmup_graphs
    monkeypatch.setattr(torch.compiler, "reset", lambda: events.append("reset"))

    def slow_warmup(*args, **kwargs):
        events.append("warmup")
        time.sleep(1.0)
        return warmup(*args, **kwargs)

    monkeypatch.setattr(tg, "warmup_graphs", slow_warmup)
    final = tg.main(tiny_hp(tmp_path, EVAL_ARTIFACT=tiny_run[1]["artifact"], TTT_ENABLED=0), env={})
    assert events == ["reset", "warmup"]
    line = next(line for line in read_log(tmp_path) if line.startswith("eval time "))
    laps = {k: float(v) for k, v in (f.split(":") for f in line.split()[2:]) if k.endswith("_ms")}
    assert laps["warmup_ms"] >= 1000
    clocked = [v for k, v in laps.items() if k not in ("total_ms", "projected_8gpu_fineweb_ms")]
    assert final["eval_time_ms"] >= sum(clocked) - len(clocked)  # rounding
