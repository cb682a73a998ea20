"""A run as a newcomer meets it: mistyped settings, reused run folders, inputs checked at
start, --help and --dry-run, failed starts, Ctrl-C, progress lines, and EVAL_ARTIFACT without the
training settings."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_ENV, tiny_env

import train_gpt as tg
from train_gpt import ConfigError, Hyperparameters

ROOT = Path(tg.__file__).resolve().parent
CPU = torch.device("cpu")


def read_log(out_dir: Path) -> list[str]:
    return (out_dir / "train.log").read_text(encoding="utf-8").splitlines()


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in Hyperparameters().flat()} | (env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "train_gpt.py"), *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# ---------------- 1. mistyped settings ------------------------------------------------------------
@pytest.mark.parametrize(
    "name, suggestion",
    [
        ("NUM_LAYER", "NUM_LAYERS"),
        ("NUM_LAYRES", "NUM_LAYERS"),
        ("ITERATION", "ITERATIONS"),
        ("TTT_LR_DECAY", "TTT_"),
    ],
)
def test_mistyped_setting_stops_with_a_suggestion(name, suggestion):
    with pytest.raises(ConfigError, match=rf"^{name} is not a setting; did you mean {suggestion}"):
        Hyperparameters.from_env({name: "3"})


def test_torchrun_and_system_variables_are_never_refused():
    system = [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "ROLE_RANK",
        "ROLE_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
        "PATH",
        "HOME",
        "CUDA_VISIBLE_DEVICES",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "PYTHONPATH",
        "PYTHONHASHSEED",
        "TORCH_LOGS",
        "TORCH_HOME",
        "TORCHINDUCTOR_CACHE_DIR",
        "NCCL_DEBUG",
        "NCCL_IB_DISABLE",
        "MAX_JOBS",
        "HF_TOKEN",
        "HF_HOME",
        "TMPDIR",
        "DATA_DIR",
        "TOKENIZERS_PARALLELISM",
        "num_layer",
    ]
    hp = Hyperparameters.from_env(
        {**os.environ, **{name: "1" for name in system}, "MATRIX_LR": "0.03"}
    )
    assert hp.train.matrix_lr == 0.03


# ---------------- 2. run folders ------------------------------------------------------------------
def test_reused_out_dir_is_refused_unless_overwrite(tiny_hp, tmp_path):
    (tmp_path / "train.log").write_text("an earlier run\n")
    (tmp_path / "final_model.pgz").write_bytes(b"its artifact")
    (tmp_path / "runs.png").write_bytes(b"its plot")
    with pytest.raises(ConfigError, match=r"already holds a run.*OVERWRITE=1"):
        tg.main(tiny_hp(tmp_path), env={})
    assert (tmp_path / "train.log").read_text() == "an earlier run\n"
    # OVERWRITE=1: the old run's files go first.
    tg.prepare_out_dir(tmp_path, True, tg.DistEnv(0, 1, 0, CPU))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_quickstart_makes_a_fresh_run_id():
    script = (ROOT / "scripts" / "cpu_quickstart.sh").read_text()
    run_id = re.search(r"RUN_ID=\$\{RUN_ID:-([^}]*)\}", script)
    assert run_id and "$(date" in run_id[1]


# ---------------- 3-4. inputs checked at start ----------------------------------------------------
def copy_data(tiny_data, folder: Path) -> Path:
    shutil.copytree(tiny_data.path, folder)
    return folder


def test_tokenizer_is_checked_against_the_manifest(tiny_data, tiny_hp, tmp_path):
    data = copy_data(tiny_data, tmp_path / "data")
    other = hashlib.sha256(b"a tokenizer from another build").hexdigest()
    (data / "manifest.json").write_text(json.dumps({"tokenizer": {"sha256": other}}))
    with pytest.raises(ConfigError, match="TOKENIZER_PATH=.* is not the tokenizer of DATA_PATH"):
        tg.main(tiny_hp(tmp_path / "out", DATA_PATH=data), env={})
    assert not (tmp_path / "out").exists()
    own = hashlib.sha256(tiny_data.tokenizer_path.read_bytes()).hexdigest()
    (data / "manifest.json").write_text(json.dumps({"tokenizer": {"sha256": own}}))
    tg.check_data(tiny_hp(tmp_path / "out", DATA_PATH=data), training=True)


def test_damaged_training_shard_stops_the_run_before_the_first_step(tiny_data, tiny_hp, tmp_path):
    data = copy_data(tiny_data, tmp_path / "data")
    shard = data / "fineweb_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="fineweb_train_000001.bin: .* truncated or corrupt"):
        tg.main(tiny_hp(tmp_path / "out", DATA_PATH=data), env={})
    assert not (tmp_path / "out").exists() and time.perf_counter() - t0 < 10  # no training started


# ---------------- 5. EVAL_ARTIFACT ----------------------------------------------------------------
def test_eval_artifact_takes_the_architecture_from_the_artifact(tiny_run, tiny_data, tmp_path):
    """Only evaluation settings are given: the model fields and the row size come from the artifact,
    and the run's scores repeat bit for bit. A model field set here must agree with the artifact."""
    final = tiny_run[1]
    evaluation = {f.name.upper() for f in dataclasses.fields(tg.EvalConfig)}
    env = {
        k: v
        for k, v in tiny_env(tiny_data, tmp_path / "a").items()
        if k in evaluation or k.endswith("_PATH") or k == "OUT_DIR"
    } | {"EVAL_ARTIFACT": final["artifact"]}
    assert "NUM_LAYERS" not in env and "VOCAB_SIZE" not in env and "TRAIN_BATCH_TOKENS" not in env
    again = tg.main(env=env)
    for key in ("quant_val_bpb", "sliding_val_bpb", "ttt_val_bpb", "val_bytes"):
        assert again[key] == final[key]
    with pytest.raises(ConfigError, match="MODEL_DIM=64 in the artifact vs 128 here"):
        tg.main(env=dict(env, MODEL_DIM="128", OUT_DIR=str(tmp_path / "b")))


