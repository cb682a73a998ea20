"""scripts/bench.py on the CPU (--tiny): every key the speed tables are built from, with sane
values."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = (
    "gpu",
    "train_batch_tokens",
    "tok_s_looping_off",
    "tok_s_looping_on",
    "peak_mem_mib",
    "first_step_s_cold",
    "first_step_s_warm",
    "mfu_looping_on",
    "mfu_looping_off",
    "step_ms_looping_on",
    "attn_backend",
)


def test_bench_tiny_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "--tiny",
            "--steps",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    missing = [k for k in KEYS if k not in result]
    assert not missing, missing
    assert result["gpu"] == "cpu" and result["train_batch_tokens"] == 2048
    assert result["tok_s_looping_off"] > 0 and result["tok_s_looping_on"] > 0
    assert 0 < result["mfu_looping_on"] < 1
    assert result["first_step_s_warm"] > 0 and result["first_step_s_cold"] > 0
    assert len(result["step_ms_looping_on"]) == 2
    assert "tok_s_looping_off" in proc.stdout  # the printed table


def test_bench_help_explains_itself():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "--batch-tokens" in proc.stdout and "--tiny" in proc.stdout
