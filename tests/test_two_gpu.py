"""scripts/two_gpu.py, the helpers of the two-GPU runs, on the CPU: the kernel-time
arithmetic of its profile lines, the profile window, training-only runs with every step logged, the
log report and the comparison of evaluation dumps."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_ENV

import train_gpt as tg

ROOT = Path(tg.__file__).resolve().parent
SCRIPT = ROOT / "scripts" / "two_gpu.py"
_spec = importlib.util.spec_from_file_location("two_gpu", SCRIPT)
two_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(two_gpu)


def test_kernel_times_split_busy_idle_and_exposed_collectives():
    """A 100-unit window: compute 0-40 and 50-70, a collective 30-60 (overlapped 30-40 and 50-60,
    alone 40-50), a second collective 80-90 alone: busy 80, idle 20, collectives 40, exposed 20."""
    kernels = [
        ("gemm", 0, 40),
        ("elementwise", 50, 70),
        ("ncclDevKernel_ReduceScatter", 30, 60),
        ("ncclDevKernel_AllGather", 80, 90),
        ("gemm", 10, 20),
    ]
    times = two_gpu.kernel_times(kernels, 100)
    assert times == dict(wall=100, busy=80, idle=20, nccl=40, nccl_exposed=20)
    assert two_gpu.kernel_times([], 5) == dict(wall=5, busy=0, idle=5, nccl=0, nccl_exposed=0)


def test_profile_window_wraps_a_training_step(monkeypatch, capsys):
    """The window starts at its first training step, stops after its last, prints one line per rank
    and logs it; other steps (and warmup steps, which pass step 0) pass straight through."""
    calls = []

    def fake_step(tr, batches, *, looping, lr_mult, step):
        calls.append(step)
        return torch.ones(64, 64) @ torch.ones(64, 64)

    monkeypatch.setattr(tg, "train_step", fake_step)
    window = two_gpu.ProfileWindow(2, 4)
    lines = []
    window.log = SimpleNamespace(line=lambda text, console=True: lines.append(text))
    tr = SimpleNamespace(dist=tg.DistEnv(0, 1, 0, torch.device("cpu")))
    for step in (0, 0, 1, 2, 3, 4):
        window(tr, [], looping=False, lr_mult=1.0, step=step)
    assert calls == [0, 0, 1, 2, 3, 4]
    out = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines == [line for line in out if line.startswith("profile")]
    assert lines[0].startswith("profile rank:0 steps:3-4 kernels:0 wall_ms:")
    with pytest.raises(AssertionError):
        two_gpu.ProfileWindow(0, 2)  # step 0 is also every warmup step's


@pytest.fixture(scope="module")
def steps_run(tmp_path_factory, tiny_data):
    """`two_gpu.py steps` on the CPU: a tiny run, training only, every step logged."""
    out = tmp_path_factory.mktemp("steps")
    env = {k: v for k, v in os.environ.items() if k not in tg.Hyperparameters().flat()}
    config = dict(
        TINY_ENV,
        DATA_PATH=tiny_data.path,
        TOKENIZER_PATH=tiny_data.tokenizer_path,
        VOCAB_SIZE=tiny_data.vocab_size,
        OUT_DIR=out,
        ITERATIONS=12,
        ENABLE_LOOPING_AT=0.5,
    )
    env.update({k: str(v) for k, v in config.items()}, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "steps", "--log-steps", "12"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "train.log"


def test_steps_logs_every_step_and_stops_after_training(steps_run):
    log = steps_run.read_text()
    body = log[log.index("\nconfig {") :]  # after the source code at the top of every log
    final = json.loads(log.splitlines()[-1].removeprefix("final "))
    assert final["steps"] == 12 and final["world_size"] == 1
    assert [line.split()[1] for line in body.splitlines() if line.startswith("train step:")] == [
        f"step:{s}/12" for s in range(1, 13)
    ]
    assert "\nartifact " not in body and "\nval " not in body  # no artifact, no evaluation


def test_report_of_a_run_against_itself(steps_run, tmp_path):
    out = tmp_path / "report.json"
    result = two_gpu.report_main(argparse.Namespace(logs=[steps_run, steps_run], json=out))
    assert json.loads(out.read_text()) == result
    run, comparison = result["runs"][0], result["comparisons"][0]
    assert run["world_size"] == 1 and run["loop_step"] == 6 and len(run["first_losses"]) == 12
    # speeds: steps 3-6 looping off, 9-12 on (two of each mode settle); 2048 tokens per step
    assert run["tok_s_per_gpu"]["off"] > 0 and run["tok_s_per_gpu"]["on"] > 0
    assert comparison["common_steps"] == 12 and comparison["max_loss_rel_diff"] == 0
    assert comparison["same_loop_step"] and comparison["tok_s_per_gpu_ratio"] == {
        "off": 1.0,
        "on": 1.0,
    }


def test_report_speeds_use_single_steps_of_each_mode():
    """tok/s per GPU from the step lines of single steps: settle steps, lines that cover several
    steps and profiled steps are left out; the world size divides the global rate."""
    run = dict(
        tokens=1000,
        world=2,
        loop_step=5,
        profiled={9},
        steps={
            s: dict(loss=1.0, step_ms=ms, single=s != 12)
            for s, ms in [
                (1, 9),
                (2, 9),
                (3, 10),
                (4, 10),
                (5, 30),
                (6, 99),
                (7, 99),
                (8, 20),
                (9, 1),
                (10, 20),
                (12, 1),
            ]
        },
    )
    assert two_gpu.speeds(run) == {"off": 1000 / 10 * 1000 / 2, "on": 1000 / 20 * 1000 / 2}


def test_dumps_compares_per_target_scores(tmp_path):
    nll = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    np.savez(tmp_path / "a.npz", nll=nll, bytes=np.array([1, 2, 3], dtype=np.int16))
    np.savez(tmp_path / "b.npz", nll=nll + 1e-3, bytes=np.array([1, 2, 3], dtype=np.int16))
    out = two_gpu.dumps_main(argparse.Namespace(dumps=[tmp_path / "a.npz", tmp_path / "b.npz"]))
    assert out["targets"] == [3, 3] and out["same_targets_and_bytes"]
    assert out["nll_max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
