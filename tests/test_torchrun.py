"""Ranks on the CPU: the per-rank data slices at 1, 2 and 4 ranks, and runs launched like the
real one (`python -m torch.distributed.run`, torchrun's module, with gloo ranks): a rank killed or
hung mid-run ends the whole run within a bound, and a world size that does not divide 8 either runs
like one rank (GRAD_ACCUM_STEPS set) or is refused at start. The tests marked `torchrun` start 2-4
processes each; together they take 55 s on 2 busy CPU cores (-m "not torchrun" skips them)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ENV

import train_gpt as tg

ROOT = Path(tg.__file__).resolve().parent
CPU = torch.device("cpu")
GLOBAL_SLICES = 8  # world x accum, constant: the default 8 // world accumulation
KILL_BOUND_S = 60.0  # the launcher must return this soon after a rank is killed (measured: 0.6 s)
HANG_TIMEOUT_S = 10.0  # DIST_TIMEOUT_S of the hang test (300 s in real runs)
# measured: rank 0 raises after the timeout, and torchrun returns 0.6 s later
HANG_BOUND_S = HANG_TIMEOUT_S + 30.0


# -------------------------------------------------------------- per-rank slices ---------------
def position_shards(folder: Path, sizes: list[int]) -> None:
    """Shards whose every token is its stream position + 2 (unique: any slice can be placed), except
    BOS at document starts (documents of 20..200 tokens)."""
    rng, offset = np.random.default_rng(0), 0
    for s, size in enumerate(sizes):
        tokens = (2 + offset + np.arange(size)).astype(np.uint16)
        bos = np.cumsum(rng.integers(20, 200, size=size // 20))
        tokens[np.concatenate([[0], bos[bos < size]])] = tg.BOS_ID
        tg.write_shard(folder / f"fineweb_train_{s:06d}.bin", tokens)
        offset += size


def steps_of(
    files: list[Path], *, rank: int, world: int, steps: int, seed: int = 0
) -> list[list[tg.Batch]]:
    loader = tg.TrainLoader(
        files,
        row_tokens=64,
        seq_len=32,
        accum=GLOBAL_SLICES // world,
        dist_env=tg.DistEnv(rank, world, rank, CPU),
        seed=seed,
    )
    try:
        return [loader.next_batches() for _ in range(steps)]
    finally:
        loader.close()


def stream(b: tg.Batch) -> np.ndarray:
    """The row + 1 stream tokens a micro-batch was cut from."""
    return torch.cat([b.x[0], b.y[0, -1:]]).numpy()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_slices_partition_the_one_rank_batch(tmp_path, world):
    """At the same global batch (world x accum = 8), each step's per-rank micro-batches, taken in
    slice order (slice i = rank i % world, micro-step i // world), are the one-rank step's batches
    token for token, with the same piece starts and bounds; and the 8 slices are disjoint and back
    to back in the stream, so together they are exactly one contiguous span: the one-rank batch."""
    position_shards(tmp_path, [9000, 7000])
    files = tg.shard_paths(tmp_path, "train")
    steps = 40  # 40 x 8 x 65 tokens: more than one pass over the shards
    one = steps_of(files, rank=0, world=1, steps=steps)
    ranks = [steps_of(files, rank=r, world=world, steps=steps) for r in range(world)]
    for step in range(steps):
        assert all(len(ranks[r][step]) == GLOBAL_SLICES // world for r in range(world))
        merged = [ranks[i % world][step][i // world] for i in range(GLOBAL_SLICES)]
        for got, want in zip(merged, one[step], strict=True):
            for name in ("x", "y", "starts", "cu_seqlens"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (step, name)
        span = np.concatenate([stream(b) for b in merged])
        positions = span[span != tg.BOS_ID].astype(np.int64)
        assert span.size == GLOBAL_SLICES * 65
        # contiguous: between any two non-BOS tokens, as many stream positions as span positions
        assert np.array_equal(np.diff(np.flatnonzero(span != tg.BOS_ID)), np.diff(positions))


def check_as_rank(
    files: list[Path], rank: int, world: int, seed: int, reduced: torch.Tensor | None, monkeypatch
) -> tuple[torch.Tensor, str | None]:
    """check_rank_slices as rank `rank` of `world`, its all-reduce replaced: returns (the tensor it
    contributed, the error or None); `reduced` is what the all-reduce returns (None: its input)."""
    seen = {}

    def fake_all_reduce(t: torch.Tensor, dist_env=None, op=None) -> torch.Tensor:
        seen["t"] = t.clone()
        return t if reduced is None else reduced.clone()

    monkeypatch.setattr(tg, "all_reduce_", fake_all_reduce)
    hp = tg.Hyperparameters.from_env({"TRAIN_SEQ_LEN": "32", "SEED": str(seed)})
    dist_env = tg.DistEnv(rank, world, rank, CPU)
    geo = tg.Geometry(
        accum=GLOBAL_SLICES // world, row=64, eval_row=64, eval_seq_len=32, ttt_row=64
    )
    try:
        tg.check_rank_slices(hp, dist_env, geo, files, tg.Logger(None, False))
        return seen["t"], None
    except tg.ConfigError as exc:
        return seen["t"], str(exc)


def test_start_check_of_rank_slices(tmp_path, monkeypatch):
    """The start-of-run check (the log's `data rank_slices:8 ... same_as_one_rank:True`), its
    all-reduce summed by hand over 4 simulated ranks: it passes when every rank loads its slices of
    the same data, and every rank refuses, naming the slices, when one rank reads other data (here
    another seed: seeds 5 and 7 start in different places)."""
    position_shards(tmp_path, [9000, 7000])
    files, world = tg.shard_paths(tmp_path, "train"), 4
    for seeds, ok in (([5, 5, 5, 5], True), ([5, 7, 5, 5], False)):
        total = sum(
            check_as_rank(files, r, world, seeds[r], None, monkeypatch)[0] for r in range(world)
        )
        errors = [
            check_as_rank(files, r, world, seeds[r], total, monkeypatch)[1] for r in range(world)
        ]
        if ok:
            assert errors == [None] * world
        else:  # rank 1's slots (1, 5) are not the others' one-rank step, nor theirs rank 1's
            named = [
                re.search(r"slices (\[[\d, ]*\]) of 8 differ", e)[1] if e else None for e in errors
            ]
            assert named == ["[1, 5]", "[0, 2, 3, 4, 6, 7]", "[1, 5]", "[1, 5]"], errors
            assert all("(DATA_PATH, SEED)" in e for e in errors)


def test_world_size_not_dividing_8_is_refused_naming_the_variable():
    """Today's behaviour, kept: 8 // world is the default accumulation, so a world of 3, 5, 6 or 7
    ranks stops at start naming GRAD_ACCUM_STEPS; with it set, a batch the ranks cannot split names
    TRAIN_BATCH_TOKENS. (786,432 = 3 x 2^18 tokens: 3 and 6 ranks run the default batch with
    GRAD_ACCUM_STEPS set.)"""
    for world in (3, 5, 6, 7):
        with pytest.raises(
            tg.ConfigError, match=rf"GRAD_ACCUM_STEPS=0 means 8 // world size.* is {world}; set "
        ):
            tg.batch_geometry(tg.Hyperparameters(), world, "math")
    hp = tg.Hyperparameters.from_env({"GRAD_ACCUM_STEPS": "1"})
    geo = tg.batch_geometry(hp, 3, "math")
    assert (geo.accum, geo.row) == (1, 262_144)
    with pytest.raises(
        tg.ConfigError,
        match=r"TRAIN_BATCH_TOKENS=786432 must be divisible by world size x GRAD_ACCUM_STEPS = 5",
    ):
        tg.batch_geometry(hp, 5, "math")


# -------------------------------------------------------------- launched by torchrun ----------
# Runs train_gpt.py's own `__main__` block (the error recording, the exit codes) in train_gpt's
# namespace, after the test's changes: a shorter DIST_TIMEOUT_S, and rank 1 hanging in a given
# optimizer step.
WRAPPER = r"""
import os, sys, time
sys.path.insert(0, {root!r})
import train_gpt as tg

timeout_s, hang_at = float(sys.argv[1]), int(sys.argv[2])
del sys.argv[1:]
tg.DIST_TIMEOUT_S = timeout_s
if hang_at and os.environ["RANK"] == "1":
    real_step, calls = tg.optimizer_step, [0]

    def hanging_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == hang_at:
            print("rank 1 hangs", flush=True)
            time.sleep(3600)
        return real_step(*args, **kwargs)

    tg.optimizer_step = hanging_step
source = open(tg.__file__, encoding="utf-8").read()
main_block = source[source.index('\nif __name__ == "__main__":'):]
exec(main_block, dict(vars(tg), __name__="__main__"))
"""


def tiny_env(tiny_data, out_dir: Path, **overrides: object) -> dict[str, str]:
    """The environment of a tiny CPU run (conftest's TINY_ENV on tiny_data), one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in tg.Hyperparameters().flat()}
    config = dict(
        TINY_ENV,
        DATA_PATH=tiny_data.path,
        TOKENIZER_PATH=tiny_data.tokenizer_path,
        VOCAB_SIZE=tiny_data.vocab_size,
        OUT_DIR=out_dir,
        **overrides,
    )
    env.update(
        {k: str(v) for k, v in config.items()},
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def torchrun(
    nproc: int, script: Path, args: list[str], env: dict[str, str], out: Path
) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=nproc script args`, stdout and stderr into `out`."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
        *args,
    ]
    with open(out, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> float:
    """Poll a file until a line matches; returns the time it was seen. Fails if proc ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace"), re.M):
            return time.time()
        assert proc.poll() is None, (
            f"ended (rc {proc.returncode}) before {pattern!r}:\n{path.read_text()[-3000:]}"
        )
        time.sleep(0.05)
    pytest.fail(f"no {pattern!r} within {timeout} s:\n{path.read_text()[-3000:]}")


def workers(launcher: int) -> dict[int, int]:
    """{RANK: pid} of the launcher's worker processes (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        ranks = [int(v[5:]) for v in environ if v.startswith(b"RANK=")]
        if ppid == launcher and ranks:
            found[ranks[0]] = int(stat.parent.name)
    return found


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher that still runs, and its workers first (they would outlive it)."""
    if proc.poll() is None:
        for pid in workers(proc.pid).values():
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def finish(proc: subprocess.Popen, since: float, bound: float) -> float:
    """Wait for the launcher; returns seconds from `since` to its exit. Past the bound: stops it,
    and fails."""
    try:
        proc.wait(timeout=max(1.0, since + bound - time.time()))
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(f"the launcher still ran {bound} s later: a hang")
    return time.time() - since


@pytest.mark.torchrun
def test_killed_rank_ends_the_torchrun_run(tiny_data, tmp_path):
    """SIGKILL of rank 1 during training: torchrun stops rank 0 and returns non-zero at once, its
    summary naming the killed rank and signal. The run also logged the start check of the slices."""
    env = tiny_env(tiny_data, tmp_path / "out", ITERATIONS=100_000)
    proc = torchrun(2, ROOT / "train_gpt.py", [], env, tmp_path / "torchrun.out")
    try:
        wait_for(tmp_path / "torchrun.out", r"^train step:1/", proc, timeout=120)
        pid = workers(proc.pid)[1]
        os.kill(pid, signal.SIGKILL)
        elapsed = finish(proc, time.time(), KILL_BOUND_S)
    finally:
        stop(proc)
    out = (tmp_path / "torchrun.out").read_text()
    assert proc.returncode != 0 and elapsed < KILL_BOUND_S
    killed = rf"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -9 \(pid: {pid}\)"
    assert re.search(killed, out), out[-2000:]
    log = (tmp_path / "out" / "train.log").read_text()
    assert "data rank_slices:8 world_size:2 same_as_one_rank:True" in log


@pytest.mark.torchrun
def test_hung_rank_ends_the_torchrun_run_after_the_timeout(tiny_data, tmp_path):
    """Rank 1 hangs in its second training step (it sleeps: alive, its sockets open, so only a
    timeout can tell). Rank 0's collective raises after DIST_TIMEOUT_S (lowered to 10 s here), its
    log ends with the error, and torchrun stops rank 1 and returns non-zero; its summary carries
    rank 0's error (the `record` wrapper)."""
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER.format(root=str(ROOT)))
    env = tiny_env(tiny_data, tmp_path / "out", ITERATIONS=100_000)
    # optimizer steps: WARMUP_STEPS=1 per looping mode (2), then training step 1, then 2 hangs
    proc = torchrun(2, script, [str(HANG_TIMEOUT_S), "4"], env, tmp_path / "torchrun.out")
    try:
        hung = wait_for(tmp_path / "torchrun.out", r"^rank 1 hangs", proc, timeout=120)
        elapsed = finish(proc, hung, HANG_BOUND_S)
    finally:
        stop(proc)
    out, log = (tmp_path / "torchrun.out").read_text(), (tmp_path / "out" / "train.log").read_text()
    # rank 0 may reach the collective a little before rank 1 reports its hang, hence the half
    assert proc.returncode != 0, out[-2000:]
    assert HANG_TIMEOUT_S / 2 < elapsed < HANG_BOUND_S, (elapsed, out[-2000:])
    error = log.splitlines()[-1]
    assert error.startswith("error RuntimeError: ") and re.search(r"timed out", error, re.I), error
    root_cause = out[out.index("Root Cause") :]
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)", root_cause), root_cause
    assert "RuntimeError" in root_cause, root_cause


def losses(log: str) -> dict[int, float]:
    lines = re.findall(r"^train step:(\d+)/\d+ loss:(\S+)", log, re.M)
    return {int(step): float(loss) for step, loss in lines}


@pytest.mark.torchrun
def test_three_ranks_run_like_one_rank(tiny_data, tmp_path):
    """A world size that does not divide 8 runs with GRAD_ACCUM_STEPS set: 3 ranks x 2 micro-steps
    against one process x 6 at the same global batch (1,536 tokens in rows of 256): the same steps,
    recurrence on at the same step, the logged (global) losses and the final scores equal to float
    noise (sums in another order). Measured: losses at most 2.8e-4 relative apart, val_loss 3e-5,
    live_val_bpb 2e-4; the tolerance, 1e-3, is 3.5x that."""
    common = dict(
        ITERATIONS=6,
        TRAIN_BATCH_TOKENS=1536,
        ENABLE_LOOPING_AT=0.3,
        GPTQ_CALIBRATION_BATCHES=2,
        SLIDING_WINDOW_ENABLED=0,
        TTT_MODE="sgd",
        TTT_CHUNK_TOKENS=8192,
        TTT_EPOCHS=1,
    )
    one_env = tiny_env(tiny_data, tmp_path / "one", GRAD_ACCUM_STEPS=6, **common)
    with open(tmp_path / "one.out", "w") as f:
        one = subprocess.Popen(
            [sys.executable, str(ROOT / "train_gpt.py")],
            env=one_env,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    three_env = tiny_env(tiny_data, tmp_path / "three", GRAD_ACCUM_STEPS=2, **common)
    three = torchrun(3, ROOT / "train_gpt.py", [], three_env, tmp_path / "three.out")
    try:
        assert three.wait(timeout=300) == 0, (tmp_path / "three.out").read_text()[-3000:]
        assert one.wait(timeout=300) == 0, (tmp_path / "one.out").read_text()[-3000:]
    finally:
        stop(three)
        stop(one)
    logs = [(tmp_path / name / "train.log").read_text() for name in ("one", "three")]
    finals = [json.loads(log.splitlines()[-1].removeprefix("final ")) for log in logs]
    assert "data rank_slices:6 world_size:3 same_as_one_rank:True" in logs[1]
    assert [f["world_size"] for f in finals] == [1, 3]
    assert [f["steps"] for f in finals] == [6, 6]
    loops = [re.findall(r"^loop enabled step:\d+", log, re.M) for log in logs]
    assert loops == [["loop enabled step:2"]] * 2
    one_losses, three_losses = map(losses, logs)
    common_steps = sorted(one_losses.keys() & three_losses.keys())
    assert len(common_steps) >= 5
    assert [three_losses[s] for s in common_steps] == pytest.approx(
        [one_losses[s] for s in common_steps], rel=1e-3
    )
    for key in ("val_tokens", "val_bytes"):
        assert finals[1][key] == finals[0][key], key
    for key in ("val_loss", "prequant_val_bpb", "live_val_bpb", "quant_val_bpb"):
        assert finals[1][key] == pytest.approx(finals[0][key], rel=1e-3), key