def test_eval_artifact_missing_or_unreadable_is_a_one_line_error(tiny_hp, tmp_path):
    garbage = tmp_path / "garbage.pgz"
    garbage.write_bytes(b"not an artifact")
    for path, message in (
        (tmp_path / "none.pgz", "is not a file"),
        (garbage, "not a Parameter Golf artifact"),
    ):
        with pytest.raises(ConfigError, match=message):
            tg.main(tiny_hp(tmp_path / "out", EVAL_ARTIFACT=path), env={})
    assert not (tmp_path / "out").exists()


def test_eval_rows_fit_a_cpu_and_come_from_the_artifact():
    """The default batch geometry gives rows of 98,304 tokens, whose math-attention scores would not
    fit a CPU's memory; the artifact's own row size is used, whatever TRAIN_BATCH_TOKENS says
    (evaluation does not depend on the training batch)."""
    hp = Hyperparameters.from_env({"EVAL_ARTIFACT": "x.pgz"})
    assert tg.batch_geometry(hp, 1, "math").eval_row == tg.MATH_EVAL_ROW == 4096
    assert tg.batch_geometry(hp, 1, "math", eval_row=256).eval_row == 256
    assert tg.batch_geometry(hp, 1, "flex").eval_row == 98_304
    given = Hyperparameters.from_env({"EVAL_ARTIFACT": "x.pgz", "TRAIN_BATCH_TOKENS": "8192"})
    assert tg.batch_geometry(given, 1, "math", eval_row=256).eval_row == 256


# ---------------- 6. progress ---------------------------------------------------------------------
def test_progress_lines_with_eta_and_no_gpu_warning_on_a_cpu(tiny_data, tmp_path, monkeypatch):
    # A line after every step, row, chunk and matrix.
    monkeypatch.setattr(tg, "PROGRESS_SECONDS", 0.0)
    env = tiny_env(
        tiny_data, tmp_path, ITERATIONS=12, TTT_MODE="sgd", TTT_CHUNK_TOKENS=2048, TTT_EPOCHS=1
    )
    tg.main(env=env)
    lines = read_log(tmp_path)
    steps = [line for line in lines if line.startswith("train step:")]
    assert [int(line.split("step:")[1].split("/")[0]) for line in steps] == list(range(1, 13))
    assert all("eta_s:" in line for line in steps)
    # Bounded by its budget.
    assert any(line.startswith("calib batches:") and " time_ms:" in line for line in lines)
    for what in ("gptq quantize", "eval flat", "eval sliding", "eval ttt chunk"):
        assert any(line.startswith(f"{what} done:") and " eta_s:" in line for line in lines), what
    # It warns only on GPUs.
    assert not any(line.startswith("warning") and "8_GPUs" in line for line in lines)
    read = next(line for line in lines if line.startswith("env_read "))
    assert "NUM_LAYERS=4" in read and "ITERATIONS=12" in read and "SEED" not in read


# ---------------- 7. --help, --dry-run, failures --------------------------------------------------
def test_help_lists_every_field_and_creates_nothing(tmp_path):
    proc = run_cli(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    for name, value in Hyperparameters().flat().items():
        line = next(line.split() for line in out if line.strip().startswith(f"{name}="))
        assert line[0] == f"{name}={value}" and len(line) > 1, name  # the default and a meaning
    groups = [
        out.index(f"{cls.__name__}:")
        for cls in (tg.ModelConfig, tg.TrainConfig, tg.QuantConfig, tg.EvalConfig)
    ]
    assert groups == sorted(groups) and list(tmp_path.iterdir()) == []


def test_dry_run_prints_config_params_and_backend_and_creates_nothing(tmp_path):
    env = {k: str(v) for k, v in TINY_ENV.items()} | {"DATA_PATH": str(tmp_path / "no_data_here")}
    proc = run_cli(["--dry-run"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    hp = Hyperparameters.from_env(env)
    params = sum(p.numel() for p in tg.GPT(hp.model).parameters())
    assert f"model params:{params} attn_backend:math" in proc.stdout
    assert json.loads(
        next(line for line in proc.stdout.splitlines() if line.startswith("config "))[7:]
    ) == json.loads(json.dumps(hp.flat()))
    assert list(tmp_path.iterdir()) == []


def test_failed_start_leaves_no_folder_and_a_failed_run_logs_why(tiny_hp, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="TOKENIZER_PATH"):
        tg.main(tiny_hp(tmp_path / "a", TOKENIZER_PATH=tmp_path / "none.model"), env={})
    assert not (tmp_path / "a").exists()

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(tg, "train_model", fail)
    with pytest.raises(RuntimeError):
        tg.main(tiny_hp(tmp_path / "b"), env={})
    assert read_log(tmp_path / "b")[-1] == "error RuntimeError: disk full"


def test_ctrl_c_ends_with_one_line_and_the_log_records_it(tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path / "out", ITERATIONS=100_000)
    full = {k: v for k, v in os.environ.items() if k not in Hyperparameters().flat()} | env
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train_gpt.py")],
        cwd=tmp_path,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log, deadline = tmp_path / "out" / "train.log", time.time() + 90
    while time.time() < deadline and "train step:1/" not in (
        log.read_text() if log.exists() else ""
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert (
        proc.returncode == 130
        and len(stderr.strip().splitlines()) == 1
        and stderr.startswith("interrupted")
    )
    assert read_log(tmp_path / "out")[-1].startswith("interrupted after_s:")
    # No half-written artifact.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.log"]
